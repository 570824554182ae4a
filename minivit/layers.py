"""The leaf layers of the Vision Transformer, each a forward/backward pair.

    y, cache = thing_forward(x, params...)     # cache: a plain tuple of exactly what backward needs
    dx, dparams... = thing_backward(dy, cache)

Shape glossary (shared with attention.py and model.py):
    B  batch                     H, W, C  image height, width, channels (images are channels-last)
    P  patch size                gh, gw   patch grid (H / P, W / P);  Np = gh * gw patches
    N  tokens (Np + 1 with a class token, Np for 'gap' models)
    D  width                     nh, hs   heads, head size (D = nh * hs)
    M  MLP width                 K        classes

Every function works on NumPy and CuPy arrays alike (`xp = get_xp(x)`), and keeps the dtype of its input:
float32 in, float32 out. Scalars are Python floats so they never upcast float32 arrays (NumPy 2 promotion).
The derivations behind the backward formulas are worked out in the lessons (lessons/04-07).

Speed: the elementwise chains (bias add, LayerNorm, GELU, softmax) run through `row_blocks` (backend.py): a
`_..._rows` function does the whole chain on a block of rows (1 MiB per array, so a chain's arrays stay in the
outer caches), in place with `out=` and no temporaries, and the blocks run on every core. Each such function is
the formula of its layer written as in-place steps, one comment per step; on CuPy it runs once over the whole
array. Caches keep only what backward needs.
"""
import math

import numpy as np

from minivit.backend import blas_threads, get_xp, gpu_kernel, matmul, row_blocks, scratch


_ONES = {}


def _ones(n, dtype):
    """A cached ones vector (n,) of `dtype`: row and column sums below are BLAS products with it."""
    key = (n, np.dtype(dtype))
    if key not in _ONES:
        _ONES[key] = np.ones(n, dtype)
    return _ONES[key]


def _row_sum(x):
    """x: (r, n) -> (r, 1) = x.sum(axis=-1, keepdims=True), as the matrix-vector product x @ ones(n) on the CPU
    (BLAS does it about 4x faster than NumPy's reduction along short rows)."""
    if get_xp(x) is not np:
        return x.sum(axis=-1, keepdims=True)
    with blas_threads(1):                                # (threaded BLAS would leave its threads spinning)
        return (x @ _ones(x.shape[-1], x.dtype))[:, None]


def _col_sum(x):
    """x: (r, n) -> (n,) = x.sum(axis=0), as the vector-matrix product ones(r) @ x on the CPU (BLAS: 2-4x faster than
    NumPy's reduction over rows at the sizes of a bias gradient)."""
    if get_xp(x) is not np:
        return x.sum(axis=0)
    with blas_threads(1):                                # (threaded BLAS would leave its threads spinning)
        return _ones(x.shape[0], x.dtype) @ x


# ----------------------------------------------------------------------------------------------------------------
# Patches: an image is a sequence of flattened P x P x C patches.

def patchify(x, P):
    """x: (B, H, W, C) -> (B, gh*gw, P*P*C): patches in row-major grid order, each flattened (row, col, channel).

    This is the layout of the original ViT checkpoints: their (P, P, C, D) embedding kernel reshapes straight to
    (P*P*C, D), so `patchify(x) @ w` is their strided convolution.
    """
    B, H, W, C = x.shape
    gh, gw = H // P, W // P
    x = x.reshape(B, gh, P, gw, P, C)             # (B, gh, P, gw, P, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)              # (B, gh, gw, P, P, C)
    return x.reshape(B, gh * gw, P * P * C)        # (B, Np, P*P*C) (a copy: the transpose is not contiguous)


def unpatchify(patches, P, grid):
    """patches: (B, gh*gw, P*P*C) -> (B, H, W, C); the exact inverse of `patchify` (and so its backward)."""
    B, Np, PPC = patches.shape
    gh, gw = grid
    C = PPC // (P * P)
    x = patches.reshape(B, gh, gw, P, P, C)        # (B, gh, gw, P, P, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)              # (B, gh, P, gw, P, C)
    return x.reshape(B, gh * P, gw * P, C)         # (B, H, W, C)


def patch_embed_forward(x, w, b, P):
    """x: (B, H, W, C), w: (P*P*C, D), b: (D,) -> (B, Np, D).

    y = patchify(x) @ w + b: a convolution with kernel P and stride P, written as one matrix product.
    """
    patches = patchify(x, P)                       # (B, Np, P*P*C)
    y, lin_cache = linear_forward(patches, w, b)   # (B, Np, D)
    return y, (lin_cache, P, x.shape[1:3])


