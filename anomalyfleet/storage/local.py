"""Local-directory backend: every write goes to a temporary name first, then is renamed."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from anomalyfleet.errors import StorageError
from anomalyfleet.manifest import atomic_write_bytes, default_mode
from anomalyfleet.storage.types import ObjectInfo, ObjectNotFound
from anomalyfleet.storage.uri import Location


CHUNK = 8 * 1024 * 1024


def _missing(loc: Location) -> ObjectNotFound:
    return ObjectNotFound(f"not found: {loc}")


def _os_error(loc: Location, exc: OSError, action: str) -> StorageError:
    return StorageError(f"cannot {action} {loc}: {exc.strerror or exc}")


def _etag(st: os.stat_result) -> str:
    """A local object's version: every write replaces the file (a new inode), so the inode tells two
    writes apart even within one timestamp tick."""
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _temporary(name: str) -> bool:
    """Names of atomic_write's temporary files and trees' staging directories (`.NAME.XXXX.tmp`)."""
    return name.startswith(".") and name.endswith(".tmp")


class LocalBackend:
    def read_bytes(self, loc: Location) -> bytes:
        try:
            return loc.path.read_bytes()
        except FileNotFoundError:
            raise _missing(loc) from None
        except IsADirectoryError:
            raise StorageError(f"{loc} is a directory, not a file") from None
        except OSError as exc:
            raise _os_error(loc, exc, "read") from None

    def open_read(self, loc: Location) -> BinaryIO:
        try:
            return open(loc.path, "rb")
        except FileNotFoundError:
            raise _missing(loc) from None
        except OSError as exc:
            raise _os_error(loc, exc, "read") from None

    def write_bytes(self, loc: Location, data: bytes, progress=None) -> None:
        try:
            atomic_write_bytes(loc.path, data)
        except OSError as exc:
            raise _os_error(loc, exc, "write") from None
        if progress is not None:
            progress(len(data))

    def create_new(self, loc: Location, data: bytes) -> bool:
        target = loc.path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp, default_mode())
                try:
                    os.link(tmp, target)  # whole, and only if nothing is there
                except FileExistsError:
                    return False
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                        raise
                    return _create_exclusive(target, data)  # a file system without hard links
            finally:
                os.unlink(tmp)
        except OSError as exc:
            raise _os_error(loc, exc, "write") from None
        return True

    def replace_if(self, loc: Location, data: bytes, etag: str) -> bool:
        import fcntl

        target = loc.path
        try:
            # Writers of this object take turns on a lock file beside it (one host or a file system
            # with working locks); the compare and the write happen under it.
            with open(target.with_name(f".{target.name}.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    st = target.stat()
                except FileNotFoundError:
                    return False
                if _etag(st) != etag:
                    return False
                atomic_write_bytes(target, data)
        except OSError as exc:
            raise _os_error(loc, exc, "write") from None
        return True

    def upload_file(self, source: Path, loc: Location, progress=None) -> None:
        self._copy_file(source, loc.path, str(loc), progress)

    def download_file(self, loc: Location, target: Path, progress=None) -> None:
        if not loc.path.is_file():
            raise _missing(loc)
        self._copy_file(loc.path, target, str(loc), progress)

    @staticmethod
    def _copy_file(source: Path, target: Path, label: str, progress=None) -> None:
        target = Path(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            try:
                with open(source, "rb") as reader, open(tmp, "wb") as writer:
                    while block := reader.read(CHUNK):
                        writer.write(block)
                        if progress is not None:
                            progress(len(block))
                os.chmod(tmp, default_mode())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except FileNotFoundError:
            raise ObjectNotFound(f"not found: {source}") from None
        except OSError as exc:
            raise StorageError(f"cannot copy to {label}: {exc.strerror or exc}") from None

    def exists(self, loc: Location) -> bool:
        return loc.path.exists()

    def stat(self, loc: Location) -> ObjectInfo:
        try:
            st = loc.path.stat()
        except FileNotFoundError:
            raise _missing(loc) from None
        return ObjectInfo(str(loc), st.st_size, _etag(st))

    def list(self, loc: Location) -> Iterator[ObjectInfo]:
        root = loc.path
        if root.is_file():
            yield self.stat(loc)
            return
        if not root.is_dir():
            return
        # os.walk skips a directory that goes away while it is walked (another writer renaming its
        # staging directory into place), where rglob would raise.
        found = []
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if not _temporary(d)]  # another writer's staging directory
            found.extend(Path(directory) / name for name in files if not _temporary(name))
        for path in sorted(found):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # removed or renamed away since the walk
            yield ObjectInfo(str(path), st.st_size, _etag(st))

    def delete(self, loc: Location) -> None:
        try:
            if loc.path.is_dir():
                shutil.rmtree(loc.path)
            else:
                loc.path.unlink()
        except FileNotFoundError:
            pass  # deleting what is not there is not an error, as on S3
        except OSError as exc:
            raise _os_error(loc, exc, "delete") from None

    def copy(self, src: Location, dst: Location) -> None:
        self._copy_file(src.path, dst.path, str(dst))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where the system or
    file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def sync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (and `root`) to disk, deepest first: a directory
    renamed into place afterwards holds whole files after a power loss, not empty or torn ones."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_directory(Path(directory))


# How systems say a directory cannot be opened or flushed (Windows, some network and FUSE file
# systems): nothing more can be done there. An I/O error stays an error.
_NO_DIRECTORY_SYNC = {errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EACCES,
                      errno.EPERM, errno.EISDIR}


def sync_directory(path: Path) -> None:
    """Flush a directory's entries (a rename into it is durable once this returns)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _NO_DIRECTORY_SYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIRECTORY_SYNC:
            raise
    finally:
        os.close(fd)


def replace_directory(new: Path, target: Path) -> None:
    """Put the directory `new` at `target`, replacing what is there. Where the system allows, the two
    are exchanged in one step, so `target` always holds a whole directory, the old or the new (a
    crash leaves one of them there, never nothing); elsewhere the old one is renamed away first."""
    if not target.exists():
        new.rename(target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now the old directory
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}.tmp")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _create_exclusive(target: Path, data: bytes) -> bool:
    """create_new where hard links are refused (SMB, some FUSE mounts): exclusive, though a reader
    may see the file before it is whole."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, default_mode())
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return True
