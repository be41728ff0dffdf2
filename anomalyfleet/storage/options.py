"""S3 connection settings: boto3's standard environment and config files, plus explicit options.

boto3 already reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE,
AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL(_S3) and ~/.aws/{config,credentials}. We add
the addressing style and the retry budget, which boto3 only takes from config files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from anomalyfleet.errors import ConfigError

ENV_PREFIX = "ANOMALYFLEET_S3_"


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    profile: str | None = None
    # "path" for most self-hosted servers (SeaweedFS, MinIO); "auto" lets botocore choose.
    addressing_style: str | None = None
    max_attempts: int = 5  # per request, throttling and connection errors included
    connect_timeout: float = 3.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024
    max_concurrency: int = 8

    def validate(self) -> "S3Options":
        if self.addressing_style not in (None, "auto", "path", "virtual"):
            raise ConfigError(f"S3 addressing style must be auto, path or virtual, not {self.addressing_style!r}")
        if self.max_attempts < 1 or self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ConfigError("S3 retries must be at least 1 and timeouts positive")
        if self.multipart_chunksize < 5 * 1024 * 1024:
            raise ConfigError("S3 multipart chunks must be at least 5 MiB")
        if (self.access_key is None) != (self.secret_key is None):
            raise ConfigError("give both an S3 access key and a secret key, or neither")
        return self

    @property
    def style(self) -> str:
        if self.addressing_style:
            return self.addressing_style
        return "path" if self.endpoint_url else "auto"

    def with_overrides(self, **changes) -> "S3Options":
        return replace(self, **{k: v for k, v in changes.items() if v is not None}).validate()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "S3Options":
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(ENV_PREFIX + name) or None

        def number(name: str, kind, default):
            raw = get(name)
            if raw is None:
                return default
            try:
                return kind(raw)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} is not a number") from None

        return cls(
            endpoint_url=get("ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=get("REGION"),
            access_key=get("ACCESS_KEY_ID"),
            secret_key=get("SECRET_ACCESS_KEY"),
            profile=get("PROFILE"),
            addressing_style=get("ADDRESSING_STYLE"),
            max_attempts=number("MAX_ATTEMPTS", int, cls.max_attempts),
            connect_timeout=number("CONNECT_TIMEOUT", float, cls.connect_timeout),
            read_timeout=number("READ_TIMEOUT", float, cls.read_timeout),
        ).validate()


def storage_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables that configure storage, to hand to Ray workers (runtime_env env_vars), so
    tasks and actors reach the same endpoint with the same credentials as the driver."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith((ENV_PREFIX, "AWS_"))}
