"""The training loop: data, augmentation, AdamW (or SGD), schedule, clipping, evaluation, checkpoints, exact resume.

    result = train(TrainConfig(dataset="shapes", epochs=10))      # what `minivit train` calls
    result.params, result.cfg, result.history, result.run_dir

What is optimized is a task (minivit.tasks: classification by default, masked patch prediction); fine-tuning and
pre-training are recipes on top of `train` (minivit.recipes). `train` reads as its three steps:
    resolve_run   the settings (a fresh run's, or the saved ones of a run resumed), its task and starting state
    prepare_run   the data, the model, the optimizer state, the normalizer and the run folder's config.json
    run_epochs    the updates, the evaluations, the log and the checkpoints (RunFolder)

Reproducibility: every random draw of the run comes from a generator derived from the run seed and counters,
    shuffle of epoch e:            np.random.default_rng([seed, 0, e])
    augmentation (and mixup) of update t:  np.random.default_rng([seed, 1, t])
    dropout of micro-batch m of update t:  np.random.default_rng([seed, 2, t, m])
so (seed, epoch, batch within the epoch, update count) is the complete random state. A checkpoint stores those
counters; resuming from it (also mid-epoch) replays exactly the batches, augmentations and masks an uninterrupted
run would have drawn, and on the CPU with the same thread count ends with bit-identical weights.
"""
import json
import math
import os
import signal
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minivit.backend import get_backend, resolve_device, to_device, to_numpy
from minivit.checkpoint import CheckpointError, NonFiniteError, load_checkpoint, save_checkpoint
from minivit.config import get_config
from minivit.data import Augment, default_augment, resize_images
from minivit.data.checkpoint_data import data_normalizer, load_run_data, recorded_data_dir
from minivit.data.transforms import augment_batch, mixup
from minivit.fileio import FolderLock, atomic_write_json, atomic_write_text, remove_stale_temporaries
from minivit.model import init_params
from minivit.optim import (OPTIMIZERS, SCHEDULES, clip_by_global_norm, lr_at, optimizer_init, optimizer_step,
                           state_from_flat)
from minivit.ranges import TRAIN_RANGES
from minivit.tasks import ClassificationTask, task_from_meta
from minivit.tree import tree_map


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and the last good checkpoint."""


class TrainingInterrupted(Exception):
    """Ctrl-C during training: a checkpoint was saved; `.path` is where, resume with --resume RUN_DIR."""

    def __init__(self, message, path):
        super().__init__(message)
        self.path = path


# Per-data-set defaults (documented in the README): the model config and the recipe that trains it well on a
# 2-core CPU in minutes.
DATASET_DEFAULTS = {
    "shapes": dict(model="shapes-small", epochs=12, batch_size=128, lr=2e-3, weight_decay=0.05),
    "mnist": dict(model="mnist-tiny", epochs=10, batch_size=128, lr=2e-3, weight_decay=0.05),
    "fashion-mnist": dict(model="mnist-tiny", epochs=10, batch_size=128, lr=2e-3, weight_decay=0.05),
    "cifar10": dict(model="cifar-small", epochs=30, batch_size=128, lr=1e-3, weight_decay=0.05),
    "cifar100": dict(model="cifar-small", epochs=30, batch_size=128, lr=1e-3, weight_decay=0.05),
    "folder": dict(model="cifar-small", epochs=30, batch_size=64, lr=1e-3, weight_decay=0.05),
}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (the command line's flags, one to one). None = per-data-set default.
    Frozen: a changed setting is a new config (dataclasses.replace), as on resume and when defaults are filled."""
    dataset: str = "shapes"
    data_dir: str = None
    model: str = None                   # a name in minivit.config.CONFIGS
    model_overrides: dict = field(default_factory=dict)   # e.g. {"width": 128, "depth": 6, "dropout": 0.1}
    image_size: int = None              # None: the model config's (must match the data after resizing)
    n_train: int = None                 # shapes only: training images to generate (default 20000)
    n_test: int = None                  # shapes only: test images (default 2000)
    epochs: int = None
    max_steps: int = 0                  # > 0: stop after this many updates (the schedule still spans all epochs)
    batch_size: int = None
    accum_steps: int = 1                # micro-batches accumulated into one update (batch_size / accum_steps each)
    optimizer: str = "adamw"
    lr: float = None
    min_lr: float = 0.0
    weight_decay: float = None
    momentum: float = 0.9               # SGD only
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "cosine"
    warmup_steps: int = None            # None: 5% of all updates
    label_smoothing: float = 0.1
    clip_norm: float = 1.0              # global-norm clipping (0 = off)
    augment: str = "default"            # 'default' (per data set) or 'none'
    crop_pad: int = None                # overrides of the augmentation (None = the default's)
    flip: bool = None
    rotate_deg: float = None
    shift: float = None
    scale: float = None
    mixup: float = None
    normalize: str = "minus_one_one"    # or 'mean_std'
    freeze_backbone: bool = False       # train only the head (a linear probe)
    seed: int = 0
    eval_every: int = 1                 # epochs between evaluations on the test split
    save_every: int = 0                 # > 0: also write last.npz every this many updates
    out: str = None                     # run folder (default runs/<data set>-<time>)
    device: str = None
    eval_batch_size: int = 500

    def to_dict(self):
        return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_defaults(tc):
    """Fill the None fields from the per-data-set defaults; validate. Returns a new TrainConfig."""
    key = "folder" if tc.dataset.startswith("folder:") or os.sep in tc.dataset else tc.dataset
    defaults = DATASET_DEFAULTS.get(key, DATASET_DEFAULTS["folder"])
    tc = replace(tc, **{k: v for k, v in defaults.items() if getattr(tc, k) is None})
    d = tc.to_dict()
    for name, allowed in TRAIN_RANGES.items():        # every numeric setting in its range (minivit.ranges)
        if d[name] is not None:
            d[name] = allowed.check(d[name], name)
    if d["batch_size"] % d["accum_steps"]:
        raise ValueError(f"batch_size {d['batch_size']} is not divisible by accum_steps {d['accum_steps']}")
    if d["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {d['optimizer']!r}")
    if d["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {d['schedule']!r}")
    if d["min_lr"] > d["lr"]:
        raise ValueError(f"min_lr {d['min_lr']!r} is above lr {d['lr']!r}: the schedule decays from lr to min_lr")
    if d["augment"] not in ("default", "none"):
        raise ValueError(f"augment must be 'default' or 'none', got {d['augment']!r}")
    return TrainConfig(**d)        # (paths as strings, as the checkpoint records them)


