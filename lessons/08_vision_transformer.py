"""Lesson 8: the whole Vision Transformer: forward, loss, backward, gradient check, parameter counts.

Goal: run lessons 1-7 end to end as `vit_forward`, `cross_entropy_forward` and `vit_backward`, prove every
gradient of the whole model right, and count the parameters of the paper's models exactly.

The math (minivit.model):
    z0 = [x_class; patchify(x) E] + E_pos                (B, N, D)     lessons 1-3
    z_l = block(z_{l-1}),  l = 1 .. L                    (B, N, D)     lessons 5-7
    pooled = LN(z_L)[:, 0]                               (B, D)        the class token's output
    logits = pooled @ head_w + head_b                    (B, K)
    loss = mean over the batch of -sum_k t_k log softmax(logits)_k,  dloss/dlogits = (softmax - t) / B
The head starts at zero (the original code's init), so every logit is 0, softmax is uniform, and the first loss
is exactly log K, with or without label smoothing: a free check of any training run's first step.
vit_backward calls the backward of every piece in exactly the reverse order and returns grads with the keys and
shapes of params.

Parameter count. Per block, with M = 4D:  attention 4D^2 + 4D (qkv_w, qkv_b, proj_w, proj_b), MLP 2DM + M + D
= 8D^2 + 5D, two LayerNorms 4D: 12D^2 + 13D in all. The whole model:
    (P*P*C*D + D)  +  D  +  N*D  +  L (12D^2 + 13D)  +  2D  +  (D*K + K)
     patch embed    cls   pos     blocks                final LN  head
The paper's table rounds ViT-B to 86M, ViT-L to 307M and ViT-H to 632M. ViT-L/16's exact count is 304.3M, and
307M is nearer L/32's 306.5M: the patch size changes the embedding and the position table, so one rounded number
per row cannot be exact for every patch size. The lesson reports both and pins the original code's exact counts.

Run:   python lessons/08_vision_transformer.py [--quick] [--out DIR]
Time:  about 3 s on a 2-core CPU, Python start-up included (--quick: 1.5 s, fewer coordinates checked).

You should see:
    shapes: images (2, 8, 8, 3) -> tokens (2, 5, 12) -> pooled (2, 12) -> logits (2, 5)
    first loss = log 5 = 1.6094 (difference ~ 1e-16), with smoothing 0.1 as well
    whole-model gradcheck ('test' config): 33 tensors, worst ~ 1e-9 (token); 'gap' pooling, exact GELU as well
    ViT-Ti/16 5,717,416  S/16 22,050,664  B/16 86,567,656  L/16 304,326,632  H/14 632,045,800: all exact
and lessons/out/08_vision_transformer.png: where the parameters of each model live.
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minivit.config import count_params, get_config
from minivit.draw import INK, PALETTE, font, save_png
from minivit.gradcheck import gradcheck_model
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.model import init_params, vit_backward, vit_forward
from minivit.tree import same_structure

ORIGINAL_COUNTS = {"vit-ti16": 5_717_416, "vit-s16": 22_050_664, "vit-b16": 86_567_656,   # the original
                   "vit-l16": 304_326_632, "vit-h14": 632_045_800}                       # code's tests
LABELS = {"vit-ti16": "ViT-Ti/16", "vit-s16": "ViT-S/16", "vit-b16": "ViT-B/16", "vit-l16": "ViT-L/16",
          "vit-h14": "ViT-H/14"}


def count_by_formula(cfg):
    """The count above, piece by piece -> {part: number of parameters}."""
    P, C, D, M, L, K = cfg.patch_size, cfg.channels, cfg.width, cfg.mlp_dim, cfg.depth, cfg.num_classes
    return {"embeddings": P * P * C * D + D + D + cfg.seq_len * D,                  # patch embed, cls, pos
            "attention": L * (4 * D * D + 4 * D), "MLP": L * (2 * D * M + M + D),
            "LayerNorms": L * 4 * D + 2 * D, "head": D * K + K}



def draw_shares(parts, path):
    """parts: {model: {part: count}} -> PNG: one bar per model, split into the parts' shares."""
    names = list(next(iter(parts.values())))
    left, bar_w, bar_h, top = 150, 560, 30, 60
    img = Image.new("RGB", (left + bar_w + 40, top + len(parts) * (bar_h + 14) + 60), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((20, 14), "where the parameters are (share of each model's total; 224 px, 1000 classes)", fill=INK,
           font=font(17))
    for r, (model, counts) in enumerate(parts.items()):
        y, total, x = top + r * (bar_h + 14), sum(counts.values()), left
        d.text((left - 10, y + bar_h / 2), f"{model}  {total / 1e6:.1f}M", fill=INK, font=font(14), anchor="rm")
        for i, n in enumerate(names):
            w = bar_w * counts[n] / total
            d.rectangle((x, y, x + w, y + bar_h), fill=PALETTE[i])
            if w > 40:
                d.text((x + w / 2, y + bar_h / 2), f"{100 * counts[n] / total:.0f}%", fill=(255, 255, 255),
                       font=font(13), anchor="mm")
            x += w
    y = top + len(parts) * (bar_h + 14) + 10
    for i, n in enumerate(names):                                        # the legend, one row
        x = left + i * 115
        d.rectangle((x, y, x + 14, y + 14), fill=PALETTE[i])
        d.text((x + 20, y + 7), n, fill=INK, font=font(13), anchor="lm")
    return save_png(img, path)


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    rng = np.random.default_rng(seed)
    out = {}

    # 1. Forward, loss, backward on the tiny 'test' config.
    cfg = get_config("test")                                             # 8x8x3 images, P=4, D=12, 2 blocks, K=5
    params = init_params(cfg, seed=seed, dtype=np.float64)
    images = rng.uniform(-1, 1, (2, 8, 8, 3))
    labels = np.array([0, 3])
    logits, cache = vit_forward(params, images, cfg)
    print(f"shapes: images {images.shape} -> tokens (2, {cfg.seq_len}, {cfg.width}) -> pooled "
          f"{cache['pooled'].shape} -> logits {logits.shape}")
    out["first_loss"] = {}
    for s in (0.0, 0.1):
        loss, ce_cache = cross_entropy_forward(logits, labels, smoothing=s)
        out["first_loss"][s] = float(loss)
        assert abs(float(loss) - math.log(cfg.num_classes)) < 1e-12
    print(f"first loss = log {cfg.num_classes} = {math.log(cfg.num_classes):.4f} (difference "
          f"{abs(out['first_loss'][0.0] - math.log(cfg.num_classes)):.0e}), with smoothing 0.1 as well")
    dimages, grads = vit_backward(cross_entropy_backward(1.0, ce_cache), cache)
    assert dimages.shape == images.shape and same_structure(grads, params)   # grads mirror params

    # 2. The whole-model gradient check: images and every parameter tensor, through the loss.
    coords = 8 if quick else 32
    out["gradcheck_worst"] = {}
    for name, c in (("token", cfg), ("gap", cfg.replace(pooling="gap")), ("exact GELU", cfg.replace(gelu="exact"))):
        res = gradcheck_model(c, seed=seed, max_coords=coords)
        worst = max(res, key=lambda r: r.rel_error)
        out["gradcheck_worst"][name] = worst.rel_error
        assert worst.rel_error < 1e-6, worst
        print(f"whole-model gradcheck ({name}): {len(res)} tensors, worst {worst.rel_error:.1e} ({worst.name})")

    # 3. Parameter counts: the package, the formula and the original code agree exactly.
    parts = {}
    for name, pinned in ORIGINAL_COUNTS.items():
        c = get_config(name)
        parts[LABELS[name]] = by_part = count_by_formula(c)
        assert count_params(c) == sum(by_part.values()) == pinned, (name, count_params(c), pinned)
    out["param_counts"] = {k: count_params(get_config(k)) for k in ORIGINAL_COUNTS}
    out["vit_l32"] = count_params(get_config("vit-l32"))
    print("  ".join(f"{k} {v:,}" for k, v in zip(parts, out["param_counts"].values())) + ": all exact")
    print(f"the paper's table: B 86M, L 307M, H 632M; exact: B/16 {out['param_counts']['vit-b16'] / 1e6:.1f}M, "
          f"L/16 {out['param_counts']['vit-l16'] / 1e6:.1f}M (L/32 {out['vit_l32'] / 1e6:.1f}M), "
          f"H/14 {out['param_counts']['vit-h14'] / 1e6:.1f}M")
    png = draw_shares(parts, out_dir / "08_vision_transformer.png")
    print(f"picture: {png}")
    out.update(png=str(png), seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer coordinates per tensor in the gradient check")
    ap.add_argument("--out", default=None, help="folder for the PNG (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
