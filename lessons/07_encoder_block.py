"""Lesson 7: the encoder block: LayerNorm, attention, MLP with GELU, and two residual connections.

Goal: put lessons 4-6 together into the Transformer block the ViT stacks L times, check its backward, and see
what the residual connections do for the gradient.

The math (minivit.model.block_forward, pre-norm as in the paper):
    x1 = x  + MSA(LN1(x))                      (B, N, D)  first residual
    y  = x1 + MLP(LN2(x1))                     (B, N, D)  second residual
    MLP(h) = GELU(h @ fc1_w + fc1_b) @ fc2_w + fc2_b          D -> M -> D, M = 4D in the paper's models
GELU(x) = x * Phi(x), Phi the standard normal CDF: a smooth ReLU that lets a little negative signal through.
    exact:  0.5 x (1 + erf(x / sqrt 2))                                     (PyTorch, timm)
    tanh:   0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))                (the original JAX ViT)
They differ by at most 4.7e-4 (near x = +-2.7): the same model for training, but weights trained with one and
run with the other give slightly different logits, so minivit offers both (`ViTConfig.gelu`).
The backward of a residual y = x + f(x) is dx = dy + df^T dy: the gradient reaches x twice, once untouched. So
block_backward runs the branches bottom-up and adds: dx1 = dy + dbranch2, dx = dx1 + dbranch1. With the branches'
output layers zero, the block is exactly the identity and dx = dy. Through a stack of blocks the untouched path
carries the loss gradient down to the first block; without residuals the gradient is scrambled at every block.

Run:   python lessons/07_encoder_block.py [--quick] [--out DIR]
Time:  about 1.6 s on a 2-core CPU, Python start-up included (--quick: 1.5 s, a shallower stack).

You should see:
    GELU exact vs tanh: max |difference| 4.7e-04 at x = +-2.70; gradcheck of both ~ 1e-10
    block from its pieces vs block_forward: max |difference| 0 forward, 0 backward
    zero output layers: the block is the identity (y == x and dx == dy exactly)
    block gradcheck, tanh and exact GELU: every tensor (x and 12 parameters) ~ 1e-10 or better
    gradient at the first of 12 blocks vs at the top, cosine: ~ 0.2 with residuals, ~ 0 without
    (after 1 block: 0.97 with residuals, 0.01 without)
and lessons/out/07_encoder_block.png: GELU exact / tanh / ReLU, their difference, and the gradient's cosine
through the stack with and without residuals.
"""
import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from minivit import reference
from minivit.attention import attention_backward, attention_forward
from minivit.charts import line_plot
from minivit.config import ViTConfig
from minivit.draw import save_png
from minivit.gradcheck import gradcheck
from minivit.layers import gelu_backward, gelu_forward, layernorm_backward, layernorm_forward
from minivit.model import block_backward, block_forward, init_params, mlp_backward, mlp_forward
from minivit.tree import flatten, tree_map, unflatten


def block_from_pieces(x, p, cfg, residual=True):
    """The block spelled out; residual=False drops both '+ x' (for the experiment only). -> y, caches."""
    h, c1 = layernorm_forward(x, p["norm1"]["w"], p["norm1"]["b"], cfg.ln_eps)
    h, c2 = attention_forward(h, p["attn"], cfg.heads)
    x1 = x + h if residual else h                                        # (B, N, D)
    h, c3 = layernorm_forward(x1, p["norm2"]["w"], p["norm2"]["b"], cfg.ln_eps)
    h, c4 = mlp_forward(h, p["mlp"], cfg.gelu, ops=reference)            # the reference pairs, as above
    return (x1 + h if residual else h), (c1, c2, c3, c4, residual)


def block_from_pieces_backward(dy, caches):
    """dy -> dx: the pieces' backwards, bottom-up; each residual adds the untouched gradient back."""
    c1, c2, c3, c4, residual = caches
    dh, _ = mlp_backward(dy, c4)                                         # fwd: h = mlp(norm2(x1))
    dh, _, _ = layernorm_backward(dh, c3)
    dx1 = dy + dh if residual else dh                                    # fwd: y = x1 + h
    dh, _ = attention_backward(dx1, c2)                                  # fwd: h = attn(norm1(x))
    dh, _, _ = layernorm_backward(dh, c1)
    return dx1 + dh if residual else dh                                  # fwd: x1 = x + h


