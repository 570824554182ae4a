"""Lesson 13: masked patch prediction (self-supervised pre-training) and the few-shot linear probe.

Goal: pre-train a ViT without labels the way the paper tried it (section 4.6), and measure what its features are
worth with the paper's cheap probe: a few labelled images per class and a closed-form linear regression.

Masked patch prediction (minivit.mpp), BERT for images:
    e  = patchify(x) E + b                     (B, Np, D)  the patch embeddings
    e' = corrupt(e):  n_c = round(0.5 Np) patches per image are chosen; each one independently becomes
                      the learnable [mask] embedding (80%), another patch's embedding of the same image (10%),
                      or stays as it is (10%)
    y  = encoder([x_class; e'] + E_pos)        exactly the classifier's encoder
    logits = y[corrupted tokens] @ W_mpp       (B * n_c, 512)
    target: each corrupted patch's mean colour, 3 bits per channel: v = (mean over the patch of the [-1, 1]
            pixels + 1) / 2, q = min(floor(8 v), 7) per channel, class = 64 q_r + 8 q_g + q_b  (512 classes)
    loss = cross-entropy over the corrupted patches only
To predict a hidden patch's colour the model has to look at the visible patches around it. No labels are used.
The same training loop as lesson 10 runs it: train(..., task=MPPTask()) (minivit.recipes.run_pretrain_mpp).

The few-shot probe (minivit.fewshot, as the authors' released evaluator): freeze the model, take the class
token's output X (n, D) for `shots` labelled images per class, standardize it, append a constant 100 (the bias),
and solve regularized least squares to targets in {-1, 1}^K in closed form:
    W = argmin ||Z W - T||^2 + l2 ||W||^2 = (Z^T Z + l2 I)^-1 Z^T T,   l2 = 2^10
then predict argmax(Z_test W). The lesson checks W against numpy.linalg.lstsq on the stacked system
[Z; sqrt(l2) I] W = [T; 0], which is the same minimization written another way.

Run:   python lessons/13_masked_patches_and_fewshot.py [--quick] [--out DIR]
Time:  about 35 s on a busy 2-core CPU, Python start-up included, once the data exist. --quick: about 2 s.

You should see (the probe numbers are measured, not promised):
    corruption: 8 of 16 patches per image; [mask] 0.80, random 0.10, kept 0.10 (over 16,000 draws); sources
    never the patch itself; corrupt_forward puts exactly the [mask] token, the source or the patch itself
    targets: 3-bit colour classes in [0, 512), equal to a loop over patches; ~500 colours occur in the test set
    MPP pre-training, 5 epochs: loss 6.2 -> 3.5; colour accuracy on the corrupted test patches ~0.13 (always
    guessing the most common colour: 0.008): the model did learn to fill in colours from the context
    probe W equals lstsq to ~1e-14 (1-shot: n = 10 < D + 1 = 65; 10-shot: n = 100 > 65)
    few-shot accuracy at 1/5/10/25 shots: random init ~0.09-0.13, MPP ~0.09-0.10 (chance), supervised (lesson 10,
    when its run is there) ~0.46-0.57. On shapes the colours are drawn independently of the class (lesson 10), so
    a pretext task about colours learns features that say nothing about the shape: the probe shows it. The paper's
    MPP gain (+2% on ImageNet) came from natural images, where colour and content go together, and 1M steps.
and two pictures in lessons/out/: 13_mpp_corruption.png (images, their corrupted patches, the colour targets)
and 13_mpp_fewshot.png (the pre-training loss and the few-shot accuracies).
"""
import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minivit.charts import line_plot
from minivit.checkpoint import load_checkpoint
from minivit.data import load_dataset, normalizer
from minivit.draw import INK, font, save_png
from minivit.fewshot import BIAS_CONSTANT, DEFAULT_L2, STD_EPS, extract_features, fewshot_fit, fewshot_model, \
    select_shots
from minivit.model import init_params
from minivit.mpp import KEEP, MASK, RANDOM, corrupt_forward, draw_corruption, mean_colour_classes, num_corrupted, \
    strip_mpp
