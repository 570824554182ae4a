"""The in-memory data set every loader returns.

Images are kept as uint8, channels-last `(N, H, W, C)` (C = 1 for gray images, 3 for colour), labels as int64
`(N,)`. Conversion to float and normalization happen per batch in the input pipeline (`minivit.data.transforms`),
so a 60,000-image set costs 47 MB, not 188 MB.
"""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Dataset:
    name: str                   # e.g. "shapes", "mnist", "cifar10", "folder:/path"
    train_images: np.ndarray    # (N_train, H, W, C) uint8
    train_labels: np.ndarray    # (N_train,) int64 in [0, K)
    test_images: np.ndarray     # (N_test, H, W, C) uint8
    test_labels: np.ndarray     # (N_test,) int64 in [0, K)
    classes: list = field(default_factory=list)  # K class names, index = label
    meta: dict = field(default_factory=dict)     # free-form facts (source files, version tag, ...)

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, split + "_images"), getattr(self, split + "_labels")
            if x.ndim != 4 or x.dtype != np.uint8:
                raise ValueError(f"{self.name}: {split} images must be uint8 (N, H, W, C), "
                                 f"got {x.dtype} {x.shape}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: {split} labels must have shape ({x.shape[0]},), got {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= len(self.classes)):
                raise ValueError(f"{self.name}: {split} labels must lie in [0, {len(self.classes)}), "
                                 f"got [{y.min()}, {y.max()}]")

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def image_shape(self):
        """(H, W, C) of one image."""
        return tuple(self.train_images.shape[1:])