def patch_embed_backward(dy, cache):
    """dy: (B, Np, D) -> dx (B, H, W, C), dw (P*P*C, D), db (D,).

    The linear backward, then the patch gradients put back in place (patchify is a permutation).
    """
    lin_cache, P, (H, W) = cache
    dpatches, dw, db = linear_backward(dy, lin_cache)   # (B, Np, P*P*C)
    dx = unpatchify(dpatches, P, (H // P, W // P))      # (B, H, W, C)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------------------
# Class token and position embedding.

def tokens_forward(x, cls_token, pos_embed):
    """x: (B, Np, D), cls_token: (1, 1, D) or None, pos_embed: (1, N, D) -> (B, N, D).

    z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos (the paper's eq. 1): prepend the class token (when the model
    has one), then add the position embedding.
    """
    xp = get_xp(x)
    B, Np, D = x.shape
    if cls_token is not None:
        cls = xp.broadcast_to(cls_token, (B, 1, D))      # (B, 1, D)
        x = xp.concatenate([cls, x], axis=1)             # (B, N, D)
    y = x + pos_embed                                    # (B, N, D)
    return y, (cls_token is not None,)


def tokens_backward(dy, cache):
    """dy: (B, N, D) -> dx (B, Np, D), dcls_token (1, 1, D) or None, dpos_embed (1, N, D).

    The position embedding and the class token are shared by every image: their gradients sum over the batch.
    """
    (has_cls,) = cache
    dpos = dy.sum(axis=0, keepdims=True)                 # (1, N, D)
    if not has_cls:
        return dy, None, dpos
    dcls = dy[:, :1].sum(axis=0, keepdims=True)          # (1, 1, D)
    return dy[:, 1:], dcls, dpos                         # (B, Np, D)


# ----------------------------------------------------------------------------------------------------------------
# Linear layer.

def _add_rows(y, b):
    """y += b on one block of rows (b broadcasts over them)."""
    y += b


def linear_forward(x, w, b):
    """x: (..., D_in), w: (D_in, D_out), b: (D_out,) -> (..., D_out).   y = x @ w + b"""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])                      # (R, D_in): one GEMM for all rows
    y = matmul(x2, w)                                    # (R, D_out)  x @ w
    row_blocks(lambda yb: _add_rows(yb, b), y)           # y += b, on row blocks over the threads
    return y.reshape(*lead, w.shape[1]), (x, w)


def linear_backward(dy, cache):
    """dy: (..., D_out) -> dx (..., D_in), dw (D_in, D_out), db (D_out,).

    dx = dy @ w^T;  dw = x^T @ dy (summed over all rows);  db = sum of dy over all rows.
    """
    x, w = cache
    dy2 = dy.reshape(-1, dy.shape[-1])                   # (R, D_out): all rows in one product
    dx = matmul(dy2, w.T).reshape(x.shape)               # (..., D_in)  dy @ w^T
    dw = matmul(x.reshape(-1, x.shape[-1]).T, dy2)       # (D_in, D_out) x^T @ dy
    return dx, dw, _col_sum(dy2)


# ----------------------------------------------------------------------------------------------------------------
# Layer normalization.

def _layernorm_rows(x, y, xhat, rstd, w, b, eps):
    """One block of rows, x (r, D) -> y, xhat (r, D), rstd (r, 1), in place."""
    xp = get_xp(x)
    inv_d = 1.0 / x.shape[-1]
    mean = _row_sum(x) * inv_d                           # (r, 1)
    xp.subtract(x, mean, out=xhat)                       # xc = x - mean
    xp.multiply(xhat, xhat, out=y)                       # xc^2 (y as scratch)
    var = _row_sum(y) * inv_d                            # (r, 1) mean(xc^2)
    rstd[...] = 1.0 / (var + eps) ** 0.5                 # 1 / sqrt(var + eps)
    xhat *= rstd                                         # xhat = xc / sqrt(var + eps)
    xp.multiply(xhat, w, out=y)
    y += b                                               # y = xhat * w + b


