"""The command line: `minivit COMMAND ...` (or `python -m minivit COMMAND ...`).

Each command is a small function that parses nothing itself: `build_parser` declares every flag in one place,
and the command functions call the package. Model code never prints; this module does.
"""
import argparse
import os
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np

from minivit.backend import get_backend, to_device, tune_allocator
from minivit.bench import add_bench_arguments, run_bench
from minivit.checkpoint import load_checkpoint
from minivit.config import get_config
from minivit.data import download
from minivit.data.checkpoint_data import dataset_for_checkpoint, normalizer_from_meta
from minivit.data.images import load_image_files
from minivit.fewshot import fewshot_model, format_table
from minivit.figures import ANALYSES, inspect_model
from minivit.finetune import resize_model
from minivit.gradcheck import gradcheck_model
from minivit.inference import predict_files, read_labels
from minivit.pretrained import checkpoint_format, load_pretrained
from minivit.ranges import (IMAGE_SIZE, MODEL_RANGES, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, POSITIVE_FLOAT, SEED,
                            TRAIN_RANGES, Range, float_list, int_list)
from minivit.recipes import PRETRAIN_DEFAULTS, run_finetune, run_pretrain_mpp
from minivit.reference import use_reference
from minivit.tasks import evaluate
from minivit.threads import set_threads
from minivit.train import TrainConfig, TrainingInterrupted, format_figure, train

REFERENCE_HELP = ("run the model on the reference layer pairs of layers.py/attention.py instead of the fast twins "
                  "(slower; same results to rounding)")


def _use_reference(args):
    """--reference: MINIVIT_REFERENCE=1 before any work, so the model runs the reference pairs (minivit.model)."""
    if getattr(args, "reference", False):
        os.environ["MINIVIT_REFERENCE"] = "1"


