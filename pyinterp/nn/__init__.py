"""Neural-network modules built on pyinterp's ops."""
from pyinterp.nn.cross_layer_transcoder import CLTOutput, CrossLayerTranscoder
from pyinterp.nn.jumprelu import JumpReLUOutput, JumpReLUSAE
from pyinterp.nn.matching_pursuit import MatchingPursuitSAE
from pyinterp.nn.matryoshka import MatryoshkaBatchTopKSAE, MatryoshkaOutput
from pyinterp.nn.sae import BatchTopKSAE, SAEOutput, TopKSAE
from pyinterp.nn.transcoder import TopKTranscoder

__all__ = ["TopKSAE", "BatchTopKSAE", "TopKTranscoder", "SAEOutput", "JumpReLUSAE", "JumpReLUOutput",
           "CrossLayerTranscoder", "CLTOutput", "MatryoshkaBatchTopKSAE", "MatryoshkaOutput",
           "MatchingPursuitSAE"]
