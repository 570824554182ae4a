"""Lesson 2: the patch embedding is a strided convolution.

Goal: turn each flattened patch (lesson 1) into a D-dimensional token with one matrix, and see that this matrix
product is exactly a convolution whose kernel size and stride are both P. The original code writes it as a conv;
minivit writes it as `patchify(x) @ w + b` (`minivit.layers.patch_embed_forward`); they are the same numbers.

The math. A convolution with kernel K (P, P, C, D), stride P and bias b (D,) gives, at grid position (i, j),

    y[i, j, d] = sum_{u, v, c} x[i*P + u, j*P + v, c] * K[u, v, c, d] + b[d]            u, v < P, c < C

With stride = kernel size the windows do not overlap: window (i, j) is exactly patch n = i*gw + j, and the triple
sum over (u, v, c) is a dot product of the flattened patch with K[:, :, :, d] flattened the same way. So with
w = K.reshape(P*P*C, D):  y = patchify(x) @ w + b, one matrix product for all patches of all images.

What the shape of w (P*P*C, D) means: row r = (u*P + v)*C + c is one input number, pixel (u, v) of channel c
inside a patch; column d is one output feature, and reshaped to (P, P, C) it is a small image: the filter that
feature d matches against every patch. ViT-B/16 has w of shape (768, 768): square by coincidence, 16*16*3 = 768
input numbers and width D = 768 output features.
The backward follows from the same picture: dw = patchify(x)^T @ dy (each filter's gradient sums its patches'
pixels weighted by dy), and dx puts dy @ w^T back into the patches (each pixel is in exactly one patch).

Run:   python lessons/02_patch_embedding.py [--quick] [--out DIR]
Time:  about 1 s on a 2-core CPU, Python start-up included (--quick: 0.8 s, fewer output features).

You should see:
    conv (loop over windows) vs patchify @ w: max |difference| ~ 1e-15 (float64 rounding)
    backward: dw and dx agree with the conv's loop gradients to ~ 1e-13
    ViT-B/16: w (768, 768) + b (768,) = 590,592 parameters; L/16 (768, 1024); H/14 (588, 1280)
and lessons/out/02_patch_embedding.png: four hand-made filters and the 14 x 14 feature map each one makes.
"""
import argparse
import time
from pathlib import Path

import numpy as np

from minivit.config import count_params, get_config, param_shapes
from minivit.data.shapes import render_shapes
from minivit.draw import save_png, tile_grid, to_uint8
from minivit.layers import patch_embed_backward, patch_embed_forward


def conv2d_naive(x, kernel, bias, stride):
    """The reference: x (B, H, W, C), kernel (kh, kw, C, D), bias (D,) -> (B, Ho, Wo, D), one window at a time."""
    B, H, W, C = x.shape
    kh, kw, _, D = kernel.shape
    Ho, Wo = (H - kh) // stride + 1, (W - kw) // stride + 1
    y = np.empty((B, Ho, Wo, D))
    for i in range(Ho):
        for j in range(Wo):
            window = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]     # (B, kh, kw, C)
            y[:, i, j] = np.einsum("buvc,uvcd->bd", window, kernel) + bias               # (B, D)
    return y


def conv2d_naive_backward(dy, x, kernel, stride):
    """The conv's gradients by the same loop: dK[u,v,c,d] = sum_{b,i,j} x[b, i*s+u, j*s+v, c] dy[b,i,j,d]."""
    kh, kw, C, D = kernel.shape
    dK, dx = np.zeros_like(kernel), np.zeros_like(x)
    for i in range(dy.shape[1]):
        for j in range(dy.shape[2]):
            rows, cols = slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw)
            dK += np.einsum("buvc,bd->uvcd", x[:, rows, cols, :], dy[:, i, j])
            dx[:, rows, cols, :] += np.einsum("uvcd,bd->buvc", kernel, dy[:, i, j])
    return dx, dK


