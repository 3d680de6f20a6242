"""Neural-network modules built on pyinterp's ops."""
from pyinterp.nn.sae import BatchTopKSAE, SAEOutput, TopKSAE

__all__ = ["TopKSAE", "BatchTopKSAE", "SAEOutput"]
