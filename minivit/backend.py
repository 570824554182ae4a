"""One code path for NumPy (CPU) and CuPy (GPU).

Every layer starts with `xp = get_xp(x)` and calls `xp.matmul`, `xp.exp`, ... so the same lines run on both. This is
the only module that imports CuPy, and it does so lazily: a CPU run never pays for (or needs) CuPy.

Device choice: an explicit `device="cpu"|"gpu"` argument (the command line's `--device`), else the
`MINIVIT_DEVICE` environment variable, else "cpu". Parameters are created on the host from a seeded NumPy
generator and moved with `to_device`, so CPU and GPU runs start from identical weights; random masks (dropout,
stochastic depth) are drawn on the host too, for the same reason.

Speed lives here too, behind plain names the layers call: `tune_allocator` (keep freed memory in the process;
call it at a program's entry point), `row_blocks` (an elementwise chain on cache-sized row blocks over a small
thread pool), `matmul` (a product split over the threads), and `gpu_kernel` (the fused CuPy twins of the chains).
"""
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

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
    import ctypes
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


# ----------------------------------------------------------------------------------------------------------------
# CPU parallelism: elementwise work in row blocks on a small thread pool, and batched small matrix products
#
# A chain of NumPy operations over a large array (GELU, LayerNorm, softmax, Adam) streams the whole array through
# memory once per operation. Run on blocks of rows, the chain finds each block in the core's cache, and the blocks
# can go to every core: NumPy releases the GIL inside its loops, so plain Python threads run them in parallel.
# `row_blocks` does both. On CuPy arrays it calls the function once on the whole arrays (a GPU kernel covers a
# whole array anyway), so the layers have one code path.

BLOCK_ELEMS = 1 << 18        # elements per block: 1 MiB of float32 per array
MIN_BLOCKS = 2               # blocks per thread at least (smaller work runs on the caller's thread alone)

_pool = None
_pool_size = 0
_threads = None
_local = threading.local()


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
    """Use `n` threads (a positive integer) for CPU row blocks and batched products; None: back to the default."""
    global _threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"number of threads must be a positive integer, got {n!r}")
    _threads = n


def parallel(fn, parts):
    """[fn(part) for part in parts], the parts on `len(parts)` threads (the caller's thread runs the first)."""
    global _pool, _pool_size
    if len(parts) == 1 or threading.current_thread().name.startswith("minivit"):   # one part, or already in the pool
        return [fn(part) for part in parts]
    if _pool is None or _pool_size < len(parts) - 1:
        _pool = ThreadPoolExecutor(max_workers=len(parts) - 1, thread_name_prefix="minivit")
        _pool_size = len(parts) - 1
    futures = [_pool.submit(fn, part) for part in parts[1:]]
    out = [fn(parts[0])]
    return out + [f.result() for f in futures]


def _split(n, parts):
    """range(n) cut into `parts` contiguous (start, stop) pieces of nearly equal size."""
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def scratch(like, shape=None, slot=0):
    """A temporary array of `like`'s dtype and `shape` (default: like's), contents undefined.

    On the CPU a per-thread buffer reused from call to call (row-block functions run thousands of times a step);
    `slot` tells apart buffers needed at the same time. On CuPy a fresh array.
    """
    shape = like.shape if shape is None else shape
    xp = get_xp(like)
    if xp is not np:
        return xp.empty(shape, like.dtype)
    size = math.prod(shape)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    key = (slot, like.dtype)
    buf = bufs.get(key)
    if buf is None or buf.size < size:
        buf = bufs[key] = np.empty(max(size, BLOCK_ELEMS), like.dtype)
    return buf[:size].reshape(shape)


