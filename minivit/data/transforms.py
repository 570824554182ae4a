"""The input pipeline: batching, augmentation, normalization and mixup, as pure functions over whole batches.

Every random function takes an explicit `rng` (np.random.Generator) and draws from nothing else, so a run is
reproduced exactly by recreating the generators (the training loop uses np.random.default_rng([seed, epoch, step])).
No function loops over the images of a batch in Python: crops, flips and affine warps are one fancy-indexing
gather each. Augmentation works on uint8 host batches (cheap to copy, exact); `normalize` and `mixup` also accept
CuPy arrays, so the float conversion can happen on the GPU after the uint8 batch is moved there.

Shapes:
    B  batch size          H, W, C  image height, width, channels (channels-last, as everywhere in minivit)
    K  classes             p  crop padding in pixels

Order used by `augment_batch`: affine warp (digits) -> pad + random crop -> random horizontal flip. Then the
training loop normalizes, and applies mixup (which needs labels and float images) when aug.mixup_alpha > 0.
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..backend import get_xp, to_numpy
from ..ranges import FRACTION, NON_NEGATIVE_FLOAT, ROTATE_DEG

# Per-channel mean and std of the training images, in [0, 1] units (pixel / 255).
DATASET_STATS = {
    # torchvision's MNIST example (over all 60,000 * 784 training pixels)
    "mnist": ((0.1307,), (0.3081,)),
    # computed by minivit from the official training file: mean 0.28604, std 0.35302
    "fashion-mnist": ((0.2860,), (0.3530,)),
    # the widely used per-channel values of the 50,000 training images (population std; the often-copied
    # (0.2023, 0.1994, 0.2010) is a per-image std averaged, not the data set's std)
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

NORMALIZE_MODES = ("minus_one_one", "mean_std")
PAD_MODES = ("constant", "reflect", "edge")  # np.pad modes: zeros, mirror without repeating the edge, repeat edge
SAMPLING = ("bilinear", "nearest")


def _pil_bilinear():
    return getattr(Image, "Resampling", Image).BILINEAR  # Pillow >= 9.1 has the enum; older has the constant


# ------------------------------------------------------------------------------------------------ normalization

def compute_stats(images, chunk=1 << 20):
    """uint8 (N, H, W, C) -> (mean (C,), std (C,)) in [0, 1] units, accumulated in float64 chunks of pixels."""
    C = images.shape[-1]
    flat = images.reshape(-1, C)                   # (N*H*W, C)
    s, ss = np.zeros(C), np.zeros(C)               # sum and sum of squares per channel
    for start in range(0, len(flat), chunk):
        block = flat[start:start + chunk].astype(np.float64)  # (chunk, C)
        s += block.sum(axis=0)
        ss += np.square(block).sum(axis=0)
    n = max(len(flat), 1)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean ** 2, 0.0))
    return tuple(float(m) / 255 for m in mean), tuple(float(v) / 255 for v in std)


def dataset_stats(name, train_images=None):
    """(mean, std) for a data set: the pinned DATASET_STATS entry, else computed from `train_images`."""
    if name in DATASET_STATS:
        return DATASET_STATS[name]
    if train_images is None:
        raise ValueError(f"no pinned mean/std for {name!r} (pinned: {', '.join(DATASET_STATS)}); "
                         f"pass train_images to compute them")
    return compute_stats(train_images)


def normalize(images, mode="minus_one_one", mean=None, std=None):
    """uint8 (B, H, W, C) -> float32 (B, H, W, C).

    minus_one_one: (x - 127.5) / 127.5, pixels in [-1, 1], as the original ViT input pipeline does; 0 -> -1, 255 -> 1.
    mean_std:      (x / 255 - mean) / std per channel, mean and std in [0, 1] units (see DATASET_STATS).
    Works on NumPy and CuPy arrays (the result stays on the input's device).
    """
    xp = get_xp(images)
    if images.dtype != np.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images.dtype}")
    y = images.astype(xp.float32)  # (B, H, W, C)
    if mode == "minus_one_one":
        y -= 127.5  # exact in float32, so 0 and 255 map to exactly -1 and 1
        y /= 127.5
        return y
    if mode != "mean_std":
        raise ValueError(f"mode must be one of {NORMALIZE_MODES}, got {mode!r}")
    if mean is None or std is None:
        raise ValueError("mode='mean_std' needs mean and std (e.g. DATASET_STATS[name] or compute_stats(train))")
    C = images.shape[-1]
    m = np.broadcast_to(np.asarray(mean, dtype=np.float64), (C,))  # (C,)
    s = np.broadcast_to(np.asarray(std, dtype=np.float64), (C,))   # (C,)
    if np.any(s <= 0):
        raise ValueError(f"std must be positive, got {tuple(s)}")
    y -= xp.asarray((255.0 * m).astype(np.float32))  # x - 255 mean
    y /= xp.asarray((255.0 * s).astype(np.float32))  # / (255 std)
    return y


def normalizer(mode="minus_one_one", mean=None, std=None):
    """-> the function images -> normalize(images, mode, mean, std): a run's (or a checkpoint's) pixel pipeline."""
    return lambda images: normalize(images, mode, mean, std)


# ----------------------------------------------------------------------------------------- crops, flips, resize


def pad_images(images, pad, mode="constant"):
    """(B, H, W, C) -> (B, H + 2p, W + 2p, C), padded with zeros ('constant'), a mirror ('reflect') or 'edge'."""
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    return np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)


def crop_at(padded, top, left, size):
    """(B, Hp, Wp, C), top (B,), left (B,), size (h, w) -> (B, h, w, C): out[b] = padded[b, top:top+h, left:left+w]."""
    h, w = size
    B = padded.shape[0]
    rows = np.asarray(top)[:, None] + np.arange(h)   # (B, h)
    cols = np.asarray(left)[:, None] + np.arange(w)  # (B, w)
    return padded[np.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, h, w, C)


def random_crop(images, pad, rng, mode="constant"):
    """(B, H, W, C) -> (B, H, W, C): pad by `pad` pixels, then crop an H x W window at a random offset per image."""
    if pad == 0:
        return images
    B, H, W, _ = images.shape
    padded = pad_images(images, pad, mode)  # (B, H + 2p, W + 2p, C)
    top = rng.integers(0, 2 * pad + 1, size=B)   # (B,)
    left = rng.integers(0, 2 * pad + 1, size=B)  # (B,)
    return crop_at(padded, top, left, (H, W))


def random_flip(images, rng, p=0.5):
    """(B, H, W, C) -> (B, H, W, C): each image mirrored left-right (x[:, ::-1]) with probability p."""
    flip = rng.random(images.shape[0]) < p  # (B,)
    out = images.copy()
    out[flip] = images[flip][:, :, ::-1]
    return out


def resize_images(images, size):
    """uint8 (N, H, W, C) -> uint8 (N, h, w, C) with Pillow's bilinear filter; size: int (square) or (h, w).

    Pillow widens the bilinear kernel by the scale factor when shrinking, so downsizing low-pass filters (no
    aliasing). One Pillow call per image: this runs once per data set, not per batch. C must be 1 or 3.
    """
    h, w = (size, size) if np.isscalar(size) else tuple(size)
    N, H, W, C = images.shape
    if (h, w) == (H, W):
        return images
    if C not in (1, 3):
        raise ValueError(f"resize_images handles 1 or 3 channels, got {C}")
    out = np.empty((N, h, w, C), dtype=np.uint8)  # (N, h, w, C)
    for i in range(N):
        im = Image.fromarray(images[i, :, :, 0] if C == 1 else images[i])  # mode L or RGB
        out[i] = np.asarray(im.resize((w, h), _pil_bilinear())).reshape(h, w, C)  # PIL sizes are (W, H)
    return out


# ---------------------------------------------------------------------------------------------- affine warps

def warp_affine(images, angle_deg, scale, shift, sampling="bilinear"):
    """uint8 (B, H, W, C), angle (B,), scale (B,), shift (B, 2) as (dx, dy) pixels -> uint8 (B, H, W, C).

    Per image: rotate by angle_deg counter-clockwise (as displayed, rows going down), scale by `scale`, both about
    the image centre c = ((W-1)/2, (H-1)/2), then shift by (dx, dy). Written as the inverse map: output pixel p
    reads the input at  q = c + A^-1 (p - c - t),  A^-1 = (1/s) [[cos, -sin], [sin, cos]]  acting on (x, y),
    sampled bilinearly (or nearest) with zeros outside the image. Zero angle, unit scale and zero shift are the
    identity exactly.
    """
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    B, H, W, C = images.shape
    cy, cx = (H - 1) / 2, (W - 1) / 2
    theta = np.deg2rad(np.asarray(angle_deg, dtype=np.float64)).reshape(B, 1, 1)  # (B, 1, 1)
    cos, sin = np.cos(theta), np.sin(theta)
    s = np.asarray(scale, dtype=np.float64).reshape(B, 1, 1)                      # (B, 1, 1)
    shift = np.asarray(shift, dtype=np.float64).reshape(B, 2)
    u = np.arange(W, dtype=np.float64)[None, None, :] - cx - shift[:, 0, None, None]  # (B, 1, W) x - cx - dx
    v = np.arange(H, dtype=np.float64)[None, :, None] - cy - shift[:, 1, None, None]  # (B, H, 1) y - cy - dy
    xs = cx + (cos * u - sin * v) / s  # (B, H, W) source column of each output pixel
    ys = cy + (sin * u + cos * v) / s  # (B, H, W) source row
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))  # (B, H+2, W+2, C): a zero border for outside reads
    b = np.arange(B)[:, None, None]                            # (B, 1, 1)

    def gather(yi, xi):
        """Integer source coordinates (B, H, W), anything outside the image reading the zero border."""
        return padded[b, np.clip(yi, -1, H).astype(np.intp) + 1, np.clip(xi, -1, W).astype(np.intp) + 1]

    if sampling == "nearest":
        return gather(np.floor(ys + 0.5), np.floor(xs + 0.5))  # (B, H, W, C)
    x0, y0 = np.floor(xs), np.floor(ys)                       # (B, H, W)
    wx = (xs - x0).astype(np.float32)[..., None]              # (B, H, W, 1) weight of the right neighbour
    wy = (ys - y0).astype(np.float32)[..., None]              # (B, H, W, 1) weight of the lower neighbour
    top = gather(y0, x0) * (1 - wx) + gather(y0, x0 + 1) * wx          # (B, H, W, C) float32
    bottom = gather(y0 + 1, x0) * (1 - wx) + gather(y0 + 1, x0 + 1) * wx
    out = top * (1 - wy) + bottom * wy
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def random_affine(images, rng, max_rotate_deg=0.0, max_shift=0.0, max_scale=0.0, sampling="bilinear"):
    """uint8 (B, H, W, C) -> uint8 (B, H, W, C): a small random rotation, scale and shift per image (digits).

    angle ~ U(-max_rotate_deg, max_rotate_deg), scale ~ 1 + U(-max_scale, max_scale), dx, dy ~ U(-max_shift,
    max_shift) pixels, each drawn independently per image; see warp_affine for the geometry.
    """
    B = images.shape[0]
    angle = rng.uniform(-max_rotate_deg, max_rotate_deg, size=B)  # (B,)
    scale = 1.0 + rng.uniform(-max_scale, max_scale, size=B)      # (B,)
    shift = rng.uniform(-max_shift, max_shift, size=(B, 2))       # (B, 2) (dx, dy)
    return warp_affine(images, angle, scale, shift, sampling)


# ------------------------------------------------------------------------------------------------------- mixup

def one_hot(labels, num_classes, xp=np):
    """int (B,) -> float32 (B, K); labels are checked on the host (CuPy would wrap a bad index silently)."""
    y = np.asarray(to_numpy(labels))
    if y.ndim != 1 or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(f"labels must be ints in [0, {num_classes}) of shape (B,), got shape {y.shape}"
                         + (f" with range [{y.min()}, {y.max()}]" if y.size else ""))
    out = np.zeros((len(y), num_classes), dtype=np.float32)  # (B, K)
    out[np.arange(len(y)), y] = 1.0
    return xp.asarray(out)


def mixup(images, labels, alpha, rng, num_classes=None):
    """float (B, H, W, C), labels int (B,) or targets (B, K) -> mixed float32 (B, H, W, C), soft targets (B, K).

    mixup (Zhang et al. 2018): one lam ~ Beta(alpha, alpha) per batch and a random pairing perm of the batch,
        x' = lam * x + (1 - lam) * x[perm],    y' = lam * y + (1 - lam) * y[perm]
    so every target row sums to 1. alpha <= 0 turns it off (lam = 1; the targets are still returned one-hot).
    Works on NumPy and CuPy arrays; lam and perm are drawn on the host from `rng`.
    """
    xp = get_xp(images)
    if getattr(labels, "ndim", np.ndim(labels)) == 1:
        if num_classes is None:
            raise ValueError("mixup with integer labels needs num_classes")
        targets = one_hot(labels, num_classes, xp)         # (B, K)
    else:
        targets = xp.asarray(labels, dtype=xp.float32)     # (B, K)
    images = images.astype(xp.float32, copy=False)
    if alpha <= 0:
        return images, targets
    lam = float(rng.beta(alpha, alpha))
    perm = xp.asarray(rng.permutation(images.shape[0]))    # (B,)
    mixed = lam * images + (1.0 - lam) * images[perm]      # (B, H, W, C)
    soft = lam * targets + (1.0 - lam) * targets[perm]     # (B, K)
    return mixed, soft


# ----------------------------------------------------------------------------------------------------- batching

def shuffled_batches(n, batch_size, rng, drop_last=False):
    """One epoch of index arrays: a random permutation of range(n) cut into batches of `batch_size`.

    drop_last drops the final short batch (so every step sees the same batch size).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    perm = rng.permutation(n)  # (n,)
    stop = n - n % batch_size if drop_last else n
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


