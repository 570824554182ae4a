"""Lesson 11: fine-tuning at a higher resolution: resampled position embeddings and a fresh zero head.

Goal: take the model of lesson 10 (trained on 32x32 images) to 48x48 images the way the paper does, see what
each step does to the weights, and measure the result honestly (with a control at the old resolution).

The paper (section 3.2): "When feeding images of higher resolution, we keep the patch size the same, which
results in a larger effective sequence length." With 8x8 patches a 32x32 image is a 4x4 grid (16 patches + the
class token = 17 tokens) and a 48x48 image a 6x6 grid (37 tokens). Every weight of the encoder works for any
number of tokens, except the position embeddings: there is one learned vector per grid cell, 16 of them, and
now 36 cells need one. "We therefore perform 2D interpolation of the pre-trained position embeddings, according
to their location in the original image" (minivit.resample, minivit.finetune.resize_model):
    grid (4, 4, D) -> R_h @ grid @ R_w^T -> (6, 6, D)       per channel; R (6, 4) = interpolation_matrix(4, 6)
    'linear' (the original code, scipy.ndimage.zoom order 1): new row o reads old position o * (4-1)/(6-1),
    so the corners land exactly on the corners; 'bilinear' / 'bicubic' (timm) use half-pixel centres instead.
The class token's embedding has no location: it is kept as it is. Every row of R sums to 1.
Then the head: "we remove the pre-trained prediction head and attach a zero-initialized D x K feedforward
layer" (new_head). All logits start at 0, so every class gets probability 1/K and the loss is log K.
Fine-tuning recipe (the paper, minivit.recipes.FINETUNE_DEFAULTS): SGD with momentum 0.9, no weight decay,
clipping at global norm 1, a short warmup and cosine decay, lr 0.01.
Note: train() updates the parameter arrays in place, and resize_model shares every array but pos_embed with its
input, so the lesson copies the base model before each fine-tuning run.

Run:   python lessons/11_finetune_resolution.py [--quick] [--out DIR]
Time:  35-50 s on a busy 2-core CPU, Python start-up included, with lesson 10's run present (without it the
       lesson first trains a shorter base model, ~15 s more). --quick: about 5 s.

You should see (the numbers depend on the base model; measured with lesson 10's):
    the 6 x 4 interpolation matrix of 'linear': rows [1 0 0 0], [.4 .6 0 0], ..., [0 0 0 1], each summing to 1
    pos_embed (1, 17, 64) -> (1, 37, 64); class token kept exactly; corners equal; every other weight shared
    the old model (old head) on 48x48 images, no fine-tuning: accuracy drops from ~0.61 at 32 to ~0.33-0.36, for
    linear, bilinear, bicubic and even 'none' (fresh random grid embeddings) nearly alike: what breaks is not the
    positions but the patches themselves, each shape now covers 1.5 x more of them and every filter sees new content
    fresh zero head: every probability 0.1, loss 2.3026 = log 10
    after 2 epochs of fine-tuning: ~0.60 at 48 against ~0.60 for the same fine-tuning at 32 (500 test
    images: one standard error is ~0.02; runs differ a little with the BLAS threads' order of summation), so on
    this small data set and budget the higher resolution gives no gain (the paper's gains come from
    224 -> 384 with large models); the lesson reports what it measures and asserts only the mechanics
and lessons/out/11_finetune_resolution.png: the position embeddings before (4x4) and after (6x6), the three
interpolation matrices, and test accuracy during fine-tuning at 48 and at 32.
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from minivit.charts import line_plot
from minivit.data import load_dataset, normalizer
from minivit.draw import heatmap, save_png, side_by_side, tile_grid
from minivit.finetune import new_head, prepare_finetune, resize_model
from minivit.inference import predict
from minivit.recipes import FINETUNE_DEFAULTS, lesson_base_model
from minivit.resample import interpolation_matrix
from minivit.tasks import evaluate
from minivit.train import TrainConfig, train
from minivit.tree import tree_map

norm_fn = normalizer("minus_one_one")


def pos_maps(pos_embed, grid, comps, mean):
    """pos_embed (1, N, D) -> 5 maps (g, g): the grid's embeddings on 3 principal directions, and the cosine
    similarity of every position with the top-left and the bottom-left position."""
    e = pos_embed[0, 1:].astype(np.float64)                            # (G, D) grid part, row-major
    proj = (e - mean) @ comps.T                                        # (G, 3)
    u = e / np.linalg.norm(e, axis=1, keepdims=True)                   # (G, D) unit rows
    g = grid[0]
    sims = [u @ u[0], u @ u[(g - 1) * g]]                              # (G,) each
    return [proj[:, j].reshape(grid) for j in range(3)] + [s.reshape(grid) for s in sims]


def same_size(m, cells=12):
    """(g, g) -> (cells, cells): each cell repeated, so 4x4 and 6x6 maps are drawn the same size."""
    k = cells // m.shape[0]
    return np.kron(m, np.ones((k, k)))


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    out = {}
    params, cfg, source = lesson_base_model(out_dir, quick, seed, epochs=1 if quick else 3, run_name="11_base_run")
    n_train, n_test, epochs, batch = (400, 200, 1, 32) if quick else (5000, 500, 2, 64)
    ds32 = load_dataset("shapes", n_train=n_train, n_test=n_test, image_size=32, progress=not quick)
    ds48 = load_dataset("shapes", n_train=n_train, n_test=n_test, image_size=48, progress=False)
    acc32 = evaluate(params, cfg, ds32.test_images, ds32.test_labels, norm_fn)["accuracy"]
    print(f"base: {source}\n  grid {cfg.grid}, {cfg.seq_len} tokens, width {cfg.width}; "
          f"test accuracy at 32: {acc32:.3f}")

    # 1. The interpolation matrices: how much each old grid row feeds each new one.
    R = {m: interpolation_matrix(4, 6, m) for m in ("linear", "bilinear", "bicubic")}   # (6, 4) each
    assert all(np.allclose(r.sum(axis=1), 1.0) for r in R.values())                    # constants stay constant
    assert np.array_equal(R["linear"][0], [1, 0, 0, 0]) and np.array_equal(R["linear"][-1], [0, 0, 0, 1])
    print("linear R (6 x 4), row o reads old position o * 3/5:\n" +
          "\n".join("  [" + " ".join(f"{v:4.2f}" for v in row) + "]" for row in R["linear"]))

    # 2. resize_model: only the position embeddings change.
    p48, cfg48 = resize_model(params, cfg, 48, "linear")
    old, new = params["pos_embed"], p48["pos_embed"]                     # (1, 17, D), (1, 37, D)
    g0, g1 = old[0, 1:].reshape(4, 4, -1), new[0, 1:].reshape(6, 6, -1)
    assert cfg48.grid == (6, 6) and new.shape == (1, 37, cfg.width) and cfg48.seq_len == 37
    assert np.array_equal(new[0, 0], old[0, 0])                        # the class token's embedding: kept
    corners = max(float(np.abs(g1[b] - g0[a]).max()) for a, b in (((0, 0), (0, 0)), ((0, 3), (0, 5)),
                                                                     ((3, 0), (5, 0)), ((3, 3), (5, 5))))
    assert corners < 1e-6                                              # 'linear': corners land on corners
    assert all(p48[k] is params[k] for k in params if k != "pos_embed")  # every other weight: the same array
    out.update(cls_token_kept=True, corner_max_diff=corners, others_shared=True)
    print(f"pos_embed {old.shape} -> {new.shape}; class token kept exactly; the 4 corners equal; "
          f"all other weights shared")

    # 3. The old model at 48 without fine-tuning (old head), for each way of filling the new grid.
    out["zero_shot_48"] = {}
    for m in ("linear", "bilinear", "bicubic", "none"):
        pm, cm = resize_model(params, cfg, 48, m, seed)
        out["zero_shot_48"][m] = evaluate(pm, cm, ds48.test_images, ds48.test_labels, norm_fn)["accuracy"]
    print("old model on 48x48 images, no fine-tuning: " + ", ".join(f"{m} {a:.3f}" for m, a in
                                                                  out["zero_shot_48"].items())
          + "  ('none': fresh random grid embeddings)")

    # 4. The fresh zero head: uniform predictions before any fine-tuning.
    ft48, ftcfg48 = prepare_finetune(tree_map(np.copy, params), cfg, 48, 10, "linear", fresh_head=True)
    assert not ft48["head"]["w"].any() and not ft48["head"]["b"].any()
    probs = predict(ft48, ftcfg48, norm_fn(ds48.test_images[:50]))       # (50, 10)
    ev0 = evaluate(ft48, ftcfg48, ds48.test_images, ds48.test_labels, norm_fn)
    assert np.allclose(probs, 0.1, rtol=0, atol=1e-7) and abs(ev0["loss"] - math.log(10)) < 1e-5
    print(f"fresh zero head: every probability {probs.mean():.4f}, loss {ev0['loss']:.4f} = log 10")

    # 5. Fine-tune at 48, and the control: the same recipe and budget at 32.
    recipe = dict(FINETUNE_DEFAULTS, epochs=epochs, batch_size=batch)
    runs = {}
    for size, (p, c, ds) in {48: (ft48, ftcfg48, ds48),
                             32: (*new_head(tree_map(np.copy, params), cfg, 10), ds32)}.items():
        tc = TrainConfig(dataset="shapes", seed=seed, out=str(out_dir / f"11_finetune_{size}"), **recipe)
        r = train(tc, params=p, cfg=c, data=ds, progress=not quick, log=None)
        runs[size] = r
        assert r.params["pos_embed"].shape == (1, c.seq_len, cfg.width)
    out["finetuned"] = {s: r.test_accuracy for s, r in runs.items()}
    out["finetune_dirs"] = {s: str(r.run_dir) for s, r in runs.items()}    # each run's last.npz, for a check
    print(f"fine-tuned {epochs} epoch(s) with {recipe['optimizer'].upper()} (momentum {recipe['momentum']}, lr "
          f"{recipe['lr']}, cosine, clip {recipe['clip_norm']}): at 48 {out['finetuned'][48]:.3f}, the same at 32 "
          f"{out['finetuned'][32]:.3f} (base at 32: {acc32:.3f}); difference 48 - 32: "
          f"{out['finetuned'][48] - out['finetuned'][32]:+.3f}")

    # The picture: position embeddings before / after, the matrices, the fine-tuning curves.
    e_old = old[0, 1:].astype(np.float64)
    mean = e_old.mean(axis=0)
    comps = np.linalg.svd(e_old - mean, full_matrices=False)[2][:3]     # (3, D) principal directions
    before, after = pos_maps(old, (4, 4), comps, mean), pos_maps(new, (6, 6), comps, mean)
    scale = np.abs(np.stack(before[:3])).max(axis=(1, 2))               # per component, from the 4x4 grid
    before[:3] = [m / s for m, s in zip(before[:3], scale)]
    after[:3] = [m / s for m, s in zip(after[:3], scale)]
    names = ["component 1", "component 2", "component 3", "cos sim, top-left", "cos sim, bottom-left"]
    p1 = tile_grid([same_size(m) for m in before + after], nrows=2, ncols=5, scale=8, cmap="rdbu", vmin=-1, vmax=1,
                   titles=[f"{n} (4x4)" for n in names] + [f"{n} (6x6)" for n in names],
                   title="position embeddings before (top, 32 px: 4x4 grid) and after 'linear' resampling "
                         "(bottom, 48 px: 6x6)")
    mats = [heatmap(r, title=f"{m}: R (6 x 4)", cmap="rdbu", vmin=-1, vmax=1, scale=22, colorbar=m == "bicubic",
                    xlabel="old row", ylabel="new row") for m, r in R.items()]
    curves = {f"fine-tuned at {s}": ([0] + [h["epoch"] for h in r.history],
                                     [ev0["accuracy"]] + [h["test_acc"] for h in r.history]) for s, r in runs.items()}
    curves["base model at 32 (its own head)"] = ([0, epochs], [acc32, acc32])
    p3 = line_plot(curves, title="test accuracy (epoch 0: fresh zero head)", xlabel="fine-tuning epoch",
                   ylabel="accuracy", markers=True, size=(420, 300), ylim=(0, 0.6), legend="lower right")
    row2 = side_by_side(mats + [p3], pad=12, align="center")
    canvas = Image.new("RGB", (max(p1.width, row2.width), p1.height + row2.height + 10), (255, 255, 255))
    canvas.paste(p1, (0, 0))
    canvas.paste(row2, (0, p1.height + 10))
    png = save_png(canvas, out_dir / "11_finetune_resolution.png")
    print(f"picture: {png}")
    out.update(source=source, base_acc_32=acc32, pos_shapes=(old.shape, new.shape), R=R,
               zero_head_probs=float(probs.mean()), zero_head_loss=ev0["loss"], png=str(png),
               seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few hundred images, 1 epoch")
    ap.add_argument("--out", default=None, help="folder for the PNG and the runs (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
