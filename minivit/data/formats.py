"""Readers for the official file formats: MNIST / Fashion-MNIST IDX, CIFAR-10 / CIFAR-100 pickles, image folders.

Every reader returns plain NumPy arrays (or a `Dataset`) in minivit's layout: uint8 images channels-last
`(N, H, W, C)`, int64 labels `(N,)`. Every check that can fail raises a ValueError (FileNotFoundError for a missing
file) whose message names the file and says what was expected and what was found.

Shapes:
    N  images in a file or split
    H, W, C  image height, width, channels (C = 1 gray, 3 colour)

IDX (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS FOR THE MNIST DATABASE"):
    bytes 0-1   0x00 0x00
    byte  2     element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte  3     number of dimensions d
    then d big-endian int32 sizes, then the elements, big-endian, row-major (last index fastest).
    MNIST images: magic 0x00000803 (uint8, 3 dims: N, 28, 28); labels: magic 0x00000801 (uint8, 1 dim: N).
    The official files are gzipped (.gz); we detect gzip by its magic bytes 1f 8b, not by the file name, so a
    decompressed copy, or a re-compressed one (Debian's `dataset-fashion-mnist`), reads the same.

CIFAR "python version" (https://www.cs.toronto.edu/~kriz/cifar.html): each batch file is a Python 2 pickle of a
dict with bytes keys. b'data': uint8 ndarray (N, 3072), each row a 32x32 colour image stored channel-major
(1024 red, then 1024 green, then 1024 blue, each row-major); CIFAR-10 has b'labels' (list of N ints) in
`data_batch_1..5` and `test_batch`, names in `batches.meta` b'label_names'; CIFAR-100 has b'fine_labels' and
b'coarse_labels' in `train` and `test`, names in `meta` b'fine_label_names' / b'coarse_label_names'.
Unpickling can run arbitrary code, so we use a restricted unpickler that resolves only the three names a NumPy
array needs (see `RestrictedUnpickler`).
"""
import gzip
import io
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np

try:  # numpy's ndarray rebuild helper, the one global a pickled array names
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct

from ..fileio import atomic_write_bytes
from .dataset import Dataset
from .images import image_suffixes, load_image

GZIP_MAGIC = b"\x1f\x8b"
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension (N,)

# IDX type byte -> big-endian NumPy dtype (the spec on the MNIST page)
IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IDX_CODES = {dt.newbyteorder(">"): code for code, dt in IDX_DTYPES.items()}

MNIST_CLASSES = [str(d) for d in range(10)]
# The label table of https://github.com/zalandoresearch/fashion-mnist#labels
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# file stem -> role, as the files are named on the official pages (with or without .gz on disk)
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}

CIFAR10_DIR, CIFAR100_DIR = "cifar-10-batches-py", "cifar-100-python"
CIFAR10_ARCHIVE, CIFAR100_ARCHIVE = "cifar-10-python.tar.gz", "cifar-100-python.tar.gz"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_ROW = 3 * 32 * 32  # 3072 bytes per image, channel-major

# Pillow filter used for every resize in minivit.data: bilinear, which Pillow applies with a support widened by
# the scale factor when shrinking (so it low-pass filters, no aliasing); the original ViT input pipeline used
# tf.image.resize, whose default is also bilinear.
RESIZE_FILTER = "bilinear"


# ----------------------------------------------------------------------------------------------------- raw bytes

