"""The Vision Transformer: parameters, forward pass, backward pass.

Shape glossary: see layers.py (B batch, H W C image, P patch, gh gw grid, N tokens, D width, nh heads, hs head
size, M MLP width, K classes).

    z0 = [x_class; patchify(x) E] + E_pos                      (the class token only for 'token' pooling)
    z' = z + MSA(LN(z));  z = z' + MLP(LN(z'))                  (pre-norm blocks, depth times)
    y  = LN(z_L);  pooled = y[:, 0] ('token') or mean over the patch tokens ('gap')
    logits = pooled @ head_w + head_b                          (through tanh(pooled @ pre_logits) when present)

`vit_backward` calls the layer backwards in exactly the reverse order of `vit_forward`. The layer pairs come from
minivit.fast (fused, row-blocked twins) unless MINIVIT_REFERENCE=1 or reference=True selects the plain reference
pairs of layers.py and attention.py (minivit.reference): the same math, the same results to rounding.
"""
import math
from typing import NamedTuple

import numpy as np

# The layer pairs the model runs: the fast twins of linear, patch embedding, LayerNorm, GELU, fc1 + GELU, softmax
# and attention (minivit/fast/, which re-exports the reference tokens, dropout and drop path as they are) ...
from minivit import fast
# ... or, with MINIVIT_REFERENCE=1 or reference=True, the reference pairs of layers.py and attention.py
from minivit import reference as reference_ops
from minivit.backend import get_xp, to_device
from minivit.config import param_shapes
from minivit.reference import use_reference
from minivit.tree import flatten, unflatten


# ----------------------------------------------------------------------------------------------------------------
# Parameters

def _xavier_uniform(rng, fan_in, fan_out, shape):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


