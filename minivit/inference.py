"""Running a trained model on image files.

Resize policy (also in `minivit predict --help`): every image is converted to the model's channels (RGB, or
gray 'L' for 1-channel models) and resized as a whole to the model's input size with Pillow's bilinear filter
(antialiased when shrinking), without cropping and without keeping the aspect ratio, as the original ViT
evaluation pipeline resizes straight to the crop size. Pixels are then normalized as the checkpoint's training
data were (default: to [-1, 1]). The loader is minivit.data.images.
"""
from pathlib import Path

import numpy as np

from minivit.data.images import load_image_files
from minivit.model import predict


def predict_files(params, cfg, paths, normalize_fn, classes=None, top_k=5):
    """-> [(path, [(class name, probability), ... top_k])] for image files."""
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