def row_blocks(fn, *arrays, block_elems=None):
    """Call fn(*blocks) on matching row blocks arrays[i][lo:hi] that cover all rows; return the results in row order.

    The arrays share their first dimension (rows). A block has about `block_elems` (default BLOCK_ELEMS) elements
    of the widest array; the blocks go in contiguous runs to up to `num_threads()` threads (MIN_BLOCKS blocks a
    thread at least). `fn` writes its outputs into the blocks of output arrays among `arrays`, and may return a value per
    block (e.g. partial sums over its rows). On CuPy arrays, or with a single block's work: one call fn(*arrays).
    """
    n = arrays[0].shape[0]
    width = max(math.prod(a.shape[1:]) for a in arrays) or 1
    rows = max(1, (block_elems or BLOCK_ELEMS) // width)
    if n <= rows or get_xp(arrays[0]) is not np:
        return [fn(*arrays)]
    starts = range(0, n, rows)
    threads = max(1, min(num_threads(), len(starts) // MIN_BLOCKS))    # else not worth a join

    def run(part):
        _local.in_blocks = True                          # (matmul inside fn: one thread, no split)
        try:
            return [fn(*(a[lo:lo + rows] for a in arrays)) for lo in starts[part[0]:part[1]]]
        finally:
            _local.in_blocks = False

    with blas_threads(1):                                # a BLAS call inside fn stays on its own thread
        return [r for part in parallel(run, _split(len(starts), threads)) for r in part]


_blas = None   # (set_num_threads, get_num_threads) of the OpenBLAS NumPy uses; False when there is none to control


def _openblas():
    global _blas
    if _blas is None:
        _blas = False
        try:
            with open("/proc/self/maps") as f:       # the loaded libraries (Linux); elsewhere: leave BLAS alone
                paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
        except OSError:
            paths = []
        import ctypes
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix in ("scipy_", ""):
                for suffix in ("64_", "", "_64"):
                    set_ = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                    get_ = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                    if set_ is not None and get_ is not None:
                        set_.argtypes, get_.restype = [ctypes.c_int], ctypes.c_int
                        _blas = (set_, get_)
                        return _blas
    return _blas or None


def set_threads(n):
    """Use `n` threads from now on (`--threads N`): for NumPy's OpenBLAS (found among the loaded libraries and set
    directly, since OPENBLAS_NUM_THREADS is read only when NumPy loads it), for minivit's row blocks and split
    products, and, through the environment variables, for libraries loaded later. Returns True when OpenBLAS took
    the setting (False where it cannot be found: another BLAS, or not Linux)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    set_num_threads(n)
    blas = _openblas()
    if blas is not None:
        blas[0](n)
    return blas is not None


@contextmanager
def blas_threads(n):
    """Run the block with NumPy's BLAS (OpenBLAS) on `n` threads, then restore; a no-op where it cannot be set."""
    blas = _openblas()
    if blas is None:
        yield
        return
    set_, get_ = blas
    before = get_()
    set_(n)
    try:
        yield
    finally:
        set_(before)


SPLIT_GEMM = 1 << 24      # multiply-adds from which a batched product is split over the threads (below: one thread)
SPLIT_GEMM_2D = 1 << 25   # multiply-adds from which a 2-D product is split over the threads (below: BLAS's threads)


def matmul(a, b, out=None):
    """a @ b for 2-D or batched (ndim >= 3, same batch) operands, into `out` when given (which may be a strided
    view with unit stride along its rows, e.g. heads written straight into a merged layout).

    On the CPU, large products are split over `num_threads()` threads, each part one single-threaded BLAS call:
    batched products by the batch (first axis), 2-D ones by rows of the result (or by columns when it has few
    rows). Attention's products are small ((N, hs) @ (hs, N) per image and head), and a BLAS that threads each of
    them spends longer waking and joining its threads than multiplying; independent parts join once. Large 2-D
    products also run better split (cifar-small step, 2 threads: 1.05 s split, 1.30 s on BLAS's threads): after
    each product OpenBLAS's idle threads keep spinning for a while and take the cores from the elementwise row
    blocks that come next. Small 2-D products (under SPLIT_GEMM_2D multiply-adds, e.g. every product of
    mnist-tiny, whose elementwise work is too small to share out anyway) go to BLAS's own threads, which start
    faster than a Python thread pool (mnist-tiny step: 35 ms against 38 ms split). Inside `row_blocks` (attention's
    chunks of images) a product is one plain call on the block's thread. The package's other BLAS calls
    (row and column sums as matrix-vector products) run on one BLAS thread, so they leave no thread spinning.
    """
    xp = get_xp(a)
    if out is None:
        shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        out = xp.empty(shape, np.result_type(a.dtype, b.dtype))
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    threads = num_threads()
    work = m * k * n * (math.prod(out.shape[:-2]) or 1)                 # multiply-adds
    if xp is not np or getattr(_local, "in_blocks", False):   # GPU, or inside a row block (already one thread)
        return xp.matmul(a, b, out=out)
    if out.ndim == 2 and work < SPLIT_GEMM_2D:
        with blas_threads(threads):                    # a small 2-D product: on BLAS's own threads
            return xp.matmul(a, b, out=out)
    if threads == 1 or work < SPLIT_GEMM:
        with blas_threads(1):                          # one thread in all, or a small batched product: no join
            return xp.matmul(a, b, out=out)
    if out.ndim >= 3:
        if a.ndim != b.ndim or a.shape[0] != b.shape[0] or out.shape[0] < threads:
            return xp.matmul(a, b, out=out)            # (a broadcast operand: no split along the batch)

        def part(span):                                # images [lo, hi) of the batch
            lo, hi = span
            xp.matmul(a[lo:hi], b[lo:hi], out=out[lo:hi])
        spans = _split(out.shape[0], threads)
    elif m >= 8 * threads:
        def part(span):                                # rows [lo, hi) of the result
            lo, hi = span
            xp.matmul(a[lo:hi], b, out=out[lo:hi])
        spans = _split(m, threads)
    else:
        def part(span):                                # columns [lo, hi) of the result
            lo, hi = span
            xp.matmul(a, b[:, lo:hi], out=out[:, lo:hi])
        spans = _split(n, threads)
    with blas_threads(1):
        parallel(part, spans)
    return out


# ----------------------------------------------------------------------------------------------------------------
# GPU twins: on CuPy, the elementwise chains of layers.py and optim.py as single fused kernels (one read and one
# write per element instead of one kernel launch per operation). Each computes the same function as its NumPy
# twin named in its comment (up to the order of rounding); tests/test_kernels.py compares them where a GPU exists.

_GPU_SOURCES = {
    # layers._gelu_tanh_rows: y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_tanh": ("T x", "T y", "T t = tanh((T)0.7978845608028654 * (x + (T)0.044715 * x * x * x));"
                               "y = (T)0.5 * x * ((T)1 + t)"),
    # layers._gelu_tanh_grad_rows: dx = dy (0.5 (1 + t) + (1 - t^2) 0.5 sqrt(2/pi) x (1 + 3 * 0.044715 x^2))
    "gelu_tanh_grad": ("T x, T dy", "T dx",
                       "T t = tanh((T)0.7978845608028654 * (x + (T)0.044715 * x * x * x));"
                       "dx = dy * ((T)0.5 * ((T)1 + t) + ((T)1 - t * t) * (T)0.3989422804014327 * x"
                       " * ((T)1 + (T)0.134145 * x * x))"),
    # layers._bias_gelu_tanh_value_deriv_rows: x = u + b;  y = gelu(x);  u <- gelu'(x), both from one t
    "bias_gelu_tanh_value_deriv": ("T b", "T u, T y",
                                   "T x = u + b;"
                                   "T t = tanh((T)0.7978845608028654 * (x + (T)0.044715 * x * x * x));"
                                   "y = (T)0.5 * x * ((T)1 + t);"
                                   "u = (T)0.5 * ((T)1 + t) + ((T)1 - t * t) * (T)0.3989422804014327 * x"
                                   " * ((T)1 + (T)0.134145 * x * x)"),
    # optim._adam_rows: m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p = p * decay - step m / (sqrt(v / c2) + eps)
    "adam": ("T g, T b1, T b2, T eps, T c2, T step, T decay", "T p, T m, T v",
             "m = b1 * m + ((T)1 - b1) * g; v = b2 * v + ((T)1 - b2) * (g * g);"
             "p = p * decay - step * (m / (sqrt(v * ((T)1 / c2)) + eps))"),
}
_gpu_kernels = {}


def gpu_kernel(name):
    """The fused CuPy ElementwiseKernel `name` (built on first use; compiled by CuPy on its first call)."""
    if name not in _gpu_kernels:
        cp = import_cupy() if "cupy" not in sys.modules else sys.modules["cupy"]
        params, outs, body = _GPU_SOURCES[name]
        _gpu_kernels[name] = cp.ElementwiseKernel(params, outs, body, f"minivit_{name}")
    return _gpu_kernels[name]