def read_maybe_gzip(path):
    """All bytes of `path`, gunzipped if the file starts with the gzip magic 1f 8b (whatever its name)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    if data[:2] != GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:  # truncated stream, bad CRC, bad header
        raise ValueError(f"{path}: corrupt or truncated gzip data ({type(e).__name__}: {e}); "
                         f"delete the file and download it again") from None


# ----------------------------------------------------------------------------------------------------------- IDX

def parse_idx(data, name="<bytes>"):
    """bytes of one IDX file -> ndarray with the header's shape and dtype (native byte order).

    Checks: the two zero bytes, a known type code, the file length equals header + prod(sizes) * itemsize.
    """
    if len(data) < 4:
        raise ValueError(f"{name}: not an IDX file: {len(data)} bytes, expected at least a 4-byte header")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in IDX_DTYPES:
        raise ValueError(f"{name}: bad IDX magic 0x{data[:4].hex()}: expected 0x0000 followed by a type byte in "
                         f"{sorted(hex(c) for c in IDX_DTYPES)} and a dimension count")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated IDX header: {ndim} dimensions need {header} bytes, found {len(data)}")
    shape = struct.unpack(f">{ndim}i", data[4:header])
    if any(s < 0 for s in shape):
        raise ValueError(f"{name}: negative IDX size in header {shape}")
    dtype = IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"{name}: IDX file {what}: header says shape {shape} of {dtype.name}, i.e. "
                         f"{expected} bytes in all, found {len(data)} bytes")
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=header)
    arr = arr.reshape(shape)  # (shape) as the header says
    return arr.astype(dtype.newbyteorder("="))  # (shape) native order, and a writable copy


def read_idx(path, magic=None):
    """IDX file (gzipped or not) -> ndarray; `magic` (e.g. IDX_IMAGES_MAGIC) must match the first 4 bytes if given."""
    path = Path(path)
    data = read_maybe_gzip(path)
    if magic is not None and data[:4] != struct.pack(">I", magic):
        found = "0x" + data[:4].hex() if len(data) >= 4 else f"only {len(data)} bytes"
        kind = {IDX_IMAGES_MAGIC: "images", IDX_LABELS_MAGIC: "labels"}.get(magic, "IDX")
        raise ValueError(f"{path}: bad IDX magic: expected 0x{magic:08x} ({kind}), found {found}")
    return parse_idx(data, name=str(path))


def read_idx_images(path):
    """MNIST-style image file (magic 0x00000803) -> uint8 (N, H, W, 1)."""
    x = read_idx(path, IDX_IMAGES_MAGIC)  # (N, H, W)
    return x[..., None]                   # (N, H, W, 1)


def read_idx_labels(path):
    """MNIST-style label file (magic 0x00000801) -> int64 (N,)."""
    return read_idx(path, IDX_LABELS_MAGIC).astype(np.int64)  # (N,)


def encode_idx(array):
    """ndarray -> bytes of an IDX file (header with big-endian int32 sizes, big-endian elements)."""
    array = np.asarray(array)
    dt = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if dt not in IDX_CODES:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of "
                         f"{sorted(d.name for d in IDX_DTYPES.values())}")
    if array.ndim > 255:
        raise ValueError(f"IDX stores at most 255 dimensions, got {array.ndim}")
    header = struct.pack(">HBB", 0, IDX_CODES[dt], array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dt).tobytes()


def write_idx(path, array, compress=None):
    """Write `array` as an IDX file; gzip it when `compress` is True (default: when the name ends in .gz)."""
    data = encode_idx(array)
    if compress is None:
        compress = str(path).endswith(".gz")
    if compress:
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)


def find_idx_file(folder, stem):
    """`folder/stem.gz` or `folder/stem` (also the `train-images.idx3-ubyte` spelling), else None."""
    folder = Path(folder)
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx_pair(images_path, labels_path):
    """An images file and its labels file -> (uint8 (N, H, W, 1), int64 (N,)), with the counts checked."""
    x = read_idx_images(images_path)  # (N, H, W, 1)
    y = read_idx_labels(labels_path)  # (N,)
    if len(x) != len(y):
        raise ValueError(f"{labels_path}: {len(y)} labels, but {images_path} holds {len(x)} images")
    return x, y


def load_mnist_folder(folder, name="mnist"):
    """Folder with the four official IDX files (gzipped or not) -> Dataset. `name`: 'mnist' or 'fashion-mnist'."""
    folder = Path(folder)
    found = {role: find_idx_file(folder, stem) for role, stem in IDX_FILES.items()}
    missing = [IDX_FILES[role] + ".gz" for role, p in found.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}")
    xtr, ytr = load_idx_pair(found["train_images"], found["train_labels"])  # (N_train, 28, 28, 1)
    xte, yte = load_idx_pair(found["test_images"], found["test_labels"])    # (N_test, 28, 28, 1)
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"{folder}: train images are {xtr.shape[1:]} but test images are {xte.shape[1:]}")
    classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    for y, role in ((ytr, "train_labels"), (yte, "test_labels")):
        if len(y) and y.max() >= len(classes):
            raise ValueError(f"{found[role]}: label {y.max()} found, expected labels in [0, {len(classes)})")
    return Dataset(name, xtr, ytr, xte, yte, classes=list(classes),
                   meta={"source": str(folder), "files": {r: str(p) for r, p in found.items()}})


# -------------------------------------------------------------------------------------------------------- CIFAR

def _numpy_reconstruct():
    """numpy's ndarray rebuild helper: numpy._core.multiarray._reconstruct (NumPy 2), numpy.core... (NumPy 1)."""
    return _reconstruct


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global that the restricted unpickler does not allow."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the global names a NumPy array pickle needs.

    A pickle calls whatever global it names (`os.system`, `builtins.eval`, ...) while loading, so a crafted
    CIFAR file could run code. Every global lookup goes through `find_class` (GLOBAL, STACK_GLOBAL, INST, OBJ and
    the EXT* opcodes), and this one allows exactly: the ndarray rebuild function under its NumPy 1 and NumPy 2
    module names, `numpy.ndarray` and `numpy.dtype`. Everything else is an UnpicklingError. Persistent ids are
    refused by the base class.
    """
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': a CIFAR batch only needs "
                f"{', '.join(sorted(m + '.' + n for m, n in self.ALLOWED))}")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return {"ndarray": np.ndarray, "dtype": np.dtype}[name]


def restricted_loads(data, name="<bytes>"):
    """Unpickle bytes with `RestrictedUnpickler` (encoding='bytes': the files are Python 2 pickles).

    A refused global, or a truncated/corrupt pickle, becomes a ValueError that names `name`.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as e:
        raise ValueError(f"{name}: unsafe pickle refused: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error) as e:
        raise ValueError(f"{name}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def _str_keys(d, name):
    """A dict with bytes keys (Python 2 pickle) -> the same dict with str keys."""
    if not isinstance(d, dict):
        raise ValueError(f"{name}: expected a pickled dict, found {type(d).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def parse_cifar_batch(data, name="<bytes>", label_key="labels"):
    """bytes of one CIFAR batch pickle -> (uint8 (N, 32, 32, 3), int64 (N,)).

    Rows of 3072 bytes in CHW order are reshaped to (N, 3, 32, 32) and transposed to channels-last.
    """
    d = _str_keys(restricted_loads(data, name), name)
    for key in ("data", label_key):
        if key not in d:
            raise ValueError(f"{name}: no '{key}' entry in the batch dict (found keys {sorted(d)})")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != CIFAR_ROW:
        found = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{name}: 'data' must be a uint8 array (N, {CIFAR_ROW}), found {found}")
    try:
        y = np.asarray(d[label_key], dtype=np.int64)  # (N,)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: '{label_key}' is not a list of integers ({e})") from None
    if y.shape != (len(x),):
        raise ValueError(f"{name}: {len(x)} images but '{label_key}' has shape {y.shape}")
    images = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 3, 32, 32) -> (N, 32, 32, 3)
    return np.ascontiguousarray(images), y


def parse_cifar_meta(data, name, key):
    """bytes of `batches.meta` / `meta` -> list of class names under `key` (e.g. 'label_names')."""
    d = _str_keys(restricted_loads(data, name), name)
    if key not in d:
        raise ValueError(f"{name}: no '{key}' entry in the meta dict (found keys {sorted(d)})")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in d[key]]


def _cifar_layout(variant, label_mode):
    """(folder inside the archive, archive name, train files, test files, meta file, label key, names key)."""
    if variant == "cifar10":
        return CIFAR10_DIR, CIFAR10_ARCHIVE, CIFAR10_TRAIN, ["test_batch"], "batches.meta", "labels", "label_names"
    if variant == "cifar100":
        if label_mode not in ("fine", "coarse"):
            raise ValueError(f"label_mode must be 'fine' (100 classes) or 'coarse' (20 superclasses), "
                             f"got {label_mode!r}")
        return (CIFAR100_DIR, CIFAR100_ARCHIVE, ["train"], ["test"], "meta",
                f"{label_mode}_labels", f"{label_mode}_label_names")
    raise ValueError(f"variant must be 'cifar10' or 'cifar100', got {variant!r}")


def _read_cifar_members(source, folder, names):
    """({member name: bytes}, where) for `names` from a .tar.gz (one streaming pass, nothing extracted to disk) or
    from an extracted folder (`source` itself or `source/folder`); where(name) says where a member came from."""
    source = Path(source)
    if source.is_file():
        wanted = {f"{folder}/{n}": n for n in names}
        out = {}
        try:
            with tarfile.open(source, "r|*") as tar:  # stream: one sequential pass over the gzip data
                for member in tar:
                    key = wanted.get(member.name[2:] if member.name.startswith("./") else member.name)
                    if key is not None and member.isfile():
                        out[key] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{source}: corrupt or truncated archive ({type(e).__name__}: {e}); "
                             f"delete it and download it again") from None
        missing = [f"{folder}/{n}" for n in names if n not in out]
        if missing:
            raise ValueError(f"{source}: archive lacks {', '.join(missing)}; expected the official "
                             f"'{folder}/' layout")
        return out, (lambda n: f"{source}:{folder}/{n}")
    root = source / folder if (source / folder).is_dir() else source
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: missing {', '.join(missing)} (expected the extracted '{folder}/' folder "
                                f"or the .tar.gz archive)")
    return {n: (root / n).read_bytes() for n in names}, (lambda n: str(root / n))


