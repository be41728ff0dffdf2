"""HeldGauges sets a series' last value again until it is released (Ray drops gauges nobody sets)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from anomalyfleet.held_gauges import HeldGauges, ray_lifecycle_lock


class RecordingGauge:
    """Duck-typed gauge: remembers every set."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[float, dict]] = []
        self.fail = fail

    def set(self, value, tags=None):
        if self.fail and self.calls:
            raise RuntimeError("metrics backend gone")
        self.calls.append((value, dict(tags or {})))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_refresh_sets_the_last_value_of_each_series_until_released():
    clock = Clock()
    held = HeldGauges(refresh_s=3600, clock=clock)  # no thread pass during the test: refresh by hand
    try:
        gauge = RecordingGauge()
        a = held.set(gauge, 1.0, {"line": "a"})
        held.set(gauge, 2.0, {"line": "b"})
        held.set(gauge, 3.0, {"line": "a"})  # the newer value replaces the older
        assert held.held() == 2 and held.refresh() == 2
        assert sorted(gauge.calls[-2:], key=lambda c: c[1]["line"]) == [(3.0, {"line": "a"}), (2.0, {"line": "b"})]
        held.release([a])
        gauge.calls.clear()
        assert held.refresh() == 1 and gauge.calls == [(2.0, {"line": "b"})]
    finally:
        held.close()


def test_release_after_a_grace_period_keeps_the_series_until_then():
    clock = Clock()
    held = HeldGauges(refresh_s=3600, clock=clock)
    try:
        gauge = RecordingGauge()
        key = held.set(gauge, 1.0, {"job": "j"})
        held.release([key], after_s=60)
        clock.now += 59
        assert held.refresh() == 1
        clock.now += 2
        assert held.refresh() == 0 and held.held() == 0
        held.set(gauge, 2.0, {"job": "j"})  # set again: held again, without a release time
        clock.now += 3600
        assert held.refresh() == 1
    finally:
        held.close()


def test_a_failing_gauge_does_not_stop_the_others():
    held = HeldGauges(refresh_s=3600)
    try:
        broken, fine = RecordingGauge(fail=True), RecordingGauge()
        held.set(broken, 1.0, {"x": "1"})
        held.set(fine, 2.0, {"x": "2"})
        assert held.refresh() == 2
        assert fine.calls == [(2.0, {"x": "2"})] * 2
    finally:
        held.close()


def test_the_thread_refreshes_and_stops_on_close():
    held = HeldGauges(refresh_s=0.05)
    gauge = RecordingGauge()
    held.set(gauge, 7.0, {"line": "a"})
    deadline = time.monotonic() + 30
    while len(gauge.calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(gauge.calls) >= 3 and {c for c, _ in gauge.calls} == {7.0}
    held.close()
    count = len(gauge.calls)
    time.sleep(0.3)
    assert len(gauge.calls) == count and held.held() == 0


def test_refresh_interval_must_be_positive():
    with pytest.raises(ValueError):
        HeldGauges(refresh_s=0)


def test_series_of_another_scope_are_dropped_not_set_again():
    session = {"now": "ray-session-1"}
    held = HeldGauges(refresh_s=3600, scope=lambda: session["now"])
    try:
        gauge = RecordingGauge()
        held.set(gauge, 1.0, {"job": "old"})
        assert held.refresh() == 1
        session["now"] = "ray-session-2"  # the process ended its Ray session and started another
        gauge.calls.clear()
        assert held.refresh() == 0 and gauge.calls == [] and held.held() == 0
    finally:
        held.close()


def test_no_refresh_pass_runs_while_the_guard_is_held():
    """The guard stands for Ray's connect/shutdown lock: a pass during ray.shutdown() would call
    into a core worker being destroyed."""
    guard = threading.Lock()
    held = HeldGauges(refresh_s=0.02, guard=guard)
    gauge = RecordingGauge()
    try:
        held.set(gauge, 1.0, {"line": "a"})
        with guard:
            count = len(gauge.calls)
            time.sleep(0.3)  # fifteen refresh intervals
            assert len(gauge.calls) == count
        deadline = time.monotonic() + 30
        while len(gauge.calls) == count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(gauge.calls) > count
    finally:
        held.close()


def test_the_guard_for_ray_gauges_is_the_lock_ray_shutdown_holds():
    import ray._private.worker as ray_worker

    lock = ray_lifecycle_lock()
    assert lock is ray_worker._connect_or_shutdown_lock
    assert ray_worker.shutdown.__wrapped__ is not None  # shutdown runs under that lock (Ray 2.x's decorator)


def test_refresh_threads_stop_at_interpreter_exit_before_ray_shuts_down(tmp_path):
    """The exit hook is registered after Ray's (atexit runs in reverse), so a held gauge is not set
    while Ray's exit hook tears the core worker down."""
    log = tmp_path / "calls.txt"
    script = textwrap.dedent(f"""
        import atexit, time
        import ray  # registers ray.shutdown with atexit, as any Ray program does
        from anomalyfleet.held_gauges import HeldGauges, ray_lifecycle_lock

        class FileGauge:
            def set(self, value, tags=None):
                with open({str(log)!r}, "a") as f:
                    f.write("set\\n")

        def ray_exit_hook_stand_in():  # ray.shutdown at exit sleeps 0.5 s, then destroys the core worker
            with open({str(log)!r}, "a") as f:
                f.write("teardown-start\\n")
            time.sleep(0.3)
            with open({str(log)!r}, "a") as f:
                f.write("teardown-end\\n")

        atexit.register(ray_exit_hook_stand_in)
        held = HeldGauges(refresh_s=0.01, guard=ray_lifecycle_lock())
        held.set(FileGauge(), 1.0, {{"line": "a"}})
        time.sleep(0.2)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    lines = log.read_text().splitlines()
    assert lines.count("set") >= 2
    # The stand-in, registered before the first set like Ray's hook, runs after the thread stopped.
    assert lines[-2:] == ["teardown-start", "teardown-end"]
