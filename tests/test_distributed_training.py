"""Distributed prompt learning on Ray: 2 workers equal 1 worker, the feature stage is reused,
a killed run resumes to the same prompts. Tiny random CLIP, generated images, CPU, gloo."""

from __future__ import annotations

import os

import pytest
import torch

from anomalyfleet.backbones import BackboneSpec
from anomalyfleet.bundle import load_bundle
from anomalyfleet.data import parse_data_spec
from anomalyfleet.detector import Detector
from anomalyfleet.distributed import DistributedTrainConfig, DistributedTrainingError, train_distributed
from anomalyfleet.distributed.config import resolve_storage_uri
from anomalyfleet.distributed.feature_stage import STAGE_FILE, ShardedFeatures
from anomalyfleet.distributed.train_loop import (latest_checkpoint_state, reduce_on_device, slice_bounds, slice_gradient,
                                                 slice_weights)
from anomalyfleet.errors import ConfigError
from anomalyfleet.training import TrainConfig, compute_losses, train_prompts
from tests.image_sets import write_folder_dataset

# Measured on this machine: 2 workers vs 1 worker differ by at most ~3e-6 after 3 epochs (float
# reassociation in the DDP gradient average and per-slice sums, through Adam and fp16 deep prompts).
EQUIVALENCE_ATOL = 1e-5
EPOCHS = 3
BATCH = 5  # 12 images: batches of 5, 5, 2 -> slices of 2/3 and 1/1 on two workers
# Variables the s3_env fixture removes from the driver; the Ray job must not carry them either.
S3_ENV_REMOVED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # Two anomalies have labels but no masks, so slices differ in how many samples carry masks.
    return write_folder_dataset(tmp_path_factory.mktemp("dist") / "widgets", normals=6, anomalies=6, label_only=2)


def make_config(root, clip_file, data, workers, name, **overrides) -> DistributedTrainConfig:
    settings = dict(
        data=(f"folder:{data}",), output=str(root / f"{name}-bundle"), backbone=f"openai:{clip_file}",
        image_size=56, layers=(3, 6), dpam_layers=4, epochs=EPOCHS, batch_size=BATCH, workers=workers,
        cache_dtype="float32", storage_path=str(root / f"{name}-runs"), feature_cache=str(root / "features"),
        shard_size=5, progress=False,
    )
    settings.update(overrides)
    return DistributedTrainConfig(**settings)


def prompts_of(detector) -> dict:
    return {k: v.detach().clone() for k, v in detector.prompts.state_dict().items()}


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# --- without Ray: the slicing and weighting arithmetic -------------------------------------------


