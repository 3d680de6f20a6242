"""What every host integration shares: the host's version and signature checks, and patches that
are applied and reverted explicitly (nothing is patched on import)."""
from __future__ import annotations

import importlib.metadata
import inspect
import types
from typing import Any, Callable

import torch
from packaging.version import Version


class HostMismatch(RuntimeError):
    """The host library is not the version, or does not have the functions, this integration was
    written against; patching it would silently change nothing or the wrong thing."""


def host_version(distribution: str) -> Version:
    try:
        return Version(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        raise HostMismatch(f"{distribution} is not installed (pip install {distribution})") from None


def supported_version(distribution: str, supported: tuple[str, str]) -> Version:
    """The installed version of `distribution` if low <= version < high for supported = (low, high),
    else HostMismatch naming the host and its version."""
    version = host_version(distribution)
    low, high = supported
    if not Version(low) <= version < Version(high):
        raise HostMismatch(f"{distribution} {version} is outside the supported range [{low}, {high}) of "
                           f"pyinterp.integrations; its functions may have changed, so nothing was patched")
    return version


def check_signature(qualname: str, function: Callable, parameters: tuple[str, ...], distribution: str,
                    version: Version) -> None:
    """The parameter names of `function` are exactly `parameters`, else HostMismatch naming it."""
    found = tuple(inspect.signature(function).parameters)
    if found != parameters:
        raise HostMismatch(f"{qualname} of {distribution} {version} takes ({', '.join(found)}), expected "
                           f"({', '.join(parameters)}); nothing was patched")


class Patches:
    """A set of attribute replacements applied together and reverted together. A revert that finds
    an attribute changed by someone else since apply() raises rather than undo their change."""

    def __init__(self, description: str, mode: str):
        self.description, self.mode = description, mode
        self._applied: list[tuple[Any, str, Any, Any, bool]] = []

    @property
    def active(self) -> bool:
        return bool(self._applied)

    def set(self, owner: Any, name: str, replacement: Any) -> None:
        had_own = name in vars(owner)
        original = vars(owner).get(name)
        setattr(owner, name, replacement)
        self._applied.append((owner, name, original, replacement, had_own))

    def revert(self) -> None:
        for owner, name, _, replacement, _ in self._applied:
            if vars(owner).get(name) is not replacement:
                raise RuntimeError(f"{self.description}: {owner!r}.{name} was replaced by someone else after "
                                   "pyinterp patched it; not reverting")
        for owner, name, original, _, had_own in reversed(self._applied):
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._applied.clear()

    def __enter__(self) -> "Patches":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


MODES = ("faithful", "fused")


def check_mode(where: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")


class ClassPatches:
    """The one class-level application of a host integration: apply() twice raises, revert()
    undoes it."""

    def __init__(self, integration: str):
        self.integration = integration
        self.current: Patches | None = None

    def start(self, mode: str) -> Patches:
        if self.is_applied():
            raise RuntimeError(f"{self.integration}.apply: already applied (mode {self.current.mode!r}); "
                               "revert() first")
        self.current = Patches(self.integration, mode)
        return self.current

    def start_instance(self, instance: Any, attribute: str, mode: str) -> Patches:
        if attribute in vars(instance):
            raise RuntimeError(f"{self.integration}.apply: this {type(instance).__name__} is patched already")
        return Patches(f"{self.integration} ({type(instance).__name__} instance)", mode)

    def patch_method(self, cls: type, instance: Any, name: str, function: Callable, mode: str) -> Patches:
        """Replace method `name` of one instance (when given) or of `cls`, by `function`."""
        if instance is not None:
            patches = self.start_instance(instance, name, mode)
            patches.set(instance, name, types.MethodType(function, instance))
            return patches
        patches = self.start(mode)
        patches.set(cls, name, function)
        return patches

    def revert(self) -> None:
        """Undo the class-level apply() (an instance's: revert() the Patches its apply() returned)."""
        if not self.is_applied():
            raise RuntimeError(f"{self.integration}.revert: not applied")
        self.current.revert()
        self.current = None

    def is_applied(self) -> bool:
        return self.current is not None and self.current.active


def check_functions(module: Any, signatures: dict[str, tuple[str, ...]], distribution: str,
                    version: Version) -> None:
    """Every "name" or "Class.name" of `signatures` exists in `module` with exactly those parameters."""
    for name, parameters in signatures.items():
        function = module
        for part in name.split("."):
            function = getattr(function, part, None)
        qualname = f"{module.__name__}.{name}"
        if function is None:
            raise HostMismatch(f"{qualname} is missing in {distribution} {version}; nothing was patched")
        check_signature(qualname, function, parameters, distribution, version)


def checked_host(module_name: str, distribution: str, supported: tuple[str, str],
                 signatures: dict[str, tuple[str, ...]]) -> tuple[Any, Version]:
    """The host module `module_name`, imported only after its distribution's version is in the
    supported range, with every function of `signatures` checked."""
    import importlib

    version = supported_version(distribution, supported)
    module = importlib.import_module(module_name)
    check_functions(module, signatures, distribution, version)
    return module, version


def compute_dtype(reference: torch.Tensor) -> torch.dtype:
    """The dtype a host's own matmuls on `reference` would run in: autocast's when it is on (the
    custom ops are not autocast-aware, so the integrations cast for them)."""
    device_type = reference.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else reference.dtype
