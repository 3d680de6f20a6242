"""pyinterp: fast, exact kernels for interpretability research, as PyTorch ops.

    P, Jbar = pyinterp.ij_accumulate(grads, weights, delta, P=P)      # one chunk of quadrature nodes
    result = pyinterp.attribution.integrated_jacobian(fn, x, reference)
    pair = pyinterp.attribution.explain_pair(model, "text a", "text b", layer=3)

Every op has the backends "cuda", "triton", "cpu" (C++) and "torch" (the reference); backend="auto"
picks the fastest available for the tensors' device."""
from pyinterp import _extension
from pyinterp.ops.ij_accumulate import ij_accumulate

__version__ = "0.1.0"
__all__ = ["ij_accumulate", "attribution", "__version__"]

_extension.cuda_extension()  # registers the CUDA kernels, when built
from pyinterp import attribution  # noqa: E402  (needs the ops above)
