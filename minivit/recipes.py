"""Runs built on minivit.train.train: fine-tuning a checkpoint, masked patch prediction pre-training, and the
base model the lessons share.

    result = run_finetune(params, cfg, meta, {"image_size": 48}, source="runs/a/last.npz")   # `minivit finetune`
    result = run_pretrain_mpp(TrainConfig(dataset="shapes", epochs=5))                       # `minivit pretrain-mpp`
    params, cfg, source = lesson_base_model(out_dir, quick)        # lesson 10's model, or its recipe run again

Each is a recipe: settings and a task handed to `train`, which does the rest (progress, logs, atomic checkpoints,
exact resume).
"""
from pathlib import Path

from minivit.checkpoint import CheckpointError, load_checkpoint
from minivit.data import load_dataset
from minivit.data.checkpoint_data import dataset_for_checkpoint, recorded_data_dir
from minivit.finetune import prepare_finetune
from minivit.tasks import MPPTask, task_from_meta
from minivit.train import TrainConfig, train

# The paper's fine-tuning recipe (section 3.2 and appendix B.1.1), scaled to a small CPU run.
FINETUNE_DEFAULTS = dict(optimizer="sgd", momentum=0.9, weight_decay=0.0, clip_norm=1.0, schedule="cosine",
                         lr=0.01, label_smoothing=0.0, epochs=3, batch_size=128)
# Training settings `minivit pretrain-mpp` uses unless a flag says otherwise: no label smoothing of colour targets.
PRETRAIN_DEFAULTS = dict(label_smoothing=0.0)


def run_finetune(params, cfg, meta, settings, source, num_classes=None, resample="linear", new_head=False,
                 log=print, **train_kwargs):
    """Fine-tune a loaded checkpoint (params, cfg, meta) with the paper's recipe -> TrainResult.

    settings: the TrainConfig fields asked for (the rest: FINETUNE_DEFAULTS, then the per-data-set defaults);
    the data set, its folder and the normalization default to the checkpoint's. The position embeddings are
    resampled to settings["image_size"] with `resample`; the head is replaced by a zero one when the classes
    change, with new_head, or for a masked patch prediction checkpoint. `log` gets one line saying what is done.
    The run records the data it read (its resume and eval read them again) and meta["finetuned_from"] = source.
    """
    data_meta = meta.get("data", {})
    settings = {**FINETUNE_DEFAULTS, **settings}
    settings.setdefault("dataset", data_meta.get("dataset", "shapes"))
    if "normalize" not in settings and data_meta.get("normalize"):
        settings["normalize"] = data_meta["normalize"]
    size = settings.get("image_size") or cfg.image_hw[0]
    ds = dataset_for_checkpoint(data_meta, settings["dataset"], settings.get("data_dir"), size,
                                settings.get("n_train"), settings.get("n_test"))
    data_dir = settings.get("data_dir") or recorded_data_dir(data_meta, settings["dataset"])
    if data_dir:
        settings["data_dir"] = data_dir
    if ds.name == "shapes":
        settings["n_train"], settings["n_test"] = len(ds.train_images), len(ds.test_images)
    num_classes = num_classes or ds.num_classes
    if num_classes != ds.num_classes:
        raise ValueError(f"--num-classes {num_classes} but {settings['dataset']} has {ds.num_classes} classes")
    fresh_head = new_head or meta.get("task") == "mpp" or num_classes != cfg.num_classes
    params, cfg = prepare_finetune(params, cfg, size, num_classes, resample, new_head, settings.get("seed") or 0)
    if log:
        log(f"fine-tuning {source} at {size}x{size} (grid {cfg.grid[0]}x{cfg.grid[1]}, position embeddings "
            f"{'re-initialized' if resample == 'none' else 'resampled ' + resample}), "
            f"{'new zero head, ' if fresh_head else ''}"
            f"{'backbone frozen' if settings.get('freeze_backbone') else 'all weights trained'}")
    meta_extra = dict(train_kwargs.pop("meta_extra", None) or {}, finetuned_from=str(source), resample=resample)
    return train(TrainConfig(**settings), params=params, cfg=cfg, data=ds, log=log, meta_extra=meta_extra,
                 **train_kwargs)


def run_pretrain_mpp(tc=None, mask_rate=0.5, replace_rates=(0.8, 0.1, 0.1), bits=3, resume=None, **train_kwargs):
    """Masked patch prediction pre-training with minivit.train.train -> TrainResult (`minivit pretrain-mpp`).

    Checkpoints get meta["task"] = "mpp" and meta["mpp"] = the rates; they hold mask_token and mpp_head beside
    the ViT's parameters. `resume` continues such a run with the rates stored in its checkpoint.
    """
    task = MPPTask(mask_rate, replace_rates, bits)
    if resume is not None:
        ckpt = Path(resume)
        ckpt = ckpt / "last.npz" if ckpt.is_dir() else ckpt
        _, _, meta = load_checkpoint(ckpt)
        if meta.get("task") != "mpp":
            raise CheckpointError(f"{ckpt} is not a masked patch prediction run (task {meta.get('task')!r})")
        task = task_from_meta(meta)
    meta_extra = dict(train_kwargs.pop("meta_extra", None) or {}, mpp=task.settings())
    return train(tc, resume=resume, task=task, meta_extra=meta_extra, **train_kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The lessons' base model.

LESSON_MODEL = dict(patch_size=8, width=64, depth=3, heads=4, mlp_dim=128)   # overrides of 'shapes-small'


def lesson_base_model(out_dir, quick, seed=0, epochs=None, run_name="base_run"):
    """-> (params, cfg, source): lesson 10's final weights if its run is in out_dir (<out_dir>/10_run/last.npz),
    else a shorter run of lesson 10's recipe trained here, into <out_dir>/<run_name> (epochs: default 2 quick, 4
    else); `source` says which, in words."""
    ckpt = Path(out_dir) / "10_run" / "last.npz"
    if ckpt.exists():
        params, cfg, _ = load_checkpoint(ckpt)
        return params, cfg, f"lesson 10's model ({ckpt})"
    n_train, n_test, batch = (400, 200, 32) if quick else (5000, 500, 64)
    epochs = epochs or (2 if quick else 4)
    ds = load_dataset("shapes", n_train=n_train, n_test=n_test, image_size=32, progress=not quick)
    tc = TrainConfig(dataset="shapes", model="shapes-small", epochs=epochs, batch_size=batch, lr=2e-3, seed=seed,
                     model_overrides=dict(LESSON_MODEL), out=str(Path(out_dir) / run_name))
    r = train(tc, data=ds, progress=False, log=None)
    return r.params, r.cfg, f"a model trained here ({epochs} epochs; run lesson 10 first to use its model)"
