"""One code path for NumPy (CPU) and CuPy (GPU).

Every layer starts with `xp = get_xp(x)` and calls `xp.matmul`, `xp.exp`, ... so the same lines run on both. This is
the only module that imports CuPy, and it does so lazily: a CPU run never pays for (or needs) CuPy.

Device choice: an explicit `device="cpu"|"gpu"` argument (the command line's `--device`), else the
`MINIVIT_DEVICE` environment variable, else "cpu". Parameters are created on the host from a seeded NumPy
generator and moved with `to_device`, so CPU and GPU runs start from identical weights; random masks (dropout,
stochastic depth) are drawn on the host too, for the same reason.

`tune_allocator` keeps freed host memory in the process (call it at a program's entry point). CPU threads and
BLAS control live in threads.py; the fast twins of the layers, and their CUDA kernels, in minivit/fast/.
"""
import ctypes
import os
import sys

import numpy as np

DEVICES = ("cpu", "gpu")


class DeviceError(RuntimeError):
    """The GPU was asked for but cannot be used (CuPy missing, or no usable CUDA device)."""


def get_xp(x):
    """The array module (numpy or cupy) that owns array `x` (CuPy's `get_array_module` idiom).

    Looks CuPy up in `sys.modules` instead of importing it: if CuPy was never imported, `x` cannot be a CuPy array.
    """
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(x, cp.ndarray):
        return cp
    return np


def resolve_device(device=None):
    """'cpu' or 'gpu' from the argument, else `MINIVIT_DEVICE`, else 'cpu'; anything else is a ValueError."""
    name = device if device is not None else os.environ.get("MINIVIT_DEVICE", "cpu")
    name = str(name).strip().lower()
    if name in ("cuda", "gpu"):
        name = "gpu"
    if name not in DEVICES:
        source = "device argument" if device is not None else "MINIVIT_DEVICE"
        raise ValueError(f"{source} must be one of {DEVICES}, got {name!r}")
    return name


def import_cupy():
    """Import CuPy and check that a GPU is usable; raise one DeviceError that says which part is missing."""
    try:
        import cupy
    except ImportError as e:
        raise DeviceError(
            "the GPU backend needs CuPy, which is not installed "
            f"({e}). Install the extra that matches your CUDA: pip install 'minivit[cuda12]' "
            "(or 'minivit[cuda13]'; in a source checkout: pip install -e '.[cuda12]'), or run with --device cpu."
        ) from None
    try:
        ok = cupy.is_available()
        if ok:
            cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver/runtime errors come in many types
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "cupy.is_available() is False"
    if not ok:
        raise DeviceError(
            f"CuPy is installed but no usable CUDA GPU was found ({why}). Check `nvidia-smi` and that the "
            "cupy-cudaXXx package matches the installed CUDA driver, or run with --device cpu.")
    return cupy


def get_backend(device=None):
    """The array module for a device name: numpy for 'cpu', cupy for 'gpu' (raises DeviceError if unusable)."""
    return import_cupy() if resolve_device(device) == "gpu" else np


def to_device(x, device=None):
    """Copy a NumPy array (or a nested dict/list of them) to the device; numbers and None pass through."""
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if x is None or not hasattr(x, "shape"):
        return x
    xp = get_backend(device)
    return xp.asarray(x)


def to_numpy(x):
    """Copy an array (or nested dict/list of arrays) back to the host as NumPy."""
    if isinstance(x, dict):
        return {k: to_numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_numpy(v) for v in x)
    if hasattr(x, "get") and get_xp(x) is not np:
        return x.get()
    return x


def tune_allocator(mmap_threshold=32 * 2**20, trim_threshold=2**30):
    """Keep freed memory in the process (glibc only): call once at a program's entry point, before the work.

    A training step frees and reallocates the same large arrays every step. By default glibc hands any block of
    128 KiB or more (its threshold rises with use, up to 32 MiB) straight back to the OS with munmap, and trims the
    heap top, so every step pays page faults and zeroing for tens of megabytes again (a plain NumPy ViT step: 2.2 s
    with glibc's defaults, 1.4 s tuned, in the issue's measurement). mallopt(M_MMAP_THRESHOLD) serves blocks up to
    `mmap_threshold` (glibc's maximum, 32 MiB on 64-bit) from the heap, and mallopt(M_TRIM_THRESHOLD) keeps up to
    `trim_threshold` of free heap top. Returns True when applied; False (changing nothing) where the C library is
    not glibc (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                   # from glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) & bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))


def synchronize(xp):
    """Wait for queued GPU work (no-op on the CPU): call before reading a clock."""
    if xp is not np:
        xp.cuda.Device().synchronize()