def test_slices_cover_every_batch_once():
    for batch in range(0, 12):
        for world in range(1, 5):
            bounds = [slice_bounds(r, world, batch) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == batch
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


@pytest.mark.parametrize("fp16_deep_prompts", [True, False])
def test_weighted_slice_gradients_sum_to_the_batch_gradient(openai_clip_file, fp16_deep_prompts):
    """Slices of unequal size and mask count: their weighted text-feature gradients sum to the batch's,
    so the parameter gradients every rank then backpropagates are the single-process ones."""
    from anomalyfleet.backbones import Features
    from anomalyfleet.prompts import PromptConfig

    spec = BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file))
    detector = Detector.create(spec, image_size=56, layers=(3, 6), dpam_layers=4, seed=111,
                               prompt_config=PromptConfig(fp16_deep_prompts=fp16_deep_prompts))
    prompts = detector.prompts
    generator = torch.Generator().manual_seed(0)
    b, dim, side = 7, 32, 56
    patches = [torch.randn(b, 16, dim, generator=generator) for _ in range(2)]
    globals_ = torch.randn(b, dim, generator=generator)
    masks = (torch.rand(b, side, side, generator=generator) > 0.8).float()
    has_mask = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    labels = torch.tensor([0, 1, 1, 0, 1, 1, 0])

    def text_gradient(rows, weight, factor):
        text = prompts().detach().requires_grad_()
        features = Features(globals_[rows], [p[rows] for p in patches], (4, 4))
        loss = compute_losses(lambda: text, features, masks[rows], has_mask[rows], labels[rows], side,
                              local_weight=weight)["loss"]
        return torch.autograd.grad(loss, text)[0] * factor

    def parameter_gradients(text_grad):
        prompts.zero_grad(set_to_none=True)
        prompts().backward(text_grad)
        return [p.grad.clone() for p in prompts.trainable_parameters()]

    full = text_gradient(torch.arange(b), 4.0, 1.0)
    expected = parameter_gradients(full)
    for world in (2, 3, 4):
        summed = torch.zeros_like(full)
        for rank in range(world):
            lo, hi = slice_bounds(rank, world, b)
            rows = torch.arange(lo, hi)
            weight, factor = slice_weights(b, int(has_mask.sum()), hi - lo, int(has_mask[rows].sum()), 4.0)
            summed += text_gradient(rows, weight, factor)
        torch.testing.assert_close(summed, full, atol=1e-6, rtol=1e-5)
        for got, want in zip(parameter_gradients(summed), expected):
            if not fp16_deep_prompts:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                continue
            # The float16 cast rounds the (equal up to float32 noise) batch gradient once, as in
            # one process; the noise can only flip a rare element to the neighbouring float16 value.
            off = ~torch.isclose(got, want, atol=1e-5, rtol=1e-5)
            assert off.float().mean() <= 0.02
            torch.testing.assert_close(got, want, atol=1e-5, rtol=2.0**-10)
    assert slice_gradient(prompts, 1.0, 1) is prompts  # one worker: the plain single-process path


def test_epoch_sums_reach_the_collective_on_the_training_device():
    # NCCL (Ray Train's backend on GPUs) refuses CPU tensors; "meta" stands in for a CUDA device here.
    seen = []

    def reduce(t):
        seen.append(t.device)
        return torch.tensor([3.0, 5.0], dtype=torch.float64)

    out = reduce_on_device(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.device("meta"), reduce)
    assert seen == [torch.device("meta")] and out.device.type == "cpu" and out.tolist() == [3.0, 5.0]


def test_config_is_validated_when_built(tmp_path):
    good = dict(data=("folder:x",), output=str(tmp_path / "out"))
    DistributedTrainConfig(**good)
    for bad, message in (
        ({"workers": 0}, "workers must be at least 1"),
        ({"gpus_per_worker": -1}, "gpus per worker"),
        ({"workers": 2, "gpus_per_worker": 0.5}, "would share a GPU, which NCCL refuses"),
        ({"cache_dtype": "int8"}, "cache dtype"),
        ({"storage_path": "gs://bucket/runs"}, "unsupported storage scheme 'gs'"),
        ({"feature_cache": "gs://bucket/features"}, "unsupported storage scheme 'gs'"),
        ({"storage_path": "s3://"}, "no bucket"),
        ({"fail_after_epoch": 99, "epochs": 2}, "fail after epoch"),
        ({"data": ()}, "--data"),
    ):
        with pytest.raises(ConfigError, match=message):
            DistributedTrainConfig(**{**good, **bad})
    DistributedTrainConfig(**good, workers=1, gpus_per_worker=0.5)  # one rank may take part of a GPU
    assert resolve_storage_uri(f"file://{tmp_path}") == tmp_path.resolve()
    # s3:// run storage and feature caches stay URIs (Ray reaches them through a pyarrow filesystem).
    assert resolve_storage_uri("s3://bucket/runs/") == "s3://bucket/runs"
    on_s3 = DistributedTrainConfig(**good, storage_path="s3://bucket/runs")
    assert on_s3.storage_dir() == "s3://bucket/runs" and on_s3.feature_dir() == "s3://bucket/runs/features"
    split = DistributedTrainConfig(**good, storage_path=str(tmp_path / "runs"), feature_cache="s3://bucket/features")
    assert split.storage_dir() == (tmp_path / "runs").resolve() and split.feature_dir() == "s3://bucket/features"
    config = DistributedTrainConfig(**good)
    assert DistributedTrainConfig.from_dict(config.to_dict()) == config