def make_augment(tc):
    """The Augment policy of a run: the data set's default (or none) with the run's overrides."""
    try:
        base = default_augment(tc.dataset) if tc.augment == "default" else Augment()
    except ValueError:
        base = Augment()
    over = {"crop_pad": tc.crop_pad, "flip": tc.flip, "rotate_deg": tc.rotate_deg, "shift": tc.shift,
            "scale": tc.scale, "mixup_alpha": tc.mixup}
    return Augment(**{**asdict(base), **{k: v for k, v in over.items() if v is not None}})


def _augment_for(tc, cfg):
    """make_augment(tc), checked against the model's input size: a shift or crop padding of a whole image or more
    would move every pixel out of the picture."""
    aug = make_augment(tc)
    side = min(cfg.image_hw)
    for name, value in (("shift", aug.shift), ("crop_pad", aug.crop_pad)):
        if value >= side:
            raise ValueError(f"{name} {value!r} is not smaller than the {side}-pixel input: every pixel would "
                             f"leave the image")
    return aug


def resolve_model(tc, ds=None, cfg=None):
    """The ViTConfig of a run: `cfg` if given, else the named config with the data's classes and channels."""
    if cfg is None:
        cfg = get_config(tc.model, **tc.model_overrides)
        if ds is not None:
            cfg = cfg.replace(num_classes=ds.num_classes, channels=ds.image_shape[2])
    if tc.image_size:
        cfg = cfg.replace(image_size=tc.image_size)
    return cfg


@dataclass
class TrainResult:
    params: dict
    cfg: object
    history: list
    run_dir: Path
    test_accuracy: float
    best_accuracy: float
    steps: int
    seconds: float


def _checkpoint_step(path):
    """The update count a checkpoint was saved at (its meta alone is read), or -1 if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return int(json.loads(str(f["meta"]))["progress"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def format_figure(value):
    """A logged figure: 4 decimals, or '-' where there is none (no update in that stretch of the epoch)."""
    return "-" if value is None else f"{value:.4f}"


# the meta entries a training checkpoint gets from the loop and save_checkpoint (the rest is carried over on resume)
_TRAINING_META = ("format", "version", "model", "extra_params", "task", "train", "progress", "data", "metrics")


def _default_run_dir(tc):
    name = tc.dataset.replace("folder:", "folder-").replace(os.sep, "_").strip("_")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


class _StopFlag:
    """Ctrl-C sets a flag that the loop checks between updates (never mid-update); a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:      # not the main thread: leave Ctrl-C alone
            self._old = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# ----------------------------------------------------------------------------------------------------------------
