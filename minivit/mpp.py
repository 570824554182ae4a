"""Masked patch prediction: the paper's self-supervised pre-training (section 4.6 and appendix B.1.2).

BERT for images: corrupt half of the patch embeddings of every image and predict, from each corrupted patch's
final representation, the 3-bit mean colour of the pixels it came from.

    e  = patchify(x) E + b                          (B, Np, D)   the patch embeddings (patch_embed_forward)
    e' = corrupt(e)                                 (B, Np, D)   n_c = round(mask_rate * Np) patches per image:
             each one, independently, is replaced by the learnable [mask] embedding  (probability 0.8),
             by the embedding of a random OTHER patch of the same image               (0.1),
             or left as it is                                                         (0.1)
    z0 = [x_class; e'] + E_pos;  y = LN(encoder(z0))  (B, N, D)   exactly as the classifier (model.py)
    logits = y[corrupted patch tokens] @ mpp_head_w + mpp_head_b                      (B * n_c, Kc)
    loss = mean cross-entropy over the corrupted patches (only those) against their colour classes

Shapes: the glossary of layers.py, plus Np = gh * gw patches, n_c corrupted patches per image, S = B * n_c
predicted positions and Kc = 2^(bits * C) colour classes (512 for RGB, 8 for gray).

The target of a patch: each channel's mean over the patch of the [-1, 1] input, mapped back to [0, 1] by
v = (m + 1) / 2, quantized to 2^bits = 8 levels q = min(floor(8 v), 7); the class is r * 64 + g * 8 + b (in
general sum_c q_c 8^(C-1-c)). So the pixels must be normalized with 'minus_one_one' (the original ViT input).

The corruption is linear in the embeddings, which makes its backward pass two lines:

    e' = S e + m mask_token      S (B, Np, Np): row i is the unit row of the patch that position i shows (its own,
                                 or the random source), or zero where the [mask] embedding goes; m (B, Np, 1) is 1
                                 exactly there
    de = S^T de'                 (a randomly replaced position sends its gradient to its source patch)
    dmask_token = sum of de' over the [mask] positions

A random replacement copies the source patch's clean embedding (the one before corruption), even when the source
is itself corrupted. The corruption is drawn on the host from a NumPy generator, like dropout masks
(`draw_corruption`), so CPU and GPU runs and resumed runs corrupt the same patches.

This module is the objective alone. minivit.tasks.MPPTask trains it in minivit.train's loop (progress bar, logs,
atomic checkpoints, exact resume), and minivit.recipes.run_pretrain_mpp is the pre-training run:

    result = run_pretrain_mpp(TrainConfig(dataset="shapes", epochs=5, label_smoothing=0.0))
    params = strip_mpp(result.params)        # then minivit.finetune.prepare_finetune / train as usual
"""
import math
from typing import NamedTuple

import numpy as np

from minivit.backend import get_xp, to_numpy
from minivit.layers import patchify
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.model import check_images, encoder_backward, encoder_forward, layer_ops

MPP_PARAMS = ("mask_token", "mpp_head")    # the parameters pre-training adds to a ViT (dropped for fine-tuning)
MASK, RANDOM, KEEP = 0, 1, 2               # what happens to a corrupted patch (Corruption.kind)


# ----------------------------------------------------------------------------------------------------------------
# The corruption: which patches, and what replaces them.

class Corruption(NamedTuple):
    """The corrupted patches of a batch; host arrays, all (B, n_c), each row sorted by patch position.

    index:  the corrupted patch positions of each image, in [0, Np)
    kind:   MASK (the [mask] embedding), RANDOM (another patch's embedding) or KEEP (unchanged)
    source: for RANDOM, the patch whose embedding replaces it (never the position itself); else `index`
    """
    index: np.ndarray
    kind: np.ndarray
    source: np.ndarray


