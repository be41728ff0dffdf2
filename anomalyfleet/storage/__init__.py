"""Storage: one API for local paths, file:// and s3:// URIs (boto3), atomic and verifiable.

    from anomalyfleet import storage
    storage.write_bytes("s3://bucket/reports/a.json", data)
    storage.cached_tree("s3://bucket/detectors/line-7/v3")   # -> verified local directory
"""

from anomalyfleet.storage.arrow import pyarrow_filesystem
from anomalyfleet.storage.cache import cache_dir, locked
from anomalyfleet.storage.core import (
    copy,
    create_new,
    delete,
    download_file,
    exists,
    list_objects,
    open_read,
    read_bytes,
    read_text,
    stat,
    upload_file,
    write_bytes,
    write_text,
)
from anomalyfleet.storage.options import S3Options, storage_env
from anomalyfleet.storage.registry import BundleRegistry, VersionInfo
from anomalyfleet.storage.trees import (cached_prefix, cached_tree, get_tree, local_path_for, localize_mirrored,
                                       prefix_mirrors_of, put_tree, read_remote_manifest)
from anomalyfleet.storage.types import ObjectInfo, ObjectNotFound
from anomalyfleet.storage.uri import Location, basename, is_remote, join, parse

__all__ = [
    "BundleRegistry",
    "VersionInfo",
    "cached_prefix",
    "Location",
    "ObjectInfo",
    "ObjectNotFound",
    "S3Options",
    "basename",
    "cache_dir",
    "cached_tree",
    "copy",
    "create_new",
    "delete",
    "download_file",
    "exists",
    "get_tree",
    "is_remote",
    "join",
    "list_objects",
    "local_path_for",
    "localize_mirrored",
    "locked",
    "open_read",
    "parse",
    "prefix_mirrors_of",
    "put_tree",
    "pyarrow_filesystem",
    "read_bytes",
    "read_remote_manifest",
    "read_text",
    "stat",
    "storage_env",
    "upload_file",
    "write_bytes",
    "write_text",
]
