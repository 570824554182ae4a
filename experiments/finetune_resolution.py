"""Does fine-tuning at a higher resolution help? The paper's transfer recipe, measured on the shapes data set.

Train a small ViT at 32x32 on a budget that leaves it below the ceiling, then spend the same extra number of
updates in each of these ways, from the same base weights:

    continue-32      keep training at 32x32 (grid 8x8)
    ft-48 linear     fine-tune at 48x48 (grid 12x12), position embeddings resampled as the original ViT code
    ft-64 linear     fine-tune at 64x64 (grid 16x16)
    ft-48 bilinear   PyTorch's half-pixel bilinear resampling
    ft-48 bicubic    PyTorch's bicubic (a = -0.75)
    ft-48 none       no resampling: position embeddings re-initialized

All extra runs use the paper's fine-tuning recipe (SGD, momentum 0.9, no weight decay, clipping at norm 1,
warmup + cosine). The shapes images are drawn at 64x64 and reduced, so 48 and 64 really show more detail.

    python experiments/finetune_resolution.py                 # the README's numbers (3 seeds)
    python experiments/finetune_resolution.py --quick         # a smoke test in about a minute

Prints a table (mean and standard deviation over seeds of test accuracy and wall time) and writes it as JSON.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from minivit.data import load_dataset
from minivit.finetune import prepare_finetune
from minivit.recipes import FINETUNE_DEFAULTS
from minivit.train import TrainConfig, train

VARIANTS = [("continue-32", 32, "linear"), ("ft-48 linear", 48, "linear"), ("ft-64 linear", 64, "linear"),
            ("ft-48 bilinear", 48, "bilinear"), ("ft-48 bicubic", 48, "bicubic"), ("ft-48 none", 48, "none")]


def run(seeds=(0, 1, 2), n_train=4000, n_test=2000, base_epochs=4, extra_steps=150, batch_size=64,
        ft_lr=0.01, out="runs/finetune-resolution", quiet=True):
    data = {s: load_dataset("shapes", image_size=s, n_train=n_train, n_test=n_test) for s in (32, 48, 64)}
    rows = {"base-32": []}
    rows.update({name: [] for name, _, _ in VARIANTS})
    for seed in seeds:
        t = time.perf_counter()
        base = train(TrainConfig(dataset="shapes", model="shapes-small", epochs=base_epochs, batch_size=batch_size,
                                 seed=seed, out=f"{out}/seed{seed}/base"), data=data[32], progress=not quiet,
                     log=None)
        rows["base-32"].append((base.test_accuracy, time.perf_counter() - t))
        for name, size, method in VARIANTS:
            params, cfg = prepare_finetune(base.params, base.cfg, size, method=method, seed=seed)
            # the schedule spans exactly the extra budget: epochs chosen so that max_steps is the whole run
            recipe = {k: v for k, v in FINETUNE_DEFAULTS.items() if k not in ("epochs", "batch_size", "lr")}
            tc = TrainConfig(dataset="shapes", epochs=-(-extra_steps * batch_size // n_train), max_steps=extra_steps,
                             batch_size=batch_size, lr=ft_lr, seed=seed, warmup_steps=extra_steps // 10,
                             out=f"{out}/seed{seed}/{name.replace(' ', '-')}", **recipe)
            t = time.perf_counter()
            r = train(tc, params=params, cfg=cfg, data=data[size], progress=not quiet, log=None)
            rows[name].append((r.test_accuracy, time.perf_counter() - t))
            print(f"seed {seed} {name:<15} test acc {r.test_accuracy:.4f}  ({rows[name][-1][1]:.0f} s)", flush=True)
        print(f"seed {seed} base-32         test acc {base.test_accuracy:.4f}", flush=True)
    return rows


def table(rows):
    lines = [f"{'variant':<16} {'test accuracy':>20} {'wall time (s)':>16}"]
    summary = {}
    for name, vals in rows.items():
        acc = np.array([v[0] for v in vals])
        sec = np.array([v[1] for v in vals])
        summary[name] = {"acc_mean": float(acc.mean()), "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                         "sec_mean": float(sec.mean()), "runs": len(acc)}
        s = summary[name]
        lines.append(f"{name:<16} {s['acc_mean']:>12.4f} ± {s['acc_std']:.4f} {s['sec_mean']:>16.1f}")
    return "\n".join(lines), summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a smoke test")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--base-epochs", type=int, default=4)
    ap.add_argument("--extra-steps", type=int, default=150)
    ap.add_argument("--out", default=None, help="default: runs/finetune-resolution (--quick: ...-quick)")
    args = ap.parse_args(argv)
    args.out = args.out or ("runs/finetune-resolution-quick" if args.quick else "runs/finetune-resolution")
    if args.quick:
        rows = run(seeds=(0,), n_train=512, n_test=256, base_epochs=1, extra_steps=4, out=args.out)
    else:
        rows = run(seeds=tuple(range(args.seeds)), n_train=args.n_train, base_epochs=args.base_epochs,
                   extra_steps=args.extra_steps, out=args.out)
    text, summary = table(rows)
    print("\n" + text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError) as e:      # bad input: one line that names it, as the CLI does
        sys.exit(f"{Path(__file__).name}: error: {e}")