# ------------------------------------------------------------------------------------------ augmentation policy

@dataclass(frozen=True)
class Augment:
    """What `augment_batch` does to a uint8 training batch (all off by default)."""
    crop_pad: int = 0            # pad by this many pixels, then random-crop back to size (0 = off)
    crop_mode: str = "constant"  # padding: 'constant' (zeros), 'reflect' or 'edge'
    flip: bool = False           # random left-right flip with probability 0.5
    rotate_deg: float = 0.0      # affine: max |rotation| in degrees
    shift: float = 0.0           # affine: max |shift| in pixels, per axis
    scale: float = 0.0           # affine: max |scale - 1|
    mixup_alpha: float = 0.0     # mixup Beta(alpha, alpha); applied by the training loop with `mixup` (0 = off)

    def __post_init__(self):
        if isinstance(self.crop_pad, bool) or not isinstance(self.crop_pad, (int, np.integer)) or self.crop_pad < 0:
            raise ValueError(f"crop_pad must be a non-negative integer, got {self.crop_pad!r}")
        if self.crop_mode not in PAD_MODES:
            raise ValueError(f"crop_mode must be one of {PAD_MODES}, got {self.crop_mode!r}")
        for name, allowed in (("rotate_deg", ROTATE_DEG), ("shift", NON_NEGATIVE_FLOAT),
                              ("mixup_alpha", NON_NEGATIVE_FLOAT), ("scale", FRACTION)):
            allowed.check(getattr(self, name), name)          # finite and in range (NaN is no setting)

    @property
    def affine(self):
        """True when any affine parameter is non-zero."""
        return bool(self.rotate_deg or self.shift or self.scale)


