"""Fast twins of the leaf layers in minivit/layers.py: the same names, signatures and results (to rounding).

    twin                      reference (minivit.layers)   what makes it fast
    linear_forward/backward   linear_*                     products split over the threads; bias add on row blocks;
                                                           db as a BLAS column sum
    layernorm_forward/back.   layernorm_*                  the whole chain on cache-sized row blocks, in place
    gelu_forward/backward     gelu_*                       tanh form: gelu(x) and gelu'(x) in one pass (they share
                                                           tanh(u)); the cache keeps gelu'(x), backward multiplies
    linear_gelu_forward/back. linear_gelu_*                fc1's bias add, gelu(u) and gelu'(u) in the same pass
    softmax_forward/backward  softmax_*                    row blocks, in place
    patch_embed_forward/back. patch_embed_*                the reference's steps with the linear twin

A `_..._rows` function does one layer's chain on a block of rows (1 MiB per array, so its arrays stay in the
outer caches) with `out=` and no temporaries, and `row_blocks` runs the blocks on every core; on CuPy it runs once
over the whole array, and where a fused CUDA kernel is worth it, its source sits beside the NumPy function it
mirrors. The exact (erf) GELU has no twin: it runs the reference.
"""
import math

import numpy as np

from minivit import layers
from minivit.backend import get_xp
from minivit.fast.rows import col_sum, cuda_kernel, matmul, row_blocks, row_sum, scratch, summed


# ----------------------------------------------------------------------------------------------------------------
# Linear layer.

def _add_rows(y, b):
    """y += b on one block of rows (b broadcasts over them)."""
    y += b


def linear_forward(x, w, b):
    """x: (..., D_in), w: (D_in, D_out), b: (D_out,) -> (..., D_out).   y = x @ w + b
    (twin of layers.linear_forward)"""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])                      # (R, D_in): one GEMM for all rows
    y = matmul(x2, w)                                    # (R, D_out)  x @ w
    row_blocks(lambda yb: _add_rows(yb, b), y)           # y += b, on row blocks over the threads
    return y.reshape(*lead, w.shape[1]), (x, w)


def linear_backward(dy, cache):
    """dy: (..., D_out) -> dx, dw, db   (twin of layers.linear_backward: dx = dy w^T, dw = x^T dy, db = sum dy)"""
    x, w = cache
    dy2 = dy.reshape(-1, dy.shape[-1])                   # (R, D_out): all rows in one product
    dx = matmul(dy2, w.T).reshape(x.shape)               # (..., D_in)  dy @ w^T
    dw = matmul(x.reshape(-1, x.shape[-1]).T, dy2)       # (D_in, D_out) x^T @ dy
    return dx, dw, col_sum(dy2)                          # db (D_out,)


def patch_embed_forward(x, w, b, P):
    """x: (B, H, W, C) -> (B, Np, D)   (twin of layers.patch_embed_forward: patchify, then the linear twin)"""
    y, lin_cache = linear_forward(layers.patchify(x, P), w, b)     # (B, Np, D)
    return y, (lin_cache, P, x.shape[1:3])


