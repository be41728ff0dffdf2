"""Distributed prompt learning on Ray: a sharded feature stage on actors, then Ray Train (DDP).

`train_distributed(DistributedTrainConfig(...))` is the library entry point; `cli_args` adds the
same options to any argparse parser (`python -m jobs.train_prompts`, `anomalyfleet train`).
Ray is imported lazily, so importing this package costs nothing until a run starts.
"""

from anomalyfleet.distributed.config import DistributedTrainConfig, resolve_storage_uri
from anomalyfleet.distributed.feature_stage import (
    DetectorSource,
    FeatureStageResult,
    ShardedFeatures,
    run_feature_stage,
)
from anomalyfleet.distributed.train_loop import (
    DistributedTrainingError,
    DistributedTrainResult,
    train_distributed,
    train_loop_per_worker,
)

__all__ = [
    "DetectorSource",
    "DistributedTrainConfig",
    "DistributedTrainResult",
    "DistributedTrainingError",
    "FeatureStageResult",
    "ShardedFeatures",
    "resolve_storage_uri",
    "run_feature_stage",
    "train_distributed",
    "train_loop_per_worker",
]