def check_rates(mask_rate, replace_rates):
    """Raise ValueError naming a bad rate: mask_rate in (0, 1]; replace_rates three non-negative numbers, sum 1."""
    if not 0.0 < mask_rate <= 1.0:
        raise ValueError(f"mask_rate must be in (0, 1], got {mask_rate!r}")
    rates = tuple(float(r) for r in replace_rates)
    if len(rates) != 3 or min(rates) < 0.0 or abs(sum(rates) - 1.0) > 1e-6:
        raise ValueError(f"replace_rates must be three non-negative fractions ([mask], random patch, unchanged) "
                         f"summing to 1, got {tuple(replace_rates)!r}")
    return rates


def num_corrupted(Np, mask_rate):
    """n_c = round(mask_rate * Np) (halves round up), at least 1: the patches corrupted in every image."""
    return max(1, int(math.floor(mask_rate * Np + 0.5)))


def draw_corruption(B, Np, rng, mask_rate=0.5, replace_rates=(0.8, 0.1, 0.1)):
    """-> Corruption of B images of Np patches, drawn from `rng` (a np.random.Generator).

    Every image gets exactly n_c = round(mask_rate * Np) corrupted patches, chosen uniformly without replacement;
    each of them independently becomes MASK, RANDOM or KEEP with the probabilities `replace_rates` (the paper's
    80 / 10 / 10). A RANDOM patch takes the embedding of a patch drawn uniformly from the other Np - 1 patches of
    the same image.
    """
    rates = check_rates(mask_rate, replace_rates)
    if rates[RANDOM] > 0 and Np < 2:
        raise ValueError(f"random replacement needs at least 2 patches per image, got Np={Np}")
    n_c = num_corrupted(Np, mask_rate)
    index = np.sort(rng.random((B, Np)).argsort(axis=1)[:, :n_c], axis=1)     # (B, n_c) distinct positions
    kind = rng.choice(3, size=(B, n_c), p=rates).astype(np.int8)              # (B, n_c) MASK / RANDOM / KEEP
    offset = rng.integers(1, max(Np, 2), size=(B, n_c))                       # (B, n_c) in [1, Np)
    source = np.where(kind == RANDOM, (index + offset) % Np, index)          # (B, n_c) another patch if RANDOM
    return Corruption(index.astype(np.int64), kind, source.astype(np.int64))


def corruption_matrices(corruption, Np):
    """-> S (B, Np, Np) and m (B, Np, 1), host float64: e' = S e + m mask_token (see the module docstring)."""
    index, kind, source = corruption
    B = index.shape[0]
    rows = np.arange(B)[:, None]                                               # (B, 1)
    S = np.broadcast_to(np.eye(Np), (B, Np, Np)).copy()                        # (B, Np, Np) identity: unchanged
    S[rows, index] = 0.0                                                       # clear the corrupted rows ...
    shown = kind != MASK
    S[rows.repeat(index.shape[1], 1)[shown], index[shown], source[shown]] = 1.0  # ... own or random source patch
    m = np.zeros((B, Np, 1))                                                   # (B, Np, 1)
    m[rows, index, 0] = (kind == MASK)
    return S, m


def corrupt_forward(x, mask_token, corruption):
    """x: (B, Np, D), mask_token: (1, 1, D) -> (B, Np, D).   e' = S e + m mask_token."""
    xp = get_xp(x)
    S, m = corruption_matrices(corruption, x.shape[1])
    S = xp.asarray(S, dtype=x.dtype)                                           # (B, Np, Np)
    m = xp.asarray(m, dtype=x.dtype)                                           # (B, Np, 1)
    y = S @ x                                                                  # (B, Np, D) own or source patch
    y += m * mask_token                                                        # (B, Np, D) [mask] embedding
    return y, (S, m)


def corrupt_backward(dy, cache):
    """dy: (B, Np, D) -> dx (B, Np, D), dmask_token (1, 1, D).   dx = S^T dy;  dmask_token = sum of m * dy."""
    S, m = cache
    dx = S.swapaxes(1, 2) @ dy                                                 # (B, Np, D)
    dmask_token = (m * dy).sum(axis=(0, 1), keepdims=True)                     # (1, 1, D)
    return dx, dmask_token


