"""Lesson 1: an image is a sequence of patches.

Goal: see how a Transformer, a model of sequences, reads an image. The ViT cuts the image into non-overlapping
P x P squares, flattens each one into a vector, and treats the list of vectors as a sentence of "words"
("An Image is Worth 16x16 Words").

The math. An image x of shape (H, W, C) (channels-last, as everywhere in minivit) is cut into a gh x gw grid,
gh = H / P and gw = W / P. Patch n = i * gw + j (row-major: left to right, then top to bottom) is

    x_p^n = x[i*P:(i+1)*P, j*P:(j+1)*P, :].flatten()          a vector of P*P*C numbers, in (row, col, channel) order

so the image becomes a sequence of Np = H*W / P^2 tokens, each of length P*P*C. The sequence length sets the cost
of attention (it compares every token with every other one: Np^2 pairs), which is why the ViT uses large patches.
`minivit.layers.patchify` does this with one reshape and one transpose, no loop; `unpatchify` undoes it exactly.

Run:   python lessons/01_patches.py [--quick] [--out DIR]
Time:  about 1 s on a 2-core CPU, Python start-up included (--quick: the same; nothing here is slow).

You should see:
    224/16: 14 x 14 grid -> 196 tokens of 768 numbers (197 with the class token)
    384/16: 24 x 24 grid -> 576 tokens of 768 numbers (577 with the class token)
    32/4:   8 x 8 grid -> 64 tokens of 48 numbers (65 with the class token)
    naive loop vs patchify: max |difference| = 0 (the same numbers, in the same order)
    unpatchify(patchify(x)) == x: True
and the picture lessons/out/01_patches.png: the image with its patch grid and token numbers, all 196 tokens
as one wrapped sequence, and the top pixel row of token 0 unrolled into numbers.
"""
import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minivit.config import ViTConfig
from minivit.data.shapes import render_shapes
from minivit.draw import INK, font, save_png
from minivit.layers import patchify, unpatchify