def layernorm_forward(x, w, b, eps=1e-6):
    """x: (..., D), w: (D,), b: (D,) -> (..., D).

    xhat = (x - mean(x)) / sqrt(var(x) + eps) over the last axis;  y = xhat * w + b.
    eps=1e-6: original ViT and timm LayerNorm (PyTorch's default is 1e-5).
    Cache: xhat and rstd = 1 / sqrt(var + eps) (not x).
    """
    xp = get_xp(x)
    D = x.shape[-1]
    x2 = x.reshape(-1, D)                                # (R, D)
    y, xhat = xp.empty_like(x2), xp.empty_like(x2)       # (R, D) each
    rstd = xp.empty((x2.shape[0], 1), x.dtype)           # (R, 1)
    row_blocks(lambda *blk: _layernorm_rows(*blk, w, b, eps), x2, y, xhat, rstd)
    shape = x.shape[:-1]
    return y.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(*shape, 1), w)


def _layernorm_grad_rows(dy, xhat, rstd, w, dx):
    """One block of rows: dx (r, D) in place; returns this block's (sum(dy * xhat), sum(dy)) over its rows."""
    xp = get_xp(dy)
    g = scratch(dy)
    xp.multiply(dy, xhat, out=g)                         # dy * xhat
    dw = _col_sum(g)                                     # (D,) partial sum
    db = _col_sum(dy)                                    # (D,) partial sum
    xp.multiply(dy, w, out=g)                            # g = dy * w
    xp.multiply(g, xhat, out=dx)                         # g * xhat (dx as scratch)
    inv_d = 1.0 / dy.shape[-1]
    mgx = _row_sum(dx) * inv_d                           # mean(g * xhat), (r, 1)
    mg = _row_sum(g) * inv_d                             # mean(g), (r, 1)
    g -= mg                                              # g - mean(g)
    xp.multiply(xhat, mgx, out=dx)                       # xhat * mean(g * xhat)
    xp.subtract(g, dx, out=dx)                           # g - mean(g) - xhat * mean(g * xhat)
    dx *= rstd                                           # dx = rstd * (...)
    return dw, db


def layernorm_backward(dy, cache):
    """dy: (..., D) -> dx (..., D), dw (D,), db (D,).

    With g = dy * w:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (means over the last axis);
    dw = sum(dy * xhat), db = sum(dy) over all rows.
    """
    xhat, rstd, w = cache
    xp = get_xp(dy)
    D = xhat.shape[-1]
    dy2 = xp.ascontiguousarray(dy).reshape(-1, D)        # (R, D)
    dx = xp.empty_like(dy2)                              # (R, D)
    parts = row_blocks(lambda *blk: _layernorm_grad_rows(*blk[:3], w, blk[3]),
                       dy2, xhat.reshape(-1, D), rstd.reshape(-1, 1), dx)
    dw, db = parts[0]
    for pw, pb in parts[1:]:                             # add up the blocks' partial sums
        dw += pw
        db += pb
    return dx.reshape(dy.shape), dw, db


# ----------------------------------------------------------------------------------------------------------------
# GELU, and the error function it needs (NumPy has no erf).

# Float32: a rational approximation erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (the form vectorized math libraries such
# as Eigen use; |error| < 1e-7, i.e. float32 rounding), and erf = +-1 beyond 4, where 1 - erf(4) = 1.5e-8.
_ERF32_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF32_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)


def erf(x):
    """x: any shape -> erf(x), same dtype.

    float64: accurate to float64 rounding (a few ulp), so float64 gradient checks of the exact GELU reach 1e-10:
      |x| < 2:  erf(x) = 2/sqrt(pi) exp(-x^2) sum_n (2x^2)^n x / (1*3*...*(2n+1))   (all terms positive:
                no cancellation);
      |x| >= 2: erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))   (continued fraction).
    float32 (and float16): the rational approximation above, computed in the input dtype.
    """
    xp = get_xp(x)
    if x.dtype != np.float64:
        xc = xp.clip(x, -4.0, 4.0)
        x2 = xc * xc
        p = xp.full_like(x, _ERF32_P[0])
        for c in _ERF32_P[1:]:
            p = p * x2 + c
        q = xp.full_like(x, _ERF32_Q[0])
        for c in _ERF32_Q[1:]:
            q = q * x2 + c
        return xc * p / q
    ax = xp.abs(x)
    small = ax < 2.0
    xs = xp.where(small, ax, 0.0)                        # series branch (|x| < 2)
    x2 = xs * xs
    term, total = xs.copy(), xs.copy()
    for n in range(1, 80):
        term = term * (2.0 * x2) / (2 * n + 1)
        total += term
    erf_small = (2.0 / math.sqrt(math.pi)) * xp.exp(-x2) * total
    xl = xp.where(small, 2.0, ax)                        # continued-fraction branch (|x| >= 2)
    f = xl.copy()
    for k in range(100, 0, -1):
        f = xl + (0.5 * k) / f
    erf_large = 1.0 - xp.exp(-xl * xl) / (math.sqrt(math.pi) * f)
    return xp.sign(x) * xp.where(small, erf_small, erf_large)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _tanh_u_rows(x, x2, t):
    """t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3), from x and x2 = x^2, in place in t (t may be x2)."""
    xp = get_xp(x)
    xp.multiply(x2, 0.044715 * _SQRT_2_OVER_PI, out=t)
    t += _SQRT_2_OVER_PI                                 # sqrt(2/pi) (1 + 0.044715 x^2)
    t *= x                                               # u
    xp.tanh(t, out=t)                                    # t = tanh(u)