# ----------------------------------------------------------------------------------------------------------------
# The target: the 3-bit mean colour of every patch.

def num_colour_classes(channels, bits=3):
    """Kc = 2^(bits * C): 512 for RGB, 8 for gray (3 bits)."""
    return 2 ** (bits * channels)


def mean_colour_classes(images, P, bits=3):
    """images: (B, H, W, C) in [-1, 1] -> (B, Np) int64 host array: each patch's quantized mean colour.

    v = (mean over the patch + 1) / 2 per channel, q = min(floor(2^bits v), 2^bits - 1), class = sum_c q_c L^(C-1-c)
    with L = 2^bits (r * 64 + g * 8 + b for RGB). Computed on the host in float64.
    """
    x = np.asarray(to_numpy(images), dtype=np.float64)
    B, H, W, C = x.shape
    patches = patchify(x, P)                                                   # (B, Np, P*P*C)
    mean = patches.reshape(B, patches.shape[1], P * P, C).mean(axis=2)        # (B, Np, C)
    L = 2 ** bits
    q = np.clip(np.floor((mean + 1.0) * 0.5 * L), 0, L - 1).astype(np.int64)  # (B, Np, C) levels
    weights = L ** np.arange(C - 1, -1, -1, dtype=np.int64)                    # (C,) e.g. 64, 8, 1
    return q @ weights                                                         # (B, Np)


def mpp_targets(images, P, corruption, bits=3):
    """images: (B, H, W, C) in [-1, 1] -> (S,) int64: the colour class of every corrupted patch, in logits' order."""
    classes = mean_colour_classes(images, P, bits)                             # (B, Np)
    rows = np.arange(classes.shape[0])[:, None]
    return classes[rows, corruption.index].reshape(-1)                         # (B * n_c,)


# ----------------------------------------------------------------------------------------------------------------
# The model: the ViT encoder with corrupted patch embeddings and a per-patch colour head.

def mpp_forward(params, images, cfg, corruption, train=False, rng=None, reference=None):
    """images: (B, H, W, C), corruption (B, n_c) -> logits (S, Kc), cache.   S = B * n_c, rows image by image.

    params: a ViT's (its `head` is not used) plus mask_token (1, 1, D) and mpp_head {w (D, Kc), b (Kc,)}.
    `train=True` turns dropout and stochastic depth on, their masks drawn from `rng` as in vit_forward; `reference`
    chooses the layer pairs as there.
    """
    check_images(images, cfg, params["pos_embed"].dtype)
    xp = get_xp(images)
    B = images.shape[0]
    index = corruption.index
    if index.shape[0] != B or index.max(initial=0) >= cfg.num_patches:
        raise ValueError(f"the corruption (shape {index.shape}, largest position {index.max(initial=0)}) does not "
                         f"fit a batch of {B} images of {cfg.num_patches} patches")
    ops = layer_ops(reference)                                   # the layer pairs vit_forward would run
    cache = {"ops": ops}
    x, cache["patch_embed"] = ops.patch_embed_forward(images, params["patch_embed"]["w"],
                                                      params["patch_embed"]["b"], cfg.patch_size)   # (B, Np, D)
    x, cache["corrupt"] = corrupt_forward(x, params["mask_token"], corruption)           # (B, Np, D)
    x, cache["encoder"] = encoder_forward(x, params, cfg, train, rng, reference=reference)   # (B, N, D)
    rows = xp.asarray(np.arange(B)[:, None])                                             # (B, 1)
    cols = xp.asarray(index + cfg.n_prefix)                                              # (B, n_c) token positions
    h = x[rows, cols]                                                                    # (B, n_c, D)
    cache["gather"] = (x.shape, rows, cols)
    logits, cache["mpp_head"] = ops.linear_forward(h, params["mpp_head"]["w"], params["mpp_head"]["b"])  # (B, n_c, Kc)
    # the parameters this objective does not use get zero gradients (the classifier head, pre_logits)
    cache["unused"] = {k: (params[k]["w"].shape, params[k]["b"].shape) for k in ("pre_logits", "head")
                       if k in params}
    return logits.reshape(-1, logits.shape[-1]), cache                                   # (S, Kc)


