"""The Ray Serve service end to end on a local Ray (127.0.0.1): scores equal the CLI's, tokens,
bad input, reload under traffic, and the app's series on Ray's metrics port."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyfleet.bundle import load_bundle
from anomalyfleet.scoring import score_images
from tests.image_sets import write_folder_dataset
from tests.ray_serve_helpers import local_serve, make_bundle
from tests.s3server import free_port

pytestmark = pytest.mark.slow

requests = pytest.importorskip("requests")

ALL_TOKEN = "client-token-all-lines"
B_TOKEN = "line-b-only-token"
MAX_BYTES = 300_000
MAX_PIXELS = 1_000_000
# The body timeout covers every request of the module: Serve hands a body from its proxy to the
# gateway through actor calls, which on a loaded 2-core machine can take a few seconds.
BODY_TIMEOUT_S = 10
THRESHOLD_A = 0.41
THRESHOLD_B = 0.55


def _version(bundle: Path) -> str:
    import hashlib

    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()[:12]


@pytest.fixture(scope="module")
def env(tmp_path_factory, openai_clip_file):
    from anomalyfleet.serving.config import ServiceConfig

    root = tmp_path_factory.mktemp("serving")
    data = write_folder_dataset(root / "parts", normals=3, anomalies=3)
    # Two lines on the same backbone (shared in the replica) with different prompts, map layers
    # and thresholds (line-a's from its bundle, line-b's from the registry).
    make_bundle(openai_clip_file, root / "bundles" / "a", seed=1, layers=(6,), threshold=THRESHOLD_A)
    make_bundle(openai_clip_file, root / "bundles" / "b", seed=2, layers=(3, 6), threshold=None)
    make_bundle(openai_clip_file, root / "bundles" / "r", seed=3, layers=(6,), threshold=0.5)
    registry = root / "registry.yaml"
    registry.write_text(
        "version: 1\n"
        "lines:\n"
        "  line-a: {bundle: bundles/a}\n"
        f"  line-b: {{bundle: bundles/b, threshold: {THRESHOLD_B}, tokens: ['{B_TOKEN}']}}\n"
        "  line-r: {bundle: bundles/r}\n"
    )
    config = ServiceConfig(
        registry=str(registry), registry_check_interval_s=0.2,
        min_replicas=1, max_replicas=1, num_cpus=0.5, gateway_num_cpus=0.25, gateway_max_replicas=1,
        max_batch_size=4, batch_wait_timeout_s=0.02, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, body_timeout_s=BODY_TIMEOUT_S,
        tokens=[{"name": "qa", "token": ALL_TOKEN, "lines": ["*"], "admin": True}],
    )
    http_port, metrics_port = free_port(), free_port()
    with local_serve(config, http_port, metrics_port, include_dashboard=False) as base:
        yield {
            "base": base, "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            "root": root, "data": data, "clip": openai_clip_file,
        }


def _auth(token: str = ALL_TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _cli_scores(bundle: Path, images: list[Path], out: Path) -> dict[str, dict]:
    detector = load_bundle(bundle)
    path = score_images(detector, images, out, batch_size=4, progress=False)
    return {Path(r["image"]).name: r for r in map(json.loads, path.read_text().splitlines())}


def test_two_lines_match_the_cli(env, tmp_path):
    images = sorted((env["data"] / "normal").glob("*.png")) + sorted((env["data"] / "anomaly").glob("*.png"))
    base = env["base"]
    for line, bundle, threshold in (("line-a", "a", THRESHOLD_A), ("line-b", "b", THRESHOLD_B)):
        expected = _cli_scores(env["root"] / "bundles" / bundle, images, tmp_path / line)
        for image in images:
            r = requests.post(f"{base}/v1/lines/{line}/score", data=image.read_bytes(),
                              headers={**_auth(), "Content-Type": "image/png"}, timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            assert abs(body["score"] - expected[image.name]["score"]) < 1e-5
            assert body["threshold"] == pytest.approx(threshold)
            assert body["anomalous"] == (body["score"] >= threshold)
            assert body["detector"]["version"] == _version(env["root"] / "bundles" / bundle)
            assert body["latency_ms"] > 0 and body["line"] == line
        # The batch endpoint (multipart, several files) and the map agree with the CLI too.
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images]
        r = requests.post(f"{base}/v1/lines/{line}/score-batch?return_map=true", files=files, headers=_auth(), timeout=60)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["image"] for x in results] == [p.name for p in images]
        for result in results:
            record = expected[result["image"]]
            assert abs(result["score"] - record["score"]) < 1e-5
            served = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(result["overlay_png"]))), dtype=int)
            cli = np.asarray(Image.open(tmp_path / line / record["overlay"]), dtype=int)
            assert served.shape == cli.shape and np.abs(served - cli).max() <= 1
            assert isinstance(result["boxes"], list)
            for box in result["boxes"]:
                assert 0 <= box["x0"] < box["x1"] <= result["width"] and 0 <= box["y0"] < box["y1"] <= result["height"]
    # The two lines really are different detectors.
    a = requests.post(f"{base}/v1/lines/line-a/score", data=images[0].read_bytes(), headers=_auth(), timeout=60).json()
    b = requests.post(f"{base}/v1/lines/line-b/score", data=images[0].read_bytes(), headers=_auth(), timeout=60).json()
    assert abs(a["score"] - b["score"]) > 1e-4


def test_lines_health_and_openapi(env):
    base = env["base"]
    listing = requests.get(f"{base}/v1/lines", headers=_auth(), timeout=30).json()
    by_line = {x["line"]: x for x in listing["lines"]}
    assert set(by_line) == {"line-a", "line-b", "line-r"}
    assert by_line["line-a"]["threshold_source"] == "bundle" and by_line["line-b"]["threshold_source"] == "registry"
    assert requests.get(f"{base}/healthz", timeout=30).json()["status"] == "ok"
    paths = requests.get(f"{base}/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/lines/{line}/score", "/v1/lines/{line}/score-batch", "/v1/lines", "/healthz"} <= set(paths)


def test_tokens(env):
    base = env["base"]
    image = sorted((env["data"] / "normal").glob("*.png"))[0].read_bytes()
    cases = [
        ("line-a", {}, 401),
        ("line-a", {"Authorization": "Basic abc"}, 401),
        ("line-a", _auth("wrong-token"), 401),
        ("line-a", _auth(B_TOKEN), 403),
        ("line-b", _auth(B_TOKEN), 200),
        ("line-a", _auth(ALL_TOKEN), 200),
        ("line-b", _auth(ALL_TOKEN), 200),
    ]
    for line, headers, status in cases:
        r = requests.post(f"{base}/v1/lines/{line}/score", data=image, headers=headers, timeout=60)
        assert r.status_code == status, (line, headers, r.text)
        if status != 200:
            assert isinstance(r.json()["detail"], str)
        if status == 401:
            assert r.headers.get("www-authenticate") == "Bearer"
    assert requests.get(f"{base}/v1/lines", timeout=30).status_code == 401
    visible = requests.get(f"{base}/v1/lines", headers=_auth(B_TOKEN), timeout=30).json()["lines"]
    assert [x["line"] for x in visible] == ["line-b"]
    assert requests.post(f"{base}/v1/admin/reload", headers=_auth(B_TOKEN), timeout=30).status_code == 403
    reloaded = requests.post(f"{base}/v1/admin/reload", headers=_auth(ALL_TOKEN), timeout=60)
    assert reloaded.status_code == 200 and len(reloaded.json()["lines"]) == 3


def _png(size: tuple[int, int], colour=(120, 80, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_inputs_are_4xx_and_the_replica_keeps_serving(env):
    from ray import serve

    base = env["base"]
    good = sorted((env["data"] / "normal").glob("*.png"))[0].read_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, format="BMP")  # ~480 KB > MAX_BYTES
    cases = {
        "empty": (b"", {"Content-Type": "image/png"}, 400),
        "corrupt (truncated png)": (good[: len(good) // 2], {"Content-Type": "image/png"}, 400),
        "corrupt (png magic, garbage)": (b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, {}, 400),
        "wrong type (text body)": (b"hello, this is not an image", {"Content-Type": "application/octet-stream"}, 415),
        "wrong type (declared json)": (b'{"a": 1}', {"Content-Type": "application/json"}, 415),
        "wrong type (gif)": (gif.getvalue(), {"Content-Type": "image/gif"}, 415),
        "too large (bytes)": (big.getvalue(), {"Content-Type": "image/bmp"}, 413),
        "too large (pixels)": (_png((1200, 1000)), {"Content-Type": "image/png"}, 413),
    }
    for name, (body, headers, status) in cases.items():
        r = requests.post(f"{base}/v1/lines/line-a/score", data=body, headers={**_auth(), **headers}, timeout=60)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json"), name
        assert isinstance(r.json()["detail"], str) and r.json()["detail"], name
    r = requests.post(f"{base}/v1/lines/no-such-line/score", data=good, headers=_auth(), timeout=60)
    assert r.status_code == 404 and "no-such-line" in r.json()["detail"]
    # A misspelt option is refused, not ignored (the client would get no map and no reason).
    r = requests.post(f"{base}/v1/lines/line-a/score?return_maps=true", data=good, headers=_auth(), timeout=60)
    assert r.status_code == 422 and "'return_maps'" in r.json()["detail"] and "return_map" in r.json()["detail"]
    r = requests.post(f"{base}/v1/lines/line-a/score", files={"file": ("notes.txt", b"abc", "text/plain")},
                      headers=_auth(), timeout=60)
    assert r.status_code == 415 and "notes.txt" in r.json()["detail"]
    r = requests.post(f"{base}/v1/lines/line-a/score", files={"field": (None, "value")}, headers=_auth(), timeout=60)
    assert r.status_code == 400 and r.json()["detail"]  # multipart without a file part
    files = [("files", ("ok.png", good, "image/png")), ("files", ("bad.png", b"not an image", "image/png"))]
    r = requests.post(f"{base}/v1/lines/line-a/score-batch", files=files, headers=_auth(), timeout=60)
    assert r.status_code == 415 and "bad.png" in r.json()["detail"]
    r = requests.post(f"{base}/v1/lines/line-a/score-batch", data=good, headers={**_auth(), "Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 415
    # Over the byte limit without a Content-Length (chunked): refused while the body streams in.
    def chunks():
        for _ in range(MAX_BYTES // 50_000 + 4):
            yield b"\0" * 50_000

    r = requests.post(f"{base}/v1/lines/line-a/score", data=chunks(), headers={**_auth(), "Content-Type": "image/png"},
                      timeout=60)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"], r.text
    # A query parameter of the wrong type: the API's one error shape, not FastAPI's list.
    r = requests.post(f"{base}/v1/lines/line-a/score?return_map=maybe", data=good, headers=_auth(), timeout=60)
    assert r.status_code == 422 and r.json()["detail"].startswith("return_map: "), r.text
    # A camera's multi-picture JPEG (MPO) is a JPEG: scored, not refused as an unknown format.
    mpo = io.BytesIO()
    frame = Image.open(io.BytesIO(good)).convert("RGB")
    frame.save(mpo, format="MPO", save_all=True, append_images=[frame])
    r = requests.post(f"{base}/v1/lines/line-a/score", data=mpo.getvalue(), headers={**_auth(), "Content-Type": "image/jpeg"},
                      timeout=60)
    assert r.status_code == 200 and r.json()["width"] == frame.width, r.text
    # A stalled upload is cut off (body_timeout_s = 2 here) with a JSON 408, instead of holding a
    # gateway slot forever: 64 of them used to freeze the service, /healthz included.
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/lines/line-a/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALL_TOKEN.encode()
                     + b"\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nabc")
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and f"not received within {BODY_TIMEOUT_S} s".encode() in reply, reply
    assert time.monotonic() - started < BODY_TIMEOUT_S + 30
    # Still serving, on the same replicas.
    r = requests.post(f"{base}/v1/lines/line-a/score", data=good, headers=_auth(), timeout=60)
    assert r.status_code == 200
    deployments = serve.status().applications["anomalyfleet"].deployments
    for name in ("Gateway", "DetectorScorer"):
        assert deployments[name].status == "HEALTHY", deployments[name]
        assert deployments[name].replica_states == {"RUNNING": 1}, deployments[name].replica_states


def test_bundle_reload_under_traffic_loses_no_request(env, tmp_path):
    base = env["base"]
    bundle = env["root"] / "bundles" / "r"
    image = sorted((env["data"] / "anomaly").glob("*.png"))[0]
    body = image.read_bytes()
    old_version = _version(bundle)
    results: list[tuple[int, str | None]] = []
    lock = threading.Lock()
    started = threading.Event()

    def client(count: int) -> None:
        for _ in range(count):
            try:
                r = requests.post(f"{base}/v1/lines/line-r/score", data=body, headers=_auth(), timeout=60)
                version = r.json().get("detector", {}).get("version") if r.status_code == 200 else None
                status = r.status_code
            except requests.RequestException:
                status, version = -1, None
            with lock:
                results.append((status, version))
                if len(results) >= 6:
                    started.set()
            time.sleep(0.1)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(client, 20) for _ in range(2)]
        assert started.wait(60)
        # Republish the line's bundle in place (new prompts, new threshold), as calibration does.
        make_bundle(env["clip"], bundle, seed=33, layers=(6,), threshold=0.45)
        for future in futures:
            future.result()
    new_version = _version(bundle)
    assert len(results) == 40
    assert [s for s, _ in results if s != 200] == []
    assert {v for _, v in results} <= {old_version, new_version}
    expected = _cli_scores(bundle, [image], tmp_path / "cli")[image.name]
    deadline = time.time() + 60
    while True:
        r = requests.post(f"{base}/v1/lines/line-r/score", data=body, headers=_auth(), timeout=60).json()
        if r["detector"]["version"] == new_version or time.time() > deadline:
            break
        time.sleep(0.3)
    assert r["detector"]["version"] == new_version
    assert abs(r["score"] - expected["score"]) < 1e-5 and r["threshold"] == pytest.approx(0.45)

    # Editing the registry (here: line-r's threshold) is picked up the same way, without a redeploy.
    registry = env["root"] / "registry.yaml"
    text = registry.read_text().replace("line-r: {bundle: bundles/r}", "line-r: {bundle: bundles/r, threshold: 0.77}")
    staging = registry.with_name(".registry.yaml.tmp")
    staging.write_text(text)
    staging.replace(registry)
    deadline = time.time() + 30
    while time.time() < deadline:
        r = requests.post(f"{base}/v1/lines/line-r/score", data=body, headers=_auth(), timeout=60)
        assert r.status_code == 200
        if r.json()["threshold"] == pytest.approx(0.77):
            break
        time.sleep(0.3)
    assert r.json()["threshold"] == pytest.approx(0.77) and r.json()["detector"]["version"] == new_version


def test_a_refused_registry_reload_says_why_and_keeps_serving(env):
    base = env["base"]
    registry = env["root"] / "registry.yaml"
    original = registry.read_text()
    good = sorted((env["data"] / "normal").glob("*.png"))[0].read_bytes()
    before = requests.get(f"{base}/v1/lines", headers=_auth(), timeout=60).json()
    try:
        registry.write_text("version: 1\nlines: {line-a: [\n")
        r = requests.post(f"{base}/v1/admin/reload", headers=_auth(), timeout=120)
        assert r.status_code == 422, r.text
        assert "registry not reloaded, still serving the previous one" in r.json()["detail"] and "not valid YAML/JSON (line 3, column 1" in r.json()["detail"]
        assert requests.post(f"{base}/v1/lines/line-a/score", data=good, headers=_auth(), timeout=60).status_code == 200
        assert requests.get(f"{base}/v1/lines", headers=_auth(), timeout=60).json() == before
    finally:
        registry.write_text(original)
    r = requests.post(f"{base}/v1/admin/reload", headers=_auth(), timeout=120)
    assert r.status_code == 200 and r.json()["registry_version"] == before["registry_version"]


def test_metrics_on_rays_export_port(env):
    base = env["base"]
    image = sorted((env["data"] / "normal").glob("*.png"))[0].read_bytes()
    for line in ("line-a", "line-b"):
        assert requests.post(f"{base}/v1/lines/{line}/score", data=image, headers=_auth(), timeout=60).status_code == 200
    requests.post(f"{base}/v1/lines/line-a/score", data=image, timeout=60)  # refused: counted
    # A client that hangs up halfway through its upload: counted as cancelled (499), not as an
    # internal error that would page someone, nor as a success.
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/lines/line-r/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALL_TOKEN.encode()
                     + b"\r\nContent-Type: image/png\r\nContent-Length: " + str(len(image)).encode() + b"\r\n\r\n"
                     + image[:len(image) // 2])
        time.sleep(6)  # the request reaches the gateway (can take seconds on a loaded machine); body timeout: 10 s
    wanted = [
        'ray_anomalyfleet_requests_total{', 'ray_anomalyfleet_errors_total{', 'ray_anomalyfleet_score_bucket{',
        'ray_anomalyfleet_request_latency_ms_bucket{', 'ray_anomalyfleet_model_latency_ms_bucket{',
        'ray_anomalyfleet_batch_size_bucket{',
    ]
    deadline = time.time() + 90
    text = ""
    while time.time() < deadline:
        try:
            text = requests.get(env["metrics"], timeout=10).text
        except requests.RequestException:
            text = ""
        series = [line for line in text.splitlines() if line.startswith("ray_anomalyfleet_")]
        hung_up = [s for s in series if 'line="line-r"' in s and not s.startswith("ray_anomalyfleet_model")]
        if all(any(s.startswith(w) and 'line="line-a"' in s for s in series) for w in wanted) and \
                any('line="line-b"' in s for s in series) and any('kind="unauthorized"' in s for s in series) and \
                any('kind="cancelled"' in s for s in hung_up) and any('code="499"' in s for s in hung_up):
            break
        time.sleep(1)
    else:
        def short(series: str) -> str:  # name, the labels we set, value (Ray's own labels are long)
            ours = re.findall(r'\b(?:line|kind|code|endpoint)="[^"]*"', series)
            return f"{series.split('{', 1)[0]}{{{','.join(ours)}}} {series.rsplit(' ', 1)[-1]}"

        pytest.fail("app series missing on the metrics port:\n" + "\n".join(sorted(
            short(s) for s in text.splitlines() if s.startswith(("ray_anomalyfleet_requests", "ray_anomalyfleet_errors")))))
    # Serve's own series are exported beside ours.
    assert "ray_serve_" in text
    # (line-r's earlier requests in this module were 200s; none of its requests was an internal error)
    assert not [s for s in hung_up if 'kind="internal"' in s or 'code="500"' in s], hung_up


def test_pool_shares_one_backbone_between_lines_and_matches_predict(tmp_path, openai_clip_file):
    """The replica's model logic without Ray: two bundles on one backbone object, CLI-equal scores."""
    from anomalyfleet.data.transforms import load_image, preprocess_image
    from anomalyfleet.serving.inputs import model_pixels
    from anomalyfleet.serving.registry import manifest_version
    from anomalyfleet.serving.service import DetectorPool, ScoreItem

    a = make_bundle(openai_clip_file, tmp_path / "a", seed=1, layers=(6,), threshold=0.3)
    b = make_bundle(openai_clip_file, tmp_path / "b", seed=2, layers=(3, 6), threshold=None)
    data = write_folder_dataset(tmp_path / "parts", normals=2, anomalies=2)
    images = sorted((data / "anomaly").glob("*.png")) + sorted((data / "normal").glob("*.png"))
    pool = DetectorPool("cpu")
    loaded_a = pool.load(f"{a}#{manifest_version(a)}")
    loaded_b = pool.load(f"{b}#{manifest_version(b)}")
    assert loaded_a.detector.backbone is loaded_b.detector.backbone and pool.shared_backbones == 1
    for loaded, bundle in ((loaded_a, a), (loaded_b, b), (loaded_a, a)):  # back to a: sizes/layers switch cleanly
        reference = load_bundle(bundle)
        batch = torch.stack([preprocess_image(load_image(p), 56, reference.mean, reference.std) for p in images])
        expected = reference.predict(batch)
        items = [ScoreItem("x", model_pixels(load_image(p), 56), want_map=True) for p in images]
        outcomes = pool.run(loaded, items)
        assert np.allclose([o.score for o in outcomes], expected.scores, atol=1e-5)
        assert np.allclose(np.stack([o.map for o in outcomes]), expected.maps, atol=1e-5)
        assert {o.version for o in outcomes} == {manifest_version(bundle)}
    del loaded_a, loaded_b, loaded
    import gc

    gc.collect()
    assert pool.shared_backbones == 0  # unloaded detectors release the backbone


def test_a_cancelled_request_is_counted_as_499_not_200():
    """Serve cancels the handler when the client goes away or its request timeout passes; the
    CancelledError is a BaseException, and the request must not be recorded as a success."""
    import asyncio
    from types import SimpleNamespace

    from anomalyfleet.serving.app import CLIENT_CLOSED, Gateway

    recorded = []

    async def nothing():
        return None

    metrics = SimpleNamespace(request=lambda line, endpoint, code, ms: recorded.append(("request", line, code)),
                              error=lambda line, kind: recorded.append(("error", line, kind)))
    gateway = SimpleNamespace(_maybe_refresh=nothing, _line=lambda request, line, snapshot: (object(), line),
                              snapshot=None, metrics=metrics)

    async def cancelled(state, started):
        raise asyncio.CancelledError

    line_request = Gateway.func_or_class._line_request
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(line_request(gateway, SimpleNamespace(query_params={}), "line-a", "score", cancelled))
    assert recorded == [("error", "line-a", "cancelled"), ("request", "line-a", CLIENT_CLOSED)]