def load_cifar(source, variant="cifar10", label_mode="fine"):
    """CIFAR-10/100 from the official python .tar.gz or its extracted folder -> Dataset of (N, 32, 32, 3) uint8.

    source: the archive file, the extracted folder (`cifar-10-batches-py/`, `cifar-100-python/`), or a folder
    that contains either. label_mode (CIFAR-100 only): 'fine' (100 classes) or 'coarse' (20 superclasses).
    """
    folder, archive, train, test, meta, label_key, names_key = _cifar_layout(variant, label_mode)
    source = Path(source)
    if source.is_dir() and not (source / folder).is_dir() and (source / archive).is_file():
        source = source / archive  # a download folder that holds only the archive
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    blobs, where = _read_cifar_members(source, folder, train + test + [meta])
    classes = parse_cifar_meta(blobs[meta], where(meta), names_key)
    splits = []
    for files in (train, test):
        parts = [parse_cifar_batch(blobs[n], where(n), label_key) for n in files]
        splits.append((np.concatenate([p[0] for p in parts]),    # (N, 32, 32, 3)
                       np.concatenate([p[1] for p in parts])))   # (N,)
    for (_, y), files in zip(splits, (train, test)):
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f"{where(files[0])}: labels in [{y.min()}, {y.max()}], expected [0, {len(classes)}) "
                             f"for the {len(classes)} names in {meta}")
    name = variant if variant == "cifar10" or label_mode == "fine" else "cifar100-coarse"
    return Dataset(name, splits[0][0], splits[0][1], splits[1][0], splits[1][1], classes=classes,
                   meta={"source": str(source), "label_mode": label_mode if variant == "cifar100" else None})


def load_cifar10(source):
    """CIFAR-10 (50,000 train / 10,000 test, 10 classes) from the .tar.gz or the extracted folder."""
    return load_cifar(source, "cifar10")


def load_cifar100(source, label_mode="fine"):
    """CIFAR-100 (50,000 / 10,000; 100 fine classes or 20 coarse superclasses) from the .tar.gz or folder."""
    return load_cifar(source, "cifar100", label_mode)


# ------------------------------------------------------------------------------------------------- image folder

def _list_images(folder, suffixes):
    """Sorted image files directly inside `folder` (hidden files and non-image suffixes skipped)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)


def _class_folders(root):
    """Sorted non-hidden sub-folders of root: one per class."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_image(path, size):
    """One image file -> (uint8 (H, W, 1) or (H, W, 3), is_gray): the file's own channels, resized to `size` (h, w)
    when given."""
    a = load_image(path, size, channels=None)
    return a, a.shape[2] == 1


def _stack(items, root):
    """[(array, gray)] -> uint8 (N, H, W, C): C = 1 if every image is gray, else gray images are repeated to RGB."""
    if not items:
        return None
    shapes = {a.shape[:2] for a, _ in items}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images have different sizes {sorted(shapes)[:4]}...; pass image_size to "
                         f"resize them all to one size")
    all_gray = all(g for _, g in items)
    arrays = [a if all_gray or a.shape[2] == 3 else np.repeat(a, 3, axis=2) for a, _ in items]
    return np.stack(arrays)  # (N, H, W, C)


