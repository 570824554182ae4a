"""CPU threads: how many minivit uses, a small thread pool, and the thread count of NumPy's BLAS.

The fast twins (minivit/fast/) run elementwise work on row blocks over a thread pool and split large matrix
products over the same threads, each part one single-threaded BLAS call; this module holds the thread count
and the pool they share, and `blas_threads`, which sets the BLAS library's own thread count for a block of code.
The BLAS library is found and driven through threadpoolctl (the package made for exactly this: it knows the
symbol names of OpenBLAS, MKL and BLIS builds, NumPy's own `scipy_openblas64_` among them), and its per-library
controllers are called directly, since `blas_threads` runs thousands of times a training step.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController

_threads = None          # set_num_threads; None: from the environment
_pool = None
_pool_size = 0
_blas = None             # the BLAS libraries' threadpoolctl controllers, found on first use


def num_threads():
    """Threads for CPU row blocks and products: `set_num_threads`, else $MINIVIT_NUM_THREADS, else
    $OMP_NUM_THREADS, else $OPENBLAS_NUM_THREADS, else the usable cores."""
    if _threads is not None:
        return _threads
    for var in ("MINIVIT_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_num_threads(n):
    """Use `n` threads (a positive integer) for CPU row blocks and split products; None: back to the default."""
    global _threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"number of threads must be a positive integer, got {n!r}")
    _threads = n


def in_pool():
    """True on one of minivit's pool threads (work there is already split: run it on this thread alone)."""
    return threading.current_thread().name.startswith("minivit")


def parallel(fn, parts):
    """[fn(part) for part in parts], the parts on `len(parts)` threads (the caller's thread runs the first)."""
    global _pool, _pool_size
    if len(parts) == 1 or in_pool():                     # one part, or already in the pool
        return [fn(part) for part in parts]
    if _pool is None or _pool_size < len(parts) - 1:
        _pool = ThreadPoolExecutor(max_workers=len(parts) - 1, thread_name_prefix="minivit")
        _pool_size = len(parts) - 1
    futures = [_pool.submit(fn, part) for part in parts[1:]]
    out = [fn(parts[0])]
    return out + [f.result() for f in futures]


def split(n, parts):
    """range(n) cut into `parts` contiguous (start, stop) pieces of nearly equal size."""
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def blas_controllers():
    """threadpoolctl's controllers of the BLAS libraries loaded in this process ([] where none is found)."""
    global _blas
    if _blas is None:
        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas


def blas_info():
    """[{internal_api, version, num_threads, architecture, filepath, ...}] of each loaded BLAS (threadpoolctl's
    info: `minivit bench` prints the kernel OpenBLAS chose)."""
    return [c.info() for c in blas_controllers()]


@contextmanager
def blas_threads(n):
    """Run the block with NumPy's BLAS on `n` threads, then restore its count; a no-op where none is found."""
    libs = blas_controllers()
    before = [lib.get_num_threads() for lib in libs]
    for lib in libs:
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib, k in zip(libs, before):
            lib.set_num_threads(k)


def set_threads(n):
    """Use `n` threads from now on (`--threads N`): for NumPy's BLAS (set directly, since OPENBLAS_NUM_THREADS is
    read only when NumPy loads it), for minivit's row blocks and split products, and, through the environment
    variables, for libraries loaded later. Returns True when a BLAS library took the setting."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    set_num_threads(n)
    libs = blas_controllers()
    for lib in libs:
        lib.set_num_threads(n)
    return bool(libs)
