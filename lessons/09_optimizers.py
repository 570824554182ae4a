"""Lesson 9: optimizers: SGD with momentum, Adam, AdamW, warmup and cosine decay, gradient clipping.

Goal: watch the optimizers that train a ViT (minivit.optim) move on 2-D problems small enough to draw, and see what
each of their ingredients is for.

The math (one step t, gradient g, learning rate lr; all of it in minivit.optim.optimizer_step):
    SGD with momentum:  m = beta m + g;  p -= lr m          (the paper's fine-tuning, beta = 0.9). m is a running
                        sum of past gradients: it builds speed along a long shallow valley, and gradients that flip
                        sign (across a narrow valley) cancel in it. beta = 0 is plain SGD.
    Adam:               m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr mhat / (sqrt(vhat) + eps),
                        mhat = m / (1 - b1^t), vhat = v / (1 - b2^t)   (bias correction: m, v start at 0)
                        Each coordinate's step is scaled by its own gradient size: about lr per step in every
                        direction, however steep or flat (the paper's pre-training, b1 = 0.9, b2 = 0.999).
    AdamW:              Adam, then p -= lr wd p on weight matrices: "decoupled" weight decay, a pull toward 0 that
                        does not go through Adam's scaling (the paper: wd 0.03-0.3 in pre-training).
    schedule (lr_at):   linear warmup to the base rate over the first steps, then cosine decay to 0:
                        lr = base * 0.5 (1 + cos(pi * progress)) * min(1, step / warmup)
                        Warmup keeps the first, badly estimated Adam steps small; the decay lets noisy (mini-batch)
                        gradients settle instead of bouncing around the minimum at a distance set by lr.
    clipping:           g *= min(1, max_norm / ||g||) over ALL gradients together: same direction, bounded length,
                        so one huge gradient cannot throw the weights far away (the paper: max_norm 1).
The problems: an ill-conditioned quadratic f = ((x-1)^2 + 50 (y-1)^2) / 2 (50 times steeper across than along) and
Rosenbrock's banana valley f = (1-x)^2 + 100 (y-x^2)^2. Both have their minimum at (1, 1). The point (x, y) is
stored as a (1, 2) matrix so that AdamW's decay applies (only matrices are decayed: see optim.decay_mask).

Run:   python lessons/09_optimizers.py [--quick] [--out DIR]
Time:  about 1 s on a 2-core CPU, Python start-up included (--quick: 0.8 s, fewer steps and seeds).

You should see (plain SGD at lr 0.035, near its limit 2/50 on the quadratic, zig-zags across the steep direction and
crawls along the flat one; momentum 0.9 gets there with lr 0.01; Adam and AdamW use lr 0.1 and 0.05):
    quadratic, 100 steps: f  SGD ~ 6e-3, momentum ~ 1e-4, Adam ~ 4e-4, AdamW (wd 0.3) ~ 0.07 (stops short, toward 0)
    Rosenbrock, 1000 steps: f  SGD ~ 3 (still in the valley), momentum ~ 6e-5, Adam ~ 3e-4, AdamW ~ 0.3
    schedule: lr 0.1 at step 1 of 10 warmup steps, 1.0 at step 10, 0.5 halfway through the decay, 0 at the end
    noisy gradients: final f, constant lr vs warmup + cosine: SGD ~ 0.3 vs ~ 0.02, Adam ~ 0.1 vs ~ 0.006
    clipping: SGD from (-2, -1) on Rosenbrock overflows after 10 steps; clipped at norm 10 it reaches f ~ 2e-5
and two pictures in lessons/out/: 09_optimizers.png (the trajectories) and 09_schedules.png (the learning-rate
schedule, constant vs decayed lr under noise, clipping).
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minivit.charts import line_plot
from minivit.draw import AXIS, INK, PALETTE, font, save_png, side_by_side
from minivit.optim import clip_by_global_norm, lr_at, optimizer_init, optimizer_step


def quadratic(p, k=50.0):
    x, y = p[..., 0], p[..., 1]
    return 0.5 * ((x - 1) ** 2 + k * (y - 1) ** 2), np.stack([x - 1, k * (y - 1)], axis=-1)


def rosenbrock(p):
    x, y = p[..., 0], p[..., 1]
    gx, gy = -2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2, np.stack([gx, gy], axis=-1)


def run(f, start, kind, lr, steps, schedule="constant", warmup=0, wd=0.0, momentum=0.9, clip=0.0, noise=0.0, seed=0):
    """Minimize f from start with minivit's optimizer -> path (steps+1, 2), f values (steps+1,)."""
    rng = np.random.default_rng(seed)
    params = {"w": np.array([start], dtype=np.float64)}                # (1, 2): a matrix, so AdamW decays it
    state = optimizer_init(params, kind)
    path, values = [params["w"][0].copy()], []
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, steps + 1):
            value, g = f(params["w"])
            values.append(float(value[0]))
            if not np.isfinite(value).all():
                break                                                  # diverged
            grads = {"w": g + noise * rng.standard_normal(g.shape)}    # noise: a stand-in for mini-batch sampling
            if clip:
                clip_by_global_norm(grads, clip)
            optimizer_step(params, grads, state, lr_at(t, lr, steps, warmup, schedule), kind=kind,
                           weight_decay=wd, momentum=momentum)
            path.append(params["w"][0].copy())
        values.append(float(f(params["w"])[0][0]))
    return np.array(path), np.array(values)



