"""Drop-in: pyinterp's fused SAE ops inside other SAE libraries, explicit opt-in per host.

    from pyinterp.integrations import sparsify             # EleutherAI sparsify (eai-sparsify)
    from pyinterp.integrations import saelens              # SAELens' TopKTrainingSAE
    from pyinterp.integrations import dictionary_learning  # dictionary_learning's TopKTrainer

Importing this package or a host module patches nothing and does not import the host; each host
module's apply() checks the host's version and the signatures it replaces (HostMismatch otherwise)
and returns the Patches, which revert() undoes. Each module's docstring says what differs between
its "faithful" and "fused" modes."""
from pyinterp.integrations._patching import HostMismatch, Patches

__all__ = ["HostMismatch", "Patches"]
