"""Integrated gradients and integrated Jacobians, and pairwise token attribution for bi-encoders."""
from pyinterp.attribution.quadrature import METHODS, nodes_and_weights

__all__ = ["METHODS", "nodes_and_weights"]
