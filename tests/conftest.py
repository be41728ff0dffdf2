"""Shared fixtures: tiny random models of the real classes, the real data root when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny_models import save_openai_state_dict, tiny_clip

REPO = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = Path(os.environ.get("ANOMALYFLEET_MT_ROOT", REPO.parent / "shared" / "data" / "magnetic-tile"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own weights/feature cache so tests never share state on disk."""
    monkeypatch.setenv("ANOMALYFLEET_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def clip_model():
    return tiny_clip(seed=0)


@pytest.fixture(scope="session")
def openai_clip_file(tmp_path_factory, clip_model):
    """The tiny CLIP saved as an OpenAI-format state dict file."""
    return save_openai_state_dict(clip_model, tmp_path_factory.mktemp("clip") / "tiny-openai.pt")


@pytest.fixture(scope="session")
def magnetic_tile_root():
    if not (MAGNETIC_TILE / "MT_Free").is_dir():
        pytest.skip(f"Magnetic Tile data not found at {MAGNETIC_TILE}")
    return MAGNETIC_TILE


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the whole session, on 127.0.0.1, with credentials checked."""
    from tests.s3server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the storage layer (and boto3) of this process at the test S3 server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    return s3_server
