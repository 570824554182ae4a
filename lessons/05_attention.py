"""Lesson 5: softmax and scaled dot-product attention, forward and backward, from scratch.

Goal: build one attention head by hand, derive its backward step by step, check it, show that it is what the
package computes, and see why the scores are divided by sqrt(d).

Softmax (minivit.layers.softmax_forward/backward), over the last axis:
    y_i = exp(x_i) / sum_j exp(x_j)       (computed as exp(x - max x) / ...: the same value, no overflow)
    dy_i/dx_j = y_i (delta_ij - y_j)      (quotient rule)
    dx_j = sum_i dy_i y_i (delta_ij - y_j) = y_j (dy_j - sum_i dy_i y_i)        i.e.  dx = y * (dy - sum(dy * y))

Scaled dot-product attention for one head: queries, keys, values q, k, v (N, d):
    S = q k^T / sqrt(d)        (N, N): how well query i matches key j
    A = softmax(S) per row     (N, N): row i is a probability distribution over the N tokens
    o = A v                    (N, d): each output is a weighted average of the values
The backward, each step inverting one forward line (read from the bottom up):
    o = A v:                   dA = do v^T,            dv = A^T do
    A = softmax(S):            dS = A * (dA - rowsum(dA * A))                       (the softmax rule above)
    S = q k^T / sqrt(d):       dq = dS k / sqrt(d),    dk = dS^T q / sqrt(d)
In the ViT, q, k, v are linear maps of the tokens x (N, D): q = x Wq + bq etc., and y = o Wproj + bproj; their
backward is the linear one (lesson 4), and dx collects dq Wq^T + dk Wk^T + dv Wv^T.

Why 1/sqrt(d): if the entries of q and k are independent with mean 0 and variance 1, then q . k is a sum of d such
products: variance d, spread sqrt(d). Without the scale, a wide head (large d) feeds softmax numbers of size
sqrt(d), softmax becomes one-hot (saturated): its Jacobian diag(A) - A A^T goes to 0 and no gradient flows back.
Dividing by sqrt(d) gives the scores variance 1 at any d.

Run:   python lessons/05_attention.py [--quick] [--out DIR]
Time:  about 1 s on a 2-core CPU, Python start-up included (--quick: 0.9 s, fewer queries in part 3).

You should see:
    softmax gradcheck: rel error ~ 1e-11;  our attention head gradcheck: q, k, v ~ 1e-10
    our head vs minivit attention_forward (heads=1): max |difference| ~ 1e-16 forward, ~ 1e-15 backward
    saturation, 64 keys: without the scale the mean max probability grows from ~0.07 (d=1) to ~0.95 (d=1024), the
    entropy falls from ~3.9 to ~0.1 nats and the gradient through softmax shrinks ~1000x (1.7e-2 -> 2e-5);
    with 1/sqrt(d) the max probability stays ~0.1, the entropy ~3.7 nats and the gradient ~2e-2
and lessons/out/05_attention.png: max probability, entropy and gradient size against d, with and without the scale.
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from minivit.attention import attention_backward, attention_forward
from minivit.charts import line_plot
from minivit.draw import save_png
from minivit.gradcheck import gradcheck
from minivit.layers import softmax_backward, softmax_forward


def sdpa_forward(q, k, v):
    """One head, the naive way: q, k, v (N, d) -> o (N, d), A (N, N); one query at a time."""
    N, d = q.shape
    A = np.empty((N, N))
    o = np.empty((N, d))
    for i in range(N):
        s = np.array([q[i] @ k[j] for j in range(N)]) / math.sqrt(d)   # (N,) scores of query i
        e = np.exp(s - s.max())
        A[i] = e / e.sum()                                               # (N,) softmax
        o[i] = sum(A[i, j] * v[j] for j in range(N))                     # (d,) weighted average of the values
    return o, A


def sdpa_backward(do, q, k, v, A):
    """do (N, d) -> dq, dk, dv (N, d): the derivation above, one line per forward line."""
    d = q.shape[1]
    dA = do @ v.T                                                        # fwd: o = A v
    dv = A.T @ do
    dS = A * (dA - (dA * A).sum(axis=1, keepdims=True))                  # fwd: A = softmax(S)
    dq = dS @ k / math.sqrt(d)                                           # fwd: S = q k^T / sqrt(d)
    dk = dS.T @ q / math.sqrt(d)
    return dq, dk, dv


def saturation(d_list, n_keys, n_queries, rng):
    """Mean max probability, mean entropy, median gradient gain of softmax(q.k [/ sqrt d]), unit-variance q, k."""
    stats = {s: {"max_prob": [], "entropy": [], "grad_gain": []} for s in ("scaled", "unscaled")}
    for d in d_list:
        q = rng.standard_normal((n_queries, d))                          # (n_queries, d)
        k = rng.standard_normal((n_keys, d))                             # (n_keys, d)
        raw = q @ k.T                                                    # (n_queries, n_keys): q.k, spread sqrt(d)
        for name, s in (("scaled", raw / math.sqrt(d)), ("unscaled", raw)):
            a, cache = softmax_forward(s)
            dA = rng.standard_normal(a.shape)                             # a random upstream gradient
            gain = np.linalg.norm(softmax_backward(dA, cache), axis=1) / np.linalg.norm(dA, axis=1)
            st = stats[name]
            st["max_prob"].append(float(a.max(axis=1).mean()))
            st["entropy"].append(float(-(a * np.log(np.maximum(a, 1e-300))).sum(axis=1).mean()))
            st["grad_gain"].append(float(np.median(gain)))
    return stats


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    rng = np.random.default_rng(seed)
    out = {}

    # 1. Softmax and our head, each against central differences.
    r = gradcheck(lambda p: softmax_forward(p["x"])[0],
                  lambda p, dy: {"x": softmax_backward(dy, softmax_forward(p["x"])[1])},
                  {"x": rng.standard_normal((4, 7)) * 3})
    out["softmax_rel"] = r[0].rel_error
    N, d = 6, 4
    qkv = {n: rng.standard_normal((N, d)) for n in "qkv"}
    r = gradcheck(lambda p: sdpa_forward(p["q"], p["k"], p["v"])[0],
                  lambda p, do: dict(zip("qkv", sdpa_backward(do, p["q"], p["k"], p["v"],
                                                              sdpa_forward(p["q"], p["k"], p["v"])[1]))), qkv)
    out["head_rel"] = {x.name: x.rel_error for x in r}
    assert out["softmax_rel"] < 1e-8 and max(out["head_rel"].values()) < 1e-8
    print(f"softmax gradcheck: rel error {out['softmax_rel']:.1e};  our attention head gradcheck: "
          + ", ".join(f"{k} {v:.1e}" for k, v in out["head_rel"].items()))

    # 2. Our head, wrapped in the q/k/v and output projections, is the package's attention with one head.
    D = 8
    x = rng.standard_normal((1, N, D))                                   # (B, N, D) tokens
    p = {"qkv_w": rng.standard_normal((D, 3 * D)) / math.sqrt(D), "qkv_b": rng.standard_normal(3 * D),
         "proj_w": rng.standard_normal((D, D)) / math.sqrt(D), "proj_b": rng.standard_normal(D)}
    y, cache = attention_forward(x, p, heads=1)                          # (1, N, D)
    Wq, Wk, Wv = np.split(p["qkv_w"], 3, axis=1)                         # qkv_w columns are [q | k | v]
    bq, bk, bv = np.split(p["qkv_b"], 3)
    q, k, v = x[0] @ Wq + bq, x[0] @ Wk + bk, x[0] @ Wv + bv             # (N, D) each: one head of size D
    o, A = sdpa_forward(q, k, v)
    y_ours = o @ p["proj_w"] + p["proj_b"]
    dy = rng.standard_normal(y.shape)
    dx, _ = attention_backward(dy, cache)
    dq, dk, dv = sdpa_backward(dy[0] @ p["proj_w"].T, q, k, v, A)        # fwd: y = o Wproj + bproj
    dx_ours = dq @ Wq.T + dk @ Wk.T + dv @ Wv.T                          # fwd: q, k, v = x W + b
    out["vs_package_fwd"] = float(np.abs(y[0] - y_ours).max())
    out["vs_package_bwd"] = float(np.abs(dx[0] - dx_ours).max())
    assert out["vs_package_fwd"] < 1e-12 and out["vs_package_bwd"] < 1e-12
    print(f"our head vs minivit attention_forward (heads=1): max |difference| {out['vs_package_fwd']:.1e} "
          f"forward, {out['vs_package_bwd']:.1e} backward")

    # 3. Saturation: softmax of q.k with and without 1/sqrt(d), for growing d.
    d_list, n_keys = [1, 4, 16, 64, 256, 1024], 64
    stats = saturation(d_list, n_keys, 100 if quick else 1000, rng)
    sc, un = stats["scaled"], stats["unscaled"]
    out.update(d_list=d_list, saturation=stats)
    for i in (0, len(d_list) - 1):
        print(f"d = {d_list[i]:4d}: max prob {un['max_prob'][i]:.2f} unscaled vs {sc['max_prob'][i]:.2f} scaled; "
              f"entropy {un['entropy'][i]:.2f} vs {sc['entropy'][i]:.2f} nats (uniform: {math.log(n_keys):.2f}); "
              f"median gradient gain {un['grad_gain'][i]:.1e} vs {sc['grad_gain'][i]:.1e}")
    assert un["max_prob"][-1] > 0.9 and max(sc["max_prob"]) < 0.4
    assert max(sc["entropy"]) - min(sc["entropy"]) < 0.1 * max(sc["entropy"])
    assert un["grad_gain"][-1] < 0.1 * sc["grad_gain"][-1]

    x_ax = np.log2(d_list)
    panels = [line_plot({"q.k / sqrt(d)": (x_ax, sc["max_prob"]), "q.k": (x_ax, un["max_prob"])},
                        title="largest attention weight", xlabel="log2(d)", ylabel="mean max probability",
                        size=(400, 320), markers=True),
              line_plot({"q.k / sqrt(d)": (x_ax, sc["entropy"]), "q.k": (x_ax, un["entropy"]),
                         f"uniform (log {n_keys})": (x_ax, [math.log(n_keys)] * len(d_list))},
                        title="entropy of the attention", xlabel="log2(d)", ylabel="nats", size=(400, 320),
                        markers=True),
              line_plot({"q.k / sqrt(d)": (x_ax, sc["grad_gain"]), "q.k": (x_ax, un["grad_gain"])}, logy=True,
                        title="gradient through softmax", xlabel="log2(d)", ylabel="median |dS| / |dA|",
                        size=(400, 320), markers=True)]
    canvas = Image.new("RGB", (sum(pn.width for pn in panels), max(pn.height for pn in panels)), (255, 255, 255))
    for i, pn in enumerate(panels):
        canvas.paste(pn, (sum(q.width for q in panels[:i]), 0))
    png = save_png(canvas, out_dir / "05_attention.png")
    print(f"picture: {png}")
    out.update(png=str(png), seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer queries in the saturation experiment")
    ap.add_argument("--out", default=None, help="folder for the PNG (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