from minivit.recipes import run_pretrain_mpp
from minivit.train import TrainConfig

MARK = {MASK: (30, 90, 230), RANDOM: (255, 150, 0), KEEP: (40, 180, 60)}     # border colours in the picture
norm_fn = normalizer("minus_one_one")


def colour_classes_naive(x, P):
    """The reference for mean_colour_classes: one patch at a time. x (B, H, W, 3) in [-1, 1] -> (B, Np)."""
    B, H, W, C = x.shape
    out = np.zeros((B, (H // P) * (W // P)), dtype=np.int64)
    for b in range(B):
        for i in range(H // P):
            for j in range(W // P):
                m = x[b, i * P:(i + 1) * P, j * P:(j + 1) * P].reshape(-1, C).mean(axis=0)      # (C,) mean colour
                q = [min(int(np.floor((v + 1) / 2 * 8)), 7) for v in m]                         # 8 levels each
                out[b, i * (W // P) + j] = q[0] * 64 + q[1] * 8 + q[2]
    return out


def ridge_lstsq(X, y, K, l2):
    """The probe's W by numpy.linalg.lstsq on [Z; sqrt(l2) I] W = [T; 0] (the same minimization, solved apart)."""
    mean, std = X.mean(axis=0), X.std(axis=0) + STD_EPS
    Z = np.concatenate([(X - mean) / std, np.full((len(X), 1), BIAS_CONSTANT)], axis=1)   # (n, F + 1)
    T = 2.0 * np.eye(K)[y] - 1.0                                                          # (n, K)
    A = np.concatenate([Z, np.sqrt(l2) * np.eye(Z.shape[1])])                             # (n + F + 1, F + 1)
    return np.linalg.lstsq(A, np.concatenate([T, np.zeros((Z.shape[1], K))]), rcond=None)[0]



def draw_corruption_picture(images, corruption, classes, P, path, s=6):
    """Per image: the image, what the model is shown (patch pixels standing in for patch embeddings), the targets."""
    n, H, W, _ = images.shape
    gw = W // P
    cell, top, left = H * s + 16, 56, 10
    img = Image.new("RGB", (left + 3 * cell + 10, top + n * cell + 40), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((left, 8), "masked patch prediction: what the model sees and what it must predict", fill=INK, font=font(16))
    for c, t in enumerate(("image", "shown to the model", "targets: 3-bit mean colour")):
        d.text((left + c * cell + H * s / 2, 34), t, fill=INK, font=font(13), anchor="mm")
    for b in range(n):
        y0 = top + b * cell
        shown = images[b].copy()                                        # (H, W, 3)
        lv = (classes[b][:, None] // np.array([64, 8, 1]) % 8)          # (Np, 3) levels 0..7
        target = np.zeros_like(images[b])
        for p in range(len(lv)):
            i, j = divmod(p, gw)
            target[i * P:(i + 1) * P, j * P:(j + 1) * P] = ((lv[p] + 0.5) * 32).astype(np.uint8)
        for idx, kind, src in zip(*(a[b] for a in corruption)):
            i, j = divmod(int(idx), gw)
            if kind == MASK:
                shown[i * P:(i + 1) * P, j * P:(j + 1) * P] = 128       # the [mask] embedding: no pixels at all
            elif kind == RANDOM:
                si, sj = divmod(int(src), gw)
                shown[i * P:(i + 1) * P, j * P:(j + 1) * P] = images[b, si * P:(si + 1) * P, sj * P:(sj + 1) * P]
        for c, pic in enumerate((images[b], shown, target)):
            x0 = left + c * cell
            img.paste(Image.fromarray(pic).resize((W * s, H * s), Image.NEAREST), (x0, y0))
            for idx, kind in zip(corruption.index[b], corruption.kind[b]):
                if c == 0:
                    continue
                i, j = divmod(int(idx), gw)
                d.rectangle((x0 + j * P * s, y0 + i * P * s, x0 + (j + 1) * P * s - 1, y0 + (i + 1) * P * s - 1),
                            outline=MARK[kind], width=3)
    y = top + n * cell + 4
    for k, (kind, name) in enumerate(((MASK, "[mask] (80%)"), (RANDOM, "another patch of the image (10%)"),
                                      (KEEP, "kept as it is (10%)"))):
        x = left + [0, 130, 400][k]
        d.rectangle((x, y + 6, x + 16, y + 22), outline=MARK[kind], width=3)
        d.text((x + 22, y + 14), name, fill=INK, font=font(13), anchor="lm")
    return save_png(img, path)


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    out = {}
    n_train, n_test, epochs, batch = (400, 200, 1, 32) if quick else (5000, 500, 5, 64)
    shots, seeds = ((1, 5), (0, 1)) if quick else ((1, 5, 10, 25), (0, 1, 2))
    ds = load_dataset("shapes", n_train=n_train, n_test=n_test, image_size=32, progress=not quick)
    tc = TrainConfig(dataset="shapes", model="shapes-small", epochs=epochs, batch_size=batch, lr=2e-3,
                     weight_decay=0.05, label_smoothing=0.0, seed=seed, out=str(out_dir / "13_mpp_run"),
                     model_overrides=dict(patch_size=8, width=64, depth=3, heads=4, mlp_dim=128))

    # 1. The corruption: exactly n_c patches per image, the 80 / 10 / 10 split, sources never the patch itself.
    Np = (32 // 8) ** 2
    c = draw_corruption(2000, Np, np.random.default_rng(seed))          # (2000, n_c) each
    n_c = num_corrupted(Np, 0.5)
    rates = {k: float(np.mean(c.kind == v)) for k, v in (("mask", MASK), ("random", RANDOM), ("keep", KEEP))}
    rnd = c.kind == RANDOM
    assert c.index.shape == (2000, n_c) == (2000, Np // 2) and (np.diff(c.index, axis=1) > 0).all()
    assert abs(rates["mask"] - 0.8) < 0.02 and abs(rates["random"] - 0.1) < 0.02 and abs(rates["keep"] - 0.1) < 0.02
    assert (c.source[rnd] != c.index[rnd]).all() and (c.source[~rnd] == c.index[~rnd]).all()
    e = np.random.default_rng(seed).standard_normal((2000, Np, 5))      # stand-in patch embeddings (B, Np, D)
    token = np.full((1, 1, 5), 7.0)                                     # a recognizable [mask] embedding
    y, _ = corrupt_forward(e, token, c)
    rows = np.arange(2000)[:, None]
    shown = y[rows, c.index]                                            # (2000, n_c, 5)
    want = np.where((c.kind == MASK)[..., None], token[0], e[rows, c.source])
    untouched = np.ones((2000, Np), bool)
    untouched[rows, c.index] = False
    assert np.array_equal(shown, want) and np.array_equal(y[untouched], e[untouched])
    out["rates"] = rates
    print(f"corruption: {n_c} of {Np} patches per image; [mask] {rates['mask']:.3f}, random {rates['random']:.3f}, "
          f"kept {rates['keep']:.3f} (over {c.kind.size:,} draws); corrupt_forward places them exactly")

    # 2. The targets: 3-bit mean colours, equal to a loop over the patches.
    x_test = norm_fn(ds.test_images)                                    # (n_test, 32, 32, 3) in [-1, 1]
    classes = mean_colour_classes(x_test, 8)                            # (n_test, Np)
    assert np.array_equal(classes[:20], colour_classes_naive(x_test[:20], 8))
    assert classes.min() >= 0 and classes.max() < 512
    counts = np.bincount(classes.ravel(), minlength=512)
    out.update(target_range=(int(classes.min()), int(classes.max())), n_colours=int((counts > 0).sum()),
               majority_colour_rate=float(counts.max() / counts.sum()))
    print(f"targets: classes in [{classes.min()}, {classes.max()}] of 512, equal to the loop; {out['n_colours']} "
          f"colours occur in the test set, the most common one in {100 * out['majority_colour_rate']:.1f}% of patches")
    png1 = draw_corruption_picture(ds.test_images[:3], draw_corruption(3, Np, np.random.default_rng(seed + 1)),
                                   classes[:3], 8, out_dir / "13_mpp_corruption.png")

    # 3. Pre-training: the lesson-10 loop with the MPP task (no labels used).
    losses = []
    r = run_pretrain_mpp(tc, data=ds, progress=not quick, log=print,
                         on_step=lambda step, loss, params: losses.append(loss))
    cfg = r.cfg
    assert "mask_token" in r.params and r.params["mpp_head"]["w"].shape == (cfg.width, 512)
    mpp = strip_mpp(r.params)                                           # a plain ViT: the features to probe
    out["mpp_losses"], out["mpp_colour_accuracy"] = losses, r.test_accuracy
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    print(f"MPP pre-training: {r.steps} updates, loss {np.mean(losses[:5]):.2f} -> {np.mean(losses[-5:]):.2f}; colour "
          f"accuracy on corrupted test patches {r.test_accuracy:.3f} (most common colour: "
          f"{out['majority_colour_rate']:.3f})")

    # 4. The probe equals the closed form, below and above n = D + 1.
    for n_shots in (1, 10) if not quick else (1, 5):
        idx = select_shots(ds.train_labels, n_shots, seed, 10)          # (n_shots * 10,)
        X = extract_features(mpp, cfg, ds.train_images[idx], norm_fn)   # (n, D) float64
        W, _, _ = fewshot_fit(X, ds.train_labels[idx], 10, DEFAULT_L2)
        W_ref = ridge_lstsq(X, ds.train_labels[idx], 10, DEFAULT_L2)
        err = float(np.abs(W - W_ref).max() / np.abs(W_ref).max())
        assert err < 1e-8, err
        out.setdefault("probe_vs_lstsq", {})[n_shots] = err
    print("probe W vs lstsq: " + ", ".join(f"{k}-shot (n = {10 * k}, D + 1 = {cfg.width + 1}) {v:.0e}"
                                           for k, v in out["probe_vs_lstsq"].items()))

    # 5. Few-shot accuracy of frozen features: random init vs MPP (vs supervised, when lesson 10 ran).
    models = {"random init": (init_params(cfg, seed=seed), cfg), "MPP pre-trained": (mpp, cfg)}
    ckpt = out_dir / "10_run" / "last.npz"
    if ckpt.exists():
        models["supervised (lesson 10)"] = load_checkpoint(ckpt)[:2]
    out["fewshot"] = {}
    for name, (p, c) in models.items():
        table = fewshot_model(p, c, ds, norm_fn, shots, seeds)
        out["fewshot"][name] = {row["shots"]: row["accuracy"] for row in table}
        print(f"few-shot, {name:24s}" + "  ".join(f"{row['shots']:2d}-shot {row['accuracy']:.3f} +- {row['std']:.3f}"
                                                  for row in table))
    curves = {"chance": (list(shots), [0.1] * len(shots))}
    curves.update({name: (list(acc), list(acc.values())) for name, acc in out["fewshot"].items()})
    steps = np.arange(1, len(losses) + 1)
    p1 = line_plot({"loss of each update": (steps, losses)}, title="MPP pre-training (512 colour classes)",
                   xlabel="update", ylabel="cross-entropy on corrupted patches", size=(460, 340), legend=False)
    p2 = line_plot(curves, title=f"few-shot linear probe ({len(seeds)} seeds, {len(ds.test_images)} test images)",
                   xlabel="labelled images per class", ylabel="test accuracy", markers=True, size=(460, 340),
                   ylim=(0, max(0.5, max(max(a.values()) for a in out["fewshot"].values()) + 0.25)),
                   legend="upper left")
    canvas = Image.new("RGB", (p1.width + p2.width + 10, max(p1.height, p2.height)), (255, 255, 255))
    canvas.paste(p1, (0, 0))
    canvas.paste(p2, (p1.width + 10, 0))
    png2 = save_png(canvas, out_dir / "13_mpp_fewshot.png")
    print(f"pictures: {png1}, {png2}")
    out.update(png=[str(png1), str(png2)], seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few hundred images, 1 epoch, 1 and 5 shots")
    ap.add_argument("--out", default=None, help="folder for the PNGs and the run (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
