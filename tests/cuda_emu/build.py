"""Builds the CUDA-on-CPU harness: kernels/cuda copied with mechanical rewrites, compiled as host C++
with tests/cuda_emu/include (emulated CUDA runtime, intrinsics, inline PTX and cub) and a driver per
kernel file, under AddressSanitizer + UBSan or ThreadSanitizer. Builds are cached by content hash
under build/cuda_emu/."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = ROOT / "kernels" / "cuda"
INCLUDE = HERE / "include"
BUILD = ROOT / "build" / "cuda_emu"

SANITIZERS = {
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    "tsan": ["-fsanitize=thread"],
}
# Run-time options: every report aborts; leaks do not matter (device buffers live to exit).
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:abort_on_error=1:report_signal_unsafe=0",
}


class RewriteError(ValueError):
    pass


def _matching(text: str, i: int, open_c: str, close_c: str, step: int) -> int:
    """Index of the bracket matching text[i] (walking forward for step 1, backward for -1)."""
    depth = 0
    while 0 <= i < len(text):
        if text[i] == open_c:
            depth += 1
        elif text[i] == close_c:
            depth -= 1
            if depth == 0:
                return i
        i += step
    raise RewriteError("unbalanced brackets")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _rewrite_launches(text: str) -> str:
    """name<<<grid, block[, smem[, stream]]>>>(args) -> ::cuda_emu::launch("name", name, ...)."""
    while (at := text.find("<<<")) >= 0:
        end_cfg = text.index(">>>", at)
        i = at - 1
        while text[i].isspace():
            i -= 1
        if text[i] == ">":  # template arguments of the kernel name
            i = _matching(text, i, ">", "<", -1) - 1
        j = i
        while j >= 0 and (text[j].isalnum() or text[j] in "_:"):
            j -= 1
        name = text[j + 1:at].strip()
        if not name:
            raise RewriteError(f"no kernel name before <<< at offset {at}")
        config = _split_top_level(text[at + 3:end_cfg])
        if not 2 <= len(config) <= 4:
            raise RewriteError(f"{name}: launch configuration {config}")
        config += ["0", "nullptr"][len(config) - 2:]
        k = end_cfg + 3
        while text[k].isspace():
            k += 1
        if text[k] != "(":
            raise RewriteError(f"{name}: no argument list after >>>")
        close = _matching(text, k, "(", ")", 1)
        args = text[k + 1:close].strip()
        call = f'::cuda_emu::launch("{name}", {name}, {", ".join(config)}' + (f", {args})" if args else ")")
        text = text[:j + 1] + call + text[close + 1:]
    return text


_DECLARATOR = re.compile(r"(\w+)((?:\s*\[[^\]]*\])*)\s*$")


def _rewrite_shared(text: str) -> str:
    """__shared__ variables -> references into the block's fresh buffers; extern __shared__ arrays ->
    pointers to the block's dynamic shared memory. Line numbers are kept."""
    text = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s*)?([\w:][\w:\s]*?)\s+(\w+)\s*\[\s*\]\s*;",
                  r"\1* \2 = reinterpret_cast<\1*>(::cuda_emu::dynamic_shared());", text)
    out = []
    for number, line in enumerate(text.split("\n"), 1):
        m = re.match(r"^(\s*)__shared__\s+(.*);\s*$", line)
        if m:
            indent, body = m.groups()
            pieces = _split_top_level(body)
            first = _DECLARATOR.search(pieces[0])
            if not first:
                raise RewriteError(f"line {number}: cannot parse {line.strip()!r}")
            base_type = pieces[0][:first.start()].strip()
            decls = []
            for piece in pieces:
                d = _DECLARATOR.search(piece) if piece is not pieces[0] else first
                name, dims = d.group(1), re.sub(r"\s+", "", d.group(2))
                key = f"{number}:{name}"
                decls.append(f'auto& {name} = ::cuda_emu::block_shared<{base_type}{dims}>("{key}");')
            line = indent + " ".join(decls)
        out.append(line)
    return "\n".join(out)


def rewrite(text: str, name: str = "source") -> str:
    text = _rewrite_shared(_rewrite_launches(text))
    for number, line in enumerate(text.split("\n"), 1):
        code = line.split("//")[0]
        if "__shared__" in code or "<<<" in code:
            raise RewriteError(f"{name}:{number}: not rewritten: {line.strip()}")
    return text


def _digest(paths: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256(" ".join(flags).encode())
    for p in sorted(paths):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(kernel: str, variant: str = "asan") -> Path:
    """The driver binary for kernels/cuda/<kernel>.cu (with <kernel>_driver.cpp), or for the
    harness's own tests/cuda_emu/selftest.cu (kernel = "selftest"), built once per content hash."""
    flags = ["-std=c++20", "-O1", "-g", "-fno-strict-aliasing", "-ffp-contract=off", "-DPYINTERP_CUDA_EMU",
             "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-variable", "-Wno-unused-function",
             *SANITIZERS[variant]]
    selftest = kernel == "selftest"
    cu = HERE / "selftest.cu" if selftest else KERNELS / f"{kernel}.cu"
    drivers = [] if selftest else [HERE / f"{kernel}_driver.cpp"]
    kernel_sources = [*KERNELS.glob("*.cu"), *KERNELS.glob("*.cuh")]
    sources = [*kernel_sources, cu, *INCLUDE.rglob("*.h"), *INCLUDE.rglob("*.cuh"), HERE / "cuda_emu.cpp",
               HERE / "driver.h", *drivers, Path(__file__)]
    out_dir = BUILD / variant / f"{kernel}-{_digest(sorted(set(sources)), flags)}"
    binary = out_dir / kernel
    if binary.exists():
        return binary
    work = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    (work / "kernels").mkdir(parents=True)
    for src in [*kernel_sources, cu]:
        dst = work / "kernels" / src.name
        dst.write_text(rewrite(src.read_text(), src.name))  # .cuh too: shared device code launches
    cmd = ["g++", *flags, "-I", str(INCLUDE), "-I", str(work / "kernels"), "-I", str(HERE),
           "-include", "cuda_emu_ptx.h", "-x", "c++", str(work / "kernels" / cu.name), "-x", "none",
           *map(str, drivers), str(HERE / "cuda_emu.cpp"), "-o", str(work / kernel)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the {kernel} harness failed:\n{' '.join(cmd)}\n{result.stderr[-8000:]}")
    shutil.rmtree(out_dir, ignore_errors=True)
    work.rename(out_dir)
    return binary


def run(binary: Path, case_dir: Path, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **SANITIZER_ENV, "CUDA_EMU_TIMEOUT": str(int(timeout)), **(env or {})}
    return subprocess.run([str(binary), str(case_dir)], capture_output=True, text=True, env=full_env,
                          timeout=timeout + 30)
