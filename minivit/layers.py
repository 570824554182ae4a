"""The leaf layers of the Vision Transformer, each a forward/backward pair: the reference, the math as written.

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

These are the reference pairs. minivit/fast/ holds twins of some of them (same names, same signatures, tested
equal) that compute the same thing faster; the model runs the twins unless MINIVIT_REFERENCE=1 (or
reference=True) asks for these.
"""
import math

import numpy as np

from minivit.backend import get_xp
from minivit.erf import erf


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
    dpatches, dw, db = linear_backward(dy, lin_cache)   # (B, Np, P*P*C)   fwd: y = patches @ w + b
    dx = unpatchify(dpatches, P, (H // P, W // P))      # (B, H, W, C)     fwd: patches = patchify(x)
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
    dpos = dy.sum(axis=0, keepdims=True)                 # (1, N, D)   fwd: y = x + pos_embed
    if not has_cls:
        return dy, None, dpos
    dcls = dy[:, :1].sum(axis=0, keepdims=True)          # (1, 1, D)   fwd: x = [cls; x]
    return dy[:, 1:], dcls, dpos                         # (B, Np, D)


# ----------------------------------------------------------------------------------------------------------------
# Linear layer.

def linear_forward(x, w, b):
    """x: (..., D_in), w: (D_in, D_out), b: (D_out,) -> (..., D_out).   y = x @ w + b"""
    y = x @ w + b                                        # (..., D_out)
    return y, (x, w)


def linear_backward(dy, cache):
    """dy: (..., D_out) -> dx (..., D_in), dw (D_in, D_out), db (D_out,).

    dx = dy @ w^T;  dw = x^T @ dy (summed over all rows);  db = sum of dy over all rows.
    """
    x, w = cache
    D_in, D_out = w.shape
    dx = dy @ w.T                                        # (..., D_in)
    dw = x.reshape(-1, D_in).T @ dy.reshape(-1, D_out)   # (D_in, D_out): every row's x^T dy, summed
    db = dy.reshape(-1, D_out).sum(axis=0)               # (D_out,)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------------------
# Layer normalization.

def layernorm_forward(x, w, b, eps=1e-6):
    """x: (..., D), w: (D,), b: (D,) -> (..., D).

    xhat = (x - mean(x)) / sqrt(var(x) + eps) over the last axis;  y = xhat * w + b.
    eps=1e-6: original ViT and timm LayerNorm (PyTorch's default is 1e-5).
    Cache: xhat, rstd = 1 / sqrt(var + eps), and w.
    """
    xp = get_xp(x)
    xc = x - x.mean(axis=-1, keepdims=True)              # (..., D)  x - mean(x)
    var = (xc * xc).mean(axis=-1, keepdims=True)         # (..., 1)
    rstd = 1.0 / xp.sqrt(var + eps)                      # (..., 1)
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
    dw = (dy * xhat).reshape(-1, D).sum(axis=0)          # (D,)        fwd: y = xhat * w + b
    db = dy.reshape(-1, D).sum(axis=0)                   # (D,)
    g = dy * w                                           # (..., D)    dL/dxhat
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - xhat * (g * xhat).mean(axis=-1, keepdims=True))   # (..., D)   fwd: xhat = (x - mean) * rstd
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------------------
# GELU.

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
APPROXIMATIONS = ("tanh", "exact")


def _check_approximate(approximate):
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"GELU approximate must be 'tanh' or 'exact', got {approximate!r}")


