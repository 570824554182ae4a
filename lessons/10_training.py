"""Lesson 10: training a tiny ViT on the embedded data set (shapes): the loop, the progress bar, the curves.

Goal: put lessons 1-9 together and train a Vision Transformer from scratch with the package's own loop,
minivit.train.train, on "shapes": ten classes of drawn shapes (disc, ring, target, crescent, square, triangle,
plus, star, arrow, pair) on cluttered, noisy backgrounds, generated on first use (no download). Every colour is
drawn symmetrically, so the average image of every class is the same grey: a model must find edges and put them
together into shapes (a linear classifier on raw pixels scores about chance, 10%).

The loop (minivit.train.train; one line of it per step):
    for epoch e:  order = permutation of the training images, seeded by (seed, e)
      for each batch of B images:
        x = normalize(augment(images[batch]))      random crop (pad 2) and flip; pixels to [-1, 1]   (B, H, W, C)
        logits, cache = vit_forward(params, x)                                  lesson 8               (B, K)
        loss = cross_entropy(logits, labels, smoothing 0.1)                     lesson 8
        grads = vit_backward(dloss/dlogits, cache)                              lesson 8: tree = params
        clip_by_global_norm(grads, 1.0);  lr = warmup + cosine(step)            lesson 9
        AdamW step (weight decay 0.05 on the matrices)                          lesson 9
        on_step(step, loss, params)                                             the hook this lesson uses
      evaluate on the test split (accuracy, loss, confusion matrix); write best.npz / last.npz, log.jsonl
The head starts at zero, so the first loss is exactly log 10 = 2.3026 (with or without label smoothing): the first
number to check in any run. The progress bar (tqdm) shows per epoch the running loss, accuracy, lr and images/s.

The model: ViT with 8x8 patches on 32x32 images (a 4x4 grid: 16 patches + the class token = 17 tokens), width 64,
3 blocks, 4 heads, MLP 128: 114,698 parameters, small enough to train in a few seconds per epoch on a CPU.

Run:   python lessons/10_training.py [--quick] [--out DIR]
Time:  about 45 s on a busy 2-core CPU (other jobs running), Python start-up included, once the data exist; the
       first run also draws the 5,500 images (~15-20 s, cached in data/). --quick: about 2 s.

You should see:
    data: 5000 training and 500 test images, 32x32, 10 classes; model: 17 tokens, width 64, 3 blocks
    a progress bar per epoch and one line per epoch: test accuracy rising from ~0.18 to ~0.4 in 8 epochs
    114,698 parameters, 624 updates in ~15-40 s (~1000-2700 images/s, depending on the machine)
    first loss = 2.3026 = log 10 (zero head: uniform predictions)
    test accuracy ~0.62 (chance 0.1); most confused pair: triangle / star (filled blobs at this resolution)
and lessons/out/10_training.png: the loss per update, the accuracy per epoch, the confusion matrix, and test images
with their predicted labels. The run (checkpoints, log) is saved in lessons/out/10_run/; lessons 11, 12 and 15 use it.
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minivit.charts import line_plot
from minivit.config import count_params
from minivit.data import load_dataset, normalize
from minivit.draw import INK, font, heatmap, save_png, side_by_side, tile_grid
from minivit.inference import predict
from minivit.recipes import LESSON_MODEL
from minivit.tasks import evaluate
from minivit.train import TrainConfig, train

MODEL = LESSON_MODEL   # overrides of the 'shapes-small' config: patch 8, width 64, 3 blocks, 4 heads, MLP 128


def run_dir_of(out_dir, quick):
    """Where lesson 10 saves its run: lessons 11, 12 and 15 look for <out>/10_run/last.npz (the final weights)."""
    return Path(out_dir) / ("10_run_quick" if quick else "10_run")


def moving_average(x, n):
    """Mean of the last n values at every step (fewer at the start): (T,) -> (T,)."""
    c = np.cumsum(np.insert(np.asarray(x, dtype=np.float64), 0, 0.0))
    i = np.arange(1, len(x) + 1)
    return (c[i] - c[np.maximum(i - n, 0)]) / np.minimum(i, n)


def stacked(rows):
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    return canvas



def caption(words, width, size=13, per_row=5):
    """A white strip with the words in rows of `per_row` (the class names under the confusion matrix)."""
    rows = [words[i:i + per_row] for i in range(0, len(words), per_row)]
    img = Image.new("RGB", (width, 10 + 20 * len(rows)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for r, row in enumerate(rows):
        d.text((12, 4 + 20 * r), "   ".join(row), fill=INK, font=font(size))
    return img


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    n_train, n_test, epochs, batch = (400, 200, 2, 32) if quick else (5000, 500, 8, 64)

    ds = load_dataset("shapes", n_train=n_train, n_test=n_test, image_size=32, progress=not quick)
    tc = TrainConfig(dataset="shapes", model="shapes-small", model_overrides=MODEL, epochs=epochs, batch_size=batch,
                     lr=2e-3, weight_decay=0.05, label_smoothing=0.1, seed=seed, out=str(run_dir_of(out_dir, quick)))
    cfg_name = f"{(32 // MODEL['patch_size']) ** 2 + 1} tokens, width {MODEL['width']}, {MODEL['depth']} blocks"
    print(f"data: {len(ds.train_images)} training and {len(ds.test_images)} test images, "
          f"{ds.image_shape[0]}x{ds.image_shape[1]}, {ds.num_classes} classes; model: {cfg_name}")

    losses = []                                                        # the loss of every update, from on_step
    result = train(tc, data=ds, progress=not quick, log=print, on_step=lambda step, loss, params: losses.append(loss))
    params, cfg, history = result.params, result.cfg, result.history
    n_params = count_params(cfg)
    print(f"{n_params:,} parameters, {result.steps} updates in {result.seconds:.1f} s "
          f"({result.steps * batch / result.seconds:.0f} images/s)")

    # The first loss: a zero head gives uniform predictions, so the loss is log K exactly.
    first = losses[0]
    assert abs(first - math.log(cfg.num_classes)) < 1e-5, first
    print(f"first loss = {first:.4f} = log {cfg.num_classes} (zero head: uniform predictions)")

    # evaluate() is what the loop ran after the last epoch: accuracy = trace(confusion) / n.
    ev = evaluate(params, cfg, ds.test_images, ds.test_labels, lambda x: normalize(x, "minus_one_one"))
    conf = ev["confusion"]                                             # (K, K): rows true class, columns predicted
    assert ev["accuracy"] == history[-1]["test_acc"] == np.trace(conf) / conf.sum()
    off = conf - np.diag(np.diag(conf))
    worst = np.unravel_index(np.argmax(off + off.T), off.shape)
    pair = (ds.classes[worst[0]], ds.classes[worst[1]])
    print(f"test accuracy {ev['accuracy']:.3f} (chance {1 / cfg.num_classes:.1f}); most confused pair: "
          f"{pair[0]} / {pair[1]} ({off[worst] + off[worst[::-1]]} test images)")

    early, late = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    assert late < early, (early, late)                                 # the loss went down (always, even in quick)
    if not quick:
        assert ev["accuracy"] > 0.3, ev["accuracy"]                    # well above chance (0.1)

    # The picture: loss per update, accuracy per epoch; the confusion matrix; test images with their predictions.
    steps = np.arange(1, len(losses) + 1)
    ep = [h["epoch"] for h in history]
    p1 = line_plot({"loss of each update": (steps, losses), "mean of the last 20": (steps, moving_average(losses, 20)),
                    "log 10 (uniform guess)": ([1, len(losses)], [math.log(10)] * 2)},
                   title="training loss (label smoothing 0.1)", xlabel="update", ylabel="cross-entropy",
                   size=(480, 340), legend="lower left")
    p2 = line_plot({"train (augmented, during the epoch)": (ep, [h["train_acc"] for h in history]),
                    "test": (ep, [h["test_acc"] for h in history]), "chance": (ep, [0.1] * len(ep))},
                   title="accuracy after each epoch", xlabel="epoch", ylabel="accuracy", size=(480, 340),
                   markers=True, ylim=(0, max(0.5, max(h["test_acc"] for h in history) + 0.1)), legend="upper left")
    p3 = heatmap(conf, title="test confusion matrix (counts)", cmap="viridis", scale=24, xlabel="predicted class",
                 ylabel="true class")
    names = caption([f"{i} {c}" for i, c in enumerate(ds.classes)], p3.width)
    show = 12
    pred = predict(params, cfg, normalize(ds.test_images[:show], "minus_one_one")).argmax(axis=1)   # (show,)
    titles = [ds.classes[p] if p == t else f"x {ds.classes[p]} ({ds.classes[t]})"
              for p, t in zip(pred, ds.test_labels[:show])]
    p4 = tile_grid(list(ds.test_images[:show]), ncols=6, scale=3, titles=titles,
                   title="test images and the predicted class ('x': wrong, the true class in brackets)")
    png = save_png(stacked([side_by_side([p1, p2]), side_by_side([stacked([p3, names]), p4], pad=30)]),
                   out_dir / "10_training.png")
    print(f"picture: {png}\nrun (checkpoints, log): {result.run_dir}")
    return {"first_loss": first, "losses": losses, "history": history, "test_accuracy": ev["accuracy"],
            "best_accuracy": result.best_accuracy, "confusion": conf, "n_params": n_params, "steps": result.steps,
            "train_seconds": result.seconds, "run_dir": str(result.run_dir),
            "checkpoint": str(Path(result.run_dir) / "last.npz"), "png": str(png),
            "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few hundred images, 2 epochs")
    ap.add_argument("--out", default=None, help="folder for the PNG and the run (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
