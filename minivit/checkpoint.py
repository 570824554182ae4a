"""The native checkpoint format: one .npz file, read with `allow_pickle=False`.

    params.<dotted name>     every parameter tensor, e.g. params.blocks.3.attn.qkv_w
    opt.<dotted name>        optimizer state: opt.m.<name>, opt.v.<name>, opt.step (absent in a weights-only file)
    meta                     one JSON string (a 0-d unicode array) with:
        format               "minivit-checkpoint", version FORMAT_VERSION
        model                the ViTConfig as a dict
        train                the training settings (TrainConfig as a dict), when written by the training loop
        progress             {"step": updates done, "epoch": current epoch, "batch": batches done in that epoch,
                              "seed": the run seed}: the random generators of shuffling, augmentation and dropout
                              are derived from (seed, epoch, step), so these counters are the complete RNG state
        data                 {"dataset", "classes", "normalize", "mean", "std", "image_size"}: how to feed it
        metrics              the latest evaluation (test accuracy, ...)
        task                 "classification", or "mpp" for masked patch prediction pre-training
        extra_params         top-level parameter names beyond the ViT's own (a task's, e.g. mask_token)

Files are written atomically (temporary file in the same folder, then rename), so an interrupted save never
damages the previous checkpoint.
"""
import json
import zipfile

import numpy as np

from minivit.backend import to_device, to_numpy
from minivit.config import ViTConfig, param_shapes
from minivit.fileio import atomic_save_npz
from minivit.model import check_params
from minivit.optim import state_to_flat
from minivit.tree import flatten, unflatten

FORMAT = "minivit-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated, corrupt, or for another model.

    `path` names the file; `missing` and `unexpected` list the keys at fault (for the original-layout loaders in
    minivit.pretrained; empty when the problem is of another kind).
    """

    def __init__(self, message, path=None, missing=(), unexpected=()):
        super().__init__(message)
        self.path = path
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)


def save_checkpoint(path, params, cfg, opt_state=None, meta=None):
    """Write params (and optimizer state) with `cfg` and `meta` to `path` atomically."""
    arrays = {f"params.{k}": to_numpy(v) for k, v in flatten(params).items()}
    if opt_state is not None:
        arrays.update({f"opt.{k}": to_numpy(v) for k, v in state_to_flat(opt_state).items()})
    info = dict(meta or {})
    extra = [k for k in params if k not in param_shapes(cfg)]     # parameters beyond the ViT's own
    info.update({"format": FORMAT, "version": FORMAT_VERSION, "model": cfg.to_dict(), "extra_params": extra})
    arrays["meta"] = np.array(json.dumps(info))
    atomic_save_npz(path, arrays)


def load_checkpoint(path, device=None, with_optimizer=False, expect_cfg=None):
    """Read a checkpoint -> (params, cfg, meta) or, with_optimizer=True, (params, cfg, meta, opt_flat or None).

    Parameters land on `device` in the dtype they were saved in. `expect_cfg` (a ViTConfig) makes a checkpoint of
    another architecture fail with an error naming the first mismatching field.
    """
    path = str(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    if "meta" not in arrays:
        raise CheckpointError(f"{path} is not a minivit checkpoint (no 'meta' entry); for original ViT .npz "
                              f"weights use minivit.pretrained.load_npz")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: its meta entry is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta['version']} is newer than this minivit "
                              f"understands ({FORMAT_VERSION}); upgrade minivit")
    try:
        cfg = ViTConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: bad model config ({e})") from None
    if expect_cfg is not None and expect_cfg != cfg:
        diff = [f"{k}: checkpoint {getattr(cfg, k)!r} vs expected {getattr(expect_cfg, k)!r}"
                for k in ViTConfig.__dataclass_fields__ if getattr(cfg, k) != getattr(expect_cfg, k)]
        raise CheckpointError(f"checkpoint {path} is for a different model ({'; '.join(diff)})")
    params = unflatten({k[len("params."):]: v for k, v in arrays.items() if k.startswith("params.")})
    extra = meta.get("extra_params", [])         # a task's own parameters (e.g. masked patch prediction's)
    try:
        check_params({k: v for k, v in params.items() if k not in extra}, cfg)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    params = to_device(params, device)
    if not with_optimizer:
        return params, cfg, meta
    opt = {k[len("opt."):]: v for k, v in arrays.items() if k.startswith("opt.")}
    return params, cfg, meta, (opt or None)
