"""The GEMM floor of a step and the machine's matmul rate: what the step's matrix products alone cost.

A step cannot be faster than its products; everything above the floor is elementwise work, copies, allocation and
Python. The products come from `cases.matmul_shapes`.
"""
import time

import numpy as np

from minivit.backend import synchronize
from minivit.fast.rows import matmul


def _operand(rng, bd, rows, cols, trans, xp=np):
    """A float32 operand of module xp that reads as (bd..., rows, cols): stored (cols, rows) and transposed when
    `trans`."""
    if trans:
        return xp.asarray(rng.standard_normal(bd + (cols, rows), dtype=np.float32)).swapaxes(-1, -2)
    return xp.asarray(rng.standard_normal(bd + (rows, cols), dtype=np.float32))


def gemm_floor(shapes, reps=3, seed=0, xp=np):
    """Milliseconds for the products of `shapes` (float32, into preallocated outputs): a lower bound.

    NumPy: each distinct product is timed `reps` times in two ways, plain `np.matmul` (BLAS's own threads) and
    `minivit.fast.rows.matmul` (as the twins call it: large products split over the threads), and costs the best time.
    CuPy (xp=cupy): `cupy.matmul` on the GPU, max(reps, 10) launches back to back between two synchronizations
    (launch overhead overlapping the work, as in a step), the better of two such rounds per launch; cupy.matmul
    copies transposed operands of batched products to contiguous memory first, and that copy, which the step
    pays too, is in the time. The floor is the sum over the step's list. Operands are random float32 in the
    stated layouts.
    """
    rng = np.random.default_rng(seed)
    counts = {}
    for _, bd, m, k, n, ta, tb in shapes:
        key = (bd, m, k, n, ta, tb)
        counts[key] = counts.get(key, 0) + 1
    total = 0.0
    for (bd, m, k, n, ta, tb), count in counts.items():
        a, b = _operand(rng, bd, m, k, ta, xp), _operand(rng, bd, k, n, tb, xp)
        c = xp.empty(bd + (m, n), np.float32)
        best = float("inf")
        if xp is np:
            for _ in range(reps + 1):                     # the first round warms up (threads, pages)
                for run in (lambda: np.matmul(a, b, out=c), lambda: matmul(a, b, out=c)):
                    t0 = time.perf_counter()
                    run()                                 # C = op(A) @ op(B), nothing else
                    best = min(best, time.perf_counter() - t0)
        else:
            n = max(reps, 10)
            xp.matmul(a, b, out=c)                        # warm-up: kernel choice, workspace
            for _ in range(2):
                synchronize(xp)
                t0 = time.perf_counter()
                for _ in range(n):
                    xp.matmul(a, b, out=c)                # queued back to back, as a step queues them
                synchronize(xp)
                best = min(best, (time.perf_counter() - t0) / n)
        total += count * best
    return total * 1e3


def matmul_peak(n=None, reps=5, xp=np):
    """The float32 matmul rate of this machine (xp=cupy: of the GPU) in GFLOP/s: the best of `reps` (n, n) @ (n, n)
    products, n = 2048 on the CPU and 8192 on the GPU (large enough to fill it)."""
    n = n or (2048 if xp is np else 8192)
    rng = np.random.default_rng(0)
    a, b = (xp.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    c = xp.empty((n, n), np.float32)
    xp.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        synchronize(xp)
        t0 = time.perf_counter()
        xp.matmul(a, b, out=c)
        synchronize(xp)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9
