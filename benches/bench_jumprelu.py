"""JumpReLU (docs/sae_family.md, "JumpReLU") on the docs/sae.md shapes, all providers of a case in
interleaved rounds:
- inference encode: pyinterp.threshold_encode per backend vs the dense torch encode (GEMM + bias,
  then the threshold, as SAELens does it) and SAELens' JumpReLUSAE.encode;
- training step (forward, backward, Adam): pyinterp's Trainer on a JumpReLUSAE vs SAELens'
  JumpReLUTrainingSAE as its trainer drives it, with the same initial weights, thresholds, L0
  coefficient ("step" loss) and bandwidth.
The thresholds are set from the data so that about k latents per token are active (k of the shape);
pyinterp caps the active latents at 4k per token (truncated rows are counted, and are rare here)."""
from __future__ import annotations

import pytest
import torch

import pyinterp
from sae_shapes import ALL_SHAPES, bench_device, measure_and_record, sae_case, saelens_training, synchronize
from pyinterp.sae import TensorSource, TrainConfig, Trainer, build_sae

ENCODE_PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "torch-dense", "saelens")
TRAIN_PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "saelens")
DEVICE = bench_device()
BANDWIDTH = 0.05        # SAELens' default jumprelu_bandwidth
L0_COEFFICIENT = 1e-3
CAP_PER_K = 4           # max_active = 4k


def problem(tokens: int, width: int, latents: int, k: int, dtype: torch.dtype):
    """x, W_enc (M, D), b_enc, b_dec, W_dec, threshold: unit-norm random directions, and thresholds at
    the (1 - k/M) quantile of a sample's pre-activations (about k active per token) plus a spread."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(tokens, width, device=DEVICE, generator=g) + 1
    W_enc = torch.randn(latents, width, device=DEVICE, generator=g)
    W_enc /= W_enc.norm(dim=1, keepdim=True)
    b_enc = torch.zeros(latents, device=DEVICE)
    b_dec = x.mean(0)
    z = (x[:256] - b_dec) @ W_enc.T
    cut = z.flatten().kthvalue(int(z.numel() * (1 - k / latents))).values
    threshold = cut + 0.1 * torch.rand(latents, device=DEVICE, generator=g)
    return [t.to(dtype) for t in (x, W_enc, b_enc, b_dec, W_enc.clone(), threshold)]


def saelens_inference(W_enc, b_enc, b_dec, W_dec, threshold):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    latents, width = W_enc.shape
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=width, d_sae=latents, device=DEVICE))
    with torch.no_grad():
        for name, value in (("W_enc", W_enc.T), ("b_enc", b_enc), ("b_dec", b_dec), ("W_dec", W_dec),
                            ("threshold", threshold)):
            getattr(sae, name).copy_(value)
    return sae


@pytest.mark.parametrize("shape", list(ALL_SHAPES))
def test_jumprelu_encode(record, progress, request, shape):
    case = sae_case("jumprelu_encode", request, record, shape, "forward", ENCODE_PROVIDERS)
    x, W_enc, b_enc, b_dec, W_dec, threshold = problem(case.tokens, case.width, case.latents, case.k, case.dtype)
    cap = CAP_PER_K * case.k
    steps = {}
    for provider in case.providers:
        if provider.startswith("pyinterp-"):
            def encode(backend=provider.removeprefix("pyinterp-")):
                return pyinterp.threshold_encode(x, W_enc, b_enc, threshold, cap, b_dec=b_dec, backend=backend)
        elif provider == "saelens":
            encode = saelens_inference(W_enc, b_enc, b_dec, W_dec, threshold).encode
            encode = (lambda f: lambda: f(x))(encode)
        else:
            def encode():
                z = (x - b_dec) @ W_enc.T + b_enc
                return torch.where(z > threshold, z, 0)

        def step(encode=encode):
            with torch.no_grad():
                encode()
            synchronize(DEVICE)
        steps[provider] = step
    measure_and_record(case, steps, record, progress, work=2 * case.tokens * case.latents * case.width,
                       unit="TFLOP/s")
    # The thresholds must give a sparse code for the comparison to mean anything.
    check = pyinterp.threshold_encode(x[:256], W_enc, b_enc, threshold, cap, b_dec=b_dec, backend="torch")
    progress(f"{case.label}: mean active {check.counts.float().mean():.1f} per token, cap {cap}, "
             f"{int(check.truncated_rows)} of 256 sampled tokens over the cap")


def pyinterp_train_step(backend, x, W_enc, b_enc, b_dec, W_dec, threshold, cap):
    sae = build_sae("jumprelu", x.shape[1], W_enc.shape[0], cap, backend=backend, device=DEVICE,
                    bandwidth=BANDWIDTH, l0_coefficient=L0_COEFFICIENT)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("threshold", threshold)):
            getattr(sae, name).copy_(value)
    config = TrainConfig(tokens=10**12, batch_size=x.shape[0], progress=False,
                         precision="bf16" if DEVICE == "cuda" else "fp32")
    return Trainer(sae, TensorSource(x.cpu()), config).train_step


def saelens_train_step(x, W_enc, b_enc, b_dec, W_dec, threshold):
    """SAELens' JumpReLU training SAE ("step" L0 loss) driven as its SAETrainer._train_step does."""
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    latents, width = W_enc.shape
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=width, d_sae=latents, device=DEVICE, jumprelu_bandwidth=BANDWIDTH,
        jumprelu_sparsity_loss_mode="step", l0_coefficient=L0_COEFFICIENT))
    with torch.no_grad():
        for name, value in (("W_enc", W_enc.T), ("b_enc", b_enc), ("b_dec", b_dec), ("W_dec", W_dec),
                            ("threshold", threshold)):
            getattr(sae, name).copy_(value)
    return saelens_training(sae, x, coefficients={"l0": L0_COEFFICIENT}, dead_mask=None)


@pytest.mark.parametrize("shape", list(ALL_SHAPES))
def test_jumprelu_train_step(record, progress, request, shape):
    case = sae_case("jumprelu_train_step", request, record, shape, "train step", TRAIN_PROVIDERS)
    tensors = problem(case.tokens, case.width, case.latents, case.k, torch.float32)
    steps = {}
    for provider in case.providers:
        if provider.startswith("pyinterp-"):
            train_step = pyinterp_train_step(provider.removeprefix("pyinterp-"), *tensors, CAP_PER_K * case.k)
        else:
            train_step = saelens_train_step(*tensors)

        def timed(train_step=train_step):
            train_step()
            synchronize(DEVICE)
        steps[provider] = timed
    measure_and_record(case, steps, record, progress, work=case.tokens, unit="tok/s")