def _gelu_tanh_rows(x, y):
    """y = 0.5 x (1 + t) on one block of rows, in place in y."""
    xp = get_xp(x)
    if xp is not np:
        gpu_kernel("gelu_tanh")(x, y)                    # CuPy: the same formula as one fused kernel
        return
    xp.multiply(x, x, out=y)                             # x^2
    _tanh_u_rows(x, y, y)                                # t
    y *= 0.5
    y += 0.5                                             # (1 + t) / 2
    y *= x                                               # gelu(x) = 0.5 x (1 + t)


def _gelu_tanh_grad_rows(x, dy, dx):
    """dx = dy * gelu'(x) on one block of rows, recomputing tanh(u) from x (the cache keeps only x)."""
    if get_xp(x) is not np:
        gpu_kernel("gelu_tanh_grad")(x, dy, dx)          # CuPy: the same function as one fused kernel
        return
    _gelu_tanh_value_deriv_rows(x, scratch(x, slot=2), dx)   # gelu'(x); gelu(x) itself lands in a scratch buffer
    dx *= dy                                             # dx = dy * gelu'(x)


def _gelu_tanh_value_deriv_rows(x, y, d):
    """y = gelu(x) and d = gelu'(x) on one block of rows (d may be x itself). With t = tanh(u) and
    p = (1 + t) / 2 = sigmoid(2u), gelu(x) = x p and dp/du = 2 p (1 - p), so gelu_backward's derivative reads

        gelu'(x) = p + x 2 p (1 - p) u'(x) = p + 2 y (1 - p) u'(x),   u'(x) = sqrt(2/pi) (1 + 3 * 0.044715 x^2)

    the same function in fewer passes over the block, y = gelu(x) coming out on the way.
    """
    xp = get_xp(x)
    p, a = scratch(x, slot=0), scratch(x, slot=1)
    xp.multiply(x, x, out=a)                             # x^2 (kept for u'(x))
    _tanh_u_rows(x, a, p)                                # t = tanh(u)
    p *= 0.5
    p += 0.5                                             # p = (1 + t) / 2
    xp.multiply(x, p, out=y)                             # y = gelu(x) = x p  (the last use of x)
    a *= 2.0 * 3.0 * 0.044715 * _SQRT_2_OVER_PI
    a += 2.0 * _SQRT_2_OVER_PI                           # 2 u'(x)
    a *= y                                               # 2 y u'(x)
    xp.subtract(1.0, p, out=d)                           # 1 - p
    a *= d                                               # 2 y (1 - p) u'(x)
    xp.add(a, p, out=d)                                  # d = gelu'(x)


def gelu_forward(x, approximate="tanh"):
    """x: any shape -> same shape.

    exact:  gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))                      (PyTorch, timm)
    tanh:   gelu(x) ~ 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))                (original JAX ViT)
    Cache: x only (backward recomputes tanh(u) or Phi(x), cheaper than keeping an array of them).
    """
    xp = get_xp(x)
    if approximate == "tanh":
        x2 = xp.ascontiguousarray(x).reshape(-1, x.shape[-1] if x.ndim else 1)   # (R, n)
        y = xp.empty_like(x2)
        row_blocks(_gelu_tanh_rows, x2, y)
        return y.reshape(x.shape), (x, approximate)
    if approximate == "exact":
        cdf = 0.5 * (1.0 + erf(x * _INV_SQRT_2))
        return x * cdf, (x, approximate)
    raise ValueError(f"GELU approximate must be 'tanh' or 'exact', got {approximate!r}")


