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


class NonFiniteError(CheckpointError):
    """Parameters or optimizer state holding NaN or infinity: never written, and refused on load by default.
    `names` lists the arrays at fault."""

    def __init__(self, message, path=None, names=()):
        super().__init__(message, path)
        self.names = tuple(names)


def nonfinite_arrays(arrays):
    """The names of the floating-point arrays of a flat {name: array} dict holding NaN or infinity, in order."""
    return [k for k, v in arrays.items()
            if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]


def _name_some(names, most=5):
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def save_checkpoint(path, params, cfg, opt_state=None, meta=None):
    """Write params (and optimizer state) with `cfg` and `meta` to `path` atomically.

    Refuses (NonFiniteError, nothing written) when any parameter or optimizer moment holds NaN or infinity: a file
    that is saved is a file that can be resumed, evaluated and fine-tuned from.
    """
    arrays = {f"params.{k}": to_numpy(v) for k, v in flatten(params).items()}
    if opt_state is not None:
        arrays.update({f"opt.{k}": to_numpy(v) for k, v in state_to_flat(opt_state).items()})
    bad = nonfinite_arrays(arrays)
    if bad:
        raise NonFiniteError(f"not saving {path}: {len(bad)} of {len(arrays)} arrays hold NaN or infinity "
                             f"({_name_some(bad)})", str(path), bad)
    info = dict(meta or {})
    extra = [k for k in params if k not in param_shapes(cfg)]     # parameters beyond the ViT's own
    info.update({"format": FORMAT, "version": FORMAT_VERSION, "model": cfg.to_dict(), "extra_params": extra})
    arrays["meta"] = np.array(json.dumps(info))
    atomic_save_npz(path, arrays)


def load_checkpoint(path, device=None, with_optimizer=False, expect_cfg=None, allow_nonfinite=False):
    """Read a checkpoint -> (params, cfg, meta) or, with_optimizer=True, (params, cfg, meta, opt_flat or None).

    Parameters land on `device` in the dtype they were saved in. `expect_cfg` (a ViTConfig) makes a checkpoint of
    another architecture fail with an error naming the first mismatching field. Everything is checked before it
    is used: the meta against its schema (`check_meta`), every parameter's shape and floating dtype, the optimizer
    state against the parameters, and (unless allow_nonfinite) that no array holds NaN or infinity; any fault is
    a CheckpointError naming the file and what was expected and found.
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
    check_meta(meta, path)
    try:
        cfg = ViTConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: bad model config ({e})") from None
    if expect_cfg is not None and expect_cfg != cfg:
        diff = [f"{k}: checkpoint {getattr(cfg, k)!r} vs expected {getattr(expect_cfg, k)!r}"
                for k in ViTConfig.__dataclass_fields__ if getattr(cfg, k) != getattr(expect_cfg, k)]
        raise CheckpointError(f"checkpoint {path} is for a different model ({'; '.join(diff)})")
    flat = {k[len("params."):]: v for k, v in arrays.items() if k.startswith("params.")}
    opt = {k[len("opt."):]: v for k, v in arrays.items() if k.startswith("opt.")}
    _check_arrays(flat, opt, path)
    if not allow_nonfinite:
        bad = nonfinite_arrays(arrays)
        if bad:
            raise NonFiniteError(f"checkpoint {path}: {len(bad)} of {len(arrays)} arrays hold NaN or infinity "
                                 f"({_name_some(bad)}); the weights are unusable (an earlier checkpoint of the "
                                 f"run may not be)", path, bad)
    try:
        params = unflatten(flat)
        extra = meta.get("extra_params", [])         # a task's own parameters (e.g. masked patch prediction's)
        check_params({k: v for k, v in params.items() if k not in extra}, cfg)
        missing = [k for k in extra if k not in params]
        if missing:
            raise ValueError(f"meta names extra parameters {missing} that the file does not hold")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    params = to_device(params, device)
    if not with_optimizer:
        return params, cfg, meta
    return params, cfg, meta, (opt or None)


def _check_arrays(params, opt, path):
    """Parameters floating point, one dtype for all; optimizer moments of the parameters' names, shapes, dtype."""
    dtypes = {}
    for k, v in params.items():
        if not np.issubdtype(v.dtype, np.floating):
            raise CheckpointError(f"checkpoint {path}: parameter {k} has dtype {v.dtype}, expected floating point "
                                  f"(float32 or float64)", path)
        dtypes.setdefault(str(v.dtype), k)
    if len(dtypes) > 1:
        raise CheckpointError(f"checkpoint {path}: its parameters mix dtypes "
                              f"({', '.join(f'{d} ({k}, ...)' for d, k in dtypes.items())}); expected one", path)
    if not opt:
        return
    step = opt.get("step")
    if step is None or step.shape != () or not np.issubdtype(step.dtype, np.integer) or int(step) < 0:
        raise CheckpointError(f"checkpoint {path}: optimizer state without a valid step (expected a non-negative "
                              f"integer scalar, found {None if step is None else f'{step.dtype} {step.shape}'})", path)
    for k, v in opt.items():
        if k == "step":
            continue
        moment, _, name = k.partition(".")
        if moment not in ("m", "v") or name not in params:
            raise CheckpointError(f"checkpoint {path}: optimizer entry opt.{k} belongs to no parameter", path)
        if v.shape != params[name].shape or v.dtype != params[name].dtype:
            raise CheckpointError(f"checkpoint {path}: optimizer entry opt.{k} is {v.dtype} {v.shape}, its "
                                  f"parameter {params[name].dtype} {params[name].shape}", path)


