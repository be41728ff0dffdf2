"""Distributed prompt learning on Ray: a sharded feature stage on actors, then Ray Train (DDP).

`train_distributed(DistributedTrainConfig(...))` is the library entry point; `cli_args` adds the
same options to any argparse parser (`python -m jobs.train_prompts`, `anomalyfleet train`).
Ray is imported lazily, so importing this package costs nothing until a run starts.
"""

# Submodules load on first use (PEP 562), so building a command line that mentions this package
# does not import torch and Ray.
_EXPORTS = {
    "DistributedTrainConfig": "config", "resolve_storage_uri": "config",
    "DetectorSource": "feature_stage", "FeatureStageResult": "feature_stage",
    "ShardedFeatures": "feature_stage", "run_feature_stage": "feature_stage",
    "DistributedTrainingError": "train_loop", "DistributedTrainResult": "train_loop",
    "train_distributed": "train_loop", "train_loop_per_worker": "train_loop",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


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
