"""Fine-tuning at a new resolution, the paper's transfer recipe.

Keep the patch size, raise the resolution, so the sequence grows: a 32x32 image with 4x4 patches is an 8x8 grid,
at 48x48 a 12x12 grid. The learned position embeddings are resized by 2D interpolation "according to their
location in the original image" (minivit.resample), the head is replaced by a zero-initialized one when the
classes change, and everything else is kept. These are pure functions of (params, cfg); the fine-tuning run
itself, with the paper's recipe (SGD + momentum 0.9, no weight decay, gradient clipping at global norm 1, a short
warmup and cosine decay), is minivit.recipes.run_finetune (FINETUNE_DEFAULTS there).

`resampled_forward` / `resampled_backward` run a model whose position embeddings are stored at one grid on
images of another size, with the resize inside the forward pass and its transpose in the backward pass, so a
model can even train through the resize.
"""
import numpy as np

from minivit.backend import get_xp
from minivit.model import vit_backward, vit_forward
from minivit.mpp import MPP_PARAMS, strip_mpp
from minivit.resample import METHODS, resample_pos_embed, resample_pos_embed_backward, resample_pos_embed_forward

RESAMPLE_CHOICES = METHODS + ("none",)   # 'none': no interpolation, freshly initialized position embeddings


def resize_model(params, cfg, image_size, method="linear", seed=0):
    """-> (params, cfg) for input size `image_size`: position embeddings resampled to the new grid.

    method: 'linear' (the original ViT code), 'bilinear', 'bicubic', or 'none' (the grid's embeddings are
    re-drawn from normal(0.02), the class token's kept: the baseline without interpolation).
    The returned params share every array except pos_embed with the input.
    """
    if method not in RESAMPLE_CHOICES:
        raise ValueError(f"resample method must be one of {RESAMPLE_CHOICES}, got {method!r}")
    new_cfg = cfg.replace(image_size=image_size)          # raises if not divisible by the patch size
    out = dict(params)
    if new_cfg.grid == cfg.grid and method != "none":
        return out, new_cfg
    pos = params["pos_embed"]                             # (1, n_prefix + gh*gw, D)
    xp = get_xp(pos)
    if method == "none":
        fresh = np.random.default_rng(seed).normal(0.0, 0.02, size=(1, new_cfg.seq_len, cfg.width))
        fresh = xp.asarray(fresh.astype(pos.dtype))
        fresh[:, :cfg.n_prefix] = pos[:, :cfg.n_prefix]
        out["pos_embed"] = fresh
    else:
        out["pos_embed"] = resample_pos_embed(pos, new_cfg.grid, cfg.grid, cfg.n_prefix, method)
    return out, new_cfg


def new_head(params, cfg, num_classes):
    """-> (params, cfg) with a zero-initialized (D, K) head, as the paper's fine-tuning; pre_logits dropped."""
    xp = get_xp(params["pos_embed"])
    dtype = params["pos_embed"].dtype
    out = {k: v for k, v in params.items() if k != "pre_logits"}
    out["head"] = {"w": xp.zeros((cfg.width, num_classes), dtype=dtype), "b": xp.zeros(num_classes, dtype=dtype)}
    return out, cfg.replace(num_classes=num_classes, representation_size=0)


def prepare_finetune(params, cfg, image_size=None, num_classes=None, method="linear", fresh_head=False, seed=0):
    """Resize the position embeddings (when image_size differs) and replace the head (when the classes change
    or fresh_head). Returns (params, cfg) ready for `minivit.train.train(params=..., cfg=...)`.
    A masked patch prediction checkpoint loses its mask_token and mpp_head and gets a zero head (minivit.mpp)."""
    if any(k in params for k in MPP_PARAMS):
        params, fresh_head = strip_mpp(params), True
    if image_size:
        params, cfg = resize_model(params, cfg, image_size, method, seed)
    if fresh_head or (num_classes is not None and num_classes != cfg.num_classes):
        params, cfg = new_head(params, cfg, num_classes or cfg.num_classes)
    return params, cfg


def resampled_forward(params, images, cfg, image_size, method="linear", train=False, rng=None):
    """images: (B, S, S, C) -> logits (B, K), with params' position embeddings (stored at cfg's grid) resampled
    to the grid of size S inside the forward pass."""
    new_cfg = cfg.replace(image_size=image_size)
    pos, rcache = resample_pos_embed_forward(params["pos_embed"], new_cfg.grid, cfg.grid, cfg.n_prefix, method)
    logits, cache = vit_forward(dict(params, pos_embed=pos), images, new_cfg, train, rng)
    return logits, (cache, rcache)


def resampled_backward(dlogits, cache):
    """-> dimages, grads; the position-embedding gradient taken back through the resize (its transpose)."""
    cache, rcache = cache
    dimages, grads = vit_backward(dlogits, cache)
    grads["pos_embed"] = resample_pos_embed_backward(grads["pos_embed"], rcache)   # fwd: pos = R pos_embed
    return dimages, grads
