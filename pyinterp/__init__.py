"""pyinterp: fast, exact kernels for interpretability research, as differentiable PyTorch ops.

    values, indices = pyinterp.topk_encode(x, W_enc, b_enc, k, b_dec=b_dec)
    x_hat = pyinterp.sparse_decode(values, indices, W_dec, b_dec)
    nested = pyinterp.prefix_decode(values, indices, W_dec, [M // 4, M // 2, M], b_dec)  # Matryoshka
    P, Jbar = pyinterp.ij_accumulate(grads, weights, delta, P=P)      # one chunk of quadrature nodes
    pair = pyinterp.attribution.explain_pair(model, "text a", "text b", layer=3)
    result = pyinterp.vsa.resonator(s, codebooks, max_iters=100)

Every op has the backends "cuda", "triton", "cpu" (C++) and "torch" (the reference); backend="auto"
picks the fastest available for the tensors' device. `pyinterp info` says which are available."""
from pyinterp import _extension
from pyinterp.ops.ij_accumulate import ij_accumulate
from pyinterp.ops.prefix_decode import prefix_decode
from pyinterp.ops.matching_pursuit_encode import matching_pursuit_encode
from pyinterp.ops.sparse_decode import sparse_decode
from pyinterp.ops.threshold_encode import threshold_encode
from pyinterp.ops.topk_encode import topk_encode

__version__ = "0.1.0"
__all__ = ["topk_encode", "threshold_encode", "matching_pursuit_encode", "sparse_decode", "prefix_decode", "ij_accumulate",
           "attribution", "vsa", "__version__"]

_extension.cuda_extension()  # registers the CUDA kernels, when built
from pyinterp import attribution, vsa  # noqa: E402  (need the ops above)
