"""Storage layer against a real S3 server (SeaweedFS on 127.0.0.1) and the local backend."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalyfleet import storage
from anomalyfleet.errors import BundleError, StorageError
from anomalyfleet.manifest import write_manifest
from tests.image_sets import write_folder_dataset

MiB = 1024 * 1024
pytestmark = pytest.mark.slow  # starts SeaweedFS servers and subprocesses


def _unique(prefix: str) -> str:
    return f"{prefix}-{time.time_ns()}"


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path, s3_env):
    """A fresh root on each backend; both must behave the same."""
    if request.param == "local":
        return str(tmp_path / "root")
    return s3_env.uri(_unique("roundtrip"))


def test_round_trip_every_operation(base, tmp_path):
    uri = storage.join(base, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"hello"
    assert storage.stat(uri).size == 5
    storage.write_text(storage.join(base, "a", "c.txt"), "text")
    storage.write_bytes(storage.join(base, "z.bin"), b"z")
    listed = [o.uri for o in storage.list_objects(base)]
    assert listed == sorted(listed) and len(listed) == 3
    assert [o.uri for o in storage.list_objects(storage.join(base, "a"))] == [uri, storage.join(base, "a", "c.txt")]

    with storage.open_read(uri) as stream:
        assert stream.read(2) == b"he" and stream.read() == b"llo"

    storage.copy(uri, storage.join(base, "copy.bin"))
    assert storage.read_bytes(storage.join(base, "copy.bin")) == b"hello"

    local = tmp_path / "up.bin"
    local.write_bytes(b"x" * 1000)
    storage.upload_file(local, storage.join(base, "up.bin"))
    down = storage.download_file(storage.join(base, "up.bin"), tmp_path / "down" / "d.bin")
    assert down.read_bytes() == b"x" * 1000
    assert not [p for p in down.parent.iterdir() if p.name.endswith(".tmp")]

    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting twice is not an error, on either backend
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(uri)


def test_large_object_multipart_and_streaming(s3_env, tmp_path):
    options = s3_env.options(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    data = np.random.default_rng(0).integers(0, 256, size=12 * MiB + 123, dtype=np.uint8).tobytes()
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    uri = s3_env.uri(_unique("big") + "/big.bin")
    storage.upload_file(source, uri, options)
    # A multipart upload's ETag has a part count suffix: proof it went up in parts.
    assert storage.stat(uri, options).etag.endswith("-3")
    digest = hashlib.sha256()
    with storage.open_read(uri, options) as stream:
        while block := stream.read(MiB):
            digest.update(block)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    storage.write_bytes(storage.join(uri + "-copy"), data, options)  # write_bytes also goes multipart
    assert storage.read_bytes(uri + "-copy", options) == data


def _bundle_like(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    write_manifest(root)
    return root


def test_trees_are_verified_and_manifest_goes_last(base, tmp_path):
    local = _bundle_like(tmp_path / "tree", {"a.txt": b"alpha", "sub/b.bin": b"\x00" * 100})
    uri = storage.join(base, "tree")
    storage.put_tree(local, uri)
    copy = storage.get_tree(uri, tmp_path / "copy")
    assert (copy / "a.txt").read_bytes() == b"alpha" and (copy / "sub" / "b.bin").stat().st_size == 100
    cached = storage.cached_tree(uri)
    assert (cached / "manifest.json").is_file()

    # Corrupt one object behind the manifest's back: the reader names it.
    storage.write_bytes(storage.join(uri, "a.txt"), b"alphx")
    with pytest.raises(StorageError, match=r"a\.txt.*(checksum|corrupt)"):
        storage.get_tree(uri, tmp_path / "copy2")
    storage.write_bytes(storage.join(uri, "a.txt"), b"alp")
    with pytest.raises(StorageError, match=r"a\.txt"):
        storage.get_tree(uri, tmp_path / "copy3")
    assert not (tmp_path / "copy2").exists() and not (tmp_path / "copy3").exists()

    # Without a manifest the tree is not published, whatever else is there.
    half = storage.join(base, "half")
    storage.write_bytes(storage.join(half, "a.txt"), b"alpha")
    with pytest.raises(StorageError, match="no manifest.json"):
        storage.cached_tree(half) if storage.is_remote(half) else storage.get_tree(half, tmp_path / "h")


def _fill_cache(args):
    uri, env, cache = args
    os.environ.update(env)
    os.environ["ANOMALYFLEET_CACHE"] = cache
    from anomalyfleet import storage as st

    path = st.cached_tree(uri)
    return str(path), (path / "weights.bin").read_bytes() == b"w" * (3 * MiB)


def test_cache_is_shared_and_safe_with_concurrent_fillers(s3_env, tmp_path, monkeypatch):
    local = _bundle_like(tmp_path / "tree", {"weights.bin": b"w" * (3 * MiB), "meta.json": b"{}"})
    uri = s3_env.uri(_unique("cached") + "/tree")
    storage.put_tree(local, uri)
    cache = str(tmp_path / "shared-cache")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_fill_cache, [(uri, s3_env.env(), cache)] * 8)
    paths = {p for p, _ in results}
    assert len(paths) == 1 and all(ok for _, ok in results)
    trees = Path(cache) / "trees"
    assert [p.name for p in trees.iterdir() if not p.name.endswith(".lock")] == [Path(paths.pop()).name]

    # Republishing different content under the same URI gives a new cache entry, never stale data.
    local2 = _bundle_like(tmp_path / "tree2", {"weights.bin": b"v" * 10, "meta.json": b"{}"})
    storage.put_tree(local2, uri)
    monkeypatch.setenv("ANOMALYFLEET_CACHE", cache)
    assert (storage.cached_tree(uri) / "weights.bin").read_bytes() == b"v" * 10


def test_local_path_for_weights_is_cached_by_etag(s3_env, tmp_path):
    uri = s3_env.uri(_unique("weights") + "/model.pt")
    storage.write_bytes(uri, b"weights-1")
    first = storage.local_path_for(uri)
    assert first.read_bytes() == b"weights-1" and storage.local_path_for(uri) == first
    storage.write_bytes(uri, b"weights-22")
    assert storage.local_path_for(uri).read_bytes() == b"weights-22"
    with pytest.raises(StorageError, match="checksum"):
        storage.local_path_for(uri, sha256="0" * 64)


# The process kills itself (SIGKILL, no cleanup of any kind) once 10 MiB have gone over the wire,
# so the kill always lands in the middle of the transfer.
KILL_MIDWAY = """
import os, signal, sys
from anomalyfleet import storage
options = storage.S3Options.from_env().with_overrides(multipart_threshold=5 << 20, multipart_chunksize=5 << 20, max_concurrency=1)
sent = [0]
def progress(n):
    sent[0] += n
    if sent[0] >= 10 << 20:
        os.kill(os.getpid(), signal.SIGKILL)