def cmd_gradcheck(args):
    """Whole-model gradient check: one row per tensor, exit status 1 on any failure."""
    cfg = get_config(args.config, pooling=args.pooling, gelu=args.gelu)
    if args.dropout:
        cfg = cfg.replace(dropout=0.1, attn_dropout=0.1, drop_path=0.1)
    print(f"gradient check of the whole ViT, config {args.config!r}: {cfg.depth} blocks, width {cfg.width}, "
          f"{cfg.heads} heads, pooling {cfg.pooling}, GELU {cfg.gelu}, "
          f"dropout {'on (fixed mask)' if args.dropout else 'off'}")
    path = "the reference pairs (layers.py, attention.py)" if use_reference() else "the fast twins (minivit/fast)"
    print(f"layers: {path}; float64 central differences (eps {args.eps:g}) on the loss, relative error "
          f"||num - ana|| / max(||num||, ||ana||), tolerance {args.tol:g}\n")
    results = gradcheck_model(cfg, seed=args.seed, train=args.dropout, eps=args.eps, max_coords=args.max_coords,
                              device=args.device)
    width = max(len(r.name) for r in results)
    print(f"{'tensor':<{width}}  {'shape':<16} {'checked':>7}  {'rel error':>10}  result")
    failed = 0
    for r in results:
        ok = r.passed(args.tol)
        failed += not ok
        print(f"{r.name:<{width}}  {str(r.shape):<16} {r.checked:>7}  {r.rel_error:>10.2e}  {'pass' if ok else 'FAIL'}")
    worst = max(results, key=lambda r: r.rel_error)
    print(f"\n{len(results)} tensors, {failed} failed; worst {worst.name} at {worst.rel_error:.2e}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------------
# train / eval / predict / download

def _train_settings(args):
    """The TrainConfig fields the flags give (those not given are left out: per-data-set defaults apply)."""
    over = {k: getattr(args, k) for k in ("width", "depth", "heads", "mlp_dim", "patch_size", "pooling", "gelu",
                                           "dropout", "attn_dropout", "drop_path") if getattr(args, k) is not None}
    keys = [f for f in TrainConfig.__dataclass_fields__ if f != "model_overrides"]
    kw = {k: getattr(args, k) for k in keys if hasattr(args, k) and getattr(args, k) is not None}
    return dict(model_overrides=over, **kw)


def _train_config(args):
    """TrainConfig from parsed flags (None where a flag was not given: per-data-set defaults apply)."""
    return TrainConfig(**_train_settings(args))


def _setup_runtime(args):
    tune_allocator()                  # keep freed memory in the process (glibc only; a no-op elsewhere)
    if getattr(args, "threads", None):
        set_threads(args.threads)
    get_backend(args.device)          # fails early, with the install hint, if the GPU is asked for but unusable


def _run_training(args, run=None):
    """Run `run()` (default: train with the flags' settings) and print its outcome; Ctrl-C: exit status 130."""
    _setup_runtime(args)
    try:
        result = run() if run else train(_train_config(args), resume=args.resume, progress=not args.quiet)
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    last = result.history[-1] if result.history else {}
    print(f"done: {result.steps} updates in {result.seconds:.1f} s; test accuracy {result.test_accuracy:.4f} "
          f"(best {result.best_accuracy:.4f}); train accuracy {format_figure(last.get('train_acc'))}")
    print(f"run folder: {result.run_dir} (last.npz, best.npz, log.jsonl, config.json)")
    return 0


def cmd_train(args):
    """Train a ViT (default: the embedded shapes data set and a small model that trains in minutes)."""
    return _run_training(args)


def _load_any(path, device=None):
    """(params, cfg, meta) from a minivit checkpoint, an original ViT .npz or a timm .safetensors file.

    A minivit checkpoint is an .npz with a 'meta' entry; any other .npz is read in the original ViT layout
    (minivit.pretrained), whose weights expect pixels in [-1, 1].
    """
    if checkpoint_format(path) == "npz" and "meta" in read_npz_keys(path):
        return load_checkpoint(path, device=device)
    loaded = load_pretrained(path)
    return to_device(loaded.params, device), loaded.cfg, {"data": {"normalize": "minus_one_one"},
                                                          "source": str(path)}


def _refuse_pretraining_head(meta, path, command):
    """eval and predict need a trained classification head; a masked patch prediction run has a zero one."""
    if meta.get("task") == "mpp":
        raise ValueError(f"{path} is a masked patch prediction checkpoint: its classification head is untrained "
                         f"(all zeros), so {command} would show chance; fine-tune it first: minivit finetune --from "
                         f"{path}")


def _check_channels(ds, cfg):
    if ds.image_shape[2] != cfg.channels:
        raise ValueError(f"{ds.name} has {ds.image_shape[2]} channel(s) but the checkpoint's model expects "
                         f"{cfg.channels}")


def read_npz_keys(path):
    """The entry names of an .npz archive, without reading the arrays."""
    try:
        with zipfile.ZipFile(path) as z:
            return {n[:-4] if n.endswith(".npy") else n for n in z.namelist()}
    except (zipfile.BadZipFile, OSError):
        return set()


def _at_image_size(params, cfg, size, method):
    if not size or tuple(cfg.image_hw) == (size, size):
        return params, cfg
    return resize_model(params, cfg, size, method)


def cmd_eval(args):
    """Accuracy and a per-class confusion summary of a checkpoint on a data set's test split."""
    _setup_runtime(args)
    params, cfg, meta = _load_any(args.checkpoint, args.device)
    _refuse_pretraining_head(meta, args.checkpoint, "eval")
    params, cfg = _at_image_size(params, cfg, args.image_size, args.resample)
    data_meta = meta.get("data", {})
    ds = dataset_for_checkpoint(data_meta, args.dataset, args.data_dir, cfg.image_hw[0], args.n_train, args.n_test)
    name = ds.name
    _check_channels(ds, cfg)
    if ds.num_classes != cfg.num_classes:
        raise ValueError(f"{name} has {ds.num_classes} classes but the checkpoint's head has {cfg.num_classes}")
    trained_on = data_meta.get("classes")
    if trained_on and list(trained_on) != list(ds.classes):
        print(f"warning: {name}'s classes {list(ds.classes)} are not the ones the checkpoint was trained on "
              f"({trained_on}); class k of the data is scored as the model's class k", file=sys.stderr)
    ev = evaluate(params, cfg, ds.test_images, ds.test_labels, normalizer_from_meta(data_meta), args.batch_size)
    conf = ev["confusion"]
    if ev["nonfinite"]:
        print(f"warning: {ev['nonfinite']} of {len(ds.test_labels)} images got NaN or infinite logits (counted as "
              f"wrong, left out of the table): the model overflows on them", file=sys.stderr)
    print(f"{args.checkpoint} on {name} test split ({len(ds.test_labels)} images, {cfg.image_hw[0]}x"
          f"{cfg.image_hw[1]}): accuracy {ev['accuracy']:.4f}, loss {ev['loss']:.4f}\n")
    width = max(len(c) for c in ds.classes)
    print(f"{'class':<{width}}  {'images':>6}  {'accuracy':>8}  most often mistaken for")
    for k, cname in enumerate(ds.classes):
        row = conf[k].copy()
        total = int(row.sum())
        acc = row[k] / total if total else float("nan")
        row[k] = 0
        worst = int(row.argmax())
        mistake = f"{ds.classes[worst]} ({row[worst]})" if row[worst] else "-"
        print(f"{cname:<{width}}  {total:>6}  {acc:>8.4f}  {mistake}")
    return 0


def cmd_predict(args):
    """Top-k classes with probabilities for image files."""
    _setup_runtime(args)
    params, cfg, meta = _load_any(args.checkpoint, args.device)
    _refuse_pretraining_head(meta, args.checkpoint, "predict")
    params, cfg = _at_image_size(params, cfg, args.image_size, args.resample)
    data_meta = meta.get("data", {})
    classes = data_meta.get("classes")
    if args.labels:
        classes = read_labels(args.labels, cfg.num_classes)
    for path, top in predict_files(params, cfg, args.images, normalizer_from_meta(data_meta), classes, args.top_k):
        print(path)
        for name, p in top:
            print(f"  {p:7.2%}  {name}")
    return 0


def cmd_finetune(args):
    """Fine-tune a checkpoint at a new resolution with the paper's recipe (SGD + momentum, cosine, clipping)."""
    if args.resume:
        return _run_training(args)
    if not args.from_:
        raise ValueError("finetune needs --from CHECKPOINT (or --resume RUN_DIR)")
    if args.out and Path(args.out).resolve() == Path(args.from_).resolve().parent:
        raise ValueError(f"--out {args.out} is the folder of the checkpoint to fine-tune from: the fine-tuning run "
                         f"would replace it; choose another --out")
    params, cfg, meta = _load_any(args.from_)
    return _run_training(args, lambda: run_finetune(params, cfg, meta, _train_settings(args), args.from_,
                                                    args.num_classes, args.resample, args.new_head,
                                                    progress=not args.quiet))


def cmd_inspect(args):
    """The paper's analysis figures for a checkpoint, as PNG files."""
    _setup_runtime(args)
    params, cfg, meta = _load_any(args.checkpoint, args.device)
    data_meta = meta.get("data", {})
    if args.image:
        images = load_image_files(args.image, cfg.image_hw, cfg.channels)
        source = f"{len(images)} image file(s)"
    else:
        ds = dataset_for_checkpoint(data_meta, args.dataset, args.data_dir, cfg.image_hw[0], args.n_train,
                                    args.n_test)
        _check_channels(ds, cfg)
        images = ds.test_images[:args.num_images]
        source = f"the first {len(images)} test images of {ds.name}"
    analyses = ANALYSES if not args.only else [a.strip() for a in args.only.split(",")]
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "inspect"
    results = inspect_model(params, cfg, images, normalizer_from_meta(data_meta), out, analyses)
    print(f"{args.checkpoint}: {cfg.depth} layers, {cfg.heads} heads, grid {cfg.grid[0]}x{cfg.grid[1]}; "
          f"attention from {source}")
    for name, (path, numbers) in results.items():
        extra = ""
        if name == "distance":
            d = numbers["distance"]
            extra = "  (mean distance per layer: " + ", ".join(f"{v:.1f}" for v in np.nanmean(d, axis=1)) + " px)"
        print(f"  {name:<9} {path}{extra}")
    return 0


def cmd_pretrain_mpp(args):
    """Masked patch prediction pre-training (the paper's section 4.6) with the training loop's machinery."""
    rates = tuple(args.replace_rates)
    _setup_runtime(args)
    try:
        tc = TrainConfig(**{**PRETRAIN_DEFAULTS, **_train_settings(args)})
        result = run_pretrain_mpp(tc, args.mask_rate, rates, args.colour_bits, resume=args.resume,
                                  progress=not args.quiet)
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    print(f"done: {result.steps} updates in {result.seconds:.1f} s; colour accuracy on corrupted test patches "
          f"{result.test_accuracy:.4f}")
    print(f"run folder: {result.run_dir}; fine-tune it with: minivit finetune --from {result.run_dir}/last.npz")
    return 0


def cmd_fewshot(args):
    """Few-shot linear evaluation of frozen features (closed-form regularized least squares, as big_vision)."""
    _setup_runtime(args)
    params, cfg, meta = _load_any(args.checkpoint, args.device)
    data_meta = meta.get("data", {})
    ds = dataset_for_checkpoint(data_meta, args.dataset, args.data_dir, cfg.image_hw[0], args.n_train, args.n_test)
    _check_channels(ds, cfg)
    shots = tuple(args.shots)
    rows = fewshot_model(params, cfg, ds, normalizer_from_meta(data_meta), shots, tuple(range(args.seeds)),
                         args.l2, args.batch_size, args.representation)
    print(format_table(rows, f"few-shot linear probe of {args.checkpoint} on {ds.name} ({args.representation} "
                             f"features, l2 {args.l2:g}, {args.seeds} seeds; test split of {len(ds.test_labels)})"))
    return 0


def cmd_bench(args):
    """The benchmark (minivit/bench/): step times against the GEMM floor, the matmul peak and PyTorch eager."""
    return run_bench(args)


def cmd_download(args):
    """Fetch an official data set archive and verify its pinned SHA-256."""
    folder = download(args.name, data_dir=args.data_dir, progress=not args.quiet)
    print(f"{args.name}: verified files in {folder}")
    return 0


def add_model_args(p):
    g = p.add_argument_group("model (a named config plus overrides)")
    g.add_argument("--model", default=None, help="named config: shapes-small, mnist-tiny, cifar-small, vit-ti16, "
                                                 "vit-s16, vit-b16, ... (default: per data set)")
    for flag, what in [("--width", "D"), ("--depth", "blocks"), ("--heads", "nh"), ("--mlp-dim", "M"),
                       ("--patch-size", "P"), ("--dropout", "dropout after embeddings and dense layers"),
                       ("--attn-dropout", "dropout on attention probabilities"),
                       ("--drop-path", "stochastic depth rate of the last block")]:
        g.add_argument(flag, type=MODEL_RANGES[flag[2:].replace("-", "_")], default=None, help=what)
    g.add_argument("--pooling", choices=["token", "gap"], default=None)
    g.add_argument("--gelu", choices=["tanh", "exact"], default=None)
    g.add_argument("--image-size", type=IMAGE_SIZE, default=None, help="input size (data resized to it)")


def add_data_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help="shapes (embedded, default), mnist, fashion-mnist, cifar10, cifar100, or folder:PATH")
    g.add_argument("--data-dir", default=None, help="where data sets live (default: data/ in a source checkout, "
                                                    "else ~/.cache/minivit; or $MINIVIT_DATA)")
    g.add_argument("--n-train", type=POSITIVE, default=None, help="shapes: training images (default 20000)")
    g.add_argument("--n-test", type=POSITIVE, default=None, help="shapes: test images (default 2000)")


