"""Set the number of BLAS threads at run time (`--threads N`).

NumPy's OpenBLAS reads OPENBLAS_NUM_THREADS only when it is loaded, which happens as soon as NumPy is imported:
too early for a command-line flag. So we find the loaded OpenBLAS in the process and call its
`openblas_set_num_threads` (the same thing threadpoolctl does), falling back to the environment variables for
libraries loaded later. Linux reads the loaded libraries from /proc/self/maps; elsewhere only the environment
variables are set (they apply to child processes), and `set_threads` says so in its return value.
"""
import ctypes
import os

_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads64_")


def _loaded_blas_paths():
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    return sorted(paths)


def set_threads(n):
    """Use `n` BLAS threads from now on. Returns the libraries that took the setting (may be empty)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    for var in _ENV:
        os.environ[var] = str(n)
    import numpy  # noqa: F401  (make sure NumPy's BLAS is loaded before looking for it)
    done = []
    for path in _loaded_blas_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn(n)
                done.append(os.path.basename(path))
                break
    return done