def _lecun_normal(rng, fan_in, shape):
    """Truncated normal (at +-2 std) with variance 1/fan_in, as jax's lecun_normal (std corrected for truncation)."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    z = rng.standard_normal(size=shape)
    bad = np.abs(z) > 2.0
    while bad.any():
        z[bad] = rng.standard_normal(size=int(bad.sum()))
        bad = np.abs(z) > 2.0
    return z * std


def init_params(cfg, seed=0, dtype=np.float32, device=None):
    """A nested dict of arrays for `cfg`, initialized as the original ViT code, on the host then moved to `device`.

    Dense kernels xavier-uniform (q, k and v each over its own (D, D) fan, as the original's separate projections;
    stored fused in qkv_w (D, 3D) as [q | k | v]); MLP biases normal(1e-6); other biases zero; patch embedding
    lecun-normal over fan-in P*P*C (it is a convolution there); position embedding normal(0.02); class token zero;
    head zero (kernel and bias); LayerNorm weight one, bias zero; pre_logits (when present) lecun-normal.
    The draws come from one seeded NumPy generator in a fixed order, so CPU and GPU start identical.
    """
    rng = np.random.default_rng(seed)
    shapes = param_shapes(cfg)
    D, M = cfg.width, cfg.mlp_dim
    p = {"patch_embed": {"w": _lecun_normal(rng, shapes["patch_embed"]["w"][0], shapes["patch_embed"]["w"]),
                         "b": np.zeros(D)}}
    if cfg.n_prefix:
        p["cls_token"] = np.zeros((1, 1, D))
    p["pos_embed"] = rng.normal(0.0, 0.02, size=shapes["pos_embed"])
    p["blocks"] = []
    for _ in range(cfg.depth):
        qkv_w = np.concatenate([_xavier_uniform(rng, D, D, (D, D)) for _ in range(3)], axis=1)   # (D, 3D)
        p["blocks"].append({
            "norm1": {"w": np.ones(D), "b": np.zeros(D)},
            "attn": {"qkv_w": qkv_w, "qkv_b": np.zeros(3 * D),
                     "proj_w": _xavier_uniform(rng, D, D, (D, D)), "proj_b": np.zeros(D)},
            "norm2": {"w": np.ones(D), "b": np.zeros(D)},
            "mlp": {"fc1_w": _xavier_uniform(rng, D, M, (D, M)), "fc1_b": rng.normal(0.0, 1e-6, size=M),
                    "fc2_w": _xavier_uniform(rng, M, D, (M, D)), "fc2_b": rng.normal(0.0, 1e-6, size=D)},
        })
    p["norm"] = {"w": np.ones(D), "b": np.zeros(D)}
    if cfg.representation_size:
        p["pre_logits"] = {"w": _lecun_normal(rng, D, (D, cfg.representation_size)),
                           "b": np.zeros(cfg.representation_size)}
    p["head"] = {"w": np.zeros(shapes["head"]["w"]), "b": np.zeros(cfg.num_classes)}
    flat = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in flatten(p).items()}
    return to_device(unflatten(flat), device)


def check_params(params, cfg, extra_ok=False):
    """Raise ValueError naming the first parameter whose name or shape does not match `cfg` (extra_ok: parameters
    beyond the ViT's own, such as a task's, are allowed)."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of arrays (init_params / load_checkpoint), got {type(params).__name__}")
    want = flatten(param_shapes(cfg), is_leaf=lambda v: isinstance(v, tuple))
    have = flatten(params)
    missing = [k for k in want if k not in have]
    unexpected = [] if extra_ok else [k for k in have if k not in want]
    if missing or unexpected:
        raise ValueError(f"parameters do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, shape in want.items():
        if tuple(have[k].shape) != tuple(shape):
            raise ValueError(f"parameter {k} has shape {tuple(have[k].shape)}, the config expects {tuple(shape)}")


# ----------------------------------------------------------------------------------------------------------------
# MLP and encoder block. `ops` is the namespace of layer pairs a forward pass runs: minivit.fast (the default)
# or minivit.reference (see layer_ops); the caches below are named, and a backward reads its ops from its cache.

def layer_ops(reference=None):
    """The layer pairs to run: minivit.reference when `reference` is True (or, when it is None, MINIVIT_REFERENCE=1
    is set), else their fast twins, minivit.fast. The two have the same names, signatures and results."""
    return reference_ops if use_reference(reference) else fast


class MLPCache(NamedTuple):
    fc1: tuple            # fc1 + GELU (a linear_gelu cache)
    drop1: tuple
    fc2: tuple
    drop2: tuple
    ops: object


def mlp_forward(x, p, approximate="tanh", train=False, rng=None, dropout=0.0, keep_cache=True, ops=None):
    """x: (B, N, D), p: {fc1_w (D, M), fc1_b, fc2_w (M, D), fc2_b} -> (B, N, D).   fc2(drop(gelu(fc1(x))))

    keep_cache=False (inference): no cache (the fast fc1 then skips gelu', which only backward needs).
    ops: the layer pairs to run (minivit.fast or minivit.reference); None: layer_ops() decides.
    """
    ops = ops or layer_ops()
    h, fc1_cache = ops.linear_gelu_forward(x, p["fc1_w"], p["fc1_b"], approximate, keep_cache)   # (B, N, M)
    h, drop1_cache = ops.dropout_forward(h, dropout, train, rng)
    y, fc2_cache = ops.linear_forward(h, p["fc2_w"], p["fc2_b"])                                 # (B, N, D)
    y, drop2_cache = ops.dropout_forward(y, dropout, train, rng)
    return y, (MLPCache(fc1_cache, drop1_cache, fc2_cache, drop2_cache, ops) if keep_cache else None)


def mlp_backward(dy, cache):
    """dy: (B, N, D) -> dx (B, N, D), grads {fc1_w, fc1_b, fc2_w, fc2_b}: the layers' backwards in reverse."""
    c, ops = cache, cache.ops
    dy = ops.dropout_backward(dy, c.drop2)
    dh, dfc2_w, dfc2_b = ops.linear_backward(dy, c.fc2)                # fwd: y = h @ fc2_w + fc2_b
    dh = ops.dropout_backward(dh, c.drop1)                             # fwd: h = drop(gelu(u))
    dx, dfc1_w, dfc1_b = ops.linear_gelu_backward(dh, c.fc1)           # fwd: h = gelu(x @ fc1_w + fc1_b)
    return dx, {"fc1_w": dfc1_w, "fc1_b": dfc1_b, "fc2_w": dfc2_w, "fc2_b": dfc2_b}


class BlockCache(NamedTuple):
    norm1: tuple
    attn: tuple           # an attention cache; attn.att is A (B, nh, N, N)
    drop_path1: tuple
    norm2: tuple
    mlp: MLPCache
    drop_path2: tuple
    ops: object


def block_forward(x, p, cfg, train=False, rng=None, drop_path=0.0, keep_cache=True, ops=None):
    """x: (B, N, D) -> (B, N, D).   x1 = x + MSA(LN(x));  y = x1 + MLP(LN(x1))
    keep_cache=False: inference, no backward to come (the MLP then skips what only backward needs).
    ops: the layer pairs to run; None: layer_ops() decides (MINIVIT_REFERENCE)."""
    ops = ops or layer_ops()
    h, norm1_cache = ops.layernorm_forward(x, p["norm1"]["w"], p["norm1"]["b"], cfg.ln_eps)
    h, attn_cache = ops.attention_forward(h, p["attn"], cfg.heads, train, rng, cfg.attn_dropout, cfg.dropout)
    h, dp1_cache = ops.drop_path_forward(h, drop_path, train, rng)
    x1 = x + h                                                          # (B, N, D) first residual
    h, norm2_cache = ops.layernorm_forward(x1, p["norm2"]["w"], p["norm2"]["b"], cfg.ln_eps)
    h, mlp_cache = mlp_forward(h, p["mlp"], cfg.gelu, train, rng, cfg.dropout, keep_cache, ops)
    h, dp2_cache = ops.drop_path_forward(h, drop_path, train, rng)
    y = x1 + h                                                          # (B, N, D) second residual
    return y, BlockCache(norm1_cache, attn_cache, dp1_cache, norm2_cache, mlp_cache, dp2_cache, ops)


def block_backward(dy, cache):
    """dy: (B, N, D) -> dx (B, N, D), grads {norm1, attn, norm2, mlp}. Residuals: dx = dy + dbranch."""
    c, ops = cache, cache.ops
    # fwd: y = x1 + drop_path(mlp(norm2(x1)))
    dh = ops.drop_path_backward(dy, c.drop_path2)
    dh, dmlp = mlp_backward(dh, c.mlp)
    dh, dnorm2_w, dnorm2_b = ops.layernorm_backward(dh, c.norm2)
    dx1 = dy + dh                                                       # (B, N, D)
    # fwd: x1 = x + drop_path(attn(norm1(x)))
    dh = ops.drop_path_backward(dx1, c.drop_path1)
    dh, dattn = ops.attention_backward(dh, c.attn)
    dh, dnorm1_w, dnorm1_b = ops.layernorm_backward(dh, c.norm1)
    dx = dx1 + dh                                                       # (B, N, D)
    return dx, {"norm1": {"w": dnorm1_w, "b": dnorm1_b}, "attn": dattn,
                "norm2": {"w": dnorm2_w, "b": dnorm2_b}, "mlp": dmlp}


# ----------------------------------------------------------------------------------------------------------------
# The whole model

def check_images(images, cfg, dtype=None):
    """Raise ValueError unless images are floating (B, H, W, C) matching cfg (and `dtype`, when given)."""
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"images must be an array (B, H, W, C) (NumPy, or CuPy on the GPU), got "
                        f"{type(images).__name__}: convert with np.asarray(images, dtype=np.float32)")
    shape = tuple(images.shape)
    H, W = cfg.image_hw
    if len(shape) != 4:
        raise ValueError(f"images must have rank 4 (B, H, W, C), got shape {shape}")
    if shape[3] != cfg.channels:
        raise ValueError(f"images must have {cfg.channels} channel(s) (channels-last (B, H, W, C)), got shape {shape}")
    if shape[1:3] != (H, W):
        raise ValueError(f"images must be {H}x{W} for this model, got {shape[1]}x{shape[2]} (shape {shape})")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floating point (normalized pixels), got dtype {images.dtype}")
    if dtype is not None and images.dtype != dtype:
        raise ValueError(f"images are {images.dtype} but the parameters are {dtype}: convert with .astype()")


