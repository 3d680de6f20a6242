"""Neural-network modules built on pyinterp's ops."""
from pyinterp.nn.jumprelu import JumpReLUOutput, JumpReLUSAE
from pyinterp.nn.matching_pursuit import MatchingPursuitSAE
from pyinterp.nn.sae import BatchTopKSAE, SAEOutput, TopKSAE
from pyinterp.nn.transcoder import TopKTranscoder

__all__ = ["TopKSAE", "BatchTopKSAE", "TopKTranscoder", "SAEOutput", "JumpReLUSAE", "JumpReLUOutput", "MatchingPursuitSAE"]
