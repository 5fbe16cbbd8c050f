"""Writing files so that a crash or kill never leaves a partial one (checkpoints, cleaned data
files, generated data sets)."""

import os
import tempfile

__all__ = ["atomic_write"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str, write, mode: int = 0o666) -> None:
    """Write a file so that ``path`` is either untouched or complete, whatever happens.

    ``write(f)`` writes into a temporary file (binary) in the same folder, which is flushed,
    fsync'ed and renamed to ``path`` with ``os.replace`` (atomic on POSIX and Windows); the
    folder is fsync'ed so the rename survives a power loss. On an exception the temporary file
    is removed; a killed process can leave one (``.NAME.*.tmp``), never a partial ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
