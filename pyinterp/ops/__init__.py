"""torch.library registration of every op: Triton custom ops, fake functions, public ops with autograd.
Importing this package registers every op's OpSpec with pyinterp._dispatch."""
from pyinterp.ops import (ij_accumulate, matching_pursuit_encode, prefix_decode, resonator, sparse_decode,  # noqa: F401
                          threshold_encode, topk_encode)
