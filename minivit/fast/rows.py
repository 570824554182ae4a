"""The engine room's tools: row blocks over threads, per-thread scratch buffers, split matrix products, BLAS row
and column sums, and fused CUDA kernels. The fast twins in this package are written with them.

A chain of NumPy operations over a large array (GELU, LayerNorm, softmax, Adam) streams the whole array through
memory once per operation. Run on blocks of rows, the chain finds each block in the core's cache, and the blocks
can go to every core: NumPy releases the GIL inside its loops, so plain Python threads run them in parallel.
`row_blocks` does both. On CuPy arrays it calls the function once on the whole arrays (a GPU kernel covers a
whole array anyway), so a twin has one code path; where a chain is worth one fused GPU kernel, `cuda_kernel`
holds its CUDA source next to the NumPy twin it mirrors.
"""
import math
import sys
import threading

import numpy as np

from minivit.backend import get_xp, import_cupy
from minivit.threads import blas_threads, num_threads, parallel, split

# elements per block: 1 MiB of float32 per array. Lesson 16 times a GELU pass by block size: blocks of 2^16 to 2^20
# elements took 9.5-11.9 ms, whole-array blocks 18-19 ms (2-core EPYC, L2 1 MiB); the default sits on that plateau
BLOCK_ELEMS = 1 << 18
MIN_BLOCKS = 2               # blocks per thread at least (smaller work runs on the caller's thread alone)

_local = threading.local()


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
    thread at least). `fn` writes its outputs into the blocks of output arrays among `arrays`, and may return a value
    per block (e.g. partial sums over its rows). On CuPy arrays, or with a single block's work: one call fn(*arrays).
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
        return [r for part in parallel(run, split(len(starts), threads)) for r in part]


def summed(parts):
    """The sum of the per-block partial results that row_blocks returned (in place in the first)."""
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


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
    chunks of images) a product is one plain call on the block's thread. The other BLAS calls of the twins
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
        spans = split(out.shape[0], threads)
    elif m >= 8 * threads:
        def part(span):                                # rows [lo, hi) of the result
            lo, hi = span
            xp.matmul(a[lo:hi], b, out=out[lo:hi])
        spans = split(m, threads)
    else:
        def part(span):                                # columns [lo, hi) of the result
            lo, hi = span
            xp.matmul(a, b[:, lo:hi], out=out[:, lo:hi])
        spans = split(n, threads)
    with blas_threads(1):
        parallel(part, spans)
    return out


_ONES = {}


def _ones(n, dtype):
    """A cached ones vector (n,) of `dtype`: row and column sums below are BLAS products with it."""
    key = (n, np.dtype(dtype))
    if key not in _ONES:
        _ONES[key] = np.ones(n, dtype)
    return _ONES[key]


def row_sum(x):
    """x: (r, n) -> (r, 1) = x.sum(axis=-1, keepdims=True), as the matrix-vector product x @ ones(n) on the CPU
    (BLAS does it about 4x faster than NumPy's reduction along short rows)."""
    if get_xp(x) is not np:
        return x.sum(axis=-1, keepdims=True)
    with blas_threads(1):                                # (threaded BLAS would leave its threads spinning)
        return (x @ _ones(x.shape[-1], x.dtype))[:, None]


def col_sum(x):
    """x: (r, n) -> (n,) = x.sum(axis=0), as the vector-matrix product ones(r) @ x on the CPU (BLAS: 2-4x faster than
    NumPy's reduction over rows at the sizes of a bias gradient)."""
    if get_xp(x) is not np:
        return x.sum(axis=0)
    with blas_threads(1):                                # (threaded BLAS would leave its threads spinning)
        return _ones(x.shape[0], x.dtype) @ x


# ----------------------------------------------------------------------------------------------------------------
# Fused GPU kernels. On CuPy an elementwise chain costs one kernel launch and one pass over memory per operation;
# a CuPy ElementwiseKernel does the chain in one. Each source sits next to the NumPy twin it mirrors and computes
# the same function (up to the order of rounding). Bodies are straight-line statements with every constant written
# as a float (C reads 1 / 2 as 0): tests/fake_cupy.py evaluates them with NumPy, tests/test_kernels.py compiles them.

GPU_SOURCES = {}   # name -> (input params, output params, body): every kernel the twins define
_gpu_kernels = {}


def cuda_kernel(name, params, outs, body):
    """Register the fused kernel `name` (CuPy ElementwiseKernel arguments) and return a function that runs it."""
    GPU_SOURCES[name] = (params, outs, body)
    return lambda *args: gpu_kernel(name)(*args)


def gpu_kernel(name):
    """The CuPy ElementwiseKernel `name` (built on first use; CuPy compiles it on its first call)."""
    if name not in _gpu_kernels:
        cp = sys.modules.get("cupy") or import_cupy()
        params, outs, body = GPU_SOURCES[name]
        _gpu_kernels[name] = cp.ElementwiseKernel(params, outs, body, f"minivit_{name}")
    return _gpu_kernels[name]