# 1. Resolve the run: its settings, task, folder and the state it starts from.

@dataclass
class RunStart:
    """Where a run starts: a fresh one at update 0, a resumed one at its checkpoint's counters and state."""
    tc: TrainConfig                     # the resolved settings (per-data-set defaults filled in)
    task: object                        # a task of minivit.tasks
    meta_extra: dict                    # what goes into every checkpoint's meta beside the training state
    progress: dict                      # {"step", "epoch", "batch"} (and a resumed epoch's "epoch_sums")
    params: dict = None                 # a resumed run's weights (on the host), else the caller's or None
    cfg: object = None
    opt_flat: dict = None               # a resumed run's optimizer state, flat
    best: float = -1.0                  # the best test accuracy so far
    history: list = field(default_factory=list)   # the log lines up to the start
    resumed_from: dict = None           # {"path", "step"} of the checkpoint resumed from
    run_dir: Path = None                # a resumed run's folder (a fresh run's is chosen in prepare_run)


def resolve_run(tc=None, resume=None, task=None, meta_extra=None, params=None, cfg=None):
    """-> RunStart. A fresh run: tc (default TrainConfig()) with defaults filled in, the given task (default
    classification) and params/cfg. A resume: the checkpoint's settings, task, weights and counters; from tc only
    a larger `epochs`, `device` and `max_steps` are taken."""
    start = RunStart(tc, task, dict(meta_extra or {}), {"step": 0, "epoch": 0, "batch": 0}, params, cfg)
    if resume is None:         # every checkpoint and config.json of the run carry its id (a resume keeps it)
        start.meta_extra["run_id"] = uuid.uuid4().hex
        tc = resolve_defaults(start.tc or TrainConfig())
    else:
        start = _resumed(resume, tc, task, meta_extra)
        try:
            tc = resolve_defaults(start.tc)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{start.resumed_from['path']}: its training settings (meta['train']) are "
                                  f"invalid: {e}") from None
    if tc.data_dir:            # recorded as an absolute path: a resume from another folder reads the same data
        tc = replace(tc, data_dir=str(Path(tc.data_dir).resolve()))
    start.tc, start.task = tc, start.task or ClassificationTask()
    start.task.check(tc.normalize, tc.freeze_backbone)
    return start


def _resumed(resume, tc, task, meta_extra):
    ckpt = Path(resume)
    ckpt = ckpt / "last.npz" if ckpt.is_dir() else ckpt
    params, cfg, meta, opt_flat = load_checkpoint(ckpt, device="cpu", with_optimizer=True)   # device: prepare_run
    if "train" not in meta or opt_flat is None:
        raise CheckpointError(f"{ckpt} has no training state to resume (a weights-only checkpoint?)")
    try:
        saved = TrainConfig.from_dict(meta["train"])
        if task is None and meta.get("task") == "mpp":             # a masked patch prediction run goes on as one
            task = task_from_meta(meta)
            meta_extra = dict(meta_extra or {}, mpp=meta["mpp"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: its training settings (meta['train'], meta['mpp']) are invalid: {e}") from None
    saved_data = meta.get("data", {})     # the data it read (older runs and fine-tunes left these to defaults)
    saved = replace(
        saved,
        epochs=tc.epochs if tc is not None and tc.epochs and tc.epochs > saved.epochs else saved.epochs,
        device=tc.device if tc is not None and tc.device else saved.device,
        max_steps=(tc.max_steps or 0) if tc is not None else 0,   # a resumed run goes on to the end by default
        out=str(ckpt.parent.resolve()),   # and on in the folder it is resumed from (it may have moved)
        data_dir=(saved.data_dir if saved.data_dir and Path(saved.data_dir).is_absolute() else
                  recorded_data_dir(saved_data, saved.dataset) or saved.data_dir))
    if saved.dataset == "shapes":
        saved = replace(saved, n_train=saved.n_train or saved_data.get("n_train"),
                        n_test=saved.n_test or saved_data.get("n_test"))
    # what a checkpoint's meta holds beyond the training state (e.g. finetuned_from) goes on into the new ones
    meta_extra = dict({k: v for k, v in meta.items() if k not in _TRAINING_META}, **(meta_extra or {}))
    progress = meta.get("progress")
    if progress is None:
        raise CheckpointError(f"{ckpt} has no meta['progress'] (the counters a resume starts from)")
    # the log as it was at the checkpoint (a later line, e.g. of a crash, is dropped)
    history = [h for h in read_log(ckpt.parent / "log.jsonl") if h.get("step", 0) <= progress["step"]]
    return RunStart(saved, task, meta_extra, progress, params, cfg, opt_flat,
                    best=_or(meta.get("metrics", {}).get("best_accuracy"), -1.0), history=history,
                    resumed_from={"path": str(ckpt), "step": progress["step"]}, run_dir=ckpt.parent)


def _or(value, default):
    return default if value is None else value


def read_log(path):
    """The entries of a run's log.jsonl (none if it does not exist). A line that is not a JSON object, such as the
    torn last line of a process killed while writing it, is dropped with a warning naming the file and line: the
    checkpoint, not the log, holds the state a resume needs."""
    path = Path(path)
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line.decode("utf-8"))
            if not isinstance(entry, dict) or not isinstance(entry.get("step", 0), int):
                raise ValueError("not a log entry (an object with an integer step)")
        except ValueError as e:          # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            warnings.warn(f"{path}: line {number} is not a log entry ({type(e).__name__}: {str(e):.80}); "
                          f"dropped", RuntimeWarning, stacklevel=2)
            continue
        entries.append(entry)
    return entries