def drop_path_rates(cfg):
    """Stochastic depth rate of each block, rising linearly from 0 to cfg.drop_path (as timm)."""
    if cfg.depth == 1:
        return [cfg.drop_path]
    return [cfg.drop_path * i / (cfg.depth - 1) for i in range(cfg.depth)]


def encoder_forward(x, params, cfg, train=False, rng=None, keep_cache=True, reference=None):
    """x: (B, Np, D) patch embeddings -> (B, N, D) every token's final representation (after the final norm).

    z0 = [x_class; x] + E_pos, dropout, the blocks, LN: the steps between the patch embedding and the pooling,
    shared by vit_forward and by objectives that read the patch tokens (or change the embeddings first, as masked
    patch prediction in minivit.mpp). The cache is a dict with keys ops, tokens, drop, blocks, norm.
    keep_cache=False (inference): each block's cache is dropped as soon as the block returns, so only one block's
    activations are alive at a time; cache["blocks"] is None then, and there is no backward pass.
    reference: run the reference layer pairs (see layer_ops).
    """
    ops = layer_ops(reference)
    cache = {"ops": ops}
    x, cache["tokens"] = ops.tokens_forward(x, params.get("cls_token"), params["pos_embed"])  # (B, N, D)
    x, cache["drop"] = ops.dropout_forward(x, cfg.dropout, train, rng)
    cache["blocks"] = [] if keep_cache else None
    for p, rate in zip(params["blocks"], drop_path_rates(cfg)):
        x, c = block_forward(x, p, cfg, train, rng, rate, keep_cache, ops)                     # (B, N, D)
        if keep_cache:
            cache["blocks"].append(c)                                   # (without: the cache goes at once)
    x, cache["norm"] = ops.layernorm_forward(x, params["norm"]["w"], params["norm"]["b"], cfg.ln_eps)  # (B, N, D)
    return x, cache


