"""A linear classifier on raw pixels: how far does the shapes data set get without learning features?

Regularized least squares from the normalized pixels (32x32x3 = 3,072 features) of every training image to
{-1, 1} class targets, solved in closed form (minivit.fewshot.fewshot_fit: features standardized, a bias feature,
l2 penalty), scored on the test split. The same probe on the MNIST-style data sets, when they are on disk, shows
what "easy for a linear model" looks like.

    python experiments/linear_baseline.py [--dataset shapes] [--image-size 32] [--l2 1024]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

from minivit.data import load_dataset, normalize
from minivit.fewshot import fewshot_fit, fewshot_predict


def linear_probe(ds, l2):
    X = normalize(ds.train_images).reshape(len(ds.train_images), -1).astype(np.float64)   # (N, H*W*C)
    Xt = normalize(ds.test_images).reshape(len(ds.test_images), -1).astype(np.float64)
    W, mean, std = fewshot_fit(X, ds.train_labels, ds.num_classes, l2)
    train_acc = float((fewshot_predict(W, X, mean, std) == ds.train_labels).mean())
    test_acc = float((fewshot_predict(W, Xt, mean, std) == ds.test_labels).mean())
    return train_acc, test_acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="shapes")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--l2", type=float, nargs="+", default=[1.0, 2.0 ** 5, 2.0 ** 10, 2.0 ** 15])
    args = ap.parse_args(argv)
    ds = load_dataset(args.dataset, data_dir=args.data_dir, image_size=args.image_size)
    print(f"{args.dataset}: {len(ds.train_images)} train / {len(ds.test_images)} test images of "
          f"{ds.image_shape}, {ds.num_classes} classes")
    for l2 in args.l2:
        t = time.perf_counter()
        train_acc, test_acc = linear_probe(ds, l2)
        print(f"  l2 {l2:>8g}: train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} "
              f"({time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError) as e:      # bad input: one line that names it, as the CLI does
        sys.exit(f"{Path(__file__).name}: error: {e}")