def cosine(a, b):
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    rng = np.random.default_rng(seed)
    out = {}

    # 1. GELU, exact and tanh.
    xs = np.linspace(-6, 6, 12001)
    diff = gelu_forward(xs, "exact")[0] - gelu_forward(xs, "tanh")[0]
    i = int(np.argmax(np.abs(diff)))
    out["gelu_max_diff"], out["gelu_max_diff_at"] = float(np.abs(diff[i])), float(xs[i])
    out["gelu_rel"] = {}
    for kind in ("exact", "tanh"):
        r = gradcheck(lambda t: gelu_forward(t["x"], kind)[0],
                      lambda t, dy: {"x": gelu_backward(dy, gelu_forward(t["x"], kind)[1])},
                      {"x": rng.standard_normal((4, 8)) * 2})
        out["gelu_rel"][kind] = r[0].rel_error
    assert 4e-4 < out["gelu_max_diff"] < 5e-4 and max(out["gelu_rel"].values()) < 1e-8
    print(f"GELU exact vs tanh: max |difference| {out['gelu_max_diff']:.1e} at x = {xs[i]:+.2f}; gradcheck "
          + ", ".join(f"{k} {v:.1e}" for k, v in out["gelu_rel"].items()))

    # 2. The block is its pieces (a small block with non-trivial parameters).
    cfg = ViTConfig(image_size=8, patch_size=4, channels=3, num_classes=5, width=12, depth=1, heads=3, mlp_dim=16)
    p = tree_map(lambda a: a + 0.3 * rng.standard_normal(a.shape), init_params(cfg, seed, np.float64)["blocks"][0])
    x = rng.standard_normal((2, 5, 12))                                  # (B, N, D)
    y, cache = block_forward(x, p, cfg, ops=reference)                   # the same pairs as the pieces
    y2, caches = block_from_pieces(x, p, cfg)
    dy = rng.standard_normal(y.shape)
    out["pieces_fwd_diff"] = float(np.abs(y - y2).max())
    out["pieces_bwd_diff"] = float(np.abs(block_backward(dy, cache)[0] - block_from_pieces_backward(dy, caches)).max())
    assert out["pieces_fwd_diff"] < 1e-12 and out["pieces_bwd_diff"] < 1e-12
    print(f"block from its pieces vs block_forward: max |difference| {out['pieces_fwd_diff']:.1e} forward, "
          f"{out['pieces_bwd_diff']:.1e} backward")

    # 3. Residuals: with the branches' output layers at zero, the block is the identity.
    z = tree_map(lambda a: a.copy(), p)
    for a in (z["attn"]["proj_w"], z["attn"]["proj_b"], z["mlp"]["fc2_w"], z["mlp"]["fc2_b"]):
        a[...] = 0.0
    yz, cz = block_forward(x, z, cfg)
    out["identity_exact"] = bool(np.array_equal(yz, x) and np.array_equal(block_backward(dy, cz)[0], dy))
    assert out["identity_exact"]
    print("zero output layers: the block is the identity (y == x and dx == dy exactly)")

    # 4. Gradient check of the whole block, every parameter, both GELUs.
    out["block_rel"] = {}
    for kind in ("tanh", "exact"):
        c = cfg.replace(gelu=kind)

        def params_of(t):                                                # {"x", "norm1.w", ...} -> the block's tree
            return unflatten({k: v for k, v in t.items() if k != "x"})

        def backward(t, dy_):
            dx, grads = block_backward(dy_, block_forward(t["x"], params_of(t), c)[1])
            return {"x": dx, **flatten(grads)}                            # grads mirror the parameters' tree
        res = gradcheck(lambda t: block_forward(t["x"], params_of(t), c)[0], backward, {"x": x.copy(), **flatten(p)})
        out["block_rel"][kind] = max(r.rel_error for r in res)
        print(f"block gradcheck, {kind} GELU: worst of {len(res)} tensors {out['block_rel'][kind]:.1e}")
    assert max(out["block_rel"].values()) < 1e-8

    # 5. The gradient through a stack of blocks, with and without the residual connections.
    deep = ViTConfig(image_size=16, patch_size=4, num_classes=5, width=32, depth=6 if quick else 12, heads=4,
                     mlp_dim=64)
    blocks = init_params(deep, seed, np.float64)["blocks"]
    x0 = rng.standard_normal((2, deep.seq_len, deep.width))
    curves = {}
    for residual in (True, False):
        h, cs = x0, []
        for bp in blocks:
            h, c_ = block_from_pieces(h, bp, deep, residual)
            cs.append(c_)
        d = dy_top = rng.standard_normal(h.shape)
        cos = [1.0]
        for c_ in reversed(cs):
            d = block_from_pieces_backward(d, c_)
            cos.append(cosine(d, dy_top))
        curves["with residuals" if residual else "without residuals"] = cos
    out["cosine_with"], out["cosine_without"] = curves["with residuals"], curves["without residuals"]
    assert out["cosine_with"][1] > 0.9 and abs(out["cosine_without"][1]) < 0.2
    print(f"gradient at the first of {deep.depth} blocks vs at the top, cosine: {out['cosine_with'][-1]:.2f} with "
          f"residuals, {out['cosine_without'][-1]:.2f} without (after 1 block: {out['cosine_with'][1]:.2f} vs "
          f"{out['cosine_without'][1]:.2f})")

    xg = np.linspace(-4, 3, 701)
    panels = [line_plot({"GELU exact": (xg, gelu_forward(xg, "exact")[0]),
                         "GELU tanh": (xg, gelu_forward(xg, "tanh")[0]), "ReLU": (xg, np.maximum(xg, 0))},
                        title="GELU (exact and tanh overlap)", xlabel="x", ylabel="f(x)", size=(400, 320),
                        legend="upper left"),
              line_plot({"exact - tanh": (xs, diff)}, title="GELU exact minus tanh form", xlabel="x",
                        ylabel="difference", size=(400, 320), legend=False),
              line_plot({k: (np.arange(len(v)), v) for k, v in curves.items()}, markers=True,
                        title="gradient vs the top's gradient", xlabel="blocks gone down through",
                        ylabel="cosine similarity", size=(400, 320))]
    canvas = Image.new("RGB", (sum(pn.width for pn in panels), panels[0].height), (255, 255, 255))
    for k, pn in enumerate(panels):
        canvas.paste(pn, (k * pn.width, 0))
    png = save_png(canvas, out_dir / "07_encoder_block.png")
    print(f"picture: {png}")
    out.update(png=str(png), seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a shallower stack in the residual experiment")
    ap.add_argument("--out", default=None, help="folder for the PNG (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