# ----------------------------------------------------------------------------------------------------------------
# 2. Prepare the data and the state: data set, model config, parameters, optimizer, normalizer, run folder.

@dataclass
class PreparedRun:
    """Everything the epochs need besides the counters."""
    ds: object                          # the Dataset, at the model's input size
    cfg: object                         # the ViTConfig
    params: dict                        # on the run's device; updated in place
    trainable: dict                     # what the optimizer updates: params, or only the head (freeze_backbone)
    opt_state: dict
    normalize_fn: object                # uint8 -> float32 pixels
    data_meta: dict                     # the checkpoint's description of the data
    aug: Augment
    steps_per_epoch: int
    total_steps: int
    warmup: int
    folder: "RunFolder"


def activation_bytes(cfg, batch):
    """About how many bytes one training micro-batch of `batch` images keeps for the backward pass (float32):
    per block the attention probabilities (batch, heads, N, N) and some ten (batch, N, width)-sized tensors plus
    the MLP's (batch, N, mlp_dim) pair. An estimate to refuse the impossible, not a measurement."""
    N = cfg.seq_len
    per_block = batch * (cfg.heads * N * N + N * (10 * cfg.width + 2 * cfg.mlp_dim))
    return 4 * cfg.depth * per_block


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):      # (no sysconf: Windows)
        return None


def check_fits_in_memory(cfg, batch, device="cpu"):
    """ValueError before any work when a micro-batch's activations alone exceed this machine's memory (CPU runs)."""
    total = _physical_memory()
    need = activation_bytes(cfg, batch)
    if device == "cpu" and total and need > total:
        H, W = cfg.image_hw
        raise ValueError(f"a micro-batch of {batch} images at {H}x{W} ({cfg.seq_len} tokens of {cfg.patch_size}x"
                         f"{cfg.patch_size} patches, {cfg.depth} blocks) needs about {need / 2 ** 30:.0f} GiB of "
                         f"activations and this machine has {total / 2 ** 30:.0f} GiB: lower --image-size or "
                         f"--batch-size, or raise --accum-steps")