def nice_ticks(lo, hi):
    """Round-number ticks inside [lo, hi]: a step of 1, 2 or 5 times a power of ten, 4 to 10 of them."""
    raw = (hi - lo) / 5
    mag = 10.0 ** math.floor(math.log10(raw))
    step = min(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1) * step


def draw_paths(f, xlim, ylim, paths, title, size=(520, 420)):
    """Trajectories over f's level bands (white = low, grey = high): paths {name: (n, 2)} -> RGB image."""
    W, H = size
    l, t, r, b = 55, 40, 15, 45                                        # margins
    pw, ph = W - l - r, H - t - b
    grid = np.stack(np.meshgrid(np.linspace(*xlim, pw), np.linspace(ylim[1], ylim[0], ph)), axis=-1)   # (ph, pw, 2)
    bands = np.floor(np.log10(f(grid)[0] + 1e-3) * 2)                  # level bands half a decade wide
    shade = 250 - 70 * (bands - bands.min()) / max(bands.max() - bands.min(), 1)   # (ph, pw): light = low f
    plot = Image.fromarray(np.repeat(shade[..., None], 3, axis=2).astype(np.uint8))
    d = ImageDraw.Draw(plot)                                           # drawn inside the frame only
    px = lambda p: ((p[0] - xlim[0]) / (xlim[1] - xlim[0]) * pw, (ylim[1] - p[1]) / (ylim[1] - ylim[0]) * ph)  # noqa
    for i, path in enumerate(paths.values()):
        pts = [px(p) for p in path if np.isfinite(p).all() and np.abs(p).max() < 1e6]
        d.line(pts, fill=PALETTE[i], width=2, joint="curve")
        if len(path) <= 150:
            for q in pts:
                d.ellipse((q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2), fill=PALETTE[i])
    mx, my = px((1.0, 1.0))
    d.line((mx - 7, my - 7, mx + 7, my + 7), fill=INK, width=3)                               # the minimum
    d.line((mx - 7, my + 7, mx + 7, my - 7), fill=INK, width=3)
    for i, path in enumerate(paths.values()):                           # where each one ended, on top
        ex, ey = px(path[-1])
        d.ellipse((ex - 6, ey - 6, ex + 6, ey + 6), fill=PALETTE[i], outline=(255, 255, 255), width=2)
    sx, sy = px(next(iter(paths.values()))[0])
    d.ellipse((sx - 6, sy - 6, sx + 6, sy + 6), outline=INK, width=2)                         # the start
    lx, ly = pw - 175, 6                                               # the legend, top right
    d.rectangle((lx, ly, pw - 6, ly + 8 + 18 * len(paths)), fill=(255, 255, 255), outline=AXIS)
    for i, name in enumerate(paths):
        d.rectangle((lx + 8, ly + 7 + 18 * i, lx + 22, ly + 19 + 18 * i), fill=PALETTE[i])
        d.text((lx + 28, ly + 13 + 18 * i), name, fill=INK, font=font(13), anchor="lm")
    img = Image.new("RGB", (W, H), (255, 255, 255))
    img.paste(plot, (l, t))
    d = ImageDraw.Draw(img)
    d.rectangle((l - 1, t - 1, l + pw, t + ph), outline=AXIS)
    for v in nice_ticks(*xlim):
        x = l + px((v, 0))[0]
        d.line((x, t + ph, x, t + ph + 4), fill=AXIS)
        d.text((x, t + ph + 6), f"{v:g}", fill=INK, font=font(12), anchor="mt")
    for v in nice_ticks(*ylim):
        y = t + px((0, v))[1]
        d.line((l - 5, y, l - 1, y), fill=AXIS)
        d.text((l - 8, y), f"{v:g}", fill=INK, font=font(12), anchor="rm")
    d.text((l + pw / 2, 12), title, fill=INK, font=font(15), anchor="mt")
    d.text((l + pw / 2, H - 6), "x      (o start, x minimum, big dots: where each ended)", fill=INK, font=font(13),
           anchor="mb")
    d.text((12, t + ph / 2), "y", fill=INK, font=font(13), anchor="lm")
    return img


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    out = {}

    # 1. Trajectories: SGD, SGD with momentum, Adam and AdamW on both problems.
    setups = {"quadratic": (quadratic, (-3.0, 1.6), 100, (0.035, 0.01, 0.1), (-3.5, 2.0), (0.4, 1.8)),
              "Rosenbrock": (rosenbrock, (-1.5, 2.0), 300 if quick else 1000, (1e-3, 1e-3, 0.05), (-2, 1.5), (-0.5, 3))}
    pictures = []
    for prob, (f, start, steps, (lr_sgd, lr_momentum, lr_adam), xlim, ylim) in setups.items():
        runs = {"SGD": run(f, start, "sgd", lr_sgd, steps, momentum=0.0),
                "SGD + momentum 0.9": run(f, start, "sgd", lr_momentum, steps),
                "Adam": run(f, start, "adam", lr_adam, steps),
                "AdamW (wd 0.3)": run(f, start, "adamw", lr_adam, steps, wd=0.3)}
        out[prob] = {k: float(v[1][-1]) for k, v in runs.items()}
        out[prob + "_end"] = {k: v[0][-1].tolist() for k, v in runs.items()}
        print(f"{prob}, {steps} steps: f " + ", ".join(f"{k} {v:.1e}" for k, v in out[prob].items()))
        assert out[prob]["SGD + momentum 0.9"] < out[prob]["SGD"] and out[prob]["Adam"] < out[prob]["SGD"]
        ends = out[prob + "_end"]
        assert np.linalg.norm(ends["AdamW (wd 0.3)"]) < np.linalg.norm(ends["Adam"])   # decay pulls toward 0
        pictures.append(draw_paths(f, xlim, ylim, {k: v[0] for k, v in runs.items()}, f"{prob}, {steps} steps"))
    png1 = save_png(side_by_side(pictures, pad=0), out_dir / "09_optimizers.png")

    # 2. The schedule: linear warmup, then cosine decay.
    total, warm = 100, 10
    lrs = [lr_at(s, 1.0, total, warm, "cosine") for s in range(1, total + 1)]
    half = lr_at(warm + (total - warm) // 2, 1.0, total, warm)           # halfway through the decay
    out["schedule"] = {"step1": lrs[0], "warmup_end": lrs[warm - 1], "half": half, "end": lrs[-1]}
    assert abs(lrs[0] - 0.1) < 1e-12 and lrs[warm - 1] == 1.0 and abs(out["schedule"]["half"] - 0.5) < 1e-12
    assert abs(lrs[-1]) < 1e-12
    print("schedule: lr {step1:.1f} at step 1 of 10 warmup steps, {warmup_end:.1f} at step 10, {half:.1f} halfway "
          "through the decay, {end:.0f} at the end".format(**out["schedule"]))

    # 3. Noisy gradients: a constant lr keeps bouncing; a decayed one settles.
    seeds, steps = (3 if quick else 5), 400
    noisy = {}
    for kind, lr in (("sgd", 0.01), ("adam", 0.1)):
        for sched, w in (("constant", 0), ("cosine", 40)):
            runs_ = [run(quadratic, (-3.0, 1.6), kind, lr, steps, sched, w, noise=3.0, seed=seed + s)
                     for s in range(seeds)]
            noisy[f"{kind} {sched}"] = float(np.mean([r[1][-1] for r in runs_]))
            if kind == "sgd":                                          # the mean curve over the seeds, drawn
                out.setdefault("noisy_curves", {})[sched] = np.mean([r[1] for r in runs_], axis=0)
    out["noisy_final"] = noisy
    assert noisy["sgd cosine"] < noisy["sgd constant"] and noisy["adam cosine"] < noisy["adam constant"]
    print(f"noisy gradients: final f, constant lr vs warmup + cosine: SGD {noisy['sgd constant']:.2g} vs "
          f"{noisy['sgd cosine']:.2g}, Adam {noisy['adam constant']:.2g} vs {noisy['adam cosine']:.2g}")

    # 4. Clipping: a steep start throws unclipped SGD out of the valley; clipped SGD takes bounded steps.
    g = {"a": np.array([30.0, -40.0]), "b": np.array([[120.0]])}          # global norm 130
    before = clip_by_global_norm(g, 10.0)
    after = math.sqrt(sum(float((v ** 2).sum()) for v in g.values()))
    assert before == 130.0 and abs(after - 10.0) < 1e-5 and np.allclose(g["a"] / g["b"][0, 0], [0.25, -1 / 3])
    free = run(rosenbrock, (-2.0, -1.0), "sgd", 1e-3, 1000)
    clipped = run(rosenbrock, (-2.0, -1.0), "sgd", 1e-3, 1000, clip=10.0)
    out["clip"] = {"unclipped_steps_to_overflow": len(free[1]) - 1, "unclipped_final": free[1][-1],
                   "clipped_final": float(clipped[1][-1])}
    assert not np.isfinite(free[1][-1]) and out["clip"]["clipped_final"] < 1e-3
    print(f"clipping: a norm-130 gradient becomes norm {after:.4f}, same direction; SGD from (-2, -1) overflows "
          f"after {out['clip']['unclipped_steps_to_overflow']} steps, clipped at 10 it reaches f = "
          f"{out['clip']['clipped_final']:.1e}")

    s = np.arange(1, total + 1)
    linear = [lr_at(i, 1.0, total, warm, "linear") for i in s]
    panels = [line_plot({"warmup + cosine": (s, lrs), "warmup + linear": (s, linear), "constant": (s, [1.0] * total)},
                        title="learning-rate schedules", xlabel="step", ylabel="lr / base lr", size=(400, 320),
                        legend="lower left"),
              line_plot({"constant lr": out["noisy_curves"]["constant"],
                         "warmup + cosine": out["noisy_curves"]["cosine"]}, logy=True,
                        title="SGD + momentum, noisy gradients", xlabel="step",
                        ylabel=f"f (mean of {seeds} runs)", size=(400, 320)),
              line_plot({f"not clipped (overflows at step {len(free[1]) - 1})": free[1],
                         "clipped at norm 10": clipped[1]}, logy=True, ylim=(1e-6, 1e8),
                        title="SGD + momentum on Rosenbrock", xlabel="step", ylabel="f", size=(400, 320))]
    png2 = save_png(side_by_side(panels, pad=0), out_dir / "09_schedules.png")
    print(f"pictures: {png1}, {png2}")
    out.update(png=[str(png1), str(png2)], seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer Rosenbrock steps and noise seeds")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
