"""The data a run reads, and the data a checkpoint was trained on: which set, from where, normalized how.

    ds = load_run_data("shapes", image_size=32, n_train=400, n_test=200)      # what `train` loads
    ds = dataset_for_checkpoint(meta["data"])           # what eval, inspect, fewshot and finetune read by default
    normalize_fn = normalizer_from_meta(meta["data"])   # the pixels as the checkpoint's training saw them

A training checkpoint's meta["data"] records the set's name, its classes, the normalization (with the mean / std
where it is 'mean_std'), the folder it was read from (absolute) and, for shapes, the size of the draw.
"""
from pathlib import Path

import numpy as np

from minivit.data import _canonical, dataset_stats, load_dataset
from minivit.data.transforms import normalizer

SHAPES_DRAW = {"n_train": 20000, "n_test": 2000}   # the shapes images `train` draws unless told otherwise


def load_run_data(dataset, image_size, data_dir=None, n_train=None, n_test=None, progress=True):
    """The Dataset of a run, resized to the model's input size (`progress`: a bar while shapes are first drawn)."""
    opts = {}
    if dataset == "shapes":
        opts = {"n_train": n_train or SHAPES_DRAW["n_train"], "n_test": n_test or SHAPES_DRAW["n_test"],
                "progress": progress}
    return load_dataset(dataset, data_dir=data_dir, image_size=image_size, **opts)


def dataset_for_checkpoint(data_meta, dataset=None, data_dir=None, image_size=None, n_train=None, n_test=None):
    """The Dataset to evaluate a checkpoint on: `dataset`, else the one its `data` meta names (else shapes), at
    `image_size`, from `data_dir` (default: where the checkpoint's training read it); shapes with n_train / n_test
    images (default: the checkpoint's own draw, else 20000 / 2000, the training default)."""
    data_meta = data_meta or {}
    name = dataset or data_meta.get("dataset") or "shapes"
    data_dir = data_dir or recorded_data_dir(data_meta, name)
    own = data_meta.get("dataset") == "shapes"
    opts = {"n_train": n_train or (own and data_meta.get("n_train")) or SHAPES_DRAW["n_train"],
            "n_test": n_test or (own and data_meta.get("n_test")) or SHAPES_DRAW["n_test"]} if name == "shapes" else {}
    return load_dataset(name, data_dir=data_dir, image_size=image_size, **opts)


def recorded_data_dir(data_meta, name):
    """The data folder a checkpoint's training read data set `name` from, if it recorded one and it exists here."""
    recorded = (data_meta or {}).get("data_dir")
    same = _canonical(name) == _canonical((data_meta or {}).get("dataset") or "")
    return recorded if same and recorded and Path(recorded).is_dir() else None


def data_normalizer(mode, ds):
    """(normalize function uint8 -> float32, its description for the checkpoint) of a run on Dataset `ds`."""
    if mode == "mean_std":
        mean, std = dataset_stats(ds.name, ds.train_images)
        mean, std = [float(v) for v in np.ravel(mean)], [float(v) for v in np.ravel(std)]
        return normalizer("mean_std", mean, std), {"normalize": "mean_std", "mean": mean, "std": std}
    if mode != "minus_one_one":
        raise ValueError(f"normalize must be 'minus_one_one' or 'mean_std', got {mode!r}")
    return normalizer("minus_one_one"), {"normalize": "minus_one_one", "mean": None, "std": None}


def normalizer_from_meta(data_meta):
    """The normalize function a checkpoint's `data` entry describes (default: pixels to [-1, 1])."""
    data_meta = data_meta or {}
    if data_meta.get("normalize") == "mean_std":
        return normalizer("mean_std", data_meta["mean"], data_meta["std"])
    return normalizer("minus_one_one")