def _block_caches(cache, what):
    """cache["blocks"], or a ValueError saying why the blocks' `what` are not there (inference, or used by backward)."""
    blocks = cache["blocks"]
    if blocks is None:
        raise ValueError(f"this forward pass ran with keep_cache=False (inference): it kept no {what}; run it with "
                         "keep_cache=True")
    if any(c is None for c in blocks):
        raise ValueError(f"this cache has been through a backward pass already, which released the {what}; run the "
                         "forward pass again")
    return blocks


def encoder_backward(dy, cache):
    """dy: (B, N, D) -> dx (B, Np, D), grads {cls_token (None for 'gap'), pos_embed, blocks, norm}.

    The backward pass consumes the blocks' activations: each block's cache is released as soon as its backward
    is done (as autograd frees its graph), so the gradients being made reuse that memory instead of adding to the
    peak. A second backward through the same cache is an error; run the forward pass again.
    """
    blocks = _block_caches(cache, "activations to backpropagate through")
    ops = cache["ops"]
    g = {}
    dx, dw, db = ops.layernorm_backward(dy, cache["norm"])
    g["norm"] = {"w": dw, "b": db}
    dblocks = []
    for i in reversed(range(len(blocks))):
        dx, gb = block_backward(dx, blocks[i])
        blocks[i] = None                                                                 # release its activations
        dblocks.append(gb)
    g["blocks"] = dblocks[::-1]
    dx = ops.dropout_backward(dx, cache["drop"])
    dx, g["cls_token"], g["pos_embed"] = ops.tokens_backward(dx, cache["tokens"])        # dx (B, Np, D)
    return dx, g


