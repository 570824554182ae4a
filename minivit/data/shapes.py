"""The embedded default data set, "shapes": ten classes of procedurally drawn shapes, no download needed.

Every image is one shape drawn with Pillow on a cluttered, noisy background. The class is the shape, and only the
shape: position, size, rotation, stretch, colours, background and clutter are all drawn at random, and the same
way for every class.

Classes (label: name, what is drawn, in units of the shape's radius R):
    0 disc      a filled circle
    1 ring      a circle with a round hole (hole radius 0.50-0.65 R)
    2 target    a ring with a separate dot at its centre (a concentric arrangement of two parts)
    3 crescent  a disc with an off-centre disc bitten out of it: open on one side
    4 square    a filled square
    5 triangle  a filled, roughly equilateral triangle
    6 plus      two crossing bars of equal length, standing like a "+" (never tilted far enough to be an "x")
    7 star      a five-pointed star
    8 arrow     a shaft with a triangular head
    9 pair      two equal dots side by side with a gap between them (an arrangement, not a single blob)
Mirroring leaves every class unchanged, so flips are label-preserving augmentations. Shapes stand nearly upright
(+-15 degrees): a small ViT learns upright shapes in minutes, arbitrary rotations take it far longer.

What varies, independently of the class:
    position    anywhere, with the whole shape inside the frame
    size        R = 0.26-0.36 of the image width (a shape spans 50-75 % of it)
    rotation    uniform in [-15, 15) degrees; the shape is also stretched along one axis by up to +-12 %
    colours     background: a gradient between two random colours plus smooth blotches; shape: one random colour
                whose brightness differs from the background's by at least 70 (of 255), so it is always visible
    clutter     0-2 thin strokes, arcs and specks behind the shape, in random colours
    noise       Gaussian pixel noise with a random standard deviation of 0-6 (of 255)

Why the mean colour says nothing about the class: every colour is drawn from a distribution that is symmetric
under inversion (c -> 255 - c): uniform colours, zero-mean noise, and a contrast rule that only looks at the size of
the brightness difference. So the inverted copy of any image is an equally likely image of the same class, and the
average image of every class is the same flat mid-grey (127.5 in every pixel). A linear classifier on raw pixels
then gives every class the same expected score, whatever its weights, and scores near chance (10 %). A model must
find edges, whichever way round their colours are, and put them together into a shape.

Rendering: each image is drawn SUPERSAMPLE = 3 times larger (192 x 192 for the stored 64 x 64) and reduced with a
3 x 3 box filter, so edges are anti-aliased. The data set is generated once at 64 x 64 and cached in the data folder
as an .npz file; `load_shapes` resizes it to the requested `image_size` with Pillow's BOX filter (each output pixel
is the area-weighted mean of the input pixels it covers: exact 2 x 2 averaging for 32, proper anti-aliasing for 48;
upsampling, which adds no detail, uses BICUBIC). Thin parts (the ring around a target's dot, the star's points, the
gap between a pair's dots) are crisp at 64 and blurrier at 32, so a model fine-tuned at a higher resolution does see
more.

Determinism: image i of a split is drawn from `np.random.default_rng([seed, split, i, 0])` alone, and the labels
come in shuffled blocks of ten (one of each class) from `np.random.default_rng([seed, split, i // 10, 1])`. So the
same (n, seed) gives the same bytes, a larger set starts with a smaller one, the classes are exactly balanced in
every multiple of ten, and the train and test splits (split = 0, 1) are disjoint streams. Bump GENERATOR_VERSION
whenever the drawing changes; the cache file name carries it, so old files are ignored.
"""
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..fileio import atomic_save_npz
from .dataset import Dataset
from .paths import default_data_dir

CLASSES = ["disc", "ring", "target", "crescent", "square", "triangle", "plus", "star", "arrow", "pair"]
GENERATOR_VERSION = 2
STORED_SIZE = 64     # the cache holds 64 x 64 images; load_shapes resizes them to image_size
SUPERSAMPLE = 3      # draw at 3 x the size, then reduce with a box filter (anti-aliasing)
SPLITS = {"train": 0, "test": 1}   # the second word of every seed: train and test are disjoint streams

_K = len(CLASSES)
_LUMA = np.array([0.299, 0.587, 0.114])   # ITU-R BT.601 brightness of an RGB colour
# What varies, in one place (the module docstring explains each; change any of them -> bump GENERATOR_VERSION).
_MIN_CONTRAST = 70.0        # least brightness difference between the shape and its background (of 255)
_GRADIENT = 70.0            # the background gradient's far end differs by up to this much per channel
_BLOTCH = 8.0               # standard deviation (at most) of the background's soft blotches
_RADIUS = (0.26, 0.36)      # the shape's radius, in image widths
_ROTATION = 15.0            # rotated by a uniform angle in [-15, 15) degrees
_STRETCH = 0.12             # stretched along one axis by a factor up to exp(+-0.12)
_CLUTTER_BEHIND = (0, 2)    # how many distractors behind the shape (inclusive range)
_CLUTTER_FRONT = (0, 0)     # and thin strokes across it
_STROKE = (0.8, 1.8)        # distractor stroke width, in pixels of a 64 x 64 image
_NOISE = 6.0                # Gaussian pixel noise standard deviation (at most)