def prepare_run(start, data=None, progress=True):
    """-> PreparedRun for a RunStart; writes the run folder's config.json (nothing else yet)."""
    tc, task, cfg = start.tc, start.task, start.cfg
    device = resolve_device(tc.device)
    xp = get_backend(device)
    check_fits_in_memory(resolve_model(tc, None, cfg), tc.batch_size // tc.accum_steps, device)   # before the data
    if data is None:   # load at the model's input size (shapes is drawn at 64 and reduced, never enlarged)
        size = tc.image_size or (cfg.image_hw[0] if cfg is not None else get_config(tc.model).image_hw[0])
        data = load_run_data(tc.dataset, size, tc.data_dir, tc.n_train, tc.n_test, progress)
    ds = data
    cfg = resolve_model(tc, ds, cfg)
    if ds.image_shape[:2] != cfg.image_hw:
        H, W = cfg.image_hw
        if H != W:
            raise ValueError(f"data are {ds.image_shape[0]}x{ds.image_shape[1]} and the model needs {H}x{W}")
        ds.train_images, ds.test_images = resize_images(ds.train_images, H), resize_images(ds.test_images, H)
    if ds.image_shape[2] != cfg.channels:
        raise ValueError(f"the data have {ds.image_shape[2]} channel(s) but the model expects {cfg.channels}")
    if ds.num_classes != cfg.num_classes and task.name == "classification":
        raise ValueError(f"the data have {ds.num_classes} classes but the model's head has {cfg.num_classes}; "
                         f"fine-tune with a new head (--new-head / --num-classes)")
    params = start.params
    if start.resumed_from is not None:   # onto the run's device: the saved one, or the one asked for now
        params = to_device(params, device)
    elif params is None:
        params = task.prepare(init_params(cfg, seed=tc.seed, device=device), cfg, tc.seed)
    else:                      # a private copy: training updates arrays in place, the caller's stay as they were
        params = task.prepare(tree_map(lambda a: xp.array(a, copy=True), to_device(to_numpy(params), device)),
                              cfg, tc.seed)
    trainable = {"head": params["head"]} if tc.freeze_backbone else params
    opt_state = (state_from_flat(start.opt_flat, trainable) if start.opt_flat else
                 optimizer_init(trainable, tc.optimizer))
    normalize_fn, data_meta = data_normalizer(tc.normalize, ds)
    data_meta.update({"dataset": ds.name, "classes": list(ds.classes), "image_size": list(cfg.image_hw)})
    if ds.name == "shapes":    # its size is a choice: eval, inspect and fewshot draw the same split by default
        data_meta.update(n_train=len(ds.train_images), n_test=len(ds.test_images))
    if tc.data_dir:            # and they read the data from where training did, unless told otherwise
        data_meta["data_dir"] = tc.data_dir

    n = len(ds.train_images)
    steps_per_epoch = n // tc.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {n} images, fewer than one batch of {tc.batch_size}")
    total_steps = tc.epochs * steps_per_epoch
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(0.05 * total_steps)
    run_dir = start.run_dir if start.resumed_from is not None else (
        Path(tc.out) if tc.out else _default_run_dir(tc))
    folder = RunFolder(run_dir, start.resumed_from, start.history)
    folder.open(start.meta_extra.get("run_id"), cfg)
    try:
        folder.write_config(tc, cfg, data_meta, start.meta_extra.get("run_id"))
    except BaseException:
        folder.close()
        raise
    return PreparedRun(ds, cfg, params, trainable, opt_state, normalize_fn, data_meta, _augment_for(tc, cfg),
                       steps_per_epoch, total_steps, warmup, folder)


class RunFolder:
    """A run's files: config.json, log.jsonl (one JSON line per epoch), last.npz and best.npz (written atomically),
    and run.lock while a process trains in it.

    open() takes the folder's lock (a second run in the same folder is refused; the lock of a killed run is taken
    over), removes the temporary files an interrupted save left, and, on a resume, checks that the checkpoint is
    this folder's run (its run id, or for older runs its model, against config.json). Before the run writes its
    first log line or checkpoint (not before: a run that fails at once destroys nothing), a new run removes an
    earlier run's log and checkpoints from the folder; a resume from an earlier checkpoint cuts the log back to it
    and removes a best.npz from the abandoned updates after it. close() releases the lock.
    """
    FILES = ("config.json", "log.jsonl", "last.npz", "best.npz")

    def __init__(self, path, resumed_from=None, history=()):
        self.path = Path(path)
        self.log_path = self.path / "log.jsonl"
        self._resumed_from = resumed_from
        self._history = list(history)   # a resumed run's log lines up to its checkpoint
        self._first_write = True
        self._lock = FolderLock(self.path / "run.lock")

    def open(self, run_id, cfg):
        self.path.mkdir(parents=True, exist_ok=True)
        replaced = self._lock.acquire()
        if replaced is not None:
            warnings.warn(f"{self.path}: took over the lock of a run that is no longer running (process "
                          f"{replaced.get('pid')}, since {replaced.get('started')})", RuntimeWarning, stacklevel=2)
        try:
            removed = remove_stale_temporaries(self.path, self.FILES)
            if removed:
                warnings.warn(f"{self.path}: removed {len(removed)} temporary file(s) of an interrupted save "
                              f"({', '.join(Path(p).name for p in removed)})", RuntimeWarning, stacklevel=2)
            if self._resumed_from is not None:
                self._check_same_run(run_id, cfg)
        except BaseException:
            self.close()
            raise

    def _check_same_run(self, run_id, cfg):
        """A checkpoint copied in from another run must not go on under this folder's log and best.npz."""
        try:
            recorded = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return                       # no (readable) config.json: nothing to compare with; it is rewritten
        if not isinstance(recorded, dict):
            return
        ckpt = self._resumed_from["path"]
        theirs = recorded.get("run_id")
        if run_id and theirs and run_id != theirs:
            why = f"its run id {run_id} is not the folder's {theirs} (config.json)"
        elif isinstance(recorded.get("model"), dict) and recorded["model"] != cfg.to_dict():
            diff = [k for k, v in cfg.to_dict().items() if recorded["model"].get(k) != v]
            why = f"its model differs from the folder's config.json in {', '.join(diff) or 'its fields'}"
        else:
            return
        raise CheckpointError(f"{ckpt} is not a checkpoint of the run in {self.path}: {why}. Resume it from the "
                              f"folder it was written in, or start from its weights in a new folder (minivit "
                              f"finetune --from {ckpt} --out NEW_FOLDER)", ckpt)

    def close(self):
        self._lock.release()

    def write_config(self, tc, cfg, data_meta, run_id=None):
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / "config.json", {"train": tc.to_dict(), "model": cfg.to_dict(),
                                                      "data": data_meta, "run_id": run_id})

    def _clear_what_is_not_this_run(self):
        if not self._first_write:
            return
        self._first_write = False
        if self._resumed_from is None:
            for name in ("log.jsonl", "best.npz", "last.npz"):
                (self.path / name).unlink(missing_ok=True)
            return
        atomic_write_text(self.log_path, "".join(json.dumps(h) + "\n" for h in self._history))
        best_path = self.path / "best.npz"
        if best_path.exists() and _checkpoint_step(best_path) > self._resumed_from["step"]:
            best_path.unlink()

    def save(self, name, params, cfg, opt_state, meta):
        """-> the path of <name>.npz, written with the training state."""
        self._clear_what_is_not_this_run()
        path = self.path / f"{name}.npz"
        save_checkpoint(path, params, cfg, opt_state, meta)
        return path

    def record(self, entry):
        """Append one line to the log."""
        self._clear_what_is_not_this_run()
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# 3. Run the epochs.

