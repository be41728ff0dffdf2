"""Training: cached and uncached paths agree, resume equals an uninterrupted run, the loss falls."""

from __future__ import annotations

import pytest
import torch

from anomalyfleet.backbones import BackboneSpec
from anomalyfleet.data import parse_data_spec
from anomalyfleet.detector import Detector
from anomalyfleet.errors import ConfigError
from anomalyfleet.training import TrainConfig, train_prompts
from tests.image_sets import write_folder_dataset


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = write_folder_dataset(tmp_path_factory.mktemp("folder") / "widgets", normals=6, anomalies=6, label_only=2)
    return parse_data_spec(f"folder:{root}")


def fresh(openai_clip_file):
    spec = BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file))
    return Detector.create(spec, image_size=56, layers=(3, 6), dpam_layers=4, seed=111)


def prompts_of(detector):
    return {k: v.clone() for k, v in detector.prompts.state_dict().items()}


def assert_same_prompts(a, b, atol):
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_cached_and_uncached_training_give_the_same_prompts(samples, openai_clip_file):
    results = {}
    for cache in ("none", "memory"):
        detector = fresh(openai_clip_file)
        train_prompts(detector, samples, TrainConfig(epochs=2, batch_size=4, cache=cache, cache_dtype="float32"), progress=False)
        results[cache] = prompts_of(detector)
    # Same features, same order: only float reassociation noise can differ.
    assert_same_prompts(results["none"], results["memory"], atol=1e-5)
    start = prompts_of(fresh(openai_clip_file))
    assert (results["none"]["ctx_pos"] - start["ctx_pos"]).abs().max() > 1e-4  # training moved them


def test_disk_cache_is_reused(samples, openai_clip_file, tmp_path):
    config = TrainConfig(epochs=1, batch_size=4, cache="disk", cache_dir=str(tmp_path / "feat"), cache_dtype="float32")
    first = fresh(openai_clip_file)
    train_prompts(first, samples, config, progress=False)
    files = sorted((tmp_path / "feat").rglob("*.pt"))
    assert len(files) == len(samples)
    stamps = [f.stat().st_mtime_ns for f in files]
    second = fresh(openai_clip_file)
    train_prompts(second, samples, config, progress=False)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not rewritten
    assert_same_prompts(prompts_of(first), prompts_of(second), atol=0)
    # Another stored precision is another cache: float16 files must not stand in for float32 ones.
    half = TrainConfig(epochs=1, batch_size=4, cache="disk", cache_dir=str(tmp_path / "feat"), cache_dtype="float16")
    train_prompts(fresh(openai_clip_file), samples, half, progress=False)
    assert len(sorted((tmp_path / "feat").rglob("*.pt"))) == 2 * len(samples)
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_resume_from_checkpoint_equals_uninterrupted_run(samples, openai_clip_file, tmp_path):
    full = fresh(openai_clip_file)
    train_prompts(full, samples, TrainConfig(epochs=3, batch_size=4, cache_dtype="float32"), progress=False)
    part = fresh(openai_clip_file)
    state = train_prompts(part, samples, TrainConfig(epochs=1, batch_size=4, cache_dtype="float32"),
                          checkpoint_dir=tmp_path / "ck", progress=False)
    assert state.epoch == 1
    resumed = fresh(openai_clip_file)
    state = train_prompts(resumed, samples, TrainConfig(epochs=3, batch_size=4, cache_dtype="float32"),
                          checkpoint_dir=tmp_path / "ck", progress=False)
    assert state.epoch == 3 and len(state.history) == 3
    assert_same_prompts(prompts_of(full), prompts_of(resumed), atol=1e-6)


def test_loss_decreases(samples, openai_clip_file):
    detector = fresh(openai_clip_file)
    state = train_prompts(detector, samples, TrainConfig(epochs=6, batch_size=4), progress=False)
    assert state.history[-1]["loss"] < state.history[0]["loss"]


def test_training_input_errors(samples, openai_clip_file):
    detector = fresh(openai_clip_file)
    normals = [s for s in samples if s.label == 0]
    with pytest.raises(ConfigError, match="both normal and anomalous"):
        train_prompts(detector, normals, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ConfigError, match="cache directory"):
        train_prompts(detector, samples, TrainConfig(epochs=1, cache="disk"), progress=False)


def test_a_run_is_the_same_run_only_with_the_same_files_and_starting_prompts(tmp_path, openai_clip_file):
    """The run fingerprint decides what a re-run resumes: a mask corrected in place or other starting
    prompts (--init-bundle, another seed) must start afresh, more epochs must not."""
    import os

    from anomalyfleet.training import run_fingerprint

    root = write_folder_dataset(tmp_path / "widgets", normals=4, anomalies=4)
    data = parse_data_spec(f"folder:{root}")
    config = TrainConfig(epochs=1, batch_size=4)
    first = run_fingerprint(fresh(openai_clip_file), data, config)
    assert run_fingerprint(fresh(openai_clip_file), data, TrainConfig(epochs=5, batch_size=4)) == first
    mask = next(s.mask for s in data if s.mask)
    stat = os.stat(mask)
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten in place
    corrected = run_fingerprint(fresh(openai_clip_file), data, config)
    assert corrected != first
    other_start = fresh(openai_clip_file)
    with torch.no_grad():
        other_start.prompts.ctx_pos.add_(0.01)  # as if loaded from another bundle
    assert run_fingerprint(other_start, data, config) != corrected


def test_a_finished_run_asked_again_writes_its_training_record_and_refuses_fewer_epochs(samples, openai_clip_file, tmp_path):
    config = TrainConfig(epochs=2, batch_size=4)
    trained = fresh(openai_clip_file)
    train_prompts(trained, samples, config, checkpoint_dir=tmp_path / "ck", progress=False)
    again = fresh(openai_clip_file)  # killed after the last checkpoint, before the bundle was saved
    state = train_prompts(again, samples, config, checkpoint_dir=tmp_path / "ck", progress=False)
    assert state.epoch == 2 and [h["epoch"] for h in again.metadata["training"]["history"]] == [1, 2]
    assert again.metadata["training"]["samples"] == len(samples)
    assert_same_prompts(prompts_of(trained), prompts_of(again), atol=0)
    with pytest.raises(ConfigError, match="trained for 2 epochs, more than the 1 asked for"):
        train_prompts(fresh(openai_clip_file), samples, TrainConfig(epochs=1, batch_size=4),
                      checkpoint_dir=tmp_path / "ck", progress=False)
