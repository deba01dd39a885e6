"""Atomic checkpoint files and a safe loader (used by the Trainer integration and the harness).

:func:`atomic_save` writes to a temporary file in the destination directory, flushes and
fsyncs it, then ``os.replace``s it over the destination (atomic on POSIX) and fsyncs the
directory: a crash at any point leaves either the previous file or the new one, never a
torn file. :func:`atomic_write_text` does the same for JSON reports. Checkpoints hold
tensors and plain types only and are read with ``torch.load(weights_only=True)``
(:func:`safe_load`).
"""
from __future__ import annotations

import io
import json
import os
import tempfile

import torch

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save",
           "UnsafeCheckpointError", "load", "safe_load"]

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the directory)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600 files; reports should be readable
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


def atomic_write_text(path: str, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds Python objects beyond tensors and plain types: not unpickled."""


def load(path: str):
    """Load a checkpoint written by :func:`atomic_save` (onto the CPU), with
    ``torch.load(weights_only=True)``: only tensors and plain Python types are read, so a
    run directory written by someone else cannot execute code through a pickle.

    Raises:
        UnsafeCheckpointError: the file holds other objects (e.g. a pickled callable).
    """
    return safe_load(path)


def safe_load(path: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with a clear error for a file that needs more
    than tensors and plain types (shared by the harness and the Trainer integration)."""
    import pickle
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"checkpoint: {path} holds Python objects other than tensors and plain types; refusing to "
            f"unpickle it (torch.load weights_only=True). Checkpoints written by this package never do: "
            f"this file was written by something else. Details: {str(e).splitlines()[0]}") from None