@dataclass
class EpochSums:
    """The running sums of the epoch in progress (saved in every checkpoint, so a resume mid-epoch goes on)."""
    seen: int = 0                       # training images
    correct: int = 0                    # correct predictions (of classes, or of MPP colours)
    counted: int = 0                    # predictions made
    loss_sum: float = 0.0               # sum over the updates of the batch's mean loss times its images

    def to_dict(self):
        return {"seen": int(self.seen), "correct": int(self.correct), "counted": int(self.counted),
                "loss_sum": float(self.loss_sum)}


def _batch(run, tc, order, batch, step, xp):
    """Update `step`'s batch: images augmented, normalized and moved to the device, labels, mixup's soft targets."""
    ds, aug = run.ds, run.aug
    idx = order[batch * tc.batch_size:(batch + 1) * tc.batch_size]                      # (B,)
    rng = np.random.default_rng([tc.seed, 1, step])
    x = run.normalize_fn(augment_batch(ds.train_images[idx], aug, rng))                  # (B, H, W, C) float32
    y = ds.train_labels[idx]                                                             # (B,) int64, host
    soft = None
    if aug.mixup_alpha > 0:
        x, soft = mixup(x, y, aug.mixup_alpha, rng, run.cfg.num_classes)                # soft (B, K)
        soft = xp.asarray(soft)
    return xp.asarray(x, dtype=run.params["pos_embed"].dtype), y, soft


def diverged_advice(tc):
    """What to change when a run diverged: the flags that tame it, with the values it ran with."""
    lower = f"a lower --lr (it was {tc.lr:g}; try {tc.lr / 10:g})"
    tame = (f"{lower}, or gradient clipping (--clip-norm 1; it was off)" if not tc.clip_norm else
            f"{lower} or a longer warmup (--warmup-steps); clipping was already on (--clip-norm {tc.clip_norm:g})")
    return (f"Start a new run with {tame}: a resume repeats the same settings and would diverge at the same "
            f"update.")