# ---------------------------------------------------------------------------------------------------------------
# Shape geometry: each class is a list of (polygon, fill) in unit coordinates (radius about 1, centred at 0).
# fill 255 adds the polygon to the shape's mask, fill 0 cuts it out again (holes, bites); they are drawn in order.

def _circle(r, cx=0.0, cy=0.0, n=64):
    """A circle of radius r as a polygon: (n, 2)."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)  # (n, 2)


def _star(points, r_out, r_in):
    """A star with `points` tips at radius r_out and notches at r_in: (2 * points, 2)."""
    t = np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)  # (2 * points, 2)


def _shape_polygons(label, rng):
    """The polygons of one shape of class `label`, with its own small random proportions."""
    name = CLASSES[label]
    if name == "disc":
        return [(_circle(1.0), 255)]
    if name == "ring":
        return [(_circle(1.0), 255), (_circle(rng.uniform(0.50, 0.65)), 0)]
    if name == "target":
        hole = rng.uniform(0.58, 0.70)
        return [(_circle(1.0), 255), (_circle(hole), 0), (_circle(rng.uniform(0.24, 0.32)), 255)]
    if name == "crescent":
        return [(_circle(1.0), 255), (_circle(rng.uniform(0.78, 0.90), cx=rng.uniform(0.38, 0.55)), 0)]
    if name == "square":
        h = 0.8
        return [(np.array([[-h, -h], [h, -h], [h, h], [-h, h]]), 255)]
    if name == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        tri = 1.1 * np.stack([np.cos(t), np.sin(t)], axis=1) + rng.uniform(-0.08, 0.08, (3, 2))  # (3, 2)
        return [(tri, 255)]
    if name == "plus":
        w, a = rng.uniform(0.17, 0.24), 1.0   # half width and half length of each bar
        return [(np.array([[-a, -w], [a, -w], [a, w], [-a, w]]), 255),
                (np.array([[-w, -a], [w, -a], [w, a], [-w, a]]), 255)]
    if name == "star":
        return [(_star(5, 1.1, rng.uniform(0.40, 0.50)), 255)]
    if name == "arrow":
        w, base, h = rng.uniform(0.13, 0.18), rng.uniform(-0.05, 0.15), rng.uniform(0.45, 0.58)
        return [(np.array([[-1.0, -w], [base, -w], [base, -h], [1.0, 0.0], [base, h], [base, w], [-1.0, w]]), 255)]
    if name == "pair":
        r, d = rng.uniform(0.30, 0.38), rng.uniform(0.58, 0.70)
        return [(_circle(r, cx=-d), 255), (_circle(r, cx=d), 255)]
    raise ValueError(f"unknown shape label {label}")


# ---------------------------------------------------------------------------------------------------------------
# Drawing one image.

def _colours(rng):
    """Shape colour and the two background gradient colours, each (3,) float, with enough brightness contrast.

    Every step commutes with inversion (c -> 255 - c), so the colours' joint distribution is inversion-symmetric.
    """
    cand = rng.uniform(0.0, 255.0, (32, 3))          # (32, 3) candidate colours
    fg = cand[0]
    ok = np.abs((cand[1:] - fg) @ _LUMA) >= _MIN_CONTRAST
    bg0 = cand[1 + int(np.argmax(ok))] if ok.any() else 255.0 - fg   # 255 - fg: the mirror image, far enough
    bg1 = np.clip(bg0 + rng.uniform(-_GRADIENT, _GRADIENT, 3), 0.0, 255.0)    # the gradient's other end
    if abs((bg1 - fg) @ _LUMA) < _MIN_CONTRAST:
        bg1 = bg0
    return fg, bg0, bg1


def _background(rng, bg0, bg1, size):
    """A smooth size x size background: a gradient from bg0 to bg1 in a random direction plus soft blotches."""
    g = 5                                            # the gradient and blotches live on a g x g grid
    u = np.linspace(-0.5, 0.5, g)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    t = 0.5 + np.cos(theta) * u[None, :] + np.sin(theta) * u[:, None]   # (g, g) position along the gradient
    field = bg0 + np.clip(t, 0.0, 1.0)[:, :, None] * (bg1 - bg0)       # (g, g, 3)
    field = field + rng.normal(0.0, rng.uniform(0.0, _BLOTCH), (g, g, 3))  # blotches
    small = Image.fromarray(np.clip(np.rint(field), 0, 255).astype(np.uint8))
    return small.resize((size, size), Image.BICUBIC)


def _random_colour(rng):
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _clutter(draw, rng, side, unit, front):
    """One distractor: a thin stroke (or, behind the shape, also an arc or a speck) in a random colour.

    side: canvas size in pixels; unit: canvas pixels per pixel of a 64 x 64 image (strokes scale with the image).
    """
    kind = "stroke" if front else rng.choice(["stroke", "stroke", "arc", "speck"])
    x, y = rng.uniform(0.0, side, 2)
    colour = _random_colour(rng)
    width = max(1, int(round(rng.uniform(*_STROKE) * unit)))
    if kind == "stroke":
        length, angle = rng.uniform(0.12, 0.45) * side, rng.uniform(0.0, 2.0 * np.pi)
        draw.line([x, y, x + length * math.cos(angle), y + length * math.sin(angle)], fill=colour, width=width)
    elif kind == "arc":
        r, start = rng.uniform(0.08, 0.22) * side, rng.uniform(0.0, 360.0)
        draw.arc([x - r, y - r, x + r, y + r], start, start + rng.uniform(60.0, 180.0), fill=colour, width=width)
    else:
        r = rng.uniform(0.6, 1.6) * unit
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _render_one(rng, label, size):
    """One image of class `label`: (size, size, 3) uint8. All randomness comes from `rng`."""
    side = size * SUPERSAMPLE                        # canvas size in pixels
    unit = side / 64.0
    fg, bg0, bg1 = _colours(rng)
    # the background is smooth: draw it at the final size, blow it up without interpolation (the box filter at the
    # end gives it back exactly)
    canvas = _background(rng, bg0, bg1, size).resize((side, side), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(_CLUTTER_BEHIND[0], _CLUTTER_BEHIND[1] + 1)):   # clutter behind the shape
        _clutter(draw, rng, side, unit, front=False)

    # the shape: unit polygons -> stretch -> rotate -> scale to radius R -> move so it lies inside the frame
    radius = rng.uniform(*_RADIUS) * side
    angle, stretch = np.radians(rng.uniform(-_ROTATION, _ROTATION)), math.exp(rng.uniform(-_STRETCH, _STRETCH))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    affine = radius * rot @ np.diag([stretch, 1.0 / stretch])            # (2, 2)
    polys = [(poly @ affine.T, fill) for poly, fill in _shape_polygons(label, rng)]   # (V, 2) each, about 0
    points = np.concatenate([p for p, fill in polys if fill])             # every point the shape covers
    lo, hi = -points.min(axis=0), side - points.max(axis=0)               # (2,) allowed centre range
    centre = rng.uniform(0.0, 1.0, 2) * np.maximum(hi - lo, 0.0) + lo     # (2,) canvas pixels
    x0, y0 = np.floor(points.min(axis=0) + centre).astype(int)           # the shape's bounding box
    x1, y1 = np.ceil(points.max(axis=0) + centre).astype(int) + 1
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)                          # drawn in the box only: faster
    mdraw = ImageDraw.Draw(mask)
    for poly, fill in polys:
        mdraw.polygon((poly + centre - [x0, y0]).ravel().tolist(), fill=fill)
    canvas.paste(tuple(int(round(c)) for c in fg), (x0, y0, x1, y1), mask)

    for _ in range(rng.integers(_CLUTTER_FRONT[0], _CLUTTER_FRONT[1] + 1)):     # thin strokes across the shape
        _clutter(draw, rng, side, unit, front=True)

    img = np.array(canvas.reduce(SUPERSAMPLE), dtype=np.float32)          # (size, size, 3) box-filtered
    img += rng.uniform(0.0, _NOISE) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _labels(n, seed, stream):
    """Labels of images 0..n-1: shuffled blocks of ten, one of each class. (n,) int64."""
    blocks = [np.random.default_rng([seed, stream, b, 1]).permutation(_K) for b in range(-(-n // _K))]
    return np.concatenate(blocks)[:n].astype(np.int64) if blocks else np.zeros(0, np.int64)


def render_shapes(n, seed, size=64, split="train", progress=False):
    """Draw n images: -> images (n, size, size, 3) uint8, labels (n,) int64 in [0, 10).

    Image i depends only on (seed, split, i), so the same arguments give the same bytes and a larger n extends a
    smaller one. `split` ("train" or "test") picks one of two disjoint random streams. `progress` shows a tqdm bar.
    """
    n, seed, size = _check_int("n", n, 0), _check_int("seed", seed, 0), _check_int("size", size, 1)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    stream = SPLITS[split]
    labels = _labels(n, seed, stream)                                     # (n,)
    images = np.empty((n, size, size, 3), dtype=np.uint8)                 # (n, size, size, 3)
    steps = range(n)
    if progress:
        steps = tqdm(steps, desc=f"drawing shapes ({split})", unit="img", leave=False)
    for i in steps:
        images[i] = _render_one(np.random.default_rng([seed, stream, i, 0]), int(labels[i]), size)
    return images, labels


# ---------------------------------------------------------------------------------------------------------------
# The cached data set.

def cache_path(data_dir, n_train, n_test, seed):
    """Where the 64 x 64 cache of one (version, sizes, seed) lives, e.g. shapes-v1-train20000-test2000-seed0.npz."""
    return Path(data_dir) / f"shapes-v{GENERATOR_VERSION}-train{n_train}-test{n_test}-seed{seed}.npz"


def _read_cache(path, n_train, n_test):
    """The arrays of a cache file, checked; raises ValueError naming the file if it is unreadable or wrong."""
    want = {"train_images": (n_train, STORED_SIZE, STORED_SIZE, 3), "train_labels": (n_train,),
            "test_images": (n_test, STORED_SIZE, STORED_SIZE, 3), "test_labels": (n_test,), "version": ()}
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in want}
    except Exception as e:   # truncated zip, bad CRC, missing key, bad header: all mean "draw it again"
        raise ValueError(f"shapes cache {path} is corrupt or incomplete ({type(e).__name__}: {e})") from e
    for k, shape in want.items():
        if arrays[k].shape != shape:
            raise ValueError(f"shapes cache {path}: {k} has shape {arrays[k].shape}, expected {shape}")
    if int(arrays["version"]) != GENERATOR_VERSION:
        raise ValueError(f"shapes cache {path} holds version {int(arrays['version'])}, "
                         f"expected {GENERATOR_VERSION}")
    for split in ("train", "test"):
        x, y = arrays[split + "_images"], arrays[split + "_labels"]
        if x.dtype != np.uint8 or y.dtype != np.int64 or (len(y) and (y.min() < 0 or y.max() >= _K)):
            raise ValueError(f"shapes cache {path}: {split} arrays have bad dtypes or labels")
    return arrays


def resize_images(images, image_size):
    """(N, H, W, C) uint8 -> (N, image_size, image_size, C) uint8 with Pillow: BOX to shrink, BICUBIC to grow."""
    image_size = _check_int("image_size", image_size, 1)
    N, H, W, C = images.shape
    if (H, W) == (image_size, image_size):
        return images
    resample = Image.BOX if image_size <= min(H, W) else Image.BICUBIC
    out = np.empty((N, image_size, image_size, C), dtype=np.uint8)      # (N, image_size, image_size, C)
    for i in range(N):
        out[i] = np.asarray(Image.fromarray(images[i]).resize((image_size, image_size), resample))
    return out


def load_shapes(data_dir=None, image_size=32, n_train=20000, n_test=2000, seed=0, progress=True):
    """The shapes data set at image_size x image_size, drawn on first use and cached in data_dir.

    The cache (64 x 64 images, written atomically) is named after the generator version, sizes and seed; a corrupt
    cache is reported with a warning and drawn again. Images are resized on load with Pillow's BOX filter.
    """
    image_size = _check_int("image_size", image_size, 1)
    n_train, n_test = _check_int("n_train", n_train, 0), _check_int("n_test", n_test, 0)
    seed = _check_int("seed", seed, 0)
    path = cache_path(default_data_dir() if data_dir is None else data_dir, n_train, n_test, seed)
    arrays = None
    if path.exists():
        try:
            arrays = _read_cache(path, n_train, n_test)
        except ValueError as e:
            warnings.warn(f"{e}; drawing it again", RuntimeWarning, stacklevel=2)
    if arrays is None:
        train_images, train_labels = render_shapes(n_train, seed, STORED_SIZE, "train", progress)
        test_images, test_labels = render_shapes(n_test, seed, STORED_SIZE, "test", progress)
        arrays = {"train_images": train_images, "train_labels": train_labels, "test_images": test_images,
                  "test_labels": test_labels, "version": np.array(GENERATOR_VERSION, dtype=np.int64)}
        atomic_save_npz(path, arrays)
    return Dataset(
        name="shapes",
        train_images=resize_images(arrays["train_images"], image_size),
        train_labels=arrays["train_labels"],
        test_images=resize_images(arrays["test_images"], image_size),
        test_labels=arrays["test_labels"],
        classes=list(CLASSES),
        meta={"version": GENERATOR_VERSION, "seed": seed, "source": str(path), "stored_size": STORED_SIZE,
              "image_size": image_size, "resize": "PIL BOX (shrink) / BICUBIC (grow)"},
    )
