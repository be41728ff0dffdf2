"""S3 backend on boto3: multipart transfers, bounded retries, and errors that name the URI.

An S3 object is never half-visible: a single PUT appears whole or not at all, and a multipart
upload appears only when completed, so a process killed mid-upload leaves nothing behind that a
reader would see (the incomplete upload is invisible and expires with the bucket's lifecycle).
"""

from __future__ import annotations

import functools
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from anomalyfleet.errors import StorageError
from anomalyfleet.manifest import default_mode
from anomalyfleet.storage.options import S3Options
from anomalyfleet.storage.types import ObjectInfo, ObjectNotFound
from anomalyfleet.storage.uri import Location

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken",
           "InvalidToken", "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
              "503", "RequestThrottled"}


def _client(options: S3Options):
    # boto3 reads credentials from AWS_* variables when the client is built; a change of them
    # (a rotated key) must give a new client, not the cached one.
    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return _cached_client(options, aws_env)


@functools.lru_cache(maxsize=16)
def _cached_client(options: S3Options, aws_env: tuple):
    # One client per settings and process: clients are thread-safe and costly to build.
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=options.profile) if options.profile else boto3.session.Session()
    config = Config(
        retries={"mode": "standard", "total_max_attempts": options.max_attempts},  # first try included
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        s3={"addressing_style": options.style},
        # Checksums on every request confuse some S3-compatible servers; send them only when required.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client(
        "s3",
        endpoint_url=options.endpoint_url,
        region_name=options.region or session.region_name or "us-east-1",
        aws_access_key_id=options.access_key,
        aws_secret_access_key=options.secret_key,
        aws_session_token=options.session_token,
        config=config,
    )


def _translate(exc: BaseException, uri: str, options: S3Options) -> StorageError | None:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
        exc = exc.__context__
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message") or code
        if code in _NOT_FOUND:
            return ObjectNotFound(f"not found: {uri}")
        if code == "NoSuchBucket":
            bucket = uri[len("s3://"):].split("/", 1)[0]
            return StorageError(f"{uri}: bucket {bucket!r} does not exist")
        if code in _DENIED:
            return StorageError(f"{uri}: access denied by the S3 server ({code}): check the credentials and their rights")
        if code in _THROTTLED:
            return StorageError(f"{uri}: the S3 server kept throttling ({code}) after {options.max_attempts} attempts")
        return StorageError(f"{uri}: S3 error {code}: {message}")
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)):
        endpoint = options.endpoint_url or "the default AWS endpoint"
        return StorageError(f"{uri}: cannot reach the S3 endpoint {endpoint} ({type(exc).__name__})")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"{uri}: no usable S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)")
    if isinstance(exc, BotoCoreError):
        # Some botocore messages run over several lines (an invalid bucket name): the first says it.
        return StorageError(f"{uri}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return None


class S3Backend:
    def __init__(self, options: S3Options):
        self.options = options

    @property
    def client(self):
        return _client(self.options)

    @contextmanager
    def _errors(self, loc: Location):
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            translated = _translate(exc, str(loc), self.options)
            if translated is None:
                raise
            raise translated from None

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.options.multipart_threshold,
            multipart_chunksize=self.options.multipart_chunksize,
            max_concurrency=self.options.max_concurrency,
        )

    def read_bytes(self, loc: Location) -> bytes:
        with self._errors(loc):
            return self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()

    def open_read(self, loc: Location) -> BinaryIO:
        """A streaming body: read(n) pulls from the network as it goes."""
        with self._errors(loc):
            return self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]

    def write_bytes(self, loc: Location, data: bytes, progress=None) -> None:
        if len(data) >= self.options.multipart_threshold:
            import io

            with self._errors(loc):
                self.client.upload_fileobj(io.BytesIO(data), loc.bucket, loc.key, Config=self._transfer_config(),
                                           Callback=progress)
            return
        with self._errors(loc):
            self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        if progress is not None:
            progress(len(data))

    def create_new(self, loc: Location, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(loc):
            try:
                self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*")
            except ClientError as exc:
                # 412: the object exists; 409: another conditional write to it is in flight.
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
        return True

    def replace_if(self, loc: Location, data: bytes, etag: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(loc):
            try:
                self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfMatch=f'"{etag}"')
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                                 "NoSuchKey", "404"):
                    return False
                raise
        return True

    def upload_file(self, source: Path, loc: Location, progress=None) -> None:
        if not Path(source).is_file():
            raise ObjectNotFound(f"not found: {source}")
        with self._errors(loc):
            self.client.upload_file(str(source), loc.bucket, loc.key, Config=self._transfer_config(), Callback=progress)

    def download_file(self, loc: Location, target: Path, progress=None) -> None:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            with self._errors(loc):
                self.client.download_file(loc.bucket, loc.key, tmp, Config=self._transfer_config(), Callback=progress)
            os.chmod(tmp, default_mode())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, loc: Location) -> bool:
        try:
            with self._errors(loc):
                self.client.head_object(Bucket=loc.bucket, Key=loc.key)
            return True
        except ObjectNotFound:
            return False

    def stat(self, loc: Location) -> ObjectInfo:
        with self._errors(loc):
            head = self.client.head_object(Bucket=loc.bucket, Key=loc.key)
        return ObjectInfo(str(loc), int(head["ContentLength"]), head.get("ETag", "").strip('"'))

    def list(self, loc: Location) -> Iterator[ObjectInfo]:
        prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        with self._errors(loc):  # building the client can fail too (an unknown profile)
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    modified = item.get("LastModified")
                    yield ObjectInfo(f"s3://{loc.bucket}/{item['Key']}", int(item["Size"]), item.get("ETag", "").strip('"'),
                                     modified.timestamp() if modified is not None else None)

    def delete(self, loc: Location) -> None:
        with self._errors(loc):
            self.client.delete_object(Bucket=loc.bucket, Key=loc.key)

    def copy(self, src: Location, dst: Location) -> None:
        with self._errors(dst):
            self.client.copy({"Bucket": src.bucket, "Key": src.key}, dst.bucket, dst.key, Config=self._transfer_config())
