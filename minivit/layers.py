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
"""
import math

import numpy as np

from minivit.backend import get_xp


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

def linear_forward(x, w, b):
    """x: (..., D_in), w: (D_in, D_out), b: (D_out,) -> (..., D_out).   y = x @ w + b"""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])                      # (R, D_in): one GEMM for all rows
    y = x2 @ w                                           # (R, D_out)
    y += b
    return y.reshape(*lead, w.shape[1]), (x, w)


def linear_backward(dy, cache):
    """dy: (..., D_out) -> dx (..., D_in), dw (D_in, D_out), db (D_out,).

    dx = dy @ w^T;  dw = x^T @ dy (summed over all rows);  db = sum of dy over all rows.
    """
    x, w = cache
    dy2 = dy.reshape(-1, dy.shape[-1])                   # (R, D_out)
    x2 = x.reshape(-1, x.shape[-1])                      # (R, D_in)
    dx = (dy2 @ w.T).reshape(x.shape)                    # (..., D_in)
    dw = x2.T @ dy2                                      # (D_in, D_out)
    db = dy2.sum(axis=0)                                 # (D_out,)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------------------
# Layer normalization.

def layernorm_forward(x, w, b, eps=1e-6):
    """x: (..., D), w: (D,), b: (D,) -> (..., D).

    xhat = (x - mean(x)) / sqrt(var(x) + eps) over the last axis;  y = xhat * w + b.
    eps=1e-6: original ViT and timm LayerNorm (PyTorch's default is 1e-5).
    """
    mean = x.mean(axis=-1, keepdims=True)                # (..., 1)
    xc = x - mean                                        # (..., D)
    var = (xc * xc).mean(axis=-1, keepdims=True)         # (..., 1)
    rstd = 1.0 / (var + eps) ** 0.5                      # (..., 1)
    xhat = xc * rstd                                     # (..., D)
    y = xhat * w + b                                     # (..., D)
    return y, (xhat, rstd, w)


def layernorm_backward(dy, cache):
    """dy: (..., D) -> dx (..., D), dw (D,), db (D,).

    With g = dy * w:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (means over the last axis);
    dw = sum(dy * xhat), db = sum(dy) over all rows.
    """
    xhat, rstd, w = cache
    D = xhat.shape[-1]
    dy2 = dy.reshape(-1, D)
    dw = (dy2 * xhat.reshape(-1, D)).sum(axis=0)         # (D,)
    db = dy2.sum(axis=0)                                 # (D,)
    g = dy * w                                           # (..., D)
    dx = g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True)
    dx *= rstd                                           # (..., D)
    return dx, dw, db


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


def gelu_forward(x, approximate="tanh"):
    """x: any shape -> same shape.

    exact:  gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))                      (PyTorch, timm)
    tanh:   gelu(x) ~ 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))                (original JAX ViT)
    """
    xp = get_xp(x)
    if approximate == "tanh":
        t = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        return 0.5 * x * (1.0 + t), (x, approximate, t)
    if approximate == "exact":
        cdf = 0.5 * (1.0 + erf(x * _INV_SQRT_2))
        return x * cdf, (x, approximate, cdf)
    raise ValueError(f"GELU approximate must be 'tanh' or 'exact', got {approximate!r}")


def gelu_backward(dy, cache):
    """dy -> dx.

    exact:  gelu'(x) = Phi(x) + x phi(x),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
    tanh:   with u = sqrt(2/pi)(x + 0.044715 x^3), t = tanh(u):
            gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    """
    x, approximate, s = cache
    xp = get_xp(x)
    if approximate == "tanh":
        t = s
        dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    else:
        cdf = s
        dgelu = cdf + x * _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
    return dy * dgelu


# ----------------------------------------------------------------------------------------------------------------
# Softmax over the last axis.

def softmax_forward(x):
    """x: (..., n) -> (..., n), rows summing to 1.  y = exp(x - max x) / sum exp(x - max x) (max-shift: no overflow)."""
    xp = get_xp(x)
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e, (e,)


def softmax_backward(dy, cache):
    """dy: (..., n) -> dx (..., n).   dx = y * (dy - sum(dy * y))   (the Jacobian diag(y) - y y^T applied to dy)"""
    (y,) = cache
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


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