def vit_forward(params, images, cfg, train=False, rng=None, keep_cache=True, reference=None):
    """images: (B, H, W, C) -> logits (B, K), cache.

    `train=True` turns dropout and stochastic depth on; their masks come from `rng` (a NumPy Generator) and are
    kept in the cache. Returns `(logits, cache)`; the pooled representation is `cache["pooled"]` and the
    attention probabilities are `attention_probs(cache)`. `keep_cache=False` (inference: predict, evaluate)
    keeps only one block's activations alive at a time; the cache then has the pooled representation but no
    blocks, and cannot go through vit_backward. `reference=True` runs the reference layer pairs of layers.py and
    attention.py instead of their fast twins (None: MINIVIT_REFERENCE decides); vit_backward follows the forward.
    """
    check_params(params, cfg, extra_ok=True)          # (names and shapes only: microseconds)
    check_images(images, cfg, params["pos_embed"].dtype)
    ops = layer_ops(reference)
    xp = get_xp(images)
    cache = {}
    x, cache["patch_embed"] = ops.patch_embed_forward(images, params["patch_embed"]["w"],
                                                      params["patch_embed"]["b"], cfg.patch_size)  # (B, Np, D)
    x, enc_cache = encoder_forward(x, params, cfg, train, rng, keep_cache, reference)   # (B, N, D)
    cache.update(enc_cache)                                              # ops, tokens, drop, blocks, norm
    if cfg.pooling == "token":
        pooled = x[:, 0]                                                                 # (B, D) class token
    else:
        pooled = x.mean(axis=1)                                                          # (B, D) mean of patches
    cache["pooled_shape"] = x.shape
    if "pre_logits" in params:
        h, cache["pre_logits"] = ops.linear_forward(pooled, params["pre_logits"]["w"], params["pre_logits"]["b"])
        pooled = xp.tanh(h)                                                              # (B, rep)
        cache["pre_logits_tanh"] = pooled
    cache["pooled"] = pooled
    logits, cache["head"] = ops.linear_forward(pooled, params["head"]["w"], params["head"]["b"])  # (B, K)
    cache["pooling"] = cfg.pooling
    cache["logits_shape"] = logits.shape
    return logits, cache


def head_backward(dlogits, cache):
    """dlogits: (B, K) -> dpooled (B, D), grads {head: {w, b}}: the classifier head's backward alone (what a
    linear probe on a frozen backbone trains; vit_backward goes on from dpooled)."""
    if tuple(getattr(dlogits, "shape", ())) != tuple(cache["logits_shape"]):
        raise ValueError(f"dlogits must have the logits' shape {tuple(cache['logits_shape'])} (B, K), got "
                         f"{tuple(getattr(dlogits, 'shape', ()))}")
    dpooled, dw, db = cache["ops"].linear_backward(dlogits, cache["head"])   # fwd: logits = pooled @ head_w + head_b
    return dpooled, {"head": {"w": dw, "b": db}}


def vit_backward(dlogits, cache):
    """dlogits: (B, K) -> dimages (B, H, W, C), grads (the same tree as params)."""
    xp = get_xp(dlogits)
    ops = cache["ops"]
    dpooled, grads = head_backward(dlogits, cache)                                      # (B, D)
    if "pre_logits" in cache:
        t = cache["pre_logits_tanh"]
        dh = dpooled * (1.0 - t * t)                                                     # fwd: pooled = tanh(h)
        dpooled, dw, db = ops.linear_backward(dh, cache["pre_logits"])
        grads["pre_logits"] = {"w": dw, "b": db}
    B, N, D = cache["pooled_shape"]
    if cache["pooling"] == "token":
        dx = xp.zeros((B, N, D), dtype=dlogits.dtype)                                    # fwd: pooled = x[:, 0]
        dx[:, 0] = dpooled
    else:
        dx = xp.broadcast_to((dpooled * (1.0 / N))[:, None, :], (B, N, D))              # fwd: pooled = mean(x)
    dx, enc = encoder_backward(dx, cache)                                               # (B, Np, D)
    grads.update(blocks=enc["blocks"], norm=enc["norm"], pos_embed=enc["pos_embed"])
    if enc["cls_token"] is not None:
        grads["cls_token"] = enc["cls_token"]
    dimages, dw, db = ops.patch_embed_backward(dx, cache["patch_embed"])                # fwd: x = patchify(images) E
    grads["patch_embed"] = {"w": dw, "b": db}
    return dimages, grads


def attention_probs(cache):
    """The attention probabilities of every layer of a forward pass: a list of L arrays (B, nh, N, N)."""
    return [c.attn.att for c in _block_caches(cache, "attention probabilities (read them before vit_backward)")]