def hand_filters(P):
    """Four readable filters -> kernel (P, P, 3, 4): brightness, vertical edge, horizontal edge, red - blue."""
    k = np.zeros((P, P, 3, 4))
    k[:, :, :, 0] = 1.0                              # mean brightness of the patch
    k[:, :P // 2, :, 1], k[:, P // 2:, :, 1] = 1.0, -1.0   # left half minus right half: a vertical edge
    k[:P // 2, :, :, 2], k[P // 2:, :, :, 2] = 1.0, -1.0   # top half minus bottom half: a horizontal edge
    k[:, :, 0, 3], k[:, :, 2, 3] = 1.0, -1.0           # red minus blue
    return k / (P * P * 3)


def enlarge(a, k):
    """(h, w, ...) -> (h*k, w*k, ...): every pixel or cell becomes a k x k square (nearest neighbour)."""
    return np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def framed(a):
    """(h, w, 3) uint8 -> (h+2, w+2, 3): a 1-pixel grey border, so white filters show on the white page."""
    return np.pad(a, ((1, 1), (1, 1), (0, 0)), constant_values=90)


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    rng = np.random.default_rng(seed)
    images, _ = render_shapes(2, seed=seed, size=224)                 # (2, 224, 224, 3) uint8
    x = (images.astype(np.float64) - 127.5) / 127.5                   # (B, H, W, C) in [-1, 1]
    P, C, D = 16, 3, (8 if quick else 64)

    # 1. Forward: a conv with kernel P and stride P is patchify followed by one matrix product.
    kernel = rng.standard_normal((P, P, C, D)) / np.sqrt(P * P * C)   # (P, P, C, D), as a conv stores it
    bias = rng.standard_normal(D)
    y_conv = conv2d_naive(x, kernel, bias, stride=P)                  # (B, 14, 14, D)
    w = kernel.reshape(P * P * C, D)                                  # (P*P*C, D): row (u*P + v)*C + c
    y, cache = patch_embed_forward(x, w, bias, P)                     # (B, 196, D)
    fwd_diff = float(np.abs(y.reshape(y_conv.shape) - y_conv).max())
    assert fwd_diff < 1e-12, fwd_diff
    print(f"conv (loop over windows) vs patchify @ w: max |difference| = {fwd_diff:.1e}")

    # 2. Backward: the same gradients as the conv's loop.
    dy = rng.standard_normal(y.shape)                                 # (B, 196, D)
    dx, dw, db = patch_embed_backward(dy, cache)
    dx_conv, dK_conv = conv2d_naive_backward(dy.reshape(y_conv.shape), x, kernel, P)
    bwd_diff = max(float(np.abs(dw.reshape(kernel.shape) - dK_conv).max()), float(np.abs(dx - dx_conv).max()),
                   float(np.abs(db - dy.sum(axis=(0, 1))).max()))
    assert bwd_diff < 1e-10, bwd_diff
    print(f"backward: dw, dx, db agree with the conv's loop gradients: max |difference| = {bwd_diff:.1e}")

    # 3. The shape of w in the paper's models.
    shapes, counts = {}, {}
    for name in ("vit-ti16", "vit-b16", "vit-l16", "vit-h14"):
        s = param_shapes(get_config(name))["patch_embed"]
        shapes[name], counts[name] = s["w"], s["w"][0] * s["w"][1] + s["b"][0]
        print(f"{name}: w {s['w']} + b {s['b']} = {counts[name]:,} parameters "
              f"({100 * counts[name] / count_params(get_config(name)):.2f}% of the model)")
    assert shapes["vit-b16"] == (768, 768) and counts["vit-b16"] == 590_592

    # 4. The picture: readable filters and the map each one makes (one number per patch).
    k4 = hand_filters(P)                                              # (P, P, 3, 4)
    feats, _ = patch_embed_forward(x[:1], k4.reshape(P * P * C, 4), np.zeros(4), P)   # (1, 196, 4)
    maps = feats[0].T.reshape(4, 14, 14)                              # (4, gh, gw): feature d over the grid
    maps = maps / np.abs(maps).max(axis=(1, 2), keepdims=True)        # each map scaled to [-1, 1]
    names = ["brightness", "vertical edge", "horizontal edge", "red - blue"]
    filt_pics = [framed(enlarge(to_uint8(k4[..., d]), 7)) for d in range(4)]   # (114, 114, 3): grey 0, white +
    img_tile = framed(images[0, ::2, ::2])                             # (114, 114, 3): the image at half size
    items = [img_tile] + filt_pics + [img_tile] + [enlarge(m, 8) for m in maps]
    titles = ["image"] + [f"filter: {n}" for n in names] + ["image"] + [f"map: {n}" for n in names]
    pic = tile_grid(items, nrows=2, ncols=5, titles=titles, cmap="rdbu", symmetric=True, scale=1, pad=10,
                    title="each column of w, reshaped to P x P x 3, is a filter (grey 0, white +, black -);"
                          " it gives one number per patch: a 14 x 14 map")
    png = save_png(pic, out_dir / "02_patch_embedding.png")
    print(f"picture: {png}")
    return {"forward_max_diff": fwd_diff, "backward_max_diff": bwd_diff, "w_shapes": shapes,
            "b16_patch_embed_params": int(counts["vit-b16"]), "png": str(png), "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer output features in the check")
    ap.add_argument("--out", default=None, help="folder for the PNG (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
