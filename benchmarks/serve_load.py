"""Load test of the scoring service on a local Ray (everything on 127.0.0.1, bounded in time and count).

    python benchmarks/serve_load.py                       # bundled detector, default steps
    python benchmarks/serve_load.py --rates 2,4,8,16 --step-s 10 --out benchmarks/results-serve-load.md

Three phases, each against a fresh deployment of the same app:
1. batching on (`max_batch_size` > 1) and 2. batching off (`max_batch_size` 1), one scorer replica
   with every core: open-loop load at rising rates; per rate the achieved throughput, p50/p95/p99
   latency, errors and the mean model batch size (reported by the service per request).
3. autoscaling (1..N replicas, one core each): a burst above one replica's capacity, then silence;
   the scorer's replica count sampled from `serve.status()` over time.

Open loop: requests start on schedule whatever the latency, so queueing shows in the tail; at most
`--max-in-flight` are outstanding (later ones are counted as shed, never queued without bound).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

APP = "anomalyfleet-bench"
LINE = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def synthetic_images(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Textured PNGs, some with a bright blob: realistic decode cost without any data set."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(count):
        base = 110 + 35 * np.sin(xx / 7.0 + i) * np.cos(yy / 11.0) + rng.normal(0, 6, (size, size))
        image = np.repeat(base[..., None], 3, axis=2)
        if i % 3 == 0:
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 12) ** 2] = [240, 60, 40]
        buffer = io.BytesIO()
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def folder_images(path: Path, limit: int) -> list[bytes]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))[:limit]
    if not files:
        raise SystemExit(f"no images under {path}")
    return [p.read_bytes() for p in files]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def open_loop(url: str, images: list[bytes], rate: float, duration_s: float, max_requests: int,
                    max_in_flight: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    batches: list[int] = []
    errors = shed = 0
    in_flight = 0
    timeout = aiohttp.ClientTimeout(total=120)

    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=max_in_flight)) as session:
        async def one(body: bytes) -> None:
            nonlocal errors, in_flight
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "image/png"}) as response:
                    payload = await response.json()
                    if response.status == 200:
                        latencies.append((time.perf_counter() - started) * 1000.0)
                        batches.append(int(payload.get("batch_size", 1)))
                    else:
                        errors += 1
            except Exception:
                errors += 1
            finally:
                in_flight -= 1

        tasks = []
        begin = time.perf_counter()
        sent = 0
        while sent < max_requests:
            due = begin + sent / rate
            if due - begin > duration_s:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            sent += 1
            if in_flight >= max_in_flight:
                shed += 1
                continue
            in_flight += 1
            tasks.append(asyncio.create_task(one(images[sent % len(images)])))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    return {
        "offered_rps": rate, "sent": sent, "ok": len(latencies), "errors": errors, "shed": shed,
        "throughput_rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95), "p99_ms": percentile(latencies, 99),
        "mean_batch": float(np.mean(batches)) if batches else float("nan"),
    }


def deploy(config, http_port: int) -> str:
    from ray import serve

    from anomalyfleet.serving.app import build_app

    serve.run(build_app(config), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{http_port}"


def warm_up(base: str, images: list[bytes], count: int = 4) -> None:
    import requests

    for body in images[:count]:
        r = requests.post(f"{base}/v1/lines/{LINE}/score", data=body, headers={"Content-Type": "image/png"}, timeout=300)
        r.raise_for_status()


def scorer_replicas() -> dict:
    from ray import serve

    try:
        deployment = serve.status().applications[APP].deployments["DetectorScorer"]
    except KeyError:
        return {}
    return dict(deployment.replica_states)


async def autoscaling_phase(base: str, images: list[bytes], rate: float, burst_s: float, quiet_s: float,
                            max_requests: int, max_in_flight: int, sample_s: float = 1.0) -> tuple[dict, list[tuple]]:
    timeline: list[tuple] = []
    begin = time.perf_counter()
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            states = await asyncio.to_thread(scorer_replicas)
            timeline.append((time.perf_counter() - begin, states.get("RUNNING", 0),
                             sum(v for k, v in states.items() if k != "RUNNING")))
            try:
                await asyncio.wait_for(stop.wait(), timeout=sample_s)
            except asyncio.TimeoutError:
                pass

    watcher = asyncio.create_task(sampler())
    load = await open_loop(f"{base}/v1/lines/{LINE}/score", images, rate, burst_s, max_requests, max_in_flight)
    await asyncio.sleep(quiet_s)
    stop.set()
    await watcher
    return load, timeline


def table(rows: list[dict]) -> str:
    head = "| batching | offered req/s | sent | ok | errors | shed | throughput req/s | p50 ms | p95 ms | p99 ms | mean batch |"
    lines = [head, "| --- " * 11 + "|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['offered_rps']:g} | {r['sent']} | {r['ok']} | {r['errors']} | {r['shed']} | "
            f"{r['throughput_rps']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="default", help="detector bundle (default: the bundled offline detector)")
    parser.add_argument("--images", default=None, help="directory of images to send (default: synthetic PNGs)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the synthetic images")
    parser.add_argument("--rates", default="2,4,8,16", help="offered request rates per step (req/s)")
    parser.add_argument("--step-s", type=float, default=10.0, help="seconds per rate step")
    parser.add_argument("--max-requests", type=int, default=400, help="cap on requests per step")
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-s", type=float, default=0.02)
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscaling ceiling (default: cores)")
    parser.add_argument("--burst-rate", type=float, default=None, help="autoscaling burst rate (default: highest rate)")
    parser.add_argument("--burst-s", type=float, default=40.0)
    parser.add_argument("--quiet-s", type=float, default=40.0)
    parser.add_argument("--skip-autoscaling", action="store_true")
    parser.add_argument("--out", default=None, help="also write the tables (markdown) and raw JSON beside it")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from anomalyfleet.cli import default_detector_path
    from anomalyfleet.serving.config import ServiceConfig

    bundle = str(default_detector_path()) if args.bundle == "default" else str(Path(args.bundle).resolve())
    images = folder_images(Path(args.images), 64) if args.images else synthetic_images(16, args.image_size)
    rates = [float(x) for x in args.rates.split(",") if x]
    cores = os.cpu_count() or 2
    max_replicas = args.max_replicas or max(2, cores)
    work = Path(tempfile.mkdtemp(prefix="anomalyfleet-bench-"))
    registry = work / "registry.json"
    registry.write_text(json.dumps({"version": 1, "lines": {LINE: {"bundle": bundle, "threshold": 0.5}}}))

    http_port = free_port()
    ray.init(num_cpus=max(cores, max_replicas), include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    rows, scaling = [], None
    try:
        common = dict(registry=str(registry), registry_check_interval_s=60, gateway_num_cpus=0.1,
                      gateway_max_replicas=1, batch_wait_timeout_s=args.batch_wait_s)
        for mode, batch in (("on", args.max_batch_size), ("off", 1)):
            config = ServiceConfig(**common, min_replicas=1, max_replicas=1, num_cpus=1, torch_threads=cores,
                                   max_batch_size=batch, max_ongoing_requests=max(32, batch))
            base = deploy(config, http_port)
            warm_up(base, images)
            for rate in rates:
                result = asyncio.run(open_loop(f"{base}/v1/lines/{LINE}/score", images, rate, args.step_s,
                                               args.max_requests, args.max_in_flight))
                result["mode"] = mode
                rows.append(result)
                print(f"batching {mode:>3} @ {rate:g} req/s: {result['throughput_rps']:.2f} req/s, "
                      f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, batch {result['mean_batch']:.2f}",
                      file=sys.stderr, flush=True)
            serve.delete(APP)
        if not args.skip_autoscaling:
            config = ServiceConfig(**common, min_replicas=1, max_replicas=max_replicas, num_cpus=max(0.5, (cores - 0.2) / max_replicas),
                                   torch_threads=1, max_batch_size=args.max_batch_size, target_ongoing_requests=2,
                                   upscale_delay_s=2, downscale_delay_s=10, max_ongoing_requests=32)
            base = deploy(config, http_port)
            warm_up(base, images)
            burst = args.burst_rate or max(rates)
            load, timeline = asyncio.run(autoscaling_phase(base, images, burst, args.burst_s, args.quiet_s,
                                                           args.max_requests * 4, args.max_in_flight))
            scaling = {"burst_rps": burst, "load": load, "timeline": timeline}
            serve.delete(APP)
    finally:
        serve.shutdown()
        ray.shutdown()

    report = [f"## Serving load ({Path(bundle).name}, {cores} cores, {len(images)} distinct images)", "", table(rows)]
    if scaling:
        load = scaling["load"]
        report += ["", f"Autoscaling: burst at {scaling['burst_rps']:g} req/s for {args.burst_s:g} s, then {args.quiet_s:g} s idle "
                   f"(ok {load['ok']}, errors {load['errors']}, shed {load['shed']}, p50 {load['p50_ms']:.0f} ms, "
                   f"p99 {load['p99_ms']:.0f} ms).", "", "| t (s) | running scorer replicas | starting/stopping |", "| --- | --- | --- |"]
        last = None
        for t, running, other in scaling["timeline"]:
            if (running, other) != last:  # only the changes, to keep the table short
                report.append(f"| {t:.0f} | {running} | {other} |")
                last = (running, other)
        if scaling["timeline"]:
            t, running, other = scaling["timeline"][-1]
            report.append(f"| {t:.0f} (end) | {running} | {other} |")
    text = "\n".join(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps({"rows": rows, "autoscaling": scaling}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