def patch_embed_backward(dy, cache):
    """dy: (B, Np, D) -> dx (B, H, W, C), dw, db   (twin of layers.patch_embed_backward)"""
    lin_cache, P, (H, W) = cache
    dpatches, dw, db = linear_backward(dy, lin_cache)               # (B, Np, P*P*C)
    return layers.unpatchify(dpatches, P, (H // P, W // P)), dw, db


# ----------------------------------------------------------------------------------------------------------------
# Layer normalization.

def _layernorm_rows(x, y, xhat, rstd, w, b, eps):
    """One block of rows, x (r, D) -> y, xhat (r, D), rstd (r, 1), in place."""
    xp = get_xp(x)
    inv_d = 1.0 / x.shape[-1]
    mean = row_sum(x) * inv_d                            # (r, 1)
    xp.subtract(x, mean, out=xhat)                       # xc = x - mean
    xp.multiply(xhat, xhat, out=y)                       # xc^2 (y as scratch)
    var = row_sum(y) * inv_d                             # (r, 1) mean(xc^2)
    rstd[...] = 1.0 / (var + eps) ** 0.5                 # 1 / sqrt(var + eps)
    xhat *= rstd                                         # xhat = xc / sqrt(var + eps)
    xp.multiply(xhat, w, out=y)
    y += b                                               # y = xhat * w + b


def layernorm_forward(x, w, b, eps=1e-6):
    """x: (..., D) -> (..., D)   (twin of layers.layernorm_forward; the same cache: xhat, rstd, w)"""
    xp = get_xp(x)
    D = x.shape[-1]
    x2 = x.reshape(-1, D)                                # (R, D)
    y, xhat = xp.empty_like(x2), xp.empty_like(x2)       # (R, D) each
    rstd = xp.empty((x2.shape[0], 1), x.dtype)           # (R, 1)
    row_blocks(lambda *blk: _layernorm_rows(*blk, w, b, eps), x2, y, xhat, rstd)
    return y.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(*x.shape[:-1], 1), w)


def _layernorm_grad_rows(dy, xhat, rstd, w, dx):
    """One block of rows: dx (r, D) in place; returns this block's (sum(dy * xhat), sum(dy)) over its rows."""
    xp = get_xp(dy)
    g = scratch(dy)
    xp.multiply(dy, xhat, out=g)                         # dy * xhat
    dw = col_sum(g)                                      # (D,) partial sum
    db = col_sum(dy)                                     # (D,) partial sum
    xp.multiply(dy, w, out=g)                            # g = dy * w
    xp.multiply(g, xhat, out=dx)                         # g * xhat (dx as scratch)
    inv_d = 1.0 / dy.shape[-1]
    mgx = row_sum(dx) * inv_d                            # mean(g * xhat), (r, 1)
    mg = row_sum(g) * inv_d                              # mean(g), (r, 1)
    g -= mg                                              # g - mean(g)
    xp.multiply(xhat, mgx, out=dx)                       # xhat * mean(g * xhat)
    xp.subtract(g, dx, out=dx)                           # g - mean(g) - xhat * mean(g * xhat)
    dx *= rstd                                           # dx = rstd * (...)
    return xp.stack([dw, db])                            # (2, D)


def layernorm_backward(dy, cache):
    """dy: (..., D) -> dx, dw, db   (twin of layers.layernorm_backward:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w). Each block returns its partial (dw, db) as
    one (2, D) array; their sum's rows are dw and db."""
    xhat, rstd, w = cache
    xp = get_xp(dy)
    D = xhat.shape[-1]
    dy2 = xp.ascontiguousarray(dy).reshape(-1, D)        # (R, D)
    dx = xp.empty_like(dy2)                              # (R, D)
    parts = row_blocks(lambda *blk: _layernorm_grad_rows(*blk[:3], w, blk[3]),
                       dy2, xhat.reshape(-1, D), rstd.reshape(-1, 1), dx)
    dw, db = summed(parts)                               # the blocks' partial sums added up
    return dx.reshape(dy.shape), dw, db


# ----------------------------------------------------------------------------------------------------------------
# GELU (tanh form). With t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3), and p = (1 + t) / 2 (= sigmoid(2u)):
#
#     gelu(x) = x p                gelu'(x) = p + 2 gelu(x) (1 - p) u'(x),   u'(x) = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
#
# (dp/du = 2 p (1 - p)). This is layers.gelu_backward's derivative in fewer passes, gelu(x) coming out on the way;
# the NumPy rows below and the CUDA statements compute it in the same steps.

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_cuda(x, y, d=None):
    """CUDA statements: y = gelu(x) and, when `d` is named, d = gelu'(x), in the steps of the formula above."""
    body = (f"T p = (T)0.5 + (T)0.5 * tanh((T){_SQRT_2_OVER_PI!r} * ({x} + (T)0.044715 * {x} * {x} * {x}));"
            f"{y} = {x} * p")
    if d:
        body += f";{d} = p + (T)2 * {y} * ((T)1 - p) * (T){_SQRT_2_OVER_PI!r} * ((T)1 + (T)0.134145 * {x} * {x})"
    return body


_bias_gelu_gpu = cuda_kernel("bias_gelu_tanh", "T u, T b", "T y", "T x = u + b;" + _gelu_cuda("x", "y"))
_bias_gelu_value_deriv_gpu = cuda_kernel("bias_gelu_tanh_value_deriv", "T b", "T u, T y",
                                         "T x = u + b;" + _gelu_cuda("x", "y", "u"))


def _tanh_p_rows(x, x2, p):
    """p = (1 + tanh(u)) / 2, u = sqrt(2/pi) (x + 0.044715 x^3), from x and x2 = x^2, in place in p (p may be x2)."""
    xp = get_xp(x)
    xp.multiply(x2, 0.044715 * _SQRT_2_OVER_PI, out=p)
    p += _SQRT_2_OVER_PI                                 # sqrt(2/pi) (1 + 0.044715 x^2)
    p *= x                                               # u
    xp.tanh(p, out=p)                                    # t = tanh(u)
    p *= 0.5
    p += 0.5                                             # p = (1 + t) / 2


def _gelu_rows(x, y):
    """y = gelu(x) = x p on one block of rows, in place in y."""
    get_xp(x).multiply(x, x, out=y)                      # x^2
    _tanh_p_rows(x, y, y)                                # p
    y *= x                                               # gelu(x) = x p


def _gelu_value_deriv_rows(x, y, d):
    """y = gelu(x) and d = gelu'(x) on one block of rows (d may be x itself)."""
    xp = get_xp(x)
    p, a = scratch(x, slot=0), scratch(x, slot=1)
    xp.multiply(x, x, out=a)                             # x^2 (kept for u'(x))
    _tanh_p_rows(x, a, p)                                # p
    xp.multiply(x, p, out=y)                             # y = gelu(x) = x p  (the last use of x)
    a *= 2.0 * 3.0 * 0.044715 * _SQRT_2_OVER_PI
    a += 2.0 * _SQRT_2_OVER_PI                           # 2 u'(x)
    a *= y                                               # 2 y u'(x)
    xp.subtract(1.0, p, out=d)                           # 1 - p
    a *= d                                               # 2 y (1 - p) u'(x)
    xp.add(a, p, out=d)                                  # d = gelu'(x)


def _bias_gelu_rows(u, y, b):
    """u += b, then y = gelu(u), on one block of rows (inference: no derivative)."""
    if get_xp(u) is not np:
        _bias_gelu_gpu(u, b, y)
        return
    u += b                                               # u = x @ w + b
    _gelu_rows(u, y)                                     # y = gelu(u)


def _bias_gelu_value_deriv_rows(u, y, b):
    """u += b, y = gelu(u), then u is overwritten by gelu'(u) (all backward needs of it), on one block of rows."""
    if get_xp(u) is not np:
        _bias_gelu_value_deriv_gpu(b, u, y)
        return
    u += b                                               # u = x @ w + b
    _gelu_value_deriv_rows(u, y, u)                      # y = gelu(u);  u <- gelu'(u)


def _mul_col_sum_rows(dy, d, du):
    """du = dy * d on one block of rows; returns the block's sum of du over its rows (its share of db)."""
    get_xp(dy).multiply(dy, d, out=du)
    return col_sum(du)


def _rows2d(x):
    """x: any shape -> a contiguous (R, n) view or copy (n: the last axis, 1 for a 0-d array)."""
    return get_xp(x).ascontiguousarray(x).reshape(-1, x.shape[-1] if x.ndim else 1)


def gelu_forward(x, approximate="tanh"):
    """x: any shape -> same shape   (twin of layers.gelu_forward). tanh form: gelu(x) and gelu'(x) in one pass,
    and the cache keeps gelu'(x) in place of x (same memory). The exact form runs the reference."""
    if approximate != "tanh":
        return layers.gelu_forward(x, approximate)
    xp = get_xp(x)
    d = _rows2d(x).copy()                                # (R, n), becomes gelu'(x)
    y = xp.empty_like(d)                                 # (R, n)
    row_blocks(lambda d_blk, y_blk: _bias_gelu_value_deriv_rows(d_blk, y_blk, 0.0), d, y)   # bias 0
    return y.reshape(x.shape), (d.reshape(x.shape), approximate)


def gelu_backward(dy, cache):
    """dy -> dx = dy * gelu'(x)   (twin of layers.gelu_backward; the tanh cache holds gelu'(x) itself)"""
    d, approximate = cache
    if approximate != "tanh":
        return layers.gelu_backward(dy, cache)
    return dy * d


def linear_gelu_forward(x, w, b, approximate="tanh", keep_cache=True):
    """x: (..., D_in) -> (..., D_out).   y = gelu(x @ w + b)   (twin of layers.linear_gelu_forward)

    One pass over row blocks after the product adds the bias and computes gelu(u) and gelu'(u), and writes
    gelu'(u) over u: the cache keeps x, w and gelu'(u), so backward's GELU step is a single multiply.
    keep_cache=False (inference): gelu(u) only, and the cache is None. The exact form: the linear twin, then the
    reference GELU.
    """
    if approximate != "tanh":
        u, lin_cache = linear_forward(x, w, b)                       # (..., D_out)
        y, gelu_cache = layers.gelu_forward(u, approximate)          # cache (u, "exact")
        return y, ((lin_cache, gelu_cache) if keep_cache else None)
    xp = get_xp(x)
    lead = x.shape[:-1]
    u = matmul(x.reshape(-1, x.shape[-1]), w)            # (R, D_out)  x @ w
    y = xp.empty_like(u)                                 # (R, D_out)
    if not keep_cache:
        row_blocks(lambda ub, yb: _bias_gelu_rows(ub, yb, b), u, y)                 # u += b;  y = gelu(u)
        return y.reshape(*lead, w.shape[1]), None
    row_blocks(lambda ub, yb: _bias_gelu_value_deriv_rows(ub, yb, b), u, y)         # y = gelu(u);  u <- gelu'(u)
    return y.reshape(*lead, w.shape[1]), ((x, w), (u, approximate))


def linear_gelu_backward(dy, cache):
    """dy: (..., D_out) -> dx, dw, db   (twin of layers.linear_gelu_backward)

    du = dy * gelu'(u) (with db = sum of du over rows, in the same pass);  dx = du @ w^T;  dw = x^T @ du.
    """
    (x, w), (d, approximate) = cache
    if approximate != "tanh":                            # the exact form: d is u
        return linear_backward(layers.gelu_backward(dy, (d, approximate)), (x, w))
    xp = get_xp(dy)
    dy2 = xp.ascontiguousarray(dy).reshape(-1, dy.shape[-1])   # (R, D_out)
    du = xp.empty_like(dy2)                              # (R, D_out)
    db = summed(row_blocks(_mul_col_sum_rows, dy2, d.reshape(dy2.shape), du))   # fwd: y = gelu(u)
    dx = matmul(du, w.T).reshape(x.shape)                # (..., D_in)   fwd: u = x @ w + b
    dw = matmul(x.reshape(-1, x.shape[-1]).T, du)        # (D_in, D_out)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------------------
# Softmax over the last axis.

def softmax_rows(x, y, scale):
    """y = softmax(scale * x) on one block of rows, in place in y (y may be x). Public, unlike the other row
    functions: the attention twin runs it on its chunks of scores."""
    xp = get_xp(x)
    m = x.max(axis=-1, keepdims=True)                    # (r, 1)
    xp.subtract(x, m, out=y)                             # x - max x
    if scale != 1.0:
        y *= scale                                       # scale (x - max x) = scale x - max(scale x), scale > 0
    xp.exp(y, out=y)                                     # e
    y /= row_sum(y)                                      # e / sum e


def softmax_grad_rows(dy, y, dx, scale):
    """dx = scale * y * (dy - sum(dy * y)) on one block of rows."""
    xp = get_xp(dy)
    xp.multiply(dy, y, out=dx)                           # dy * y (dx as scratch)
    s = row_sum(dx)                                      # sum(dy * y), (r, 1)
    xp.subtract(dy, s, out=dx)                           # dy - sum(dy * y)
    dx *= y
    if scale != 1.0:
        dx *= scale


def softmax_forward(x, scale=1.0):
    """x: (..., n) -> (..., n)   (twin of layers.softmax_forward; scale > 0)"""
    xp = get_xp(x)
    x2 = _rows2d(x)                                      # (rows, n)
    y = xp.empty_like(x2)
    row_blocks(lambda a, b: softmax_rows(a, b, scale), x2, y)
    y = y.reshape(x.shape)
    return y, (y, scale)


def softmax_backward(dy, cache):
    """dy: (..., n) -> dx   (twin of layers.softmax_backward: dx = scale * y * (dy - sum(dy * y)))"""
    y, scale = cache
    xp = get_xp(dy)
    n = y.shape[-1]
    dx = xp.empty(y.shape, y.dtype)
    row_blocks(lambda a, b, c: softmax_grad_rows(a, b, c, scale), _rows2d(dy), y.reshape(-1, n), dx.reshape(-1, n))
    return dx