def gelu_backward(dy, cache):
    """dy -> dx.

    exact:  gelu'(x) = Phi(x) + x phi(x),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
    tanh:   with u = sqrt(2/pi)(x + 0.044715 x^3), t = tanh(u):
            gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    """
    x, approximate = cache
    xp = get_xp(x)
    if approximate == "tanh":
        shape = (-1, x.shape[-1] if x.ndim else 1)
        x2 = xp.ascontiguousarray(x).reshape(shape)                     # (R, n)
        dx = xp.empty_like(x2)
        row_blocks(_gelu_tanh_grad_rows, x2, xp.ascontiguousarray(dy).reshape(shape), dx)
        return dx.reshape(x.shape)
    cdf = 0.5 * (1.0 + erf(x * _INV_SQRT_2))
    dgelu = cdf + x * _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
    return dy * dgelu


def _bias_gelu_tanh_rows(u, y, b):
    """u += b, then y = gelu(u) (tanh form) on one block of rows: the bias add rides along with the GELU pass."""
    u += b                                               # u = x @ w + b
    _gelu_tanh_rows(u, y)                                # y = gelu(u)


def _bias_gelu_tanh_value_deriv_rows(u, y, b):
    """u += b, y = gelu(u), then u is overwritten by gelu'(u) (all backward needs of it), on one block of rows."""
    if get_xp(u) is not np:
        gpu_kernel("bias_gelu_tanh_value_deriv")(b, u, y)   # CuPy: the same function as one fused kernel
        return
    u += b                                               # u = x @ w + b
    _gelu_tanh_value_deriv_rows(u, y, u)                 # y = gelu(u);  u <- gelu'(u)


def _mul_col_sum_rows(dy, d, du):
    """du = dy * d on one block of rows; returns the block's sum of du over its rows (its share of db)."""
    get_xp(dy).multiply(dy, d, out=du)
    return _col_sum(du)


def linear_gelu_forward(x, w, b, approximate="tanh", grad=True):
    """x: (..., D_in), w: (D_in, D_out), b: (D_out,) -> (..., D_out).   y = gelu(x @ w + b)

    linear_forward then gelu_forward (the MLP's fc1 and its activation), with the bias add and the GELU done in
    one pass over row blocks after the matrix product. That pass also computes gelu'(u), u = x @ w + b (it shares
    tanh(u) with gelu(u)), and writes it over u: the cache keeps x, w and gelu'(u), so backward's GELU step is a
    single multiply. grad=False (inference, no backward to come): gelu(u) only, and the cache is None.
    """
    if approximate != "tanh":                            # the exact form: the two layers as they are
        u, lin_cache = linear_forward(x, w, b)
        y, gelu_cache = gelu_forward(u, approximate)
        return y, ((lin_cache, gelu_cache) if grad else None)
    xp = get_xp(x)
    lead = x.shape[:-1]
    u = matmul(x.reshape(-1, x.shape[-1]), w)            # (R, D_out)  x @ w
    y = xp.empty_like(u)                                 # (R, D_out)
    if not grad:
        row_blocks(lambda ub, yb: _bias_gelu_tanh_rows(ub, yb, b), u, y)              # u += b;  y = gelu(u)
        return y.reshape(*lead, w.shape[1]), None
    row_blocks(lambda ub, yb: _bias_gelu_tanh_value_deriv_rows(ub, yb, b), u, y)      # y = gelu(u);  u <- gelu'(u)
    return y.reshape(*lead, w.shape[1]), ((x, w), (u, approximate))


def linear_gelu_backward(dy, cache):
    """dy: (..., D_out) -> dx (..., D_in), dw (D_in, D_out), db (D_out,).

    du = dy * gelu'(u) (with db = sum of du over rows, in the same pass);  dx = du @ w^T;  dw = x^T @ du.
    """
    (x, w), (d, approximate) = cache
    xp = get_xp(dy)
    dy2 = xp.ascontiguousarray(dy).reshape(-1, dy.shape[-1])   # (R, D_out)
    # fwd: y = gelu(u)
    if approximate != "tanh":                            # the exact form: the GELU layer's own backward (d is u)
        du = gelu_backward(dy2, (d.reshape(dy2.shape), approximate))   # (R, D_out)
        parts = [_col_sum(du)]
    else:
        du = xp.empty_like(dy2)                          # (R, D_out)
        parts = row_blocks(_mul_col_sum_rows, dy2, d.reshape(dy2.shape), du)   # du = dy * gelu'(u)
    db = parts[0]
    for part in parts[1:]:
        db += part                                       # db = sum of du over all rows
    # fwd: u = x @ w + b
    dx = matmul(du, w.T).reshape(x.shape)                # (..., D_in)   du @ w^T
    dw = matmul(x.reshape(-1, x.shape[-1]).T, du)        # (D_in, D_out) x^T @ du
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------------------
# Softmax over the last axis.

