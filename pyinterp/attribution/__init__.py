"""Integrated gradients and integrated Jacobians of any callable, pairwise token attribution for
bi-encoders (Moeller et al., "An Attribution Method for Siamese Encoders", EMNLP 2023) and attribution
to SAE features; docs/attribution.md has the math."""
from pyinterp.attribution.encoders import (FeaturePairs, PairExplanation, TextAttribution, attribute_texts,
                                           explain_pair)
from pyinterp.attribution.integrated import (IntegratedGradients, IntegratedJacobian, integrated_gradients,
                                             integrated_jacobian)
from pyinterp.attribution.quadrature import METHODS, nodes_and_weights
from pyinterp.attribution.sae import SAEAttribution, sae_attribution, sae_feature_attribution

__all__ = ["METHODS", "nodes_and_weights", "IntegratedJacobian", "IntegratedGradients", "integrated_jacobian",
           "integrated_gradients", "explain_pair", "attribute_texts", "PairExplanation", "FeaturePairs",
           "TextAttribution", "SAEAttribution", "sae_attribution", "sae_feature_attribution"]