def test_job_arguments_become_a_config(tmp_path):
    from anomalyfleet.distributed.cli_args import config_from_args
    from jobs.train_prompts import build_parser

    args = build_parser().parse_args([
        "--data", "folder:/d", "--data", "mvtec:/m", "--backbone", "ViT-L-14-336", "--workers", "4",
        "--gpus-per-worker", "1", "--output", f"file://{tmp_path}/bundle", "--layers", "6,12,18,24",
        "--max-failures", "2", "--feature-gpus", "0.25", "--batch-size", "16",
    ])
    config = config_from_args(args)
    assert config.data == ("folder:/d", "mvtec:/m") and config.workers == 4 and config.layers == (6, 12, 18, 24)
    assert config.resources_per_worker() == {"CPU": 1.0, "GPU": 1.0} and config.use_gpu
    assert config.storage_dir() == (tmp_path / "bundle.checkpoints").resolve()
    assert config.output_dir() == (tmp_path / "bundle").resolve()
    remote = config_from_args(build_parser().parse_args(["--data", "folder:/d", "--output", "s3://bucket/bundle"]))
    # Run state beside the bundle, where every node of a cluster reaches it (not on the driver's disk).
    assert remote.output_dir() == "s3://bucket/bundle" and remote.storage_dir() == "s3://bucket/bundle.checkpoints"
    assert remote.feature_dir() == "s3://bucket/bundle.checkpoints/features"
    on_s3 = config_from_args(build_parser().parse_args([
        "--data", "folder:/d", "--output", "/x", "--storage-path", "s3://bucket/runs",
        "--feature-cache", "s3://bucket/features",
    ]))
    assert on_s3.storage_dir() == "s3://bucket/runs" and on_s3.feature_dir() == "s3://bucket/features"
    bad = build_parser().parse_args(["--data", "folder:/d", "--output", "/x", "--storage-path", "gs://bucket/runs"])
    with pytest.raises(ConfigError, match="unsupported storage scheme"):
        config_from_args(bad)


def test_pyarrow_filesystem_follows_the_s3_options(tmp_path):
    from pyarrow import fs

    from anomalyfleet.storage import S3Options, pyarrow_filesystem

    local, path = pyarrow_filesystem(f"file://{tmp_path}/runs")
    assert isinstance(local, fs.LocalFileSystem) and path == str((tmp_path / "runs").resolve())
    options = S3Options(endpoint_url="http://127.0.0.1:8333", region="eu-west-1", access_key="key", secret_key="secret")
    s3, path = pyarrow_filesystem("s3://bucket/runs/", options)
    assert isinstance(s3, fs.S3FileSystem) and path == "bucket/runs"
    assert s3.region == "eu-west-1"
    assert "127.0.0.1:8333" in repr(s3.__reduce__()) and "'http'" in repr(s3.__reduce__())
    # The default AWS chain: no keys are put into the (pickled) filesystem.
    chain, _ = pyarrow_filesystem("s3://bucket", S3Options(endpoint_url="https://s3.example.com", region="x"))
    assert "'secret'" not in repr(chain.__reduce__()) and "'https'" in repr(chain.__reduce__())
    with pytest.raises(ConfigError, match="endpoint"):
        pyarrow_filesystem("s3://bucket/x", S3Options(endpoint_url="ftp://host"))


def test_training_workers_put_only_the_text_side_on_their_device(openai_clip_file, tmp_path):
    """The vision tower stays in host memory; prompts and text tower move. The "meta" device stands
    in for a GPU here: anything moved there is visibly not on the CPU."""
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.distributed.feature_stage import DetectorSource

    spec = BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file))
    detector = Detector.create(spec, image_size=56, layers=(3, 6), dpam_layers=4, seed=111)
    source = DetectorSource(str(save_bundle(detector, tmp_path / "init")), spec.to_dict())
    loaded = source.load_for_prompt_training("meta")
    assert {p.device.type for p in loaded.prompts.parameters()} == {"meta"}
    assert {p.device.type for p in loaded.backbone.text_tower.parameters()} == {"meta"}
    assert {p.device.type for p in loaded.backbone.visual.parameters()} == {"cpu"}