"""
KILLED_UPLOAD = KILL_MIDWAY + "storage.write_bytes(sys.argv[1], os.urandom(40 << 20), options, progress=progress)\n"
KILLED_DOWNLOAD = KILL_MIDWAY + "storage.download_file(sys.argv[1], sys.argv[2], options, progress=progress)\n"


def test_killed_transfers_leave_no_object(s3_env, tmp_path):
    uri = s3_env.uri(_unique("killed") + "/big.bin")
    env = {**os.environ, **s3_env.env()}
    result = subprocess.run([sys.executable, "-c", KILLED_UPLOAD, uri], env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert not storage.exists(uri)
    assert not list(storage.list_objects(uri.rsplit("/", 1)[0]))

    # Locally the same: a killed download or copy leaves no target, at most a hidden temporary.
    options = s3_env.options(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    storage.write_bytes(uri, os.urandom(40 * MiB), options)
    target = tmp_path / "out" / "big.bin"
    result = subprocess.run([sys.executable, "-c", KILLED_DOWNLOAD, uri, str(target)], env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL and not target.exists()
    local_copy = tmp_path / "out" / "copy.bin"
    result = subprocess.run([sys.executable, "-c", KILLED_DOWNLOAD, str(storage.download_file(uri, tmp_path / "src.bin")),
                             str(local_copy)], env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL and not local_copy.exists()


def test_failures_are_clear_and_bounded(s3_env, tmp_path):
    uri = s3_env.uri(_unique("fail") + "/x.bin")
    storage.write_bytes(uri, b"1")
    wrong = s3_env.options(secret_key="not-the-secret")
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"access denied.*SignatureDoesNotMatch") as info:
        storage.read_bytes(uri, wrong)
    assert uri in str(info.value)
    with pytest.raises(StorageError, match="access denied.*InvalidAccessKeyId"):
        storage.write_bytes(uri, b"2", s3_env.options(access_key="nobody", secret_key="x"))
    assert storage.read_bytes(uri) == b"1"  # the refused write changed nothing
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-here' does not exist"):
        storage.read_bytes("s3://no-such-bucket-here/x", s3_env.options())
    with pytest.raises(StorageError, match=r"not found: s3://"):
        storage.read_bytes(uri + ".missing")
    assert time.monotonic() - started < 60  # no retry storm (bounded), with room for a loaded machine

    from tests.s3server import free_port

    dead = s3_env.options(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=3, connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        storage.read_bytes(uri, dead)
    assert time.monotonic() - started < 30
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        storage.read_bytes("gs://bucket/key")


def test_stopped_server_is_a_clear_error(tmp_path):
    from tests.s3server import start_s3_server

    server = start_s3_server(tmp_path / "weed")
    options = server.options(max_attempts=2, connect_timeout=1.0)
    storage.write_bytes(server.uri("k"), b"v", options)
    server.stop()
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {server.endpoint}"):
        storage.read_bytes(server.uri("k"), options)
    assert time.monotonic() - started < 30


def test_registry_versions_latest_and_immutability(base, tmp_path):
    registry = storage.BundleRegistry(storage.join(base, "models"))
    one = _bundle_like(tmp_path / "one", {"detector.json": b'{"v": 1}', "prompts.pt": b"p1"})
    two = _bundle_like(tmp_path / "two", {"detector.json": b'{"v": 2}', "prompts.pt": b"p2"})
    assert registry.push(one, "line-7").version == "v0001"
    assert registry.push(two, "line-7").version == "v0002"
    assert registry.latest("line-7") == "v0002"
    assert registry.push(one, "line-7", version="v0001").version == "v0001"  # same content: a no-op
    with pytest.raises(StorageError, match="immutable"):
        registry.push(two, "line-7", version="v0001")
    registry.push(two, "other", version="canary", set_latest=False)
    assert registry.names() == ["line-7", "other"]
    assert [v.version for v in registry.versions("line-7")] == ["v0001", "v0002"]
    assert registry.latest("other") is None
    with pytest.raises(StorageError, match="no published version"):
        registry.resolve("other")

    # A version whose manifest is not there yet (publication in progress) does not exist for readers.
    storage.write_bytes(storage.join(registry.version_uri("line-7", "v0003"), "prompts.pt"), b"partial")
    assert [v.version for v in registry.versions("line-7")] == ["v0001", "v0002"]
    with pytest.raises(StorageError, match="no version 'v0003'"):
        registry.resolve("line-7", "v0003")

    pulled = registry.pull("line-7", "v0001", tmp_path / "pulled")
    assert (pulled / "prompts.pt").read_bytes() == b"p1"
    assert (registry.cached("line-7") / "prompts.pt").read_bytes() == b"p2"
    with pytest.raises(StorageError, match="invalid detector name"):
        registry.push(one, "../escape")
    (two / "prompts.pt").write_bytes(b"p3")  # altered after its manifest was written
    with pytest.raises(StorageError, match=r"damaged.*prompts\.pt"):
        registry.push(two, "line-7", version="v0009")
    assert [v.version for v in registry.versions("line-7")] == ["v0001", "v0002"]


def test_bundle_save_load_and_cli_through_s3(s3_env, tmp_path, openai_clip_file, capsys, monkeypatch):
    from anomalyfleet.backbones import BackboneSpec
    from anomalyfleet.bundle import load_bundle, save_bundle
    from anomalyfleet.cli import main
    from anomalyfleet.detector import Detector

    detector = Detector.create(BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)),
                               image_size=56, layers=(6,), dpam_layers=4, seed=3)
    local = save_bundle(detector, tmp_path / "bundle")
    remote = s3_env.uri(_unique("bundles") + "/b")
    assert save_bundle(detector, remote) == remote
    assert save_bundle(detector, remote) == remote  # a bundle replaces a bundle
    # ... but never a prefix that holds something else (a mistyped --out).
    occupied = s3_env.uri(_unique("bundles") + "/data")
    storage.write_bytes(storage.join(occupied, "images", "a.png"), b"precious")
    with pytest.raises(BundleError, match="holds 1 objects and no detector bundle"):
        save_bundle(detector, occupied)
    assert storage.read_bytes(storage.join(occupied, "images", "a.png")) == b"precious"
    x = torch.rand(2, 3, 56, 56)
    expected = load_bundle(local).predict(x)
    got = load_bundle(remote).predict(x)
    assert np.allclose(got.scores, expected.scores) and np.allclose(got.maps, expected.maps)

    registry = s3_env.uri(_unique("registry"))
    assert main(["bundle", "push", str(local), "--name", "line-a", "--registry", registry]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v0001"
    assert main(["bundle", "list", "--registry", registry, "--json"]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == ["v0001"]
    assert main(["bundle", "pull", "line-a", "--registry", registry, "--out", str(tmp_path / "pulled")]) == 0
    assert np.allclose(load_bundle(tmp_path / "pulled").predict(x).scores, expected.scores)

    # The CLI turns storage failures into one line and a non-zero exit, and writes nothing.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    capsys.readouterr()
    code = main(["bundle", "pull", "line-a", "--registry", registry, "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("anomalyfleet: error:") and "access denied" in err and "\n" not in err
    assert not (tmp_path / "never").exists()


def test_datasets_and_score_outputs_on_s3(s3_env, tmp_path, openai_clip_file):
    from anomalyfleet.backbones import BackboneSpec
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.cli import main
    from anomalyfleet.data import parse_data_specs

    data = write_folder_dataset(tmp_path / "parts", normals=2, anomalies=2, size=48)
    prefix = s3_env.uri(_unique("datasets") + "/parts")
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        storage.upload_file(path, storage.join(prefix, path.relative_to(data).as_posix()))
    local_samples = parse_data_specs([f"folder:{data}"])
    remote_samples = parse_data_specs([f"folder:{prefix}"])
    assert [(Path(s.image).name, s.label) for s in remote_samples] == [(Path(s.image).name, s.label) for s in local_samples]

    from anomalyfleet.detector import Detector

    detector = Detector.create(BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)),
                               image_size=56, layers=(6,), dpam_layers=4, seed=1)
    bundle = save_bundle(detector, tmp_path / "bundle")
    out = s3_env.uri(_unique("scores"))
    assert main(["score", "--detector", str(bundle), "--images", storage.join(prefix, "anomaly"),
                 "--out", out, "--quiet", "--device", "cpu"]) == 0
    assert main(["score", "--detector", str(bundle), "--images", str(data / "anomaly"),
                 "--out", str(tmp_path / "local-scores"), "--quiet", "--device", "cpu"]) == 0
    remote_scores = [json.loads(l)["score"] for l in storage.read_text(storage.join(out, "scores.jsonl")).splitlines()]
    local_scores = [json.loads(l)["score"] for l in (tmp_path / "local-scores" / "scores.jsonl").read_text().splitlines()]
    assert np.allclose(remote_scores, local_scores, atol=1e-6)
    assert storage.exists(storage.join(out, "manifest.json"))


def test_backbone_weights_from_s3(s3_env, openai_clip_file):
    from anomalyfleet.backbones import create_backbone, parse_backbone

    uri = s3_env.uri(_unique("weights") + "/tiny-openai.pt")
    storage.upload_file(openai_clip_file, uri)
    remote = create_backbone(parse_backbone(f"openai:{uri}"), 56)
    local = create_backbone(parse_backbone(f"openai:{openai_clip_file}"), 56)
    assert remote.fingerprint() == local.fingerprint()
    with pytest.raises(StorageError, match="not found"):
        create_backbone(parse_backbone(f"openai:{uri}.missing"), 56)


def test_throttling_is_retried_then_reported_within_bounds(s3_env):
    from tests.throttle_proxy import ThrottleProxy

    uri = s3_env.uri(_unique("throttled") + "/x.bin")
    storage.write_bytes(uri, b"payload")
    # Two SlowDown answers, then the real server: the read succeeds on its third attempt.
    with ThrottleProxy(s3_env.endpoint, throttle=2) as proxy:
        options = s3_env.options(endpoint_url=proxy.endpoint, max_attempts=5)
        assert storage.read_bytes(uri, options) == b"payload"
        assert proxy.throttled == 2 and proxy.forwarded == 1
    # A server that never stops throttling: a clear error after the configured attempts, in bounded time.
    with ThrottleProxy(s3_env.endpoint, throttle=-1) as proxy:
        options = s3_env.options(endpoint_url=proxy.endpoint, max_attempts=3)
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"kept throttling \(SlowDown\) after 3 attempts") as info:
            storage.write_bytes(uri, b"other", options)
        assert uri in str(info.value) and time.monotonic() - started < 30
        assert proxy.throttled == 3 and proxy.forwarded == 0
    assert storage.read_bytes(uri) == b"payload"  # the refused write changed nothing


def test_bundle_list_refuses_a_missing_registry_or_an_unknown_name(tmp_path, openai_clip_file, capsys):
    from anomalyfleet.backbones import BackboneSpec
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.cli import main
    from anomalyfleet.detector import Detector

    detector = Detector.create(BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)),
                               image_size=56, layers=(6,), dpam_layers=4, seed=3)
    registry = tmp_path / "registry"
    registry.mkdir()
    assert main(["bundle", "list", "--registry", str(registry)]) == 0  # empty is not an error
    assert "no published detectors" in capsys.readouterr().err
    assert main(["bundle", "push", str(save_bundle(detector, tmp_path / "b")), "--name", "line-a",
                 "--registry", str(registry)]) == 0
    capsys.readouterr()
    for argv, message in (
        (["--registry", str(tmp_path / "typo")], "is not a directory (it does not exist)"),
        (["--registry", str(tmp_path / "b" / "detector.json")], "is not a directory"),
        (["line-b", "--registry", str(registry)], "no detector named 'line-b' in"),
    ):
        assert main(["bundle", "list", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main(["bundle", "list", "line-a", "--registry", str(registry)]) == 0
    assert "line-a" in capsys.readouterr().out


def test_local_listing_skips_other_writers_temporary_files_and_staging_directories(tmp_path):
    (tmp_path / "a.txt").write_text("1")
    (tmp_path / ".b.txt.k2j4.tmp").write_text("half")  # atomic_write in progress
    staging = tmp_path / "registry" / ".v0004.x8f1.tmp"  # a tree being built, then renamed
    staging.mkdir(parents=True)
    (staging / "manifest.json").write_text("{}")
    (tmp_path / "registry" / "v0003").mkdir()
    (tmp_path / "registry" / "v0003" / "manifest.json").write_text("{}")
    listed = sorted(os.path.relpath(o.uri, tmp_path) for o in storage.list_objects(tmp_path))
    assert listed == ["a.txt", "registry/v0003/manifest.json"]


def test_replace_directory_swaps_whole_directories_and_leaves_nothing_behind(tmp_path):
    from anomalyfleet.storage.local import replace_directory

    target = tmp_path / "bundle"
    first = tmp_path / ".bundle.a.tmp"
    first.mkdir()
    (first / "v").write_text("1")
    replace_directory(first, target)  # nothing there yet: a rename
    second = tmp_path / ".bundle.b.tmp"
    second.mkdir()
    (second / "v").write_text("2")
    (second / "only-new").write_text("x")
    replace_directory(second, target)
    assert sorted(p.name for p in target.iterdir()) == ["only-new", "v"] and (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_registry_pushes_at_once_get_distinct_versions_and_latest_never_goes_back(base, tmp_path):
    """Two pushes that see the same next number must not publish into one version (on S3 their files
    would mix under whichever manifest lands last)."""
    import threading

    registry = storage.BundleRegistry(storage.join(base, "models"))
    bundles = [_bundle_like(tmp_path / f"b{i}", {"detector.json": f'{{"v": {i}}}'.encode(), "prompts.pt": b"p%d" % i})
               for i in range(4)]
    barrier, results, errors = threading.Barrier(len(bundles)), {}, []

    def push(i):
        try:
            barrier.wait(30)
            results[i] = registry.push(bundles[i], "line-9").version
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(bundles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(results.values()) == ["v0001", "v0002", "v0003", "v0004"]
    for i, version in results.items():  # each version holds the bundle that claimed it, whole
        pulled = registry.pull("line-9", version, tmp_path / f"pulled-{version}")
        assert (pulled / "prompts.pt").read_bytes() == b"p%d" % i
    assert registry.latest("line-9") == "v0004"

    # Another push's claim on an explicit version is respected; a push of the same content that
    # did not finish (its claim, no manifest) may be run again.
    storage.write_bytes(storage.join(registry._name_uri("line-9"), ".claims", "v0007.json"),
                        b'{"manifest_sha256": "another-bundle"}')
    with pytest.raises(StorageError, match="being published with other content by another push"):
        registry.push(bundles[0], "line-9", version="v0007")
    assert [v.version for v in registry.versions("line-9")] == ["v0001", "v0002", "v0003", "v0004"]
    if storage.is_remote(base):  # (a local push is one rename: it cannot stop half way)
        registry.push(bundles[1], "line-9", version="v0008", set_latest=False)
        storage.delete(storage.join(registry.version_uri("line-9", "v0008"), "manifest.json"))  # as if it died
        assert registry.push(bundles[1], "line-9", version="v0008", set_latest=False).version == "v0008"
    # Re-running an earlier push changes nothing, latest included.
    second = next(i for i, version in results.items() if version == "v0002")
    info = registry.push(bundles[second], "line-9", version="v0002")
    assert registry.latest("line-9") == "v0004" and not info.latest
    # A numbered push never moves latest back: one that finishes after a newer one leaves it.
    assert not registry._point_latest("line-9", "v0003", forward_only=True)
    assert registry.latest("line-9") == "v0004"
    # A named version made latest does not stop numbered pushes from moving it on.
    registry.push(bundles[3], "line-9", version="prod")
    assert registry.latest("line-9") == "prod"
    extra = _bundle_like(tmp_path / "b9", {"detector.json": b'{"v": 9}', "prompts.pt": b"p9"})
    info = registry.push(extra, "line-9")
    assert info.latest and registry.latest("line-9") == info.version


def test_an_unknown_profile_or_a_bad_bucket_name_is_one_line(monkeypatch, capsys):
    from anomalyfleet.cli import main

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("ANOMALYFLEET_S3_PROFILE", "no-such-profile-here")
    assert main(["bundle", "list", "--registry", "s3://some-bucket/models"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-profile-here" in err[0], err
    monkeypatch.delenv("ANOMALYFLEET_S3_PROFILE")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://Bad_Bucket!/key")
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.unlink(), "listed in the manifest but missing"),
    (lambda f: f.write_bytes(b"shor"), r"size 4 bytes, manifest says 6 \(truncated\?\)"),
    (lambda f: f.write_bytes(b"BYTES!"), r"checksum mismatch \(corrupted\)"),
])
def test_both_manifest_readers_name_a_damaged_file_alike(tmp_path, damage, message):
    """verify_manifest (streams files from disk) and read_verified (reads them into memory) check the
    same things and say the same."""
    from anomalyfleet.manifest import ManifestError, read_verified, verify_manifest

    root = tmp_path / "artefact"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "w.bin").write_bytes(b"bytes!")
    (root / "a.json").write_bytes(b"{}")
    write_manifest(root)
    raw, files = read_verified(root)
    assert files == {"a.json": b"{}", "sub/w.bin": b"bytes!"} and verify_manifest(root)["files"].keys() == files.keys()
    damage(root / "sub" / "w.bin")
    for reader in (verify_manifest, lambda r: read_verified(r, attempts=1)):
        with pytest.raises(ManifestError, match=f"{root / 'sub' / 'w.bin'}: {message}"):
            reader(root)


def test_a_dataset_mirror_is_found_again_on_another_node(s3_env, tmp_path, monkeypatch):
    """Feature actors may run on a node other than the driver's, whose paths point into the
    driver's mirror of an s3:// dataset: each node fetches its own, at the same relative place,
    with the objects' times (so data fingerprints agree), and refuses a prefix that changed."""
    uri = s3_env.uri(_unique("dataset"))
    for name in ("normal/a.png", "normal/b.png"):
        storage.write_bytes(storage.join(uri, name), name.encode())
    monkeypatch.setenv("ANOMALYFLEET_CACHE", str(tmp_path / "driver-cache"))
    driver_root = storage.cached_prefix(uri)
    image = str(driver_root / "normal" / "b.png")
    mirrors = storage.prefix_mirrors_of([image, None, str(tmp_path / "elsewhere.png")])
    assert mirrors == {str(driver_root): uri}
    assert storage.localize_mirrored(mirrors)(image) == image  # on the driver's node: its own mirror
    stamp = os.stat(image).st_mtime_ns
    os.rename(tmp_path / "driver-cache", tmp_path / "gone")  # the other node has no such directory
    monkeypatch.setenv("ANOMALYFLEET_CACHE", str(tmp_path / "worker-cache"))  # and its cache elsewhere
    here = storage.localize_mirrored(mirrors)
    moved = here(image)
    assert moved.startswith(str(tmp_path / "worker-cache")) and Path(moved).read_bytes() == b"normal/b.png"
    assert here(None) is None and here("/data/local.png") == "/data/local.png"
    assert os.stat(moved).st_mtime_ns == stamp  # the object's time, on both nodes
    storage.write_bytes(storage.join(uri, "normal/c.png"), b"new")
    os.rename(tmp_path / "worker-cache", tmp_path / "gone-too")  # a third node, after the prefix grew
    with pytest.raises(StorageError, match="changed since this job listed it"):
        storage.localize_mirrored(mirrors)