def add_runtime_args(p):
    p.add_argument("--device", choices=["cpu", "gpu"], default=None, help="default: $MINIVIT_DEVICE or cpu")
    p.add_argument("--threads", type=POSITIVE, default=None, help="BLAS threads (default: the library's own choice)")
    p.add_argument("--reference", action="store_true", help=REFERENCE_HELP)


def add_optim_args(p, sgd_default=False):
    g = p.add_argument_group("optimization (None: per-data-set default, see README)")
    g.add_argument("--epochs", type=POSITIVE, default=None)
    g.add_argument("--max-steps", type=NON_NEGATIVE, default=None,
                   help="stop after this many updates (0: no limit)")
    g.add_argument("--batch-size", type=POSITIVE, default=None)
    g.add_argument("--accum-steps", type=POSITIVE, default=None, help="micro-batches accumulated per update")
    g.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default=None)
    g.add_argument("--lr", type=TRAIN_RANGES["lr"], default=None, help="peak learning rate")
    g.add_argument("--min-lr", type=TRAIN_RANGES["min_lr"], default=None, help="learning rate at the end of the decay")
    g.add_argument("--weight-decay", type=TRAIN_RANGES["weight_decay"], default=None)
    g.add_argument("--momentum", type=TRAIN_RANGES["momentum"], default=None, help="SGD momentum")
    g.add_argument("--beta1", type=TRAIN_RANGES["beta1"], default=None)
    g.add_argument("--beta2", type=TRAIN_RANGES["beta2"], default=None)
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=None)
    g.add_argument("--warmup-steps", type=TRAIN_RANGES["warmup_steps"], default=None, help="linear warmup updates (default 5%% of all)")
    g.add_argument("--label-smoothing", type=TRAIN_RANGES["label_smoothing"], default=None)
    g.add_argument("--clip-norm", type=TRAIN_RANGES["clip_norm"], default=None, help="global-norm gradient clipping (0: off)")
    a = p.add_argument_group("augmentation")
    a.add_argument("--augment", choices=["default", "none"], default=None,
                   help="the data set's default policy (see README) or none")
    a.add_argument("--crop-pad", type=TRAIN_RANGES["crop_pad"], default=None, help="pad-and-random-crop pixels")
    a.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flip")
    a.add_argument("--rotate-deg", type=TRAIN_RANGES["rotate_deg"], default=None, help="random affine: max rotation")
    a.add_argument("--shift", type=TRAIN_RANGES["shift"], default=None, help="random affine: max shift in pixels")
    a.add_argument("--scale", type=TRAIN_RANGES["scale"], default=None, help="random affine: max |scale - 1|")
    a.add_argument("--mixup", type=TRAIN_RANGES["mixup"], default=None, help="mixup alpha (0: off)")
    a.add_argument("--normalize", choices=["minus_one_one", "mean_std"], default=None,
                   help="pixels to [-1, 1] (original ViT) or per-data-set mean/std")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=SEED, default=None)
    r.add_argument("--eval-every", type=TRAIN_RANGES["eval_every"], default=None, help="epochs between test evaluations")
    r.add_argument("--save-every", type=TRAIN_RANGES["save_every"], default=None, help="also save last.npz every N updates")
    r.add_argument("--out", default=None, help="run folder (default runs/<data set>-<time>)")
    r.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a run exactly where it stopped, in its folder, with its saved settings (only "
                        "--epochs to extend it, --max-steps to stop it early and --device are taken from the "
                        "command line)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show (None: a per-data-set default, or
    one the flag's own help already states)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="minivit", description="The Vision Transformer from scratch in NumPy/CuPy.",
        formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("gradcheck", help="check every gradient of the whole model against finite differences",
                       description="Whole-model gradient check in float64: central differences against the "
                                   "hand-written backward pass, one row per parameter tensor and for the input "
                                   "images. Exits with status 1 if any tensor fails.",
                       formatter_class=_HelpFormatter)
    p.add_argument("--config", default="test", help="named model config (small ones only: every check is a "
                                                    "pair of forward passes per coordinate)")
    p.add_argument("--pooling", choices=["token", "gap"], default="token")
    p.add_argument("--gelu", choices=["tanh", "exact"], default="tanh")
    p.add_argument("--dropout", action="store_true", help="check with dropout and stochastic depth on (fixed mask)")
    p.add_argument("--eps", type=POSITIVE_FLOAT, default=1e-5, help="finite-difference step")
    p.add_argument("--tol", type=POSITIVE_FLOAT, default=1e-6, help="largest relative error that passes")
    p.add_argument("--max-coords", type=POSITIVE, default=32, help="coordinates sampled per tensor")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", choices=["cpu", "gpu"], default=None,
                   help="array backend (default: $MINIVIT_DEVICE or cpu)")
    p.add_argument("--reference", action="store_true", help=REFERENCE_HELP)
    p.set_defaults(func=cmd_gradcheck)

    fmt = _HelpFormatter
    p = sub.add_parser("train", help="train a ViT (default: the embedded shapes data set, a few minutes on a CPU)",
                       description="Train a ViT with AdamW, warmup + cosine decay, label smoothing and clipping. "
                                   "Progress bars per epoch, test evaluation every epoch, run folder with "
                                   "config.json, log.jsonl (one JSON line per epoch), last.npz and best.npz "
                                   "(written atomically). Ctrl-C saves last.npz and exits; --resume RUN_DIR "
                                   "continues exactly (bit-identical on the CPU with the same --threads).",
                       formatter_class=fmt)
    add_data_args(p)
    add_model_args(p)
    add_optim_args(p)
    add_runtime_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy and per-class confusion of a checkpoint",
                       description="Evaluate a checkpoint on a data set's test split (default: the data set it "
                                   "was trained on) and print accuracy, loss and a per-class summary.",
                       formatter_class=fmt)
    p.add_argument("checkpoint", help="a minivit checkpoint (.npz), or original ViT .npz / timm .safetensors")
    add_data_args(p)
    p.add_argument("--image-size", type=IMAGE_SIZE, default=None,
                   help="evaluate at another input size (position embeddings resampled on load)")
    p.add_argument("--resample", choices=["linear", "bilinear", "bicubic"], default="linear")
    p.add_argument("--batch-size", type=POSITIVE, default=500)
    add_runtime_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes for image files",
                       description="Classify image files of any size and format Pillow reads. Each image is "
                                   "converted to the model's channels and resized as a whole (no crop, aspect "
                                   "ratio not kept) to the model's input size with Pillow's bilinear filter, "
                                   "then normalized as the checkpoint's training data were.",
                       formatter_class=fmt)
    p.add_argument("checkpoint", help="a minivit checkpoint (.npz), or original ViT .npz / timm .safetensors")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=POSITIVE, default=5)
    p.add_argument("--labels", default=None, help="text file with one class name per line")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=None,
                   help="run at another input size (position embeddings resampled)")
    p.add_argument("--resample", choices=["linear", "bilinear", "bicubic"], default="linear")
    add_runtime_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint at a new resolution (the paper's recipe)",
                       description="Load a checkpoint (minivit, original ViT .npz or timm .safetensors), resample "
                                   "its position embeddings to the grid of --image-size, replace the head by a "
                                   "zero-initialized one when the classes change (or with --new-head), and "
                                   "fine-tune. Defaults follow the paper: SGD with momentum 0.9, no weight "
                                   "decay, clipping at global norm 1, warmup then cosine decay, lr 0.01, a short "
                                   "schedule (3 epochs); every one can be overridden.",
                       formatter_class=fmt)
    p.add_argument("--from", dest="from_", default=None, metavar="CHECKPOINT", help="weights to start from")
    p.add_argument("--num-classes", type=POSITIVE, default=None, help="classes of the new task (default: the data's)")
    p.add_argument("--new-head", action="store_true", help="replace the head even when the classes match")
    p.add_argument("--resample", choices=["linear", "bilinear", "bicubic", "none"], default="linear",
                   help="position-embedding interpolation: linear = the original ViT code (corner-aligned), "
                        "bilinear/bicubic = PyTorch's half-pixel interpolate, none = re-initialized")
    p.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="train only the head (a linear probe)")
    add_data_args(p)
    add_model_args(p)
    add_optim_args(p)
    add_runtime_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("inspect", help="draw the paper's analysis figures (attention, position embeddings, filters)",
                       description="Write PNG images of what a trained ViT learned (the paper's figures 6-7): "
                                   "embedding_filters.png (PCA of the patch-embedding filters), "
                                   "pos_embed_similarity.png (cosine similarity of position embeddings), "
                                   "attention_distance.png (mean attention distance per head vs depth), "
                                   "rollout.png (attention rollout overlaid on the inputs), attention_maps.png "
                                   "(class-token attention per layer and head).",
                       formatter_class=fmt)
    p.add_argument("checkpoint")
    p.add_argument("--image", nargs="+", default=None, metavar="FILE",
                   help="image files to analyse (default: test images of the checkpoint's data set)")
    p.add_argument("--num-images", type=POSITIVE, default=128, help="test images used when no --image is given")
    p.add_argument("--only", default=None, help="comma-separated subset of: filters,posemb,distance,rollout,maps")
    p.add_argument("--out", default=None, help="output folder (default: inspect/ beside the checkpoint)")
    add_data_args(p)
    add_runtime_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("pretrain-mpp", help="self-supervised masked patch prediction pre-training",
                       description="Masked patch prediction (the paper's section 4.6): corrupt 50% of the patch "
                                   "embeddings (80% a learned [mask] embedding, 10% another patch's, 10% kept) "
                                   "and predict each corrupted patch's 3-bit mean colour (512 classes) from its "
                                   "final representation. Same loop as `train` (progress bars, log, atomic "
                                   "checkpoints, --resume). `minivit finetune --from RUN/last.npz` fine-tunes "
                                   "the result (the prediction head dropped, a zero classification head added).",
                       formatter_class=fmt)
    p.add_argument("--mask-rate", type=Range(float, 0.0, 1.0, lo_open=True), default=0.5, help="share of patches corrupted")
    p.add_argument("--replace-rates", default="0.8,0.1,0.1", type=float_list(Range(float, 0.0, 1.0), 3),
                   help="of the corrupted: mask embedding, random other patch, unchanged")
    p.add_argument("--colour-bits", type=Range(int, 1, 8), default=3, help="bits per channel of the target colour")
    add_data_args(p)
    add_model_args(p)
    add_optim_args(p)
    add_runtime_args(p)
    p.set_defaults(func=cmd_pretrain_mpp)

    p = sub.add_parser("fewshot", help="few-shot linear evaluation of a checkpoint's frozen features",
                       description="Regularized least squares from frozen features (the class token after the "
                                   "final norm, or the mean patch token) of n images per class to {-1, 1} "
                                   "targets, solved in closed form as the authors' evaluator does (features "
                                   "standardized on the shot set, a constant bias feature of 100, l2 = 2^10); "
                                   "test-split accuracy averaged over seeds.",
                       formatter_class=fmt)
    p.add_argument("checkpoint")
    p.add_argument("--shots", default="1,5,10,25", type=int_list(POSITIVE), help="comma-separated images per class")
    p.add_argument("--seeds", type=POSITIVE, default=3, help="shot draws averaged")
    p.add_argument("--l2", type=NON_NEGATIVE_FLOAT, default=2.0 ** 10)
    p.add_argument("--representation", choices=["pooled", "patch_mean"], default="pooled")
    p.add_argument("--batch-size", type=POSITIVE, default=500)
    add_data_args(p)
    add_runtime_args(p)
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser("bench", help="time training steps against the machine's limit (and PyTorch with --vs-torch)",
                       description="Named cases (mnist-tiny, cifar-small, vit-s16, vit-b16-infer), float32: ms per "
                                   "step, images/s, analytic matmul FLOPs and GFLOP/s, the machine's matmul rate, "
                                   "the GEMM floor, memory; --profile per operation; --vs-torch the same model "
                                   "in PyTorch eager with the same weights. The formulas and how to get stable "
                                   "numbers: `python -c 'import minivit.bench; help(minivit.bench)'` and README.",
                       formatter_class=fmt)
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("download", help="fetch and verify an official data set",
                       description="Download the official archives of a data set into DATA_DIR/NAME/ and check "
                                   "them against SHA-256 values pinned in minivit (a mismatch is refused).",
                       formatter_class=fmt)
    p.add_argument("name", choices=["mnist", "fashion-mnist", "cifar10", "cifar100"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_download)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    _use_reference(args)
    with warnings.catch_warnings():     # the package's warnings as one line each, like its errors
        warnings.showwarning = lambda message, *_: print(f"minivit {args.command}: warning: {message}",
                                                         file=sys.stderr)
        return _run(args)


def _run(args):
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                # the reader of our output went away (e.g. `| head`): stop quietly
        try:                               # (stdout to /dev/null: no second error when Python flushes it at exit)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):      # stdout without a file descriptor (captured, e.g. under pytest)
            pass
        return 141                         # 128 + SIGPIPE, as a shell tool that is cut off reports
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"minivit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:
        print(f"minivit {args.command}: error: out of memory{f' ({e})' if str(e) else ''}; lower --batch-size or "
              f"the image size", file=sys.stderr)
        return 2