# --- on a local Ray instance ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster(s3_server, tmp_path_factory):
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # As `ensure_ray` does for a run: the job's runtime_env carries the storage variables (here the
    # test S3 server's), so Ray Train's controller and workers reach s3:// run storage; and the
    # workers share the tests' node cache instead of ~/.cache.
    from anomalyfleet.storage import storage_env

    ambient = {k: v for k, v in storage_env().items() if k not in S3_ENV_REMOVED}  # as the s3_env fixture
    env = {**ambient, **s3_server.env(), "ANOMALYFLEET_CACHE": str(tmp_path_factory.getbasetemp() / "cache"),
           "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(ray_cluster, dataset, openai_clip_file, tmp_path_factory):
    """One uninterrupted 1-worker and 2-worker run, sharing one feature cache."""
    root = tmp_path_factory.mktemp("runs")
    one = train_distributed(make_config(root, openai_clip_file, dataset, 1, "one"))
    shard_times = {p.name: p.stat().st_mtime_ns for p in one.features.directory.iterdir()}
    two = train_distributed(make_config(root, openai_clip_file, dataset, 2, "two"))
    return {"root": root, "one": one, "two": two, "shard_times": shard_times}


@pytest.mark.slow
def test_two_workers_give_the_prompts_of_one_worker(runs, dataset, openai_clip_file):
    one, two = runs["one"], runs["two"]
    assert one.epochs == two.epochs == EPOCHS
    difference = max_difference(prompts_of(one.detector), prompts_of(two.detector))
    print(f"max |prompts(2 workers) - prompts(1 worker)| = {difference:.2e}")
    assert difference <= EQUIVALENCE_ATOL
    # The epoch losses are the same global-batch means, summed in another order: relative, not
    # absolute, agreement (a loss near 5.7 once differed by 1.4e-5, 2.5e-6 relative, while the
    # prompts agreed to 2e-6).
    for a, b in zip(one.history, two.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert [h["workers"] for h in two.history] == [2] * EPOCHS
    # ... and one worker is the single-process trainer on the same features.
    spec = BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file))
    single = Detector.create(spec, image_size=56, layers=(3, 6), dpam_layers=4, seed=111)
    train_prompts(single, parse_data_spec(f"folder:{dataset}"),
                  TrainConfig(epochs=EPOCHS, batch_size=BATCH, cache_dtype="float32"), progress=False)
    assert max_difference(prompts_of(single), prompts_of(one.detector)) <= EQUIVALENCE_ATOL
    # Training moved the prompts, so the comparison above is not trivially true.
    start = prompts_of(Detector.create(spec, image_size=56, layers=(3, 6), dpam_layers=4, seed=111))
    assert (start["ctx_pos"] - prompts_of(two.detector)["ctx_pos"]).abs().max() > 1e-3


@pytest.mark.slow
def test_result_is_a_loadable_bundle_with_training_metadata(runs, openai_clip_file):
    two = runs["two"]
    spec = BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file))
    loaded = load_bundle(two.bundle, backbone_spec=spec)
    assert max_difference(prompts_of(loaded), prompts_of(two.detector)) == 0
    training = loaded.metadata["training"]
    assert training["distributed"]["workers"] == 2 and len(training["history"]) == EPOCHS
    state = latest_checkpoint_state(two.run_dir)
    assert state["epoch"] == EPOCHS and state["position"] == {"epoch": EPOCHS, "batch": 0, "seed": 111}
    assert state["optimizer"]["state"], "the optimiser moments are checkpointed"