def patchify_naive(x, P):
    """The reference: x (B, H, W, C) -> (B, Np, P*P*C), one patch at a time, in the order the paper describes."""
    B, H, W, C = x.shape
    tokens = []
    for i in range(H // P):                        # grid row, top to bottom
        for j in range(W // P):                    # grid column, left to right
            patch = x[:, i * P:(i + 1) * P, j * P:(j + 1) * P, :]   # (B, P, P, C)
            tokens.append(patch.reshape(B, P * P * C))              # (B, P*P*C): rows, then columns, then channels
    return np.stack(tokens, axis=1)                                 # (B, Np, P*P*C)



def draw_lesson(img, P, path):
    """img: (H, W, 3) uint8 -> PNG: the numbered patch grid, all tokens as one sequence, token 0 unrolled."""
    s = 2                                                            # display scale
    H, W, _ = img.shape
    gw = W // P
    cell = P * s
    pic = Image.fromarray(img).resize((W * s, H * s), Image.NEAREST)
    d = ImageDraw.Draw(pic)
    for k in range(0, W * s + 1, cell):                              # the grid lines
        d.line((k, 0, k, H * s), fill=(255, 255, 255), width=1)
        d.line((0, k, W * s, k), fill=(255, 255, 255), width=1)
    for n in range((H // P) * gw):                                   # token number in each patch's corner
        i, j = divmod(n, gw)
        d.text((j * cell + 2, i * cell + 1), str(n), fill=(255, 255, 0), font=font(10),
               stroke_width=1, stroke_fill=(0, 0, 0))
    patches = patchify(img[None], P)[0]                               # (Np, P*P*3) uint8
    per_row, gap = 28, 2                                              # the sequence, wrapped every 28 tokens
    rows = -(-len(patches) // per_row)
    vec = patches[0, :P * 3]                                          # token 0's first 3P numbers: pixel row 0
    bar = 8                                                           # pixels per number in the unrolled strip
    width = max(W * s, per_row * (P + gap), len(vec) * bar) + 60
    height = 60 + H * s + 60 + rows * (P + gap) + 60 + 60
    out = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(out)
    d.text((20, 8), f"a {H}x{W} image cut into a {H // P}x{gw} grid of {P}x{P} patches;", fill=INK, font=font(16))
    d.text((20, 30), "each patch is one token, numbered row by row", fill=INK, font=font(16))
    out.paste(pic, (20, 60))
    y = 60 + H * s + 15
    d.text((20, y), f"the same {len(patches)} tokens as one sequence, wrapped every {per_row} tokens:",
           fill=INK, font=font(13))
    d.text((20, y + 18), "the model gets no 2-D layout, only a list (lesson 3 gives the order back)",
           fill=INK, font=font(13))
    y += 40
    for n in range(len(patches)):
        r, c = divmod(n, per_row)
        x0, y0 = 40 + c * (P + gap), y + r * (P + gap)
        out.paste(Image.fromarray(patches[n].reshape(P, P, 3)), (x0, y0))
        if c == 0:
            d.text((36, y0 + P // 2), str(n), fill=INK, font=font(10), anchor="rm")
    y += rows * (P + gap)
    y += 15
    d.text((20, y), f"token 0 unrolled: its top pixel row is the first {len(vec)} of its {patches.shape[1]} "
           "numbers (r g b, r g b, ...)", fill=INK, font=font(13))
    y += 25
    for k, v in enumerate(vec):                                       # each number drawn in its channel's colour
        colour = [0, 0, 0]
        colour[k % 3] = int(v)
        d.rectangle((20 + k * bar, y, 20 + (k + 1) * bar - 2, y + 28), fill=tuple(colour))
        if k % 3 == 0:
            d.text((20 + k * bar, y + 32), "rgb", fill=INK, font=font(9))
    save_png(out, path)
    return path


def main(quick=False, seed=0, out_dir=None):
    """Patchify, count tokens, check against the naive loop, draw the grid. Returns the key numbers."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    images, labels = render_shapes(2, seed=seed, size=224)           # (2, 224, 224, 3) uint8: a shape on clutter
    x = (images.astype(np.float64) - 127.5) / 127.5                   # pixels in [-1, 1], as the original code

    tokens, patch_dims = {}, {}
    for size, P in ((224, 16), (384, 16), (32, 4)):
        cfg = ViTConfig(image_size=size, patch_size=P)                # the config knows the grid ...
        seq = patchify(np.zeros((1, size, size, 3)), P)               # ... and patchify agrees: (1, Np, P*P*C)
        assert seq.shape == (1, cfg.num_patches, P * P * 3), seq.shape
        tokens[f"{size}/{P}"], patch_dims[f"{size}/{P}"] = cfg.num_patches, P * P * 3
        gh, gw = cfg.grid
        print(f"{size}/{P}: {gh} x {gw} grid -> {cfg.num_patches} tokens of {P * P * 3} numbers "
              f"({cfg.seq_len} with the class token)")
    assert tokens == {"224/16": 196, "384/16": 576, "32/4": 64}

    fast = patchify(x, 16)                                            # (2, 196, 768)
    naive = patchify_naive(x, 16)
    max_diff = float(np.abs(fast - naive).max())
    assert fast.shape == (2, 196, 768) and max_diff == 0.0
    print(f"naive loop vs patchify: max |difference| = {max_diff:g} (the same numbers, in the same order)")
    roundtrip = bool(np.array_equal(unpatchify(fast, 16, (14, 14)), x))
    assert roundtrip
    print(f"unpatchify(patchify(x)) == x: {roundtrip}")
    small = np.random.default_rng(seed).standard_normal((3, 32, 32, 3))   # another size: 32/4
    assert np.array_equal(patchify(small, 4), patchify_naive(small, 4))

    png = draw_lesson(images[0], 16, out_dir / "01_patches.png")
    print(f"picture: {png}")
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "patch_dims": patch_dims, "naive_max_diff": max_diff, "roundtrip_exact": roundtrip,
            "png": str(png), "seconds": seconds}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the fast version (here: the same)")
    ap.add_argument("--out", default=None, help="folder for the PNG (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
