"""Lesson 6: multi-head attention: several attention patterns at the price of one.

Goal: see that "multi-head" is a reshape, that each head attends with its own slice of the features and so
can look for something different, and check the whole layer's backward.

The math (minivit.attention.attention_forward). With nh heads of size hs = D / nh:

    qkv = x @ qkv_w + qkv_b                            (B, N, 3D): columns [q | k | v]
    qkv.reshape(B, N, 3, nh, hs).transpose(2, 0, 3, 1, 4) -> q, k, v  (B, nh, N, hs) each
    head h:  A_h = softmax(q_h k_h^T / sqrt(hs)),  o_h = A_h v_h       (lesson 5, once per head, all at once)
    o = [o_1 | ... | o_nh]                             (B, N, D): heads side by side again
    y = o @ proj_w + proj_b

Head h reads only columns h*hs ... (h+1)*hs - 1 of q, k and v. The parameters are the same (D, 3D) and (D, D)
matrices whatever nh is: splitting into heads costs nothing, and gives nh attention matrices instead of one,
each of them free to match its own kind of similarity. The backward is lesson 5's, per head, then the heads'
gradients are put back side by side (the transpose of the reshape).

To see "what each head sees", we build the weights by hand. Each token gets features [position code | colour]:
the position code of grid cell (r, c) is (cos wr, sin wr, cos wc, sin wc) with w = pi / (grid size), so the dot
product of two codes is cos(w * row distance) + cos(w * column distance): largest for nearby cells. The colour part holds the patch's mean colour m
and |m|^2 / 2, so that a suitable q . k = m_i . m_j - |m_j|^2 / 2 = -|m_i - m_j|^2 / 2 + (a constant for query i):
largest for keys of the same colour. Head 0's q and k read only the position code; head 1's only the colour.

Run:   python lessons/06_multi_head_attention.py [--quick] [--out DIR]
Time:  about 1 s on a 2-core CPU, Python start-up included (--quick: the same).

You should see:
    head loop vs attention_forward: max |difference| 0 (outputs and attention matrices: the same arithmetic)
    ViT-B/16 parameters with 1, 12, 768 heads: 86,567,656 each
    hand-built heads: mean attention distance head 0 (position) ~ 8 px, head 1 (colour) ~ 26 px
    gradcheck of attention (B=2, N=5, D=12, 3 heads): every tensor ~ 1e-10
and lessons/out/06_multi_head_attention.png: for two query patches, where each head looks.
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
from PIL import ImageDraw

from minivit.analysis import mean_attention_distance
from minivit.attention import attention_backward, attention_forward
from minivit.config import count_params, get_config
from minivit.data.shapes import render_shapes
from minivit.draw import overlay, save_png, tile_grid
from minivit.gradcheck import gradcheck
from minivit.layers import patchify, softmax_forward


def heads_by_loop(x, p, nh):
    """The reference: x (B, N, D) -> y (B, N, D), A (B, nh, N, N), one head at a time on its own columns."""
    D = x.shape[-1]
    hs = D // nh
    qkv = x @ p["qkv_w"] + p["qkv_b"]                                    # (B, N, 3D)
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]            # (B, N, D) each
    outs, atts = [], []
    for h in range(nh):
        cols = slice(h * hs, (h + 1) * hs)                                # head h's columns
        A, _ = softmax_forward(q[..., cols] @ k[..., cols].swapaxes(1, 2) / math.sqrt(hs))   # (B, N, N)
        outs.append(A @ v[..., cols])                                     # (B, N, hs)
        atts.append(A)
    o = np.concatenate(outs, axis=-1)                                     # (B, N, D): heads side by side
    return o @ p["proj_w"] + p["proj_b"], np.stack(atts, axis=1)


def hand_built(image, P, pos_gain=8.0, colour_gain=12.0):
    """image (H, W, 3) uint8 -> tokens x (1, N, 16), qkv_w (16, 48): head 0 matches position, head 1 colour."""
    x_img = (image[None].astype(np.float64) - 127.5) / 127.5
    g = image.shape[0] // P
    m = patchify(x_img, P)[0].reshape(g * g, P * P, 3).mean(axis=1)     # (N, 3) mean colour of each patch
    r, c = np.divmod(np.arange(g * g), g)                                 # grid row and column of each token
    w = math.pi / g
    pos = np.stack([np.cos(w * r), np.sin(w * r), np.cos(w * c), np.sin(w * c)], axis=1)   # (N, 4)
    # pos_i . pos_j = cos(w (r_i - r_j)) + cos(w (c_i - c_j)): 2 for the same cell, falling with distance
    x = np.zeros((g * g, 16))                                             # (N, D): the features
    x[:, 0:4] = pos                                                       # position code
    x[:, 8:11] = m                                                        # mean colour
    x[:, 11] = 0.5 * (m * m).sum(axis=1)                                  # |m|^2 / 2
    x[:, 12] = 1.0                                                        # a constant
    D = 16
    a_pos = math.sqrt(pos_gain) * 8 ** 0.25                               # a^2 / sqrt(hs) = gain
    a_col = math.sqrt(colour_gain) * 8 ** 0.25
    qkv_w = np.zeros((D, 3 * D))                                          # columns [q | k | v]
    for i in range(4):                                                    # head 0 = q, k columns 0..7
        qkv_w[i, i] = qkv_w[i, D + i] = a_pos                             # q0 = k0 = pos code
    for i in range(3):                                                    # head 1 = q, k columns 8..15
        qkv_w[8 + i, 8 + i] = qkv_w[8 + i, D + 8 + i] = a_col             # q1, k1 start with the colour m
    qkv_w[12, 11] = a_col                                                 # q1 ends with 1
    qkv_w[11, D + 11] = -a_col                                            # k1 ends with -|m|^2/2
    qkv_w[:, 2 * D:] = np.eye(D)                                          # v = x
    return x[None], qkv_w


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    rng = np.random.default_rng(seed)
    out = {}
    B, N, D, nh = 2, 5, 12, 3
    x = rng.standard_normal((B, N, D))
    p = {"qkv_w": rng.standard_normal((D, 3 * D)) / math.sqrt(D), "qkv_b": rng.standard_normal(3 * D) * 0.1,
         "proj_w": rng.standard_normal((D, D)) / math.sqrt(D), "proj_b": rng.standard_normal(D) * 0.1}

    # 1. Heads are a reshape: a loop over column slices gives the package's output and attention matrices.
    y, cache = attention_forward(x, p, nh)
    y_loop, A_loop = heads_by_loop(x, p, nh)
    out["loop_max_diff"] = max(float(np.abs(y - y_loop).max()), float(np.abs(cache.att - A_loop).max()))
    assert out["loop_max_diff"] < 1e-12
    print(f"head loop vs attention_forward: max |difference| {out['loop_max_diff']:.1e} (outputs and attention)")
    out["params_by_heads"] = {h: count_params(get_config("vit-b16", heads=h)) for h in (1, 12, 768)}
    assert len(set(out["params_by_heads"].values())) == 1                # the heads split D; they add nothing
    print("ViT-B/16 parameters with 1, 12, 768 heads: "
          + ", ".join(f"{v:,}" for v in out["params_by_heads"].values()))

    # 2. What each head sees: hand-built weights on a real image.
    images, _ = render_shapes(1, seed=seed, size=64)
    P, g = 8, 8
    xs, qkv_w = hand_built(images[0], P)
    hp = {"qkv_w": qkv_w, "qkv_b": np.zeros(48), "proj_w": np.eye(16), "proj_b": np.zeros(16)}
    _, hc = attention_forward(xs, hp, heads=2)
    A = hc.att                                                             # (1, 2, 64, 64)
    dist = mean_attention_distance([A], (g, g), P, n_prefix=0)[0]         # (2,) pixels (lesson 12 explains it)
    out["mean_distance_px"] = [float(d) for d in dist]
    assert dist[0] < dist[1]
    print(f"hand-built heads: mean attention distance head 0 (position) {dist[0]:.1f} px, "
          f"head 1 (colour) {dist[1]:.1f} px")

    # The picture: two query patches (one on the shape, one on the background), each head's attention.
    colour = xs[0, :, 8:11]                                               # (N, 3)
    far = np.linalg.norm(colour - np.median(colour, axis=0), axis=1)      # how unlike the background
    queries = [int(np.argmax(far)), int(np.argmin(far))]
    tiles, titles = [], []
    for qi in queries:
        r, c = divmod(qi, g)
        for name, heat in (("query patch", None), ("head 0: position", A[0, 0, qi]), ("head 1: colour", A[0, 1, qi])):
            pic = overlay(images[0], np.zeros((g, g)) if heat is None else heat.reshape(g, g),
                          alpha=0.0 if heat is None else 0.65, scale=4, vmin=0.0)
            ImageDraw.Draw(pic).rectangle((c * P * 4, r * P * 4, (c + 1) * P * 4 - 1, (r + 1) * P * 4 - 1),
                                          outline=(255, 255, 255), width=3)
            tiles.append(pic)
            titles.append(f"{name} ({r}, {c})" if heat is None else name)
    grid = tile_grid(tiles, nrows=2, ncols=3, titles=titles, pad=12,
                     title="two heads, one layer: where the boxed query patch attends (bright = more)")
    png = save_png(grid, out_dir / "06_multi_head_attention.png")
    print(f"picture: {png}")

    # 3. The gradient check of the whole layer, every parameter and the input.
    def backward(t, dy):
        dx, grads = attention_backward(dy, attention_forward(t["x"], t, nh)[1])
        return dict(x=dx, **grads)                                        # grads: the keys of the parameters
    res = gradcheck(lambda t: attention_forward(t["x"], t, nh)[0], backward, dict(x=x, **p))
    out["gradcheck_rel"] = {r_.name: r_.rel_error for r_ in res}
    assert max(out["gradcheck_rel"].values()) < 1e-8
    print(f"gradcheck of attention (B={B}, N={N}, D={D}, {nh} heads): "
          + ", ".join(f"{k} {v:.1e}" for k, v in out["gradcheck_rel"].items()))
    out.update(png=str(png), seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the fast version (here: the same)")
    ap.add_argument("--out", default=None, help="folder for the PNG (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
