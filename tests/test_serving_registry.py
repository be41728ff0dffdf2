"""The line registry and request parsing refuse bad input once, with a reason, without Ray."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest

from anomalyfleet.errors import ConfigError
from anomalyfleet.manifest import write_manifest
from anomalyfleet.serving.registry import LineRegistry, parse_registry
from tests.ray_serve_helpers import make_bundle

HEX = "a" * 64


@pytest.mark.parametrize("text, message", [
    ("lines:\n  a: {bundle: b1}\n  a: {bundle: b2, threshold: 0.9}\n", "found duplicate key 'a'"),
    ('{"lines": {"a": {"bundle": "b1", "bundle": "b2"}}}', "found duplicate key 'bundle'"),
    ("lines:\n  a: {bundle: b, tokens: [{name: x}]}\n", "line 'a' tokens: token grant 'x' needs exactly one of"),
    ("lines:\n  a: {bundle: b, tokens: ['']}\n", "needs exactly one of token, token_sha256, token_env"),
    (f"lines:\n  a: {{bundle: b, tokens: [{{token: t, token_sha256: {HEX}}}]}}\n", "needs exactly one of"),
    ("lines:\n  a: {bundle: b, tokens: [{token_sha256: zz}]}\n", "token_sha256 must be 64 hex digits"),
    ("lines:\n  a: {bundle: b, tokens: [{tokn: x}]}\n", "tokens[0]: unknown key tokn (expected name, token"),
    ("lines:\n  a: {bundle: b, tokens: [123]}\n", "tokens[0]: expected a token string or a table, got int"),
    ("lines:\n  a: {bundle: b, threshold: .nan}\n", "lines.a.threshold: Input should be a finite number"),
    ("lines:\n  a: {bundle: b, pixel_threshold: .inf}\n", "lines.a.pixel_threshold: Input should be a finite number"),
    ("lines:\n  a: {bundle: b, threshold: yes}\n", "lines.a.threshold: Input should be a valid number"),
    ("lines:\n  a: {bundle: b, window: {threshold: -.inf}}\n", "lines.a.window.threshold: Input should be a finite number"),
])
def test_bad_registries_are_refused_naming_the_problem(text, message):
    with pytest.raises(ConfigError) as error:
        parse_registry(text)
    assert message in str(error.value)
    assert "Value error" not in str(error.value) and "lax-or-strict" not in str(error.value)


def test_registry_values_that_are_fine():
    # Above 1 is a valid threshold for a line memory's calibrated scores (checked against the bundle).
    document = parse_registry("lines:\n  a: {bundle: b, threshold: 1}\n  c: {bundle: b, threshold: 2.5}\n")
    assert document.lines["a"].threshold == 1.0 and document.lines["c"].threshold == 2.5
    # Exponents without a dot (as json.dumps writes small numbers) are strings to YAML 1.1: numbers here.
    exponents = parse_registry('{"lines": {"a": {"bundle": "b", "threshold": 1e-05, "pixel_threshold": 2e0}}}')
    assert exponents.lines["a"].threshold == 1e-05 and exponents.lines["a"].pixel_threshold == 2.0
    merged = parse_registry("lines:\n  a: &base {bundle: x, threshold: 0.5}\n  b:\n    <<: *base\n    bundle: y\n")
    assert merged.lines["b"].bundle == "y" and merged.lines["b"].threshold == 0.5  # << then an override


def test_a_damaged_bundle_or_impossible_threshold_takes_down_only_its_line(tmp_path, openai_clip_file):
    good = make_bundle(openai_clip_file, tmp_path / "good", seed=1, threshold=0.4)
    damaged = make_bundle(openai_clip_file, tmp_path / "damaged", seed=2, threshold=0.4)
    meta = json.loads((damaged / "detector.json").read_text())
    meta["settings"]["layers"] = 5  # wrong type, behind a manifest that verifies
    (damaged / "detector.json").write_text(json.dumps(meta))
    write_manifest(damaged)
    registry = tmp_path / "lines.yaml"
    registry.write_text(f"lines:\n  ok: {{bundle: {good}}}\n  bad: {{bundle: {damaged}}}\n"
                        f"  strict: {{bundle: {good}, threshold: 1.5}}\n")
    snapshot = LineRegistry(str(registry)).load()
    assert set(snapshot.lines) == {"ok"}
    assert "cannot read bundle" in snapshot.errors["bad"]
    assert "above 1, but its bundle scores with prompts alone" in snapshot.errors["strict"]


def test_a_registry_check_does_not_hold_up_requests():
    """A registry in object storage that does not answer blocks its reader for as long as storage
    retries; the check runs beside the request, not in front of it."""
    from anomalyfleet.serving.app import Gateway

    gateway_cls = Gateway.func_or_class
    release, reading = threading.Event(), threading.Event()

    class StalledRegistry:
        def changed(self, snapshot):
            reading.set()
            release.wait(30)
            return False

    gateway = SimpleNamespace(config=SimpleNamespace(registry_check_interval_s=0.0), _last_check=0.0,
                              _refreshing=None, snapshot=None, registry=StalledRegistry())
    gateway._check_then_refresh = lambda: gateway_cls._check_then_refresh(gateway)

    async def request_path():
        await gateway_cls._maybe_refresh(gateway)  # returns at once, the read still stalled
        stalled = not release.is_set()
        await gateway_cls._maybe_refresh(gateway)  # a check in progress is not started twice
        await asyncio.to_thread(reading.wait, 30)
        release.set()
        await gateway._refreshing
        return stalled

    assert asyncio.run(request_path())


def test_a_batch_reports_one_threshold_only_when_all_results_share_it():
    from anomalyfleet.serving.app import shared_threshold

    assert shared_threshold([{"threshold": 0.5}, {"threshold": 0.5}]) == 0.5
    # The line's rolling window filled up within the batch: its later results use the window's.
    assert shared_threshold([{"threshold": 0.5}, {"threshold": 3.0}]) is None


def test_multipart_file_names_may_hold_semicolons_and_quotes():
    from anomalyfleet.serving.inputs import _header_params

    assert _header_params('form-data; name="file"; filename="lot;7.png"') == ("form-data", {"name": "file", "filename": "lot;7.png"})
    assert _header_params('form-data; name=file; filename="a\\"b.png"')[1]["filename"] == 'a"b.png'
    assert _header_params('form-data; filename="C:\\dir\\x.png"')[1]["filename"] == "C:\\dir\\x.png"
    assert _header_params("multipart/form-data; boundary=----x1") == ("multipart/form-data", {"boundary": "----x1"})
