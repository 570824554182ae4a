"""Masked patch prediction vs training from scratch on a small labelled budget (issue 8's experiment).

For each seed s:
  labelled  = L images of the training split (shapes, or --dataset; L / K per class, drawn with
              default_rng([s, 100]))
  (a) scratch:  train a ViT on `labelled` (AdamW recipe below)                 -> test accuracy, few-shot
  (b) mpp:      masked patch prediction on all U training images (labels unused), then fine-tune on `labelled`
                with exactly the recipe of (a)                                  -> few-shot of the pre-trained
                                                                                   and of the fine-tuned model
  (c) random:   init_params(cfg, seed=s)                                        -> few-shot only
Few-shot: minivit.fewshot (big_vision's fewshot_lsr: standardized features, bias 100, l2 = 2^10), shots drawn
from `labelled` with shot seeds 0, 1, 2, scored on the test split; on two representations: 'pooled' (the class
token after the final norm, the paper's) and 'patch_mean' (the mean patch token: masked patch prediction trains
the patch tokens' outputs and never the class token's).

    --fewshot-from RUN_DIR   re-score the checkpoints an earlier run left in RUN_DIR (scratch-sS, mpp-pre-sS,
                             mpp-ft-sS) without training; the labelled sets are drawn again from the same seeds.

    python experiments/mpp_fewshot.py --seeds 0,1,2 --labelled 3500 --pre-epochs 10 --pre-batch 128 --width 128 \
        --depth 4 --heads 4 --mlp-dim 256 --threads 2 --out runs/mpp-fewshot-3500      # the README's table
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from minivit.checkpoint import load_checkpoint
from minivit.data import Dataset, load_dataset, normalize
from minivit.fewshot import fewshot_model
from minivit.finetune import prepare_finetune
from minivit.model import init_params
from minivit.recipes import run_pretrain_mpp
from minivit.threads import set_threads
from minivit.train import TrainConfig, resolve_model, train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="shapes", help="shapes (drawn here) or a data set on disk, e.g. "
                    "fashion-mnist (with --data-dir)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default=None, help="config name (default: shapes-small for shapes, else mnist-tiny)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--labelled", type=int, default=1000)
    ap.add_argument("--unlabelled", type=int, default=20000, help="shapes: images drawn; else: the first U "
                    "training images (0: all)")
    ap.add_argument("--n-test", type=int, default=2000, help="shapes: test images drawn (other data sets: all)")
    ap.add_argument("--ft-epochs", type=int, default=30)
    ap.add_argument("--ft-batch", type=int, default=64)
    ap.add_argument("--ft-lr", type=float, default=2e-3)
    ap.add_argument("--pre-epochs", type=int, default=2)
    ap.add_argument("--pre-batch", type=int, default=128)
    ap.add_argument("--pre-lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp-dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="scratch,mpp,random", help="which arms to run")
    ap.add_argument("--out", default="runs/mpp-fewshot")
    ap.add_argument("--fewshot-from", default=None, metavar="RUN_DIR",
                    help="only re-score the checkpoints of an earlier run (both representations)")
    args = ap.parse_args()
    set_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(width=args.width, depth=args.depth, heads=args.heads, mlp_dim=args.mlp_dim)
    model = args.model or ("shapes-small" if args.dataset == "shapes" else "mnist-tiny")
    if args.dataset == "shapes":
        full = load_dataset("shapes", n_train=args.unlabelled, n_test=args.n_test, image_size=32, progress=False)
    else:
        full = load_dataset(args.dataset, data_dir=args.data_dir)
        if args.unlabelled:
            full = Dataset(full.name, full.train_images[:args.unlabelled], full.train_labels[:args.unlabelled],
                           full.test_images, full.test_labels, classes=full.classes)
    norm = lambda x: normalize(x, "minus_one_one")   # noqa: E731
    arms = args.only.split(",")
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rng = np.random.default_rng([seed, 100])
        per = args.labelled // full.num_classes
        idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(full.train_labels == k), per, replace=False)
                                      for k in range(full.num_classes)]))
        labelled = Dataset(full.name, full.train_images[idx], full.train_labels[idx], full.test_images,
                           full.test_labels, classes=full.classes)
        unlabelled = Dataset(full.name, full.train_images, full.train_labels, full.test_images, full.test_labels,
                             classes=full.classes)

        def finetune_config(name):
            return TrainConfig(dataset=args.dataset, model=model, model_overrides=overrides,
                               epochs=args.ft_epochs, batch_size=args.ft_batch, lr=args.ft_lr, weight_decay=0.05,
                               seed=seed, eval_every=args.ft_epochs, out=str(out / f"{name}-s{seed}"))

        def fewshot(row, arm, params, cfg):
            """row[ARM_fewshot_REP] = {shots: accuracy} for both representations."""
            for rep in ("pooled", "patch_mean"):
                table = fewshot_model(params, cfg, labelled, norm, representation=rep)
                row[f"{arm}_fewshot_{rep}"] = {t["shots"]: t["accuracy"] for t in table}

        row = {"seed": seed}
        if args.fewshot_from:                             # re-score an earlier run's checkpoints, both ways
            for arm, run in (("scratch", "scratch"), ("mpp_pre", "mpp-pre"), ("mpp_ft", "mpp-ft")):
                params, cfg, _ = load_checkpoint(Path(args.fewshot_from) / f"{run}-s{seed}" / "last.npz")
                fewshot(row, arm, params, cfg)
            cfg = resolve_model(finetune_config("random"), labelled)
            fewshot(row, "random", init_params(cfg, seed=seed), cfg)
            print(f"seed {seed}: " + "; ".join(f"{k} {v}" for k, v in row.items() if k != "seed"), flush=True)
            results.append(row)
            (out / "fewshot.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))
            continue
        if "scratch" in arms:
            t = time.perf_counter()
            r = train(finetune_config("scratch"), data=labelled, progress=False, log=None)
            row["scratch_s"] = time.perf_counter() - t
            row["scratch_acc"] = r.test_accuracy
            fewshot(row, "scratch", r.params, r.cfg)
            print(f"seed {seed} scratch: acc {r.test_accuracy:.4f} ({row['scratch_s']:.0f} s) few-shot "
                  f"{row['scratch_fewshot_pooled']}", flush=True)
        if "random" in arms:
            cfg = resolve_model(finetune_config("random"), labelled)
            fewshot(row, "random", init_params(cfg, seed=seed), cfg)
            print(f"seed {seed} random init few-shot {row['random_fewshot_pooled']}", flush=True)
        if "mpp" in arms:
            t = time.perf_counter()
            tc = TrainConfig(dataset=args.dataset, model=model, model_overrides=overrides,
                             epochs=args.pre_epochs, batch_size=args.pre_batch, lr=args.pre_lr, weight_decay=0.05,
                             label_smoothing=0.0, seed=seed, eval_every=args.pre_epochs,
                             out=str(out / f"mpp-pre-s{seed}"))
            pre = run_pretrain_mpp(tc, data=unlabelled, progress=False, log=None)
            row["mpp_pre_s"] = time.perf_counter() - t
            row["mpp_colour_acc"] = pre.test_accuracy
            fewshot(row, "mpp_pre", pre.params, pre.cfg)
            print(f"seed {seed} mpp pre-training: colour acc {pre.test_accuracy:.4f} train loss "
                  f"{pre.history[-1]['train_loss']:.3f} ({row['mpp_pre_s']:.0f} s) few-shot "
                  f"{row['mpp_pre_fewshot_pooled']}",
                  flush=True)
            params, cfg = prepare_finetune(pre.params, pre.cfg)
            t = time.perf_counter()
            r = train(finetune_config("mpp-ft"), params=params, cfg=cfg, data=labelled, progress=False, log=None)
            row["mpp_ft_s"] = time.perf_counter() - t
            row["mpp_ft_acc"] = r.test_accuracy
            fewshot(row, "mpp_ft", r.params, r.cfg)
            print(f"seed {seed} mpp fine-tuned: acc {r.test_accuracy:.4f} ({row['mpp_ft_s']:.0f} s) few-shot "
                  f"{row['mpp_ft_fewshot_pooled']}", flush=True)
        results.append(row)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))
    summarize(results)


def summarize(rows):
    def ms(values):
        v = np.array(values, dtype=float)
        return f"{100 * v.mean():5.1f} ± {100 * (v.std(ddof=1) if len(v) > 1 else 0.0):4.1f}"
    print("\n(mean ± sample std over seeds, %)")
    for key in ("scratch_acc", "mpp_ft_acc"):
        if key in rows[0]:
            print(f"{key:>26}: {ms([r[key] for r in rows])}")
    for key in [k for k in rows[0] if "fewshot" in k]:
        print(f"{key:>26}: " + "  ".join(f"{n}-shot {ms([r[key][n] for r in rows])}" for n in rows[0][key]))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError) as e:      # bad input: one line that names it, as the CLI does
        sys.exit(f"{Path(__file__).name}: error: {e}")