def _update(run, tc, task, x, y, soft, step, where):
    """One update: loss and gradients, clipping, the optimizer step -> (loss, correct, counted, grad norm, lr).
    A non-finite loss raises TrainingError before the weights change; `where` () -> the words naming the update."""
    loss, grads, n_correct, n_counted = task.loss_and_grads(
        run.params, run.cfg, x, y, soft, smoothing=tc.label_smoothing, accum_steps=tc.accum_steps, seed=tc.seed,
        step=step, freeze_backbone=tc.freeze_backbone)
    if not math.isfinite(loss):
        raise TrainingError(f"the loss became {loss} at update {step + 1} {where()}. {diverged_advice(tc)}")
    gnorm = clip_by_global_norm(grads, tc.clip_norm)
    if not math.isfinite(gnorm):      # before the weights change: a NaN gradient would poison every weight
        raise TrainingError(f"the gradient norm became {gnorm} at update {step + 1} {where()}. "
                            f"{diverged_advice(tc)}")
    lr = lr_at(step + 1, tc.lr, run.total_steps, run.warmup, tc.schedule, tc.min_lr)
    optimizer_step(run.trainable, grads, run.opt_state, lr, kind=tc.optimizer, beta1=tc.beta1, beta2=tc.beta2,
                   weight_decay=tc.weight_decay, momentum=tc.momentum)
    return loss, n_correct, n_counted, gnorm, lr