@pytest.mark.slow
def test_second_run_skips_the_feature_stage(runs):
    one, two = runs["one"], runs["two"]
    assert not one.features.skipped and one.features.computed_shards == one.features.shards == 3
    assert two.features.skipped and two.features.computed_shards == 0
    assert two.features.directory == one.features.directory
    assert {p.name: p.stat().st_mtime_ns for p in two.features.directory.iterdir()} == runs["shard_times"]
    store = ShardedFeatures(two.features.directory)
    assert len(store) == 12 and (two.features.directory / STAGE_FILE).is_file()
    # Rows come back in the order asked for, across shard boundaries.
    table = store.rows(torch.tensor([11, 0, 6, 5]))
    assert table.labels.tolist() == [store.labels[i].item() for i in (11, 0, 6, 5)]
    assert torch.equal(table.global_features[1], store.rows(torch.tensor([0])).global_features[0])


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_prompts(runs, dataset, openai_clip_file):
    root = runs["root"]
    failing = make_config(root, openai_clip_file, dataset, 2, "killed", fail_after_epoch=1, max_failures=0)
    with pytest.raises(DistributedTrainingError, match="resume from epoch 1"):
        train_distributed(failing)
    state = latest_checkpoint_state(resolve_storage_uri(failing.storage_path) / runs["two"].run_dir.name)
    assert state is not None and state["epoch"] == 1
    # The same command again (without the injected fault) continues from the checkpoint.
    resumed = train_distributed(make_config(root, openai_clip_file, dataset, 2, "killed"))
    assert resumed.resumed_from_epoch == 1 and resumed.epochs == EPOCHS
    assert resumed.features.skipped
    assert [h["epoch"] for h in resumed.history] == list(range(1, EPOCHS + 1))
    difference = max_difference(prompts_of(resumed.detector), prompts_of(runs["two"].detector))
    print(f"max |prompts(resumed) - prompts(uninterrupted)| = {difference:.2e}")
    assert difference <= 1e-6


@pytest.mark.slow
def test_bundle_goes_to_s3_and_loads_from_there(runs, dataset, openai_clip_file, s3_env):
    root = runs["root"]
    uri = s3_env.uri(f"dist-{os.getpid()}/bundle")
    config = make_config(root, openai_clip_file, dataset, 1, "one", output=uri)  # same run as "one": resumes at the end
    result = train_distributed(config)
    assert str(result.bundle) == uri
    assert max_difference(prompts_of(load_bundle(uri)), prompts_of(runs["one"].detector)) == 0.0


@pytest.mark.slow
def test_run_storage_and_feature_cache_on_s3_resume_after_a_kill(runs, dataset, openai_clip_file, s3_env):
    """Two workers with checkpoints and feature shards on the real S3 server: a run whose worker
    fails after epoch 1 resumes from its S3 checkpoint and ends with the prompts of the
    uninterrupted local 2-worker run."""
    from anomalyfleet import storage

    root = runs["root"]
    prefix = f"dist-{os.getpid()}"
    on_s3 = dict(storage_path=s3_env.uri(f"{prefix}/runs"), feature_cache=s3_env.uri(f"{prefix}/features"))
    failing = make_config(root, openai_clip_file, dataset, 2, "s3", fail_after_epoch=1, **on_s3)
    with pytest.raises(DistributedTrainingError, match="resume from epoch 1"):
        train_distributed(failing)
    # The feature stage finished on S3 before training started: every shard, stage.json last.
    keys = sorted(info.uri.rsplit("/", 1)[1] for info in storage.list_objects(on_s3["feature_cache"]))
    assert keys == ["shard-00000.pt", "shard-00001.pt", "shard-00002.pt", STAGE_FILE]
    run_uri = storage.join(on_s3["storage_path"], runs["two"].run_dir.name)
    state = latest_checkpoint_state(run_uri)
    assert state is not None and state["epoch"] == 1
    assert not (root / "s3-runs").exists()  # nothing went to the local default

    # The same command again (without the injected fault) continues from the S3 checkpoint.
    resumed = train_distributed(make_config(root, openai_clip_file, dataset, 2, "s3", **on_s3))
    assert resumed.resumed_from_epoch == 1 and resumed.epochs == EPOCHS
    assert resumed.run_dir == run_uri and latest_checkpoint_state(run_uri)["epoch"] == EPOCHS
    assert resumed.features.skipped and str(resumed.features.directory).startswith(on_s3["feature_cache"])
    assert [h["epoch"] for h in resumed.history] == list(range(1, EPOCHS + 1))
    assert [h["workers"] for h in resumed.history] == [2] * EPOCHS
    difference = max_difference(prompts_of(resumed.detector), prompts_of(runs["two"].detector))
    print(f"max |prompts(S3, resumed) - prompts(local, uninterrupted)| = {difference:.2e}")
    assert difference <= 1e-6  # same worker count, same arithmetic: only the storage differs
    # Training workers read the shards through the node cache; the driver can do the same.
    remote, local = ShardedFeatures(resumed.features.directory), ShardedFeatures(runs["one"].features.directory)
    rows = torch.tensor([11, 0, 6])
    assert len(remote) == 12 and torch.equal(remote.rows(rows).patch_features, local.rows(rows).patch_features)


