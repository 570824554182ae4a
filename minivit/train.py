"""The training loop: data, augmentation, AdamW (or SGD), schedule, clipping, evaluation, checkpoints, exact resume.

    result = train(TrainConfig(dataset="shapes", epochs=10))      # what `minivit train` calls
    result.params, result.cfg, result.history, result.run_dir

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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from minivit.backend import get_backend, resolve_device, to_numpy
from minivit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minivit.config import get_config
from minivit.data.transforms import augment_batch, mixup
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.model import head_backward, init_params, vit_backward, vit_forward
from minivit.optim import (OPTIMIZERS, SCHEDULES, clip_by_global_norm, lr_at, optimizer_init, optimizer_step,
                           state_from_flat)
from minivit.tree import accumulate


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


@dataclass
class TrainConfig:
    """Every setting of a training run (the command line's flags, one to one). None = per-data-set default."""
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
    d = tc.to_dict()
    for k, v in defaults.items():
        if d[k] is None:
            d[k] = v
    if d["warmup_steps"] is not None and d["warmup_steps"] < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {d['warmup_steps']}")
    for name in ("epochs", "batch_size", "accum_steps", "eval_batch_size"):
        if not isinstance(d[name], int) or d[name] < 1:
            raise ValueError(f"{name} must be a positive integer, got {d[name]!r}")
    if d["batch_size"] % d["accum_steps"]:
        raise ValueError(f"batch_size {d['batch_size']} is not divisible by accum_steps {d['accum_steps']}")
    if d["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {d['optimizer']!r}")
    if d["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {d['schedule']!r}")
    if not d["lr"] > 0:
        raise ValueError(f"lr must be positive, got {d['lr']!r}")
    if d["augment"] not in ("default", "none"):
        raise ValueError(f"augment must be 'default' or 'none', got {d['augment']!r}")
    return TrainConfig(**d)


def make_augment(tc):
    """The Augment policy of a run: the data set's default (or none) with the run's overrides."""
    from minivit.data import Augment, default_augment
    try:
        base = default_augment(tc.dataset) if tc.augment == "default" else Augment()
    except ValueError:
        base = Augment()
    over = {"crop_pad": tc.crop_pad, "flip": tc.flip, "rotate_deg": tc.rotate_deg, "shift": tc.shift,
            "scale": tc.scale, "mixup_alpha": tc.mixup}
    return Augment(**{**asdict(base), **{k: v for k, v in over.items() if v is not None}})


def load_data(tc, image_size, progress=True):
    """The Dataset of a run, resized to the model's input size (`progress`: a bar while shapes are first drawn)."""
    from minivit.data import load_dataset
    opts = {}
    if tc.dataset == "shapes":
        opts = {"n_train": tc.n_train or 20000, "n_test": tc.n_test or 2000, "progress": progress}
    return load_dataset(tc.dataset, data_dir=tc.data_dir, image_size=image_size, **opts)


def dataset_for_checkpoint(data_meta, dataset=None, data_dir=None, image_size=None, n_train=None, n_test=None):
    """The Dataset to evaluate a checkpoint on: `dataset`, else the one its `data` meta names (else shapes), at
    `image_size`, from `data_dir` (default: where the checkpoint's training read it); shapes with n_train / n_test
    images (default: the checkpoint's own draw, else 20000 / 2000, the training default)."""
    from minivit.data import load_dataset
    data_meta = data_meta or {}
    name = dataset or data_meta.get("dataset") or "shapes"
    data_dir = data_dir or recorded_data_dir(data_meta, name)
    own = data_meta.get("dataset") == "shapes"
    opts = {"n_train": n_train or (own and data_meta.get("n_train")) or 20000,
            "n_test": n_test or (own and data_meta.get("n_test")) or 2000} if name == "shapes" else {}
    return load_dataset(name, data_dir=data_dir, image_size=image_size, **opts)


def recorded_data_dir(data_meta, name):
    """The data folder a checkpoint's training read data set `name` from, if it recorded one and it exists here."""
    from minivit.data import _canonical
    recorded = (data_meta or {}).get("data_dir")
    same = _canonical(name) == _canonical((data_meta or {}).get("dataset") or "")
    return recorded if same and recorded and Path(recorded).is_dir() else None


def data_normalizer(tc, ds):
    """(normalize function uint8 -> float32, its description for the checkpoint)."""
    from minivit.data import dataset_stats, normalize
    if tc.normalize == "mean_std":
        mean, std = dataset_stats(ds.name, ds.train_images)
        mean, std = [float(v) for v in np.ravel(mean)], [float(v) for v in np.ravel(std)]
        return (lambda x: normalize(x, "mean_std", mean, std)), {"normalize": "mean_std", "mean": mean, "std": std}
    if tc.normalize != "minus_one_one":
        raise ValueError(f"normalize must be 'minus_one_one' or 'mean_std', got {tc.normalize!r}")
    return (lambda x: normalize(x, "minus_one_one")), {"normalize": "minus_one_one", "mean": None, "std": None}


def normalizer_from_meta(data_meta):
    """The normalize function a checkpoint's `data` entry describes (default: pixels to [-1, 1])."""
    from minivit.data import normalize
    data_meta = data_meta or {}
    if data_meta.get("normalize") == "mean_std":
        return lambda x: normalize(x, "mean_std", data_meta["mean"], data_meta["std"])
    return lambda x: normalize(x, "minus_one_one")


def evaluate(params, cfg, images, labels, normalize_fn, batch_size=500, num_classes=None):
    """Accuracy, mean loss and the confusion matrix (K, K) of `params` on uint8 images (evaluation mode)."""
    xp = get_backend(_device_of(params))
    K = num_classes or cfg.num_classes
    confusion = np.zeros((K, K), dtype=np.int64)
    total_loss = 0.0
    for i in range(0, len(images), batch_size):
        x = xp.asarray(normalize_fn(images[i:i + batch_size]), dtype=params["pos_embed"].dtype)
        y = labels[i:i + batch_size]
        logits, _ = vit_forward(params, x, cfg, keep_cache=False)
        loss, _ = cross_entropy_forward(logits, y)
        total_loss += float(loss) * len(y)
        pred = to_numpy(logits.argmax(axis=1))
        np.add.at(confusion, (y, pred), 1)
    n = max(1, len(images))
    return {"accuracy": float(np.trace(confusion)) / n, "loss": total_loss / n, "confusion": confusion}


def _device_of(params):
    from minivit.backend import get_xp
    return "cpu" if get_xp(params["pos_embed"]) is np else "gpu"


def resolve_model(tc, ds=None, cfg=None):
    """The ViTConfig of a run: `cfg` if given, else the named config with the data's classes and channels."""
    if cfg is None:
        cfg = get_config(tc.model, **tc.model_overrides)
        if ds is not None:
            cfg = cfg.replace(num_classes=ds.num_classes, channels=ds.image_shape[2])
    if tc.image_size:
        cfg = cfg.replace(image_size=tc.image_size)
    return cfg


def loss_and_grads(params, cfg, x, targets, tc, step, freeze_backbone=False):
    """Forward + loss + backward of one update, accumulated over tc.accum_steps micro-batches.

    Returns (mean loss, grads, logits). Each micro-batch's loss gradient is scaled by micro/B, so the sum of the
    micro-batch gradients is the gradient of the mean loss over the whole batch.
    """
    B = x.shape[0]
    micro = B // tc.accum_steps
    xp = get_backend(_device_of(params))
    total_loss, grads, all_logits = 0.0, None, []
    for m in range(tc.accum_steps):
        sl = slice(m * micro, (m + 1) * micro)
        rng = np.random.default_rng([tc.seed, 2, step, m])
        logits, cache = vit_forward(params, x[sl], cfg, train=not freeze_backbone, rng=rng)
        loss, ce_cache = cross_entropy_forward(logits, targets[sl], tc.label_smoothing)
        dlogits = cross_entropy_backward(micro / B, ce_cache)                 # (micro, K)
        if freeze_backbone:
            g = head_backward(dlogits, cache)[1]                               # only the head learns
        else:
            _, g = vit_backward(dlogits, cache)
        grads = accumulate(grads, g)                                           # sum over micro-batches
        total_loss += float(loss) * micro / B
        all_logits.append(logits)
    return total_loss, grads, xp.concatenate(all_logits)


class ClassificationTask:
    """What `train` optimizes: the supervised classification loss. Other objectives (masked patch prediction,
    minivit.mpp) provide the same four members, and the loop (batches, schedule, checkpoints, resume) is shared.

        name                                   stored in the checkpoint's meta["task"]
        prepare(params, cfg, seed) -> params   add the task's own parameters (none here)
        loss_and_grads(params, cfg, x, y, tc, step, soft_targets=None) -> (loss, grads, correct, counted)
        evaluate(params, cfg, images, labels, normalize_fn, batch_size) -> {"accuracy", "loss", ...}
    """
    name = "classification"

    def prepare(self, params, cfg, seed):
        return params

    def loss_and_grads(self, params, cfg, x, y, tc, step, soft_targets=None):
        targets = y if soft_targets is None else soft_targets                  # (B,) labels or (B, K) mixup
        loss, grads, logits = loss_and_grads(params, cfg, x, targets, tc, step, tc.freeze_backbone)
        pred = to_numpy(logits.argmax(axis=1))
        return loss, grads, int((pred == y).sum()), len(y)

    def evaluate(self, params, cfg, images, labels, normalize_fn, batch_size):
        return evaluate(params, cfg, images, labels, normalize_fn, batch_size)


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


def train(tc=None, params=None, cfg=None, resume=None, progress=True, log=print, data=None, meta_extra=None,
          on_step=None, task=None):
    """Train a ViT as `tc` says; returns a TrainResult.

    params/cfg: start from these weights (fine-tuning) instead of a fresh init_params(cfg, seed).
    resume: a run folder (or a checkpoint file) to continue exactly where it stopped; its saved settings are used
        (tc may only raise `epochs`).
    data: an already loaded Dataset (else tc.dataset is loaded).
    on_step: called as on_step(step, loss, params) after every update (lessons draw curves with it).
    task: what is optimized (default ClassificationTask(); see minivit.mpp for masked patch prediction).
    """
    opt_flat, start = None, {"step": 0, "epoch": 0, "batch": 0}
    best, history = -1.0, []
    if resume is not None:
        ckpt = Path(resume)
        ckpt = ckpt / "last.npz" if ckpt.is_dir() else ckpt
        params, cfg, meta, opt_flat = load_checkpoint(ckpt, device="cpu", with_optimizer=True)   # device: below
        if "train" not in meta or opt_flat is None:
            raise CheckpointError(f"{ckpt} has no training state to resume (a weights-only checkpoint?)")
        saved = TrainConfig.from_dict(meta["train"])
        if tc is not None and tc.epochs and tc.epochs > saved.epochs:
            saved.epochs = tc.epochs
        if tc is not None and tc.device:
            saved.device = tc.device
        saved.max_steps = (tc.max_steps or 0) if tc is not None else 0   # a resumed run goes on to the end by default
        saved.out = str(ckpt.parent.resolve())   # and on in the folder it is resumed from (it may have moved)
        saved_data = meta.get("data", {})     # the data it read (older runs and fine-tunes left these to defaults)
        if not (saved.data_dir and Path(saved.data_dir).is_absolute()):
            saved.data_dir = recorded_data_dir(saved_data, saved.dataset) or saved.data_dir
        if saved.dataset == "shapes":
            saved.n_train = saved.n_train or saved_data.get("n_train")
            saved.n_test = saved.n_test or saved_data.get("n_test")
        if task is None and meta.get("task") == "mpp":             # a masked patch prediction run goes on as one
            from minivit.mpp import task_from_meta
            task = task_from_meta(meta)
            meta_extra = dict(meta_extra or {}, mpp=meta["mpp"])
        # what a checkpoint's meta holds beyond the training state (e.g. finetuned_from) goes on into the new ones
        meta_extra = dict({k: v for k, v in meta.items() if k not in _TRAINING_META}, **(meta_extra or {}))
        tc = saved
        start = meta["progress"]
        best = meta.get("metrics", {}).get("best_accuracy", -1.0)
        resumed_from = {"path": str(ckpt), "step": start["step"]}
        run_dir = ckpt.parent
        log_path = run_dir / "log.jsonl"
        if log_path.exists():   # the log as it was at the checkpoint (a later line, e.g. of a crash, is dropped)
            history = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            history = [h for h in history if h.get("step", 0) <= start["step"]]
    task = task or ClassificationTask()
    tc = resolve_defaults(tc or TrainConfig())
    if tc.data_dir:            # recorded as an absolute path: a resume from another folder reads the same data
        tc.data_dir = str(Path(tc.data_dir).resolve())
    device = resolve_device(tc.device)
    xp = get_backend(device)
    if resume is not None:     # onto the run's device: the saved one, or the one asked for now
        from minivit.backend import to_device
        params = to_device(params, device)
    if data is None:   # load at the model's input size (shapes is drawn at 64 and reduced, never enlarged)
        size = tc.image_size or (cfg.image_hw[0] if cfg is not None else get_config(tc.model).image_hw[0])
        data = load_data(tc, size, progress)
    ds = data
    cfg = resolve_model(tc, ds, cfg)
    if ds.image_shape[:2] != cfg.image_hw:
        from minivit.data import resize_images
        H, W = cfg.image_hw
        if H != W:
            raise ValueError(f"data are {ds.image_shape[0]}x{ds.image_shape[1]} and the model needs {H}x{W}")
        ds.train_images, ds.test_images = resize_images(ds.train_images, H), resize_images(ds.test_images, H)
    if ds.image_shape[2] != cfg.channels:
        raise ValueError(f"the data have {ds.image_shape[2]} channel(s) but the model expects {cfg.channels}")
    if ds.num_classes != cfg.num_classes and task.name == "classification":
        raise ValueError(f"the data have {ds.num_classes} classes but the model's head has {cfg.num_classes}; "
                         f"fine-tune with a new head (--new-head / --num-classes)")
    if params is None:
        params = task.prepare(init_params(cfg, seed=tc.seed, device=device), cfg, tc.seed)
    elif resume is None:       # a private copy: training updates arrays in place, the caller's stay as they were
        from minivit.backend import to_device
        from minivit.tree import tree_map
        params = task.prepare(tree_map(lambda a: xp.array(a, copy=True), to_device(to_numpy(params), device)),
                              cfg, tc.seed)
    trainable = {"head": params["head"]} if tc.freeze_backbone else params
    opt_state = state_from_flat(opt_flat, trainable) if opt_flat else optimizer_init(trainable, tc.optimizer)
    normalize_fn, data_meta = data_normalizer(tc, ds)
    data_meta.update({"dataset": ds.name, "classes": list(ds.classes), "image_size": list(cfg.image_hw)})
    if ds.name == "shapes":    # its size is a choice: eval, inspect and fewshot draw the same split by default
        data_meta.update(n_train=len(ds.train_images), n_test=len(ds.test_images))
    if tc.data_dir:            # and they read the data from where training did, unless told otherwise
        data_meta["data_dir"] = tc.data_dir
    aug = make_augment(tc)

    n = len(ds.train_images)
    steps_per_epoch = n // tc.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {n} images, fewer than one batch of {tc.batch_size}")
    total_steps = tc.epochs * steps_per_epoch
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(0.05 * total_steps)
    if resume is None:
        run_dir = Path(tc.out) if tc.out else _default_run_dir(tc)
    run_dir.mkdir(parents=True, exist_ok=True)
    from minivit.fileio import atomic_write_json
    atomic_write_json(run_dir / "config.json", {"train": tc.to_dict(), "model": cfg.to_dict(), "data": data_meta})
    log_path = run_dir / "log.jsonl"
    first_write = True

    def clear_what_is_not_this_run():
        """Before this run writes its first file (not before: a run that fails at once destroys nothing): a new
        run removes an earlier run's log and checkpoints from the folder; a resume from an earlier checkpoint cuts
        the log back to it and removes a best.npz from the abandoned updates after it."""
        nonlocal first_write
        if not first_write:
            return
        first_write = False
        if resume is None:
            for name in ("log.jsonl", "best.npz", "last.npz"):
                (run_dir / name).unlink(missing_ok=True)
            return
        from minivit.fileio import atomic_write_text
        atomic_write_text(log_path, "".join(json.dumps(h) + "\n" for h in history))
        best_path = run_dir / "best.npz"
        if best_path.exists() and _checkpoint_step(best_path) > start["step"]:
            best_path.unlink()

    step, epoch, batch = start["step"], start["epoch"], start["batch"]
    # the running sums of the epoch in progress: a run resumed mid-epoch goes on with the saved ones
    resumed_sums = dict(start.get("epoch_sums") or {}) if batch else {}
    gnorm = None
    last_good = resumed_from if resume is not None else {"path": None, "step": None}

    def save(name, metrics=None):
        clear_what_is_not_this_run()
        sums = {"seen": int(seen), "correct": int(correct), "counted": int(counted), "loss_sum": float(loss_sum)}
        meta = {"task": task.name, "train": tc.to_dict(),
                "progress": {"step": step, "epoch": epoch, "batch": batch, "seed": tc.seed, "epoch_sums": sums},
                "data": data_meta, "metrics": dict(metrics or {}, best_accuracy=best)}
        meta.update(meta_extra or {})
        path = run_dir / f"{name}.npz"
        save_checkpoint(path, params, cfg, opt_state, meta)
        if name == "last":
            last_good.update(path=str(path), step=step)
        return path

    def record(entry):
        clear_what_is_not_this_run()
        history.append(entry)
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    if progress:
        from tqdm import tqdm
    t_start = time.perf_counter()
    test_acc = history[-1]["test_acc"] if history and "test_acc" in history[-1] else float("nan")
    with _StopFlag() as stop:
        while epoch < tc.epochs:
            order = np.random.default_rng([tc.seed, 0, epoch]).permutation(n)   # (n,) shuffle of this epoch
            bar = tqdm(total=steps_per_epoch, initial=batch, desc=f"epoch {epoch + 1}/{tc.epochs}",
                       leave=True, dynamic_ncols=True, disable=not progress) if progress else None
            seen, correct, counted = (resumed_sums.pop(k, 0) for k in ("seen", "correct", "counted"))
            loss_sum = float(resumed_sums.pop("loss_sum", 0.0))
            seen_before = seen                            # images of this epoch before a resume (not timed here)
            step_before = step
            t_epoch = time.perf_counter()
            while batch < steps_per_epoch:
                if stop.requested:
                    path = save("last")
                    if bar:
                        bar.close()
                    raise TrainingInterrupted(
                        f"interrupted at update {step} (epoch {epoch + 1}, batch {batch}); saved {path}; "
                        f"resume with: minivit train --resume {run_dir}", path)
                if tc.max_steps and step >= tc.max_steps:
                    break
                idx = order[batch * tc.batch_size:(batch + 1) * tc.batch_size]            # (B,)
                rng = np.random.default_rng([tc.seed, 1, step])
                x = normalize_fn(augment_batch(ds.train_images[idx], aug, rng))            # (B, H, W, C) float32
                y = ds.train_labels[idx]                                                   # (B,) int64, host
                soft = None
                if aug.mixup_alpha > 0:
                    x, soft = mixup(x, y, aug.mixup_alpha, rng, cfg.num_classes)          # soft (B, K)
                    soft = xp.asarray(soft)
                x = xp.asarray(x, dtype=params["pos_embed"].dtype)
                loss, grads, n_correct, n_counted = task.loss_and_grads(params, cfg, x, y, tc, step, soft)
                if not math.isfinite(loss):
                    where = (f"the last good checkpoint is {last_good['path']} (update {last_good['step']})"
                             if last_good["path"] else "no checkpoint was written yet")
                    raise TrainingError(f"the loss became {loss} at update {step + 1} (epoch {epoch + 1}, batch "
                                        f"{batch + 1}); {where}. Try a lower --lr or --clip-norm 1.")
                gnorm = clip_by_global_norm(grads, tc.clip_norm)
                lr = lr_at(step + 1, tc.lr, total_steps, warmup, tc.schedule, tc.min_lr)
                optimizer_step(trainable, grads, opt_state, lr, kind=tc.optimizer, beta1=tc.beta1, beta2=tc.beta2,
                               weight_decay=tc.weight_decay, momentum=tc.momentum)
                step += 1
                batch += 1
                correct += n_correct
                counted += n_counted
                seen += len(y)
                loss_sum += loss * len(y)
                if on_step is not None:
                    on_step(step, loss, params)
                if tc.save_every and step % tc.save_every == 0:
                    save("last")
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / max(counted, 1):.3f}", lr=f"{lr:.2e}",
                                    img_s=f"{(seen - seen_before) / (time.perf_counter() - t_epoch):.0f}",
                                    refresh=False)
            if bar:
                bar.close()
            finished = batch >= steps_per_epoch
            if not finished and step == step_before:      # resumed at its --max-steps: nothing done, nothing to log
                break
            entry = {"epoch": epoch + 1, "step": step, "lr": lr_at(max(step, 1), tc.lr, total_steps, warmup,
                                                                     tc.schedule, tc.min_lr),
                     "train_loss": loss_sum / seen if seen else None,
                     "train_acc": correct / counted if counted else None,
                     "grad_norm": float(gnorm) if gnorm is not None else None,
                     "images_per_s": (seen - seen_before) / max(time.perf_counter() - t_epoch, 1e-9),
                     "time": time.perf_counter() - t_start}
            if not finished:
                entry["partial"] = True           # stopped inside the epoch (--max-steps); its full line follows
            last_epoch = epoch + 1 == tc.epochs or (tc.max_steps and step >= tc.max_steps)
            if (epoch + 1) % tc.eval_every == 0 or last_epoch:
                ev = task.evaluate(params, cfg, ds.test_images, ds.test_labels, normalize_fn, tc.eval_batch_size)
                test_acc = ev["accuracy"]
                entry.update(test_loss=ev["loss"], test_acc=test_acc)
            if finished:
                epoch, batch = epoch + 1, 0
            record(entry)
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
    return TrainResult(params, cfg, history, run_dir, test_acc, best, step, seconds)

