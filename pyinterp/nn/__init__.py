"""Neural-network modules built on pyinterp's ops."""
from pyinterp.nn.sae import BatchTopKSAE, SAEOutput, TopKSAE
from pyinterp.nn.jumprelu import JumpReLUOutput, JumpReLUSAE

__all__ = ["TopKSAE", "BatchTopKSAE", "SAEOutput", "JumpReLUSAE", "JumpReLUOutput"]
