"""Device choice: CUDA when present, except in a Ray worker that was granted no GPU."""

from __future__ import annotations

import pytest

from anomalyfleet.device import auto_device_type, ray_gpu_grant, select_device


@pytest.mark.parametrize("cuda, grant, expected", [
    (False, None, "cpu"),
    (False, [0], "cpu"),
    (True, None, "cuda"),     # a plain process or a Ray driver with CUDA
    (True, [1], "cuda"),      # a Ray worker granted GPU 1 (Ray sets CUDA_VISIBLE_DEVICES to it)
    (True, [], "cpu"),        # a Ray worker granted none: the node's GPUs stay visible since Ray 2.60
])
def test_auto_device_follows_cuda_and_the_ray_grant(cuda, grant, expected):
    assert auto_device_type(cuda, grant) == expected


def test_explicit_devices_are_checked():
    from anomalyfleet.errors import ConfigError

    assert select_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="unknown device"):
        select_device("tpu-please")


@pytest.mark.slow
def test_a_ray_task_without_gpus_sees_an_empty_grant_and_the_driver_none(monkeypatch):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        @ray.remote(num_cpus=1, num_gpus=0)
        def inside():
            from anomalyfleet.device import ray_gpu_grant, select_device

            return ray_gpu_grant(), select_device("auto").type

        assert ray.get(inside.remote(), timeout=120) == ([], "cpu")
        assert ray_gpu_grant() is None  # the driver: its own choice, not a grant
    finally:
        ray.shutdown()