def _softmax_rows(x, y, scale):
    """y = softmax(scale * x) on one block of rows, in place in y (y may be x)."""
    xp = get_xp(x)
    m = x.max(axis=-1, keepdims=True)                    # (r, 1)
    xp.subtract(x, m, out=y)                             # x - max x
    if scale != 1.0:
        y *= scale                                       # scale (x - max x) = scale x - max(scale x), scale > 0
    xp.exp(y, out=y)                                     # e
    y /= _row_sum(y)                                     # e / sum e


def _softmax_grad_rows(dy, y, dx, scale):
    """dx = scale * y * (dy - sum(dy * y)) on one block of rows."""
    xp = get_xp(dy)
    xp.multiply(dy, y, out=dx)                           # dy * y (dx as scratch)
    s = _row_sum(dx)                                     # sum(dy * y), (r, 1)
    xp.subtract(dy, s, out=dx)                           # dy - sum(dy * y)
    dx *= y
    if scale != 1.0:
        dx *= scale


def softmax_forward(x, scale=1.0, out=None):
    """x: (..., n) -> (..., n), rows summing to 1.  y = exp(s - max s) / sum exp(s - max s), s = scale * x
    (max-shift: no overflow; scale > 0, e.g. attention's 1/sqrt(hs)). `out` may be x (in place)."""
    xp = get_xp(x)
    n = x.shape[-1]
    x2 = xp.ascontiguousarray(x).reshape(-1, n)                         # (rows, n)
    y = xp.empty_like(x2) if out is None else out.reshape(-1, n)        # a view: out must be contiguous
    row_blocks(lambda a, b: _softmax_rows(a, b, scale), x2, y)
    y = y.reshape(x.shape)
    return y, (y, scale)


def softmax_backward(dy, cache):
    """dy: (..., n) -> dx (..., n).   dx = scale * y * (dy - sum(dy * y))   (the Jacobian diag(y) - y y^T, times the
    input scale, applied to dy)"""
    y, scale = cache
    xp = get_xp(dy)
    n = y.shape[-1]
    dx = xp.empty(y.shape, y.dtype)
    row_blocks(lambda a, b, c: _softmax_grad_rows(a, b, c, scale),
               xp.ascontiguousarray(dy).reshape(-1, n), y.reshape(-1, n), dx.reshape(-1, n))
    return dx


# ----------------------------------------------------------------------------------------------------------------
# Dropout and stochastic depth. Masks are drawn on the host from a NumPy generator (so CPU and GPU runs with the
# same seed drop the same units, and a resumed run draws the same masks) and kept in the cache for backward.

def _keep_mask(shape, p, rng, dtype, xp):
    """(shape) mask with entries 0 (dropped, probability p) or 1/(1-p) (kept): inverted dropout."""
    if rng is None:
        raise ValueError("dropout in training mode needs a random generator: pass rng=np.random.default_rng(seed)")
    keep = rng.random(shape, dtype=np.float32) >= p
    return xp.asarray(keep.astype(dtype) * np.asarray(1.0 / (1.0 - p), dtype=dtype))


def dropout_forward(x, p, train, rng=None):
    """x: any shape -> same shape.  train: y = x * mask, mask in {0, 1/(1-p)}; evaluation: y = x."""
    if not train or p == 0.0:
        return x, (None,)
    mask = _keep_mask(x.shape, p, rng, x.dtype, get_xp(x))
    return x * mask, (mask,)


def dropout_backward(dy, cache):
    """dy -> dx = dy * mask (the same mask as forward)."""
    (mask,) = cache
    return dy if mask is None else dy * mask


def drop_path_forward(x, p, train, rng=None):
    """x: (B, ...) -> same shape.  Stochastic depth: drop a whole residual branch per sample, scale kept ones by 1/(1-p)."""
    if not train or p == 0.0:
        return x, (None,)
    mask = _keep_mask((x.shape[0],) + (1,) * (x.ndim - 1), p, rng, x.dtype, get_xp(x))   # (B, 1, 1)
    return x * mask, (mask,)


drop_path_backward = dropout_backward   # the same rule: dx = dy * mask (the mask broadcasts over N and D)
