"""Lesson 3: the class token and the position embeddings.

Goal: see why the ViT adds two learned things to the patch tokens of lesson 2, and prove the reason numerically.

The math (the paper's eq. 1, `minivit.layers.tokens_forward`):

    z0 = [x_class; x_p^1 E; ...; x_p^Np E] + E_pos          cls_token (1, 1, D), pos_embed E_pos (1, N, D), N = Np + 1

- The class token x_class is one learned vector, the same for every image, put in front of the patch tokens.
  After the L blocks its output is the image's representation: the head reads the class from it. It gives the model
  a fixed place to collect the whole image into, whatever the number of patches. ('gap' models average the patch
  tokens' outputs instead, and have no class token.)
- Attention mixes tokens with weights computed from the tokens themselves, and LayerNorm and the MLP act on each
  token alone. Nothing in a block knows where a token sits in the sequence: permute the input tokens and the
  outputs come out permuted the same way (the encoder is permutation-EQUIVARIANT), so the class token's output,
  a weighted combination of all tokens, does not change at all (it is permutation-INVARIANT). An image with its
  patches shuffled would be the same image to the model.
- The position embedding E_pos adds to token n a learned vector that belongs to position n. Now a patch's token
  depends on what it shows AND where it is, and shuffling the patches changes the output.

Run:   python lessons/03_class_token_and_positions.py [--quick] [--out DIR]
Time:  about 1 s on a 2-core CPU, Python start-up included (--quick: the same; it is already small).

You should see (a small ViT: 32x32 images, 8x8 patches -> 16 patch tokens + 1 class token, D = 32, 2 blocks):
    tokens: patches (1, 16, 32) -> with class token and positions (1, 17, 32)
    no position embedding:   class-token output changes by ~ 1e-16 when the patches are shuffled (rounding)
                             and the patch tokens' outputs are the same vectors, shuffled the same way
    'gap' pooling, no position embedding: ~ 1e-16 too
    with position embedding (as initialized, std 0.02): the class-token output changes by ~ 3%
and lessons/out/03_class_token_and_positions.png: the image, its shuffled patches, and the change in the
class token's output without and with position embeddings.
"""
import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minivit.charts import line_plot
from minivit.config import ViTConfig
from minivit.data.shapes import render_shapes
from minivit.draw import INK, font, save_png
from minivit.layers import layernorm_forward, patch_embed_forward, patchify, tokens_forward, unpatchify
from minivit.model import block_forward, init_params, vit_forward


def encode(params, x, cfg):
    """images (B, H, W, C) -> all output tokens (B, N, D): vit_forward's encoder, spelled out from its pieces."""
    z, _ = patch_embed_forward(x, params["patch_embed"]["w"], params["patch_embed"]["b"], cfg.patch_size)  # (B, Np, D)
    z, _ = tokens_forward(z, params.get("cls_token"), params["pos_embed"])                                  # (B, N, D)
    for p in params["blocks"]:
        z, _ = block_forward(z, p, cfg)                                                                     # (B, N, D)
    z, _ = layernorm_forward(z, params["norm"]["w"], params["norm"]["b"], cfg.ln_eps)
    return z



def rel_change(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    cfg = ViTConfig(image_size=32, patch_size=8, channels=3, num_classes=10, width=32, depth=2, heads=4, mlp_dim=64)
    params = init_params(cfg, seed=seed, dtype=np.float64)
    params["cls_token"] = np.random.default_rng(seed).normal(0, 0.5, (1, 1, cfg.width))  # as if learned (init: 0)
    images, _ = render_shapes(1, seed=seed, size=32)                        # (1, 32, 32, 3) uint8
    x = (images - 127.5) / 127.5                                            # (1, 32, 32, 3) float64 in [-1, 1]
    gh, gw = cfg.grid
    perm = np.random.default_rng(seed + 1).permutation(cfg.num_patches)     # a shuffle of the 16 patches
    x_shuf = unpatchify(patchify(x, 8)[:, perm], 8, (gh, gw))               # the same patches, other places

    z, _ = patch_embed_forward(x, params["patch_embed"]["w"], params["patch_embed"]["b"], 8)
    z0, _ = tokens_forward(z, params["cls_token"], params["pos_embed"])
    print(f"tokens: patches {z.shape} -> with class token and positions {z0.shape}")
    out = {}
    no_pos = dict(params, pos_embed=np.zeros_like(params["pos_embed"]))
    a, b = encode(no_pos, x, cfg), encode(no_pos, x_shuf, cfg)              # (1, 17, 32) each
    out["no_pos_cls_change"] = rel_change(a[:, 0], b[:, 0])
    out["no_pos_patch_equivariance"] = float(np.abs(b[:, 1:] - a[:, 1 + perm]).max())   # outputs shuffled alike
    assert out["no_pos_cls_change"] < 1e-12 and out["no_pos_patch_equivariance"] < 1e-12
    print(f"no position embedding: class-token output changes by {out['no_pos_cls_change']:.1e} (relative); "
          f"patch outputs = shuffled outputs to {out['no_pos_patch_equivariance']:.1e}")
    _, c = vit_forward(no_pos, x, cfg)                                      # the package's forward agrees
    assert np.allclose(c["pooled"], a[:, 0], rtol=0, atol=1e-12)

    gap = cfg.replace(pooling="gap")                                        # no class token: mean of the patches
    gp = init_params(gap, seed=seed, dtype=np.float64)
    gp["pos_embed"][:] = 0.0
    (_, ca), (_, cb) = vit_forward(gp, x, gap), vit_forward(gp, x_shuf, gap)
    out["gap_no_pos_change"] = rel_change(ca["pooled"], cb["pooled"])
    assert out["gap_no_pos_change"] < 1e-12
    print(f"'gap' pooling, no position embedding: pooled output changes by {out['gap_no_pos_change']:.1e}")

    a2, b2 = encode(params, x, cfg), encode(params, x_shuf, cfg)
    out["pos_cls_change"] = rel_change(a2[:, 0], b2[:, 0])
    assert out["pos_cls_change"] > 1e-3
    print(f"with position embedding (as initialized, std {params['pos_embed'].std():.2f}): class-token output "
          f"changes by {100 * out['pos_cls_change']:.1f}%")

    # The picture: the two images on top, the change of each of the D features of the class token's output below.
    s = 6
    pics = [Image.fromarray(im).resize((32 * s, 32 * s), Image.NEAREST) for im in (images[0],
            np.clip(np.rint(x_shuf[0] * 127.5 + 127.5), 0, 255).astype(np.uint8))]
    plot = line_plot({"no position embedding": (b - a)[0, 0], "with position embedding": (b2 - a2)[0, 0]},
                     title="class-token output: shuffled image minus original", xlabel="feature d",
                     ylabel="difference", size=(620, 300), markers=True)
    canvas = Image.new("RGB", (max(plot.width, 2 * 32 * s + 60), 32 * s + 40 + plot.height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (pic, label) in enumerate(zip(pics, ("the image", f"its {cfg.num_patches} patches shuffled"))):
        canvas.paste(pic, (20 + i * (32 * s + 20), 30))
        draw.text((20 + i * (32 * s + 20), 8), label, fill=INK, font=font(15))
    canvas.paste(plot, (0, 32 * s + 40))
    png = save_png(canvas, out_dir / "03_class_token_and_positions.png")
    print(f"picture: {png}")
    out.update(png=str(png), seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the fast version (here: the same)")
    ap.add_argument("--out", default=None, help="folder for the PNG (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
