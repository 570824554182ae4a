"""Atomic file writes: nothing already saved is lost if a write is interrupted.

Every checkpoint, data file and log snapshot minivit writes goes through these helpers: the bytes are written
to a temporary file in the same folder, flushed to disk, and then renamed over the target. A rename within one
file system is atomic, so a reader sees either the old complete file or the new complete file, never half of one.
"""
import io
import json
import os
import socket
import tempfile
import time

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


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock file."""


class FolderLock:
    """An exclusive lock on a folder: a file created with O_EXCL that holds {"pid", "host", "started"}.

        lock = FolderLock(run_dir / "run.lock"); lock.acquire(); ...; lock.release()

    A second acquire, from another process, raises FolderInUse naming the holder. A lock left behind by a process
    that was killed (same host, pid no longer running) is stale: it is taken over, and acquire() returns the
    holder it replaced (None otherwise). A lock of another host cannot be checked from here and is never taken
    over: the message says which file to remove if that run is gone.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.held = False

    def _holder(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}      # unreadable or half-written (a process killed while writing it): nobody can hold it

    def _alive(self, holder):
        if not holder:                   # unreadable: being written this instant, or left half-written by a kill
            try:
                return time.time() - os.path.getmtime(self.path) < 5.0
            except OSError:
                return False
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname():
            return True                  # another machine's process: it cannot be checked from here
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return False
        try:
            os.kill(pid, 0)              # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return False
        except PermissionError:          # it exists (another user's process)
            return True
        return True

    def acquire(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        replaced = None
        for _ in range(3):               # (a stale lock removed by a racing process: try again)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._alive(holder):
                    where = f"process {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
                    raise FolderInUse(f"{os.path.dirname(self.path) or '.'} is in use by another run ({where}); "
                                      f"wait for it to finish or choose another folder (if that run is gone, "
                                      f"remove {self.path})") from None
                replaced = holder or {"pid": None}
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return replaced
        raise FolderInUse(f"could not take the lock {self.path}: other processes keep replacing it")

    def release(self):
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def remove_stale_temporaries(folder, names):
    """Remove the temporary files that an interrupted atomic write of one of `names` left in `folder` (the
    '.<name>.*.tmp' files of atomic_write_bytes) -> the paths removed. Call it only while holding the folder's
    lock: a live writer's temporary file looks the same."""
    removed = []
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.endswith(".tmp") and any(entry.startswith(f".{name}.") for name in names):
            path = os.path.join(folder, entry)
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed
