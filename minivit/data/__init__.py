"""Data sets and the input pipeline.

    ds = load_dataset("mnist")                  # Dataset: uint8 (N, 28, 28, 1) images, int64 labels
    ds = load_dataset("cifar10", image_size=64) # resized once with Pillow's bilinear filter
    ds = load_dataset("folder:/photos")         # one sub-folder per class

Names: 'shapes' (the embedded default set, generated on first use), 'mnist', 'fashion-mnist', 'cifar10',
'cifar100', and 'folder:PATH' (or just a path to a folder). The downloadable ones are fetched once with
`minivit download NAME` (minivit.data.download) into data_dir/NAME/.
"""
from pathlib import Path

from .dataset import Dataset
from .download import (ChecksumError, MissingDatasetError, download, missing_message, verify, verify_file,
                       DOWNLOADABLE, FILES)
from .formats import (FASHION_MNIST_CLASSES, IDX_FILES, MNIST_CLASSES, RESIZE_FILTER, RestrictedUnpickler,
                      encode_idx, find_idx_file, load_cifar, load_cifar10, load_cifar100, load_idx_pair,
                      load_image_folder, load_mnist_folder, parse_cifar_batch, parse_idx, read_idx,
                      read_idx_images, read_idx_labels, restricted_loads, write_idx)
from .paths import default_data_dir
from .shapes import load_shapes
from .transforms import (DATASET_STATS, DEFAULT_AUGMENT, Augment, augment_batch, compute_stats, crop_at,
                         dataset_stats, default_augment, mixup, normalize, normalizer, one_hot, pad_images,
                         random_affine, random_crop, random_flip, resize_images, shuffled_batches, warp_affine)

DATASETS = ("shapes", "mnist", "fashion-mnist", "cifar10", "cifar100")  # plus "folder:PATH"


def _canonical(name):
    """'Fashion_MNIST' -> 'fashion-mnist', 'cifar-10' -> 'cifar10'; other names unchanged but lower-cased."""
    n = name.strip().lower().replace("_", "-")
    return {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist"}.get(n, n)


def _local_folder(name, data_dir, path):
    """The folder to read `name` from: an explicit `path`, else data_dir/<name>."""
    if path is not None:
        return Path(path)
    return Path(data_dir if data_dir is not None else default_data_dir()) / name


def _load_idx_set(name, folder, verify_files):
    """mnist / fashion-mnist from `folder`; MissingDatasetError (with the download command) if files are absent."""
    missing = [stem + ".gz" for stem in IDX_FILES.values() if find_idx_file(folder, stem) is None]
    if missing:
        raise MissingDatasetError(missing_message(name, folder, missing))
    checks = verify(name, folder=folder) if verify_files else None
    ds = load_mnist_folder(folder, name)
    ds.meta["verified"] = checks  # {file: 'archive' | 'content'}, or None when not checked
    return ds


def _load_cifar_set(name, folder, verify_files, label_mode):
    """cifar10 / cifar100 from the archive in `folder` (or its extracted sub-folder)."""
    entry = FILES[name][0]
    archive = folder if folder.is_file() else folder / entry.name
    extracted = folder / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    checks = None
    if archive.is_file():
        checks = {entry.name: verify_file(archive, entry)} if verify_files else None
        source = archive
    elif extracted.is_dir():
        source = extracted  # an extracted copy: no pinned hash for the separate batch files, so not verified
    else:
        raise MissingDatasetError(missing_message(name, folder, [entry.name]))
    ds = load_cifar10(source) if name == "cifar10" else load_cifar100(source, label_mode=label_mode)
    ds.meta["verified"] = checks
    return ds


def load_dataset(name, data_dir=None, image_size=None, **options):
    """Load a data set by name -> Dataset (uint8 (N, H, W, C) images, int64 labels).

    name: 'shapes', 'mnist', 'fashion-mnist', 'cifar10', 'cifar100', 'folder:PATH' or a path to a folder.
    data_dir: where data sets live (default minivit.data.paths.default_data_dir()); each in data_dir/<name>/.
    image_size: None = native size (28 for the MNISTs, 32 for CIFAR); an int (square) or (h, w) resizes every
        image once with Pillow's bilinear filter (antialiased when shrinking).
    options:
        shapes:           n_train, n_test, seed, progress (passed to minivit.data.shapes.load_shapes)
        mnist, fashion-mnist, cifar10, cifar100:
                          path (read the files from this folder instead of data_dir/<name>, e.g. Debian's
                          /usr/share/datasets/fashion-mnist), verify (default True: check the pinned SHA-256)
        cifar100:         label_mode 'fine' (100 classes, default) or 'coarse' (20 superclasses)
        folder:           test_fraction (default 0.2), seed (default 0) for the seeded split
    Unknown names raise ValueError listing the valid ones; a data set not on disk raises MissingDatasetError
    (a FileNotFoundError) that shows the `minivit download NAME` command.
    """
    def take(allowed):
        extra = set(options) - set(allowed)
        if extra:
            raise TypeError(f"load_dataset({name!r}) got unexpected options {sorted(extra)}; "
                            f"it accepts {sorted(allowed)}")
        return options

    raw = str(name)
    key = _canonical(raw)
    if key == "shapes":
        kw = dict(take(("n_train", "n_test", "seed", "progress")))
        if image_size is not None:
            kw["image_size"] = image_size
        return load_shapes(data_dir=data_dir, **kw)
    if key in ("mnist", "fashion-mnist"):
        opts = take(("path", "verify"))
        ds = _load_idx_set(key, _local_folder(key, data_dir, opts.get("path")), opts.get("verify", True))
    elif key in ("cifar10", "cifar100"):
        opts = take(("path", "verify", "label_mode") if key == "cifar100" else ("path", "verify"))
        ds = _load_cifar_set(key, _local_folder(key, data_dir, opts.get("path")), opts.get("verify", True),
                             opts.get("label_mode", "fine"))
    elif raw.startswith("folder:") or (key not in DATASETS and Path(raw).expanduser().is_dir()):
        folder = Path(raw[len("folder:"):] if raw.startswith("folder:") else raw).expanduser()
        opts = take(("test_fraction", "seed"))
        return load_image_folder(folder, image_size=image_size, **opts)
    else:
        raise ValueError(f"unknown data set {raw!r}: valid names are {', '.join(DATASETS)}, "
                         f"or 'folder:PATH' for a folder of class sub-folders")
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if size != ds.image_shape[:2]:
            ds = Dataset(ds.name, resize_images(ds.train_images, size), ds.train_labels,
                         resize_images(ds.test_images, size), ds.test_labels, classes=ds.classes,
                         meta={**ds.meta, "native_size": ds.image_shape[:2], "resize_filter": RESIZE_FILTER})
    return ds


__all__ = [
    "DATASETS", "Dataset", "load_dataset", "default_data_dir",
    # download
    "download", "verify", "verify_file", "ChecksumError", "MissingDatasetError", "DOWNLOADABLE",
    # formats
    "read_idx", "read_idx_images", "read_idx_labels", "parse_idx", "encode_idx", "write_idx", "load_idx_pair",
    "load_mnist_folder", "load_cifar", "load_cifar10", "load_cifar100", "parse_cifar_batch", "restricted_loads",
    "RestrictedUnpickler", "load_image_folder", "MNIST_CLASSES", "FASHION_MNIST_CLASSES",
    # transforms
    "normalize", "normalizer", "compute_stats", "dataset_stats", "DATASET_STATS", "pad_images", "crop_at", "random_crop",
    "random_flip", "warp_affine", "random_affine", "one_hot", "mixup", "resize_images", "shuffled_batches",
    "Augment", "DEFAULT_AUGMENT", "default_augment", "augment_batch",
]
