"""A pyarrow filesystem for a storage location, for libraries that take one (Ray Train run storage).

    fs, path = storage.pyarrow_filesystem("s3://bucket/runs")
    RunConfig(storage_path=path, storage_filesystem=fs)

The S3 filesystem is built from the same `S3Options` as the boto3 backend (endpoint, region,
explicit keys, retries, timeouts), so Ray writes where the storage layer reads. Without explicit
keys the credentials are left to the AWS default chain (AWS_* variables, ~/.aws, instance roles) in
whichever process uses the filesystem: the object is pickled to Ray's controller and workers, so
they need the storage environment too (`storage_env()` as runtime_env env_vars).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from anomalyfleet.errors import ConfigError
from anomalyfleet.storage.options import S3Options
from anomalyfleet.storage.uri import parse


def _endpoint(url: str) -> tuple[str, str]:
    """(scheme, host[:port]) of an endpoint URL; a bare host means https."""
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"S3 endpoint {url!r} must look like http(s)://host[:port]")
    if parts.path.strip("/"):
        raise ConfigError(f"S3 endpoint {url!r} has a path; pyarrow takes only http(s)://host[:port]")
    return parts.scheme, parts.netloc


def _region(options: S3Options, bucket: str) -> str | None:
    """The region the boto3 backend would sign with (options, then AWS config), else the bucket's."""
    if options.region:
        return options.region
    import boto3

    session = boto3.session.Session(profile_name=options.profile) if options.profile else boto3.session.Session()
    if session.region_name:
        return session.region_name
    if options.endpoint_url:
        return "us-east-1"  # what the boto3 backend uses for self-hosted servers
    try:  # AWS proper: the bucket's own region, or redirects fail every request
        from pyarrow.fs import resolve_s3_region

        return resolve_s3_region(bucket)
    except Exception:  # noqa: BLE001 - offline or no permission: leave it to the AWS SDK
        return None


def _credentials(options: S3Options) -> dict:
    if options.access_key is not None:
        return {"access_key": options.access_key, "secret_key": options.secret_key,
                "session_token": options.session_token}
    if options.profile:
        # The AWS SDK inside pyarrow reads AWS_PROFILE but not our ANOMALYFLEET_S3_PROFILE: resolve
        # that profile's keys with boto3 (they then travel with the filesystem object).
        import boto3

        found = boto3.session.Session(profile_name=options.profile).get_credentials()
        if found is None:
            raise ConfigError(f"AWS profile {options.profile!r} has no credentials")
        frozen = found.get_frozen_credentials()
        return {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "session_token": frozen.token}
    return {}  # the default AWS chain, resolved where the filesystem is used


def pyarrow_filesystem(uri: str | Path, options: S3Options | None = None):
    """(pyarrow filesystem, path inside it) for a local path, file:// or s3:// URI.

    Local locations give `LocalFileSystem` and the absolute path; s3://bucket/prefix gives an
    `S3FileSystem` and "bucket/prefix", the form Ray's `RunConfig(storage_filesystem=...)` expects.
    """
    from pyarrow import fs

    loc = parse(uri)
    if not loc.is_remote:
        return fs.LocalFileSystem(), str(loc.path.resolve())
    options = (options or S3Options.from_env()).validate()
    kwargs: dict = {
        "region": _region(options, loc.bucket),
        "connect_timeout": options.connect_timeout,
        "request_timeout": options.read_timeout,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
        # Path-style unless asked otherwise; without an endpoint pyarrow picks virtual hosting itself.
        "force_virtual_addressing": options.addressing_style == "virtual",
        **_credentials(options),
    }
    if options.endpoint_url:
        kwargs["scheme"], kwargs["endpoint_override"] = _endpoint(options.endpoint_url)
    path = f"{loc.bucket}/{loc.key.strip('/')}".rstrip("/")
    return fs.S3FileSystem(**kwargs), path
