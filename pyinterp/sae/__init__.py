"""Training top-k SAEs on pyinterp's fused ops: data sources, trainer, checkpoints, multi-process."""
from pyinterp.sae.data import ShardSource, ShuffledStream, TensorSource, harvest_model_activations
from pyinterp.sae.distributed import LatentShardedTopKSAE, ParallelContext, parallel_context
from pyinterp.sae.trainer import DeadLatents, TrainConfig, Trainer, build_sae

__all__ = ["TrainConfig", "Trainer", "build_sae", "DeadLatents", "TensorSource", "ShardSource",
           "ShuffledStream", "harvest_model_activations", "LatentShardedTopKSAE", "ParallelContext",
           "parallel_context"]