DRIVER_KILL_EPOCHS = 6


@pytest.mark.slow
def test_killed_driver_resumes_when_the_same_command_is_run_again(ray_cluster, runs, dataset, openai_clip_file):
    """`python -m jobs.train_prompts` on the running cluster, SIGKILLed once its first epoch
    checkpoint exists; the same command again resumes there and ends with the single-process prompts."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = runs["root"]
    storage_path, name = root / "driver-runs", "driver-kill"
    command = [
        sys.executable, "-m", "jobs.train_prompts", "--data", f"folder:{dataset}", "--output", str(root / "driver-bundle"),
        "--backbone", f"openai:{openai_clip_file}", "--image-size", "56", "--layers", "3,6", "--dpam-layers", "4",
        "--epochs", str(DRIVER_KILL_EPOCHS), "--batch-size", str(BATCH), "--workers", "2", "--cache-dtype", "float32",
        "--storage-path", str(storage_path), "--name", name, "--feature-cache", str(root / "features"),
        "--shard-size", "5", "--ray-address", ray_cluster.get_runtime_context().gcs_address, "--quiet",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    log = root / "driver-kill.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(command, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
        killed_at, deadline = None, time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:
            state = latest_checkpoint_state(storage_path / name)
            if state is not None:
                driver.send_signal(signal.SIGKILL)
                killed_at = state["epoch"]
                break
            time.sleep(0.05)
        driver.wait(timeout=60)
    assert killed_at is not None, f"no checkpoint before the driver ended:\n{log.read_text()[-3000:]}"
    assert driver.returncode == -signal.SIGKILL
    assert 1 <= killed_at < DRIVER_KILL_EPOCHS, "the run must be cut short for this test to mean anything"
    assert not (root / "driver-bundle").exists()  # no half-written output

    again = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = load_bundle(root / "driver-bundle", backbone_spec=BackboneSpec(kind="openai_file",
                                                                              pretrained=str(openai_clip_file)))
    training = resumed.metadata["training"]
    # Workers of the killed driver may finish one more epoch before Ray reaps them; never fewer.
    assert killed_at <= training["distributed"]["resumed_from_epoch"] < DRIVER_KILL_EPOCHS
    assert [h["epoch"] for h in training["history"]] == list(range(1, DRIVER_KILL_EPOCHS + 1))
    assert training["distributed"]["feature_stage_skipped"]
    spec = BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file))
    single = Detector.create(spec, image_size=56, layers=(3, 6), dpam_layers=4, seed=111)
    train_prompts(single, parse_data_spec(f"folder:{dataset}"),
                  TrainConfig(epochs=DRIVER_KILL_EPOCHS, batch_size=BATCH, cache_dtype="float32"), progress=False)
    difference = max_difference(prompts_of(resumed), prompts_of(single))
    print(f"killed at epoch {killed_at}, resumed from {training['distributed']['resumed_from_epoch']}; "
          f"max |prompts(resumed, 2 workers) - prompts(single process)| = {difference:.2e}")
    assert difference <= EQUIVALENCE_ATOL