# Per-data-set defaults. Digits: no flip (a mirrored 2 is not a 2), a small affine jitter instead (+-10 deg,
# +-2 px, +-10 % scale). Fashion-MNIST: clothes are left-right symmetric, so flip, plus a 2-pixel crop jitter.
# CIFAR: the standard pad-4 random crop and flip. shapes: every class is unchanged by mirroring (see
# minivit.data.shapes), so flip, plus a 2-pixel crop jitter. Image folders: unknown content, so off.
DEFAULT_AUGMENT = {
    "shapes": Augment(crop_pad=2, flip=True),
    "mnist": Augment(rotate_deg=10.0, shift=2.0, scale=0.1),
    "fashion-mnist": Augment(crop_pad=2, flip=True),
    "cifar10": Augment(crop_pad=4, flip=True),
    "cifar100": Augment(crop_pad=4, flip=True),
    "folder": Augment(),
}


def default_augment(name):
    """The default Augment for a data set name ('folder:PATH' names use the 'folder' entry)."""
    key = "folder" if name.startswith("folder:") else name
    if key not in DEFAULT_AUGMENT:
        raise ValueError(f"no default augmentation for {name!r}; known: {', '.join(DEFAULT_AUGMENT)} "
                         f"(or 'folder:PATH'); pass an Augment(...) instead")
    return DEFAULT_AUGMENT[key]


def augment_batch(images, aug, rng):
    """uint8 (B, H, W, C) -> uint8 (B, H, W, C): affine (if any) -> pad + random crop (if crop_pad) -> flip (if flip).

    Deterministic given `rng`'s state. Returns `images` itself when `aug` changes nothing. Mixup is not applied
    here: it needs float images and labels; call `mixup` after `normalize` when aug.mixup_alpha > 0.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"augment_batch expects uint8 (B, H, W, C), got {images.dtype} {images.shape}")
    if aug.affine:
        images = random_affine(images, rng, aug.rotate_deg, aug.shift, aug.scale)
    if aug.crop_pad:
        images = random_crop(images, aug.crop_pad, rng, aug.crop_mode)
    if aug.flip:
        images = random_flip(images, rng)
    return images