def load_image_folder(root, image_size=None, test_fraction=0.2, seed=0):
    """A folder of class sub-folders -> Dataset. Any format Pillow reads.

    Layouts: root/train/<class>/*, root/test/<class>/* (explicit split), or root/<class>/* (seeded split: in each
    class, round(test_fraction * n) images chosen by np.random.default_rng(seed) go to test). Classes are the
    sorted sub-folder names. Images become RGB, or L (C = 1) when every image is gray; resized (bilinear) to
    image_size (int or (h, w)) when given, else they must all share one size.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    size = None if image_size is None else (
        (int(image_size), int(image_size)) if np.isscalar(image_size) else tuple(int(s) for s in image_size))
    suffixes = image_suffixes()
    explicit = (root / "train").is_dir() and (root / "test").is_dir()
    if explicit:
        classes = _class_folders(root / "train")
        extra = sorted(set(_class_folders(root / "test")) - set(classes))
        if extra:
            raise ValueError(f"{root / 'test'}: classes {extra} have no folder in {root / 'train'}")
        files = {split: [(p, k) for k, c in enumerate(classes) if (root / split / c).is_dir()
                         for p in _list_images(root / split / c, suffixes)] for split in ("train", "test")}
    else:
        classes = _class_folders(root)
        rng = np.random.default_rng(seed)
        files = {"train": [], "test": []}
        for k, c in enumerate(classes):
            paths = _list_images(root / c, suffixes)
            n_test = int(round(test_fraction * len(paths)))
            order = rng.permutation(len(paths))
            test_idx = set(order[:n_test].tolist())
            for i, p in enumerate(paths):
                files["test" if i in test_idx else "train"].append((p, k))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders found (expected root/<class>/<image> "
                         f"or root/train/<class>/... and root/test/<class>/...)")
    if not files["train"]:
        raise ValueError(f"{root}: no images found in the class folders {classes[:5]} "
                         f"(readable suffixes include .png .jpg .bmp .gif)")
    items = {s: [_load_image(p, size) for p, _ in files[s]] for s in ("train", "test")}
    all_items = items["train"] + items["test"]
    x = _stack(all_items, root)  # (N_train + N_test, H, W, C): one stack so both splits share C
    n_train = len(items["train"])
    labels = {s: np.array([k for _, k in files[s]], dtype=np.int64) for s in ("train", "test")}
    return Dataset(f"folder:{root}", x[:n_train], labels["train"], x[n_train:], labels["test"],
                   classes=classes, meta={"source": str(root), "split": "explicit" if explicit else "seeded",
                                          "test_fraction": None if explicit else test_fraction,
                                          "seed": None if explicit else seed,
                                          "resize_filter": RESIZE_FILTER if size else None})
