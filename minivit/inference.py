"""Running a trained model: batch by batch over many images (`run_batched`), and on image files.

    outs = run_batched(lambda x, batch: vit_forward(params, x, cfg, keep_cache=False)[0], images, params,
                       normalize_fn=normalize_fn)          # [logits of each batch], host arrays

Resize policy (also in `minivit predict --help`): every image is converted to the model's channels (RGB, or
gray 'L' for 1-channel models) and resized as a whole to the model's input size with Pillow's bilinear filter
(antialiased when shrinking), without cropping and without keeping the aspect ratio, as the original ViT
evaluation pipeline resizes straight to the crop size. Pixels are then normalized as the checkpoint's training
data were (default: to [-1, 1]). The loader is minivit.data.images.
"""
from pathlib import Path

import numpy as np

from minivit.backend import get_xp, to_numpy
from minivit.data.images import load_image_files
from minivit.model import vit_forward


def run_batched(fn, images, params, batch_size=500, normalize_fn=None):
    """-> [fn(x, batch) of every batch, on the host], in evaluation order: the one loop of every evaluation.

    images: (n, H, W, C), uint8 when normalize_fn is given (else already float). For each batch of `batch_size`
    images, batch = slice(i, i + b) is its place in `images` (to pick its labels, or seed its draws) and
    x = normalize_fn(images[batch]) is moved to the device and dtype of params["pos_embed"]. What fn returns (an
    array, a tuple / list / dict of them, or plain numbers) comes back with every array copied to the host.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    like = params["pos_embed"]
    xp = get_xp(like)
    out = []
    for i in range(0, len(images), batch_size):
        batch = slice(i, min(i + batch_size, len(images)))
        x = images[batch] if normalize_fn is None else normalize_fn(images[batch])
        out.append(to_numpy(fn(xp.asarray(x, dtype=like.dtype), batch)))                # (b, H, W, C) on device
    return out


def predict(params, cfg, images, batch_size=256):
    """images: (B, H, W, C) float -> class probabilities (B, K) as NumPy, in evaluation mode, batch by batch."""
    def probs(x, _):
        logits, _ = vit_forward(params, x, cfg, keep_cache=False)         # (b, K)
        e = get_xp(logits).exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    out = run_batched(probs, images, params, batch_size)
    return np.concatenate(out) if out else np.zeros((0, cfg.num_classes), dtype=np.float32)


def predict_files(params, cfg, paths, normalize_fn, classes=None, top_k=5):
    """-> [(path, [(class name, probability), ... top_k])] for image files (top_k above the classes: all of them)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    images = load_image_files(paths, cfg.image_hw, cfg.channels)
    probs = predict(params, cfg, normalize_fn(images).astype(params["pos_embed"].dtype, copy=False))  # (N, K)
    k = min(top_k, probs.shape[1])
    names = classes if classes and len(classes) == probs.shape[1] else [str(i) for i in range(probs.shape[1])]
    results = []
    for path, p in zip(paths, probs):
        top = np.argsort(-p, kind="stable")[:k]
        results.append((str(Path(path)), [(names[j], float(p[j])) for j in top]))
    return results


def read_labels(path, num_classes=None):
    """A text file with one class name per line -> list of names (line i is class i).

    Surrounding whitespace is stripped and trailing empty lines dropped; an empty line inside the list, or a count
    different from `num_classes` (when given), raises ValueError naming the file.
    """
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f]
    while names and not names[-1]:
        names.pop()
    if "" in names:
        raise ValueError(f"{path}: line {names.index('') + 1} is empty (one class name per line)")
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{path}: {len(names)} labels, but the model has {num_classes} classes")
    return names