# ----------------------------------------------------------------------------------------------------------------
# The meta entry's schema: what each field must be. check_meta runs on every load, so a wrong field is named once,
# here, instead of surfacing as a KeyError or TypeError wherever it is first used.

_INT = (int,)
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))


def _field(obj, key, types, where, path, required=False):
    """obj[key] if it is one of `types` (bool is no number), None if absent and not required."""
    if key not in obj:
        if required:
            raise CheckpointError(f"checkpoint {path}: {where} has no {key!r} entry", path)
        return None
    v = obj[key]
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        names = "/".join("null" if t is type(None) else {"dict": "object", "list": "array", "str": "string",
                                                          "int": "integer", "float": "number"}.get(t.__name__,
                                                                                                   t.__name__)
                         for t in types)
        raise CheckpointError(f"checkpoint {path}: {where}[{key!r}] must be {names}, found "
                              f"{type(v).__name__} {v!r:.60}", path)
    return v


def check_meta(meta, path):
    """Validate a checkpoint's meta against its schema (the module docstring); CheckpointError naming the field."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: its meta is a JSON {type(meta).__name__}, expected an object", path)
    fmt = _field(meta, "format", (str,), "meta", path, required=True)
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: unknown format {fmt!r} (expected {FORMAT!r})", path)
    version = _field(meta, "version", _INT, "meta", path, required=True)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this minivit understands "
                              f"({FORMAT_VERSION}); upgrade minivit", path)
    if version < 1:
        raise CheckpointError(f"{path}: format version {version} is not a version (expected 1..{FORMAT_VERSION})")
    _field(meta, "model", (dict,), "meta", path, required=True)
    extra = _field(meta, "extra_params", (list,), "meta", path) or []
    if not all(isinstance(k, str) for k in extra):
        raise CheckpointError(f"checkpoint {path}: meta['extra_params'] must be a list of names, found {extra!r:.60}")
    task = _field(meta, "task", (str,), "meta", path)
    if task is not None and task not in ("classification", "mpp"):
        raise CheckpointError(f"checkpoint {path}: meta['task'] {task!r} is no task (classification or mpp)", path)
    _field(meta, "mpp", (dict,), "meta", path)             # the MPP task's settings (defaults where absent)
    _field(meta, "train", (dict,), "meta", path)
    progress = _field(meta, "progress", (dict,), "meta", path)
    if progress is not None:
        for key in ("step", "epoch", "batch"):
            if _field(progress, key, _INT, "meta['progress']", path, required=True) < 0:
                raise CheckpointError(f"checkpoint {path}: meta['progress'][{key!r}] is negative", path)
        sums = _field(progress, "epoch_sums", (dict, type(None)), "meta['progress']", path)
        for key in ("seen", "correct", "counted", "loss_sum"):
            if sums is not None:
                _field(sums, key, _NUM, "meta['progress']['epoch_sums']", path, required=True)
    metrics = _field(meta, "metrics", (dict,), "meta", path) or {}
    for key in metrics:
        _field(metrics, key, _OPT_NUM, "meta['metrics']", path)
    data = _field(meta, "data", (dict,), "meta", path)
    if data is not None:
        _check_data_meta(data, path)


def _check_data_meta(data, path):
    where = "meta['data']"
    for key in ("dataset", "data_dir"):
        _field(data, key, (str, type(None)), where, path)
    classes = _field(data, "classes", (list,), where, path)
    if classes is not None and not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"checkpoint {path}: {where}['classes'] must be a list of names", path)
    size = _field(data, "image_size", (list,), where, path)
    if size is not None and (len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size)):
        raise CheckpointError(f"checkpoint {path}: {where}['image_size'] must be [H, W], found {size!r}", path)
    mode = _field(data, "normalize", (str,), where, path)
    if mode not in (None, "minus_one_one", "mean_std"):
        raise CheckpointError(f"checkpoint {path}: {where}['normalize'] {mode!r} is not minus_one_one or mean_std",
                              path)
    if mode == "mean_std":
        for key in ("mean", "std"):
            v = _field(data, key, (list,), where, path, required=True)
            if not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) or (
                    key == "std" and min(v) <= 0):
                raise CheckpointError(f"checkpoint {path}: {where}[{key!r}] must be a list of numbers per channel"
                                      f"{' (positive)' if key == 'std' else ''}, found {v!r:.60}", path)
