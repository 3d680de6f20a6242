"""Vector-symbolic architectures: resonator-network factorisation (pyinterp.vsa.resonator), its
capacity harness, and the vector helpers."""
from pyinterp.ops.resonator import resonator
from pyinterp.reference.resonator import ResonatorResult
from pyinterp.vsa.capacity import CapacityPoint, CapacityReport, capacity, iteration_cap
from pyinterp.vsa.demo import demo
from pyinterp.vsa.vectors import bind, random_codebooks, random_problems, similarity, unbind

__all__ = ["resonator", "ResonatorResult", "capacity", "iteration_cap", "CapacityPoint",
           "CapacityReport", "demo", "bind", "unbind", "similarity", "random_codebooks",
           "random_problems"]