def mpp_backward(dlogits, cache):
    """dlogits: (S, Kc) -> dimages (B, H, W, C), grads (the same tree as params).

    Zero gradients for the parameters the objective does not touch (head, pre_logits), so the optimizer sees
    the whole tree.
    """
    xp = get_xp(dlogits)
    ops = cache["ops"]
    shape, rows, cols = cache["gather"]
    B, N, D = shape
    g = {}
    dh, dw, db = ops.linear_backward(dlogits.reshape(B, -1, dlogits.shape[-1]), cache["mpp_head"])   # (B, n_c, D)
    g["mpp_head"] = {"w": dw, "b": db}
    dx = xp.zeros(shape, dtype=dlogits.dtype)                                            # (B, N, D)
    dx[rows, cols] = dh                                      # fwd: h = x[rows, cols] (distinct positions per image)
    dx, genc = encoder_backward(dx, cache["encoder"])                                    # (B, Np, D)
    g.update({k: v for k, v in genc.items() if v is not None})                         # (no cls_token: 'gap')
    dx, g["mask_token"] = corrupt_backward(dx, cache["corrupt"])                         # fwd: e' = S e + m mask
    dimages, dw, db = ops.patch_embed_backward(dx, cache["patch_embed"])
    g["patch_embed"] = {"w": dw, "b": db}
    for k, (w_shape, b_shape) in cache["unused"].items():
        g[k] = {"w": xp.zeros(w_shape, dtype=dlogits.dtype), "b": xp.zeros(b_shape, dtype=dlogits.dtype)}
    return dimages, g


def mpp_loss_forward(params, images, cfg, corruption, targets, train=False, rng=None, smoothing=0.0):
    """-> (mean cross-entropy over the corrupted patches: 0-d array, logits (S, Kc), cache)."""
    logits, cache = mpp_forward(params, images, cfg, corruption, train, rng)
    loss, ce_cache = cross_entropy_forward(logits, targets, smoothing)
    return loss, logits, (cache, ce_cache)


def mpp_loss_backward(cache, dloss=1.0):
    """-> dimages, grads of the mean loss (times dloss)."""
    cache, ce_cache = cache
    return mpp_backward(cross_entropy_backward(dloss, ce_cache), cache)


# ----------------------------------------------------------------------------------------------------------------
# Parameters.

def add_mpp_params(params, cfg, seed=0, bits=3):
    """-> params plus mask_token (1, 1, D) ~ normal(0.02) (as BERT's embeddings) and a zero mpp_head (D, Kc)
    (zero, as the classification head). Drawn on the host from a seeded generator; existing ones are kept."""
    if all(k in params for k in MPP_PARAMS):
        return params
    xp = get_xp(params["pos_embed"])
    dtype = params["pos_embed"].dtype
    D, Kc = cfg.width, num_colour_classes(cfg.channels, bits)
    rng = np.random.default_rng([seed, 5])
    out = dict(params)
    out["mask_token"] = xp.asarray(rng.normal(0.0, 0.02, size=(1, 1, D)).astype(dtype))
    out["mpp_head"] = {"w": xp.zeros((D, Kc), dtype=dtype), "b": xp.zeros(Kc, dtype=dtype)}
    return out


def strip_mpp(params):
    """-> params without mask_token and mpp_head: a plain ViT (the arrays are shared, not copied)."""
    return {k: v for k, v in params.items() if k not in MPP_PARAMS}