def run_epochs(start, run, progress=True, log=print, on_step=None):
    """The updates from start.progress to the end (or tc.max_steps), an evaluation, a log line and checkpoints
    after each epoch -> TrainResult. Ctrl-C saves last.npz and raises TrainingInterrupted."""
    tc, task, cfg, params, folder = start.tc, start.task, run.cfg, run.params, run.folder
    xp = get_backend(resolve_device(tc.device))
    n, steps_per_epoch = len(run.ds.train_images), run.steps_per_epoch
    history, best = start.history, start.best
    step, epoch, batch = start.progress["step"], start.progress["epoch"], start.progress["batch"]
    # the running sums of the epoch in progress: a run resumed mid-epoch goes on with the saved ones
    resumed = EpochSums(**start.progress.get("epoch_sums") or {}) if batch else EpochSums()
    sums = gnorm = None
    last_good = dict(start.resumed_from) if start.resumed_from is not None else {"path": None, "step": None}

    def save(name, metrics=None):
        meta = {"task": task.name, "train": tc.to_dict(),
                "progress": {"step": step, "epoch": epoch, "batch": batch, "seed": tc.seed,
                             "epoch_sums": sums.to_dict()},
                "data": run.data_meta, "metrics": dict(metrics or {}, best_accuracy=best)}
        meta.update(start.meta_extra)
        try:
            path = folder.save(name, params, cfg, run.opt_state, meta)
        except NonFiniteError as e:   # finite loss and gradients, yet weights or moments overflowed: stop here
            raise TrainingError(f"after update {step} the {'weights' if any(n.startswith('params.') for n in e.names) else 'optimizer state'} "
                                f"hold NaN or infinity ({len(e.names)} arrays, e.g. {e.names[0]}), so {name}.npz "
                                f"was not written {where()}. {diverged_advice(tc)}") from None
        if name == "last":
            last_good.update(path=str(path), step=step)
        return path

    def where():
        good = (f"the last good checkpoint is {last_good['path']} (update {last_good['step']})"
                if last_good["path"] else "no checkpoint was written yet")
        return f"(epoch {epoch + 1}, batch {batch + 1}); {good}"

    t_start = time.perf_counter()
    test_acc = history[-1]["test_acc"] if history and "test_acc" in history[-1] else float("nan")
    with _StopFlag() as stop:
        while epoch < tc.epochs:
            order = np.random.default_rng([tc.seed, 0, epoch]).permutation(n)   # (n,) shuffle of this epoch
            bar = tqdm(total=steps_per_epoch, initial=batch, desc=f"epoch {epoch + 1}/{tc.epochs}",
                       leave=True, dynamic_ncols=True, disable=not progress) if progress else None
            sums, resumed = resumed, EpochSums()          # (only the first epoch after a resume has sums so far)
            seen_before = sums.seen                       # images of this epoch before a resume (not timed here)
            step_before = step
            t_epoch = time.perf_counter()
            while batch < steps_per_epoch:
                if stop.requested:
                    path = save("last")
                    if bar:
                        bar.close()
                    raise TrainingInterrupted(
                        f"interrupted at update {step} (epoch {epoch + 1}, batch {batch}); saved {path}; "
                        f"resume with: minivit train --resume {folder.path}", path)
                if tc.max_steps and step >= tc.max_steps:
                    break
                x, y, soft = _batch(run, tc, order, batch, step, xp)
                loss, n_correct, n_counted, gnorm, lr = _update(run, tc, task, x, y, soft, step, where)
                step += 1
                batch += 1
                sums.correct += n_correct
                sums.counted += n_counted
                sums.seen += len(y)
                sums.loss_sum += loss * len(y)
                if on_step is not None:
                    on_step(step, loss, params)
                if tc.save_every and step % tc.save_every == 0:
                    save("last")
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sums.loss_sum / sums.seen:.3f}",
                                    acc=f"{sums.correct / max(sums.counted, 1):.3f}", lr=f"{lr:.2e}",
                                    img_s=f"{(sums.seen - seen_before) / (time.perf_counter() - t_epoch):.0f}",
                                    refresh=False)
            if bar:
                bar.close()
            finished = batch >= steps_per_epoch
            if not finished and step == step_before:      # resumed at its --max-steps: nothing done, nothing to log
                break
            entry = {"epoch": epoch + 1, "step": step, "lr": lr_at(max(step, 1), tc.lr, run.total_steps, run.warmup,
                                                                     tc.schedule, tc.min_lr),
                     "train_loss": sums.loss_sum / sums.seen if sums.seen else None,
                     "train_acc": sums.correct / sums.counted if sums.counted else None,
                     "grad_norm": float(gnorm) if gnorm is not None else None,
                     "images_per_s": (sums.seen - seen_before) / max(time.perf_counter() - t_epoch, 1e-9),
                     "time": time.perf_counter() - t_start}
            if not finished:
                entry["partial"] = True           # stopped inside the epoch (--max-steps); its full line follows
            last_epoch = epoch + 1 == tc.epochs or (tc.max_steps and step >= tc.max_steps)
            if (epoch + 1) % tc.eval_every == 0 or last_epoch:
                ev = task.evaluate(params, cfg, run.ds.test_images, run.ds.test_labels, run.normalize_fn,
                                   tc.eval_batch_size)
                test_acc = ev["accuracy"]
                entry.update(test_loss=ev["loss"], test_acc=test_acc)
            if finished:
                epoch, batch = epoch + 1, 0
            folder.record(entry)
            history.append(entry)
            if "test_acc" in entry and entry["test_acc"] > best:
                best = entry["test_acc"]
                save("best", {"test_accuracy": entry["test_acc"]})
            save("last", {"test_accuracy": entry.get("test_acc")})
            if log and "test_acc" in entry:       # (after the files: a closed output cannot lose the epoch)
                log(f"epoch {entry['epoch']}: train loss {format_figure(entry['train_loss'])} "
                    f"acc {format_figure(entry['train_acc'])} | test loss {entry['test_loss']:.4f} "
                    f"acc {entry['test_acc']:.4f} | {entry['images_per_s']:.0f} img/s")
            if tc.max_steps and step >= tc.max_steps:
                break
    seconds = time.perf_counter() - t_start
    return TrainResult(params, cfg, history, folder.path, test_acc, best, step, seconds)


def train(tc=None, params=None, cfg=None, resume=None, progress=True, log=print, data=None, meta_extra=None,
          on_step=None, task=None):
    """Train a ViT as `tc` says; returns a TrainResult.

    params/cfg: start from these weights (fine-tuning) instead of a fresh init_params(cfg, seed).
    resume: a run folder (or a checkpoint file) to continue exactly where it stopped; its saved settings are used
        (tc may only raise `epochs`, and set `device` and `max_steps`).
    data: an already loaded Dataset (else tc.dataset is loaded).
    on_step: called as on_step(step, loss, params) after every update (lessons draw curves with it).
    task: what is optimized (default ClassificationTask(); minivit.tasks.MPPTask for masked patch prediction).
    """
    start = resolve_run(tc, resume, task, meta_extra, params, cfg)
    run = prepare_run(start, data, progress)          # (takes the run folder's lock)
    try:
        return run_epochs(start, run, progress, log, on_step)
    finally:
        run.folder.close()
