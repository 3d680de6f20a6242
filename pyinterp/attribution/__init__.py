"""Integrated gradients and integrated Jacobians of any callable, and pairwise token attribution for
bi-encoders (Moeller et al., "An Attribution Method for Siamese Encoders", EMNLP 2023); see
attribution.md in the project specs for the math."""
from pyinterp.attribution.integrated import (IntegratedGradients, IntegratedJacobian, integrated_gradients,
                                             integrated_jacobian)
from pyinterp.attribution.quadrature import METHODS, nodes_and_weights

__all__ = ["METHODS", "nodes_and_weights", "IntegratedJacobian", "IntegratedGradients",
           "integrated_jacobian", "integrated_gradients"]
