"""Atomic file writes: nothing already saved is lost if a write is interrupted.

Every checkpoint, data file and log snapshot minivit writes goes through these helpers: the bytes are written
to a temporary file in the same folder, flushed to disk, and then renamed over the target. A rename within one
file system is atomic, so a reader sees either the old complete file or the new complete file, never half of one.
"""
import io
import json
import os
import tempfile

import numpy as np


def atomic_write_bytes(path, data):
    """Write `data` (bytes) to `path` atomically (temporary file in the same folder, fsync, rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes the file private (0600); give it the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text):
    """Write a str to `path` atomically (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_npz(path, arrays, compress=False):
    """Save a dict of name -> array as an .npz file atomically. Arrays must not be object arrays."""
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
