"""The scoring service on a local Ray, for the tests that need it running: tiny detector bundles and
the app deployed on 127.0.0.1 with Ray's metrics export on a port of the test's choosing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def make_bundle(clip_file: Path, path: Path, seed: int, threshold: float | None,
                layers: tuple[int, ...] = (6,)) -> Path:
    """A bundle of an untrained detector on the tiny CLIP; `threshold` None keeps the detector's own."""
    from anomalyfleet.backbones import BackboneSpec
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.detector import Detector

    detector = Detector.create(BackboneSpec(kind="openai_file", pretrained=str(clip_file)),
                               image_size=56, layers=layers, dpam_layers=4, seed=seed)
    if threshold is not None:
        detector.thresholds["image"] = threshold
    return save_bundle(detector, path)


@contextmanager
def local_serve(config, http_port: int, metrics_port: int, **init_kwargs) -> Iterator[str]:
    """Ray on 127.0.0.1 running the app built from `config` at `/`; yields its base URL.

    Metrics are reported every second so a test sees its own traffic on `metrics_port` within seconds.
    """
    import ray
    from ray import serve

    from anomalyfleet.serving.app import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000}, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}}, **init_kwargs)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(config), name="anomalyfleet", route_prefix="/")
        yield f"http://127.0.0.1:{http_port}"
    finally:
        serve.shutdown()
        ray.shutdown()