def gelu_forward(x, approximate="tanh"):
    """x: any shape -> same shape.

    exact:  gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))                      (PyTorch, timm)
    tanh:   gelu(x) ~ 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))                (original JAX ViT)
    Cache: x.
    """
    _check_approximate(approximate)
    xp = get_xp(x)
    if approximate == "tanh":
        y = 0.5 * x * (1.0 + xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    else:
        y = 0.5 * x * (1.0 + erf(x * _INV_SQRT_2))
    return y, (x, approximate)


def gelu_backward(dy, cache):
    """dy -> dx = dy * gelu'(x).

    exact:  gelu'(x) = Phi(x) + x phi(x),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
    tanh:   with u = sqrt(2/pi)(x + 0.044715 x^3), t = tanh(u):
            gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    """
    x, approximate = cache
    xp = get_xp(x)
    if approximate == "tanh":
        t = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    else:
        cdf = 0.5 * (1.0 + erf(x * _INV_SQRT_2))                          # Phi(x)
        dgelu = cdf + x * _INV_SQRT_2PI * xp.exp(-0.5 * x * x)            # Phi(x) + x phi(x)
    return dy * dgelu


def linear_gelu_forward(x, w, b, approximate="tanh", keep_cache=True):
    """x: (..., D_in), w: (D_in, D_out), b: (D_out,) -> (..., D_out).   y = gelu(x @ w + b)

    The MLP's first layer and its activation as one step (minivit.fast fuses the two). keep_cache=False
    (inference, no backward to come): the cache is None.
    """
    u, lin_cache = linear_forward(x, w, b)               # (..., D_out)   u = x @ w + b
    y, gelu_cache = gelu_forward(u, approximate)         # (..., D_out)   y = gelu(u)
    return y, ((lin_cache, gelu_cache) if keep_cache else None)


def linear_gelu_backward(dy, cache):
    """dy: (..., D_out) -> dx (..., D_in), dw (D_in, D_out), db (D_out,): GELU's backward, then the linear's."""
    lin_cache, gelu_cache = cache
    du = gelu_backward(dy, gelu_cache)                   # fwd: y = gelu(u)
    return linear_backward(du, lin_cache)                # fwd: u = x @ w + b


# ----------------------------------------------------------------------------------------------------------------
# Softmax over the last axis.

def softmax_forward(x, scale=1.0):
    """x: (..., n) -> (..., n), rows summing to 1.   y = exp(s - max s) / sum exp(s - max s),  s = scale * x

    Shifting by the row's max changes nothing (it cancels in the ratio) and keeps exp from overflowing. `scale`
    is attention's 1/sqrt(hs). Cache: y (the backward needs only the output) and scale.
    """
    xp = get_xp(x)
    s = scale * x                                        # (..., n)
    e = xp.exp(s - s.max(axis=-1, keepdims=True))        # (..., n)
    y = e / e.sum(axis=-1, keepdims=True)                # (..., n)
    return y, (y, scale)


def softmax_backward(dy, cache):
    """dy: (..., n) -> dx (..., n).   dx = scale * y * (dy - sum(dy * y))   (the Jacobian diag(y) - y y^T, times the
    input scale, applied to dy)"""
    y, scale = cache
    return scale * y * (dy - (dy * y).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------------------------------------------
# Dropout and stochastic depth. Masks are drawn on the host from a NumPy generator (so CPU and GPU runs with the
# same seed drop the same units, and a resumed run draws the same masks) and kept in the cache for backward.

def keep_mask(shape, p, rng, dtype, xp):
    """(shape) mask with entries 0 (dropped, probability p) or 1/(1-p) (kept): inverted dropout."""
    if rng is None:
        raise ValueError("dropout in training mode needs a random generator: pass rng=np.random.default_rng(seed)")
    keep = rng.random(shape, dtype=np.float32) >= p
    return xp.asarray(keep.astype(dtype) * np.asarray(1.0 / (1.0 - p), dtype=dtype))


def dropout_forward(x, p, train, rng=None):
    """x: any shape -> same shape.  train: y = x * mask, mask in {0, 1/(1-p)}; evaluation: y = x."""
    if not train or p == 0.0:
        return x, (None,)
    mask = keep_mask(x.shape, p, rng, x.dtype, get_xp(x))
    return x * mask, (mask,)


def dropout_backward(dy, cache):
    """dy -> dx = dy * mask (the same mask as forward)."""
    (mask,) = cache
    return dy if mask is None else dy * mask


def drop_path_forward(x, p, train, rng=None):
    """x: (B, ...) -> same shape.  Stochastic depth: drop a whole residual branch per sample, scale the kept ones
    by 1/(1-p)."""
    if not train or p == 0.0:
        return x, (None,)
    mask = keep_mask((x.shape[0],) + (1,) * (x.ndim - 1), p, rng, x.dtype, get_xp(x))   # (B, 1, 1)
    return x * mask, (mask,)


drop_path_backward = dropout_backward   # the same rule: dx = dy * mask (the mask broadcasts over N and D)
