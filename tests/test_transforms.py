"""The input pipeline, checked against references that do not share its code: naive slices, per-pixel loops,
np.rot90, closed-form values, and Pillow itself."""
import math

import numpy as np
import pytest
from PIL import Image

from minivit.data import DATASETS
from minivit.data.transforms import (DATASET_STATS, DEFAULT_AUGMENT, Augment, augment_batch, compute_stats, crop_at,
                                     dataset_stats, default_augment, mixup, normalize, one_hot, pad_images,
                                     random_affine, random_crop, random_flip, resize_images, shuffled_batches,
                                     warp_affine)


def images(B=6, H=9, W=11, C=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (B, H, W, C), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- normalize

def test_normalize_minus_one_one():
    x = np.array([0, 255, 51, 204], np.uint8).reshape(1, 2, 2, 1)
    y = normalize(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y[0, 0, 0, 0] == -1.0 and y[0, 0, 1, 0] == 1.0  # exactly
    np.testing.assert_allclose(y.ravel(), (np.array([0, 255, 51, 204]) - 127.5) / 127.5, rtol=0, atol=1e-7)


def test_normalize_mean_std():
    x = images(C=3)
    mean, std = DATASET_STATS["cifar10"]
    y = normalize(x, "mean_std", mean, std)
    ref = (x / 255.0 - np.array(mean)) / np.array(std)  # float64 closed form
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs mean and std"):
        normalize(x, "mean_std")
    with pytest.raises(ValueError, match="mode must be one of"):
        normalize(x, "zscore")
    with pytest.raises(ValueError, match="uint8"):
        normalize(x.astype(np.float32))


def test_compute_stats_matches_numpy():
    x = images(B=5, C=3, seed=3)
    mean, std = compute_stats(x, chunk=37)  # small chunks exercise the accumulation
    np.testing.assert_allclose(mean, x.reshape(-1, 3).mean(0) / 255, rtol=1e-12)
    np.testing.assert_allclose(std, x.reshape(-1, 3).std(0) / 255, rtol=1e-9)
    assert dataset_stats("mnist") == DATASET_STATS["mnist"]
    assert dataset_stats("shapes", x) == (mean, std)
    with pytest.raises(ValueError, match="no pinned mean/std"):
        dataset_stats("shapes")


# ------------------------------------------------------------------------------------------- crops and flips

def test_crop_at_equals_naive_slice():
    x = images()
    padded = pad_images(x, 3)
    assert padded.shape == (6, 15, 17, 3) and (padded[:, :3] == 0).all()
    top, left = np.array([0, 6, 2, 3, 1, 5]), np.array([6, 0, 4, 3, 2, 1])
    out = crop_at(padded, top, left, (9, 11))
    for b in range(6):
        np.testing.assert_array_equal(out[b], padded[b, top[b]:top[b] + 9, left[b]:left[b] + 11])


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_random_crop_is_a_window_of_the_padded_image(mode):
    x, pad = images(B=8), 2
    out = random_crop(x, pad, np.random.default_rng(1), mode=mode)
    assert out.shape == x.shape and out.dtype == np.uint8
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    offsets = set()
    for b in range(len(x)):
        hits = [(i, j) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                if np.array_equal(out[b], padded[b, i:i + 9, j:j + 11])]
        assert len(hits) == 1  # random pixels: exactly one window matches
        offsets.add(hits[0])
    assert len(offsets) > 1  # offsets are drawn per image
    assert random_crop(x, 0, np.random.default_rng(1)) is x


def test_random_flip():
    x = images()
    np.testing.assert_array_equal(random_flip(x, np.random.default_rng(0), p=1.0), x[:, :, ::-1])
    np.testing.assert_array_equal(random_flip(x, np.random.default_rng(0), p=0.0), x)
    out = random_flip(images(B=64), np.random.default_rng(0))
    src = images(B=64)
    flipped = [np.array_equal(o, s[:, ::-1]) for o, s in zip(out, src)]
    kept = [np.array_equal(o, s) for o, s in zip(out, src)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


# -------------------------------------------------------------------------------------------------- affine

def naive_warp(img, angle_deg, scale, dx, dy):
    """Per-pixel loop reference: inverse-map each output pixel, bilinear, zeros outside."""
    H, W, C = img.shape
    cy, cx = (H - 1) / 2, (W - 1) / 2
    t = math.radians(angle_deg)
    out = np.zeros((H, W, C))
    for y in range(H):
        for x in range(W):
            u, v = x - cx - dx, y - cy - dy
            sx = cx + (math.cos(t) * u - math.sin(t) * v) / scale
            sy = cy + (math.sin(t) * u + math.cos(t) * v) / scale
            x0, y0 = math.floor(sx), math.floor(sy)
            for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                    if 0 <= yy < H and 0 <= xx < W:
                        out[y, x] += wy * wx * img[yy, xx]
    return out


def test_affine_zero_params_is_identity():
    x = images()
    np.testing.assert_array_equal(random_affine(x, np.random.default_rng(0)), x)
    np.testing.assert_array_equal(warp_affine(x, np.zeros(6), np.ones(6), np.zeros((6, 2))), x)
    np.testing.assert_array_equal(warp_affine(x, np.zeros(6), np.ones(6), np.zeros((6, 2)), "nearest"), x)


def test_affine_rotation_and_shift_closed_forms():
    x = images(B=2, H=7, W=7, C=2)
    # 90 degrees counter-clockwise about the centre is np.rot90 on the (H, W) axes
    np.testing.assert_array_equal(warp_affine(x, [90, 90], [1, 1], np.zeros((2, 2))), np.rot90(x, 1, axes=(1, 2)))
    # an integer shift (dx=2, dy=-1) moves content right 2 and up 1, zeros coming in
    out = warp_affine(x, [0, 0], [1, 1], [[2, -1], [2, -1]])
    ref = np.zeros_like(x)
    ref[:, :6, 2:] = x[:, 1:, :5]
    np.testing.assert_array_equal(out, ref)


def test_affine_matches_per_pixel_reference():
    x = images(B=3, H=8, W=10, C=1, seed=5)
    angle, scale = np.array([17.0, -8.0, 33.0]), np.array([1.1, 0.9, 1.0])
    shift = np.array([[0.3, -1.2], [2.0, 0.5], [0.0, 0.0]])
    out = warp_affine(x, angle, scale, shift)
    for b in range(3):
        ref = naive_warp(x[b].astype(np.float64), angle[b], scale[b], *shift[b])
        assert np.abs(out[b].astype(np.float64) - ref).max() <= 0.5 + 1e-3  # rounding to uint8 only


def test_random_affine_varies_and_is_deterministic():
    x = images(B=4, H=12, W=12)
    a = random_affine(x, np.random.default_rng(7), 15, 2, 0.1)
    b = random_affine(x, np.random.default_rng(7), 15, 2, 0.1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.dtype == np.uint8 and not np.array_equal(a, x)


# --------------------------------------------------------------------------------------------------- mixup

def test_mixup_targets_and_weight():
    B, K = 8, 10
    x = np.random.default_rng(0).standard_normal((B, 4, 4, 3)).astype(np.float32)
    y = np.arange(B)  # distinct labels: each target row names its two sources
    mixed, t = mixup(x, y, alpha=0.4, rng=np.random.default_rng(3), num_classes=K)
    assert mixed.shape == x.shape and mixed.dtype == np.float32 and t.shape == (B, K) and t.dtype == np.float32
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
    lams = set()
    for i in range(B):
        nz = np.flatnonzero(t[i])
        lam = t[i, i]
        assert i in nz and len(nz) <= 2                        # its own label and at most one partner's
        partner = next((j for j in nz if j != i), i)
        np.testing.assert_allclose(mixed[i], lam * x[i] + (1 - lam) * x[partner] if partner != i else x[i],
                                   atol=1e-5)
        if partner != i:
            lams.add(round(float(lam), 6))
    assert len(lams) == 1  # one lam per batch
    same = mixup(x, y, 0.4, np.random.default_rng(3), num_classes=K)
    np.testing.assert_array_equal(same[0], mixed)


def test_mixup_off_and_soft_and_bad_labels():
    x = np.ones((3, 2, 2, 1), np.float32)
    out, t = mixup(x, np.array([0, 2, 1]), 0.0, np.random.default_rng(0), num_classes=3)
    np.testing.assert_array_equal(t, np.eye(3)[[0, 2, 1]])
    np.testing.assert_array_equal(out, x)
    soft = np.full((3, 4), 0.25, np.float32)
    np.testing.assert_allclose(mixup(x, soft, 1.0, np.random.default_rng(0))[1], soft)
    with pytest.raises(ValueError, match=r"labels must be ints in \[0, 3\)"):
        one_hot(np.array([0, 3]), 3)


# --------------------------------------------------------------------------------------- resize and batching

def test_resize_images_matches_pillow():
    x = images(B=3, H=10, W=14, C=3)
    out = resize_images(x, (7, 9))
    assert out.shape == (3, 7, 9, 3) and out.dtype == np.uint8
    ref = np.asarray(Image.fromarray(x[1]).resize((9, 7), getattr(Image, "Resampling", Image).BILINEAR))
    np.testing.assert_array_equal(out[1], ref)
    g = images(B=2, H=6, W=6, C=1)
    assert resize_images(g, 12).shape == (2, 12, 12, 1)
    assert resize_images(g, 6) is g


def test_shuffled_batches():
    rng = np.random.default_rng(0)
    batches = shuffled_batches(10, 4, rng)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert [len(b) for b in shuffled_batches(10, 4, np.random.default_rng(0), drop_last=True)] == [4, 4]
    a = shuffled_batches(10, 4, np.random.default_rng([1, 2, 3]))
    b = shuffled_batches(10, 4, np.random.default_rng([1, 2, 3]))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


# -------------------------------------------------------------------------------------------- Augment policy

def test_augment_defaults_and_validation():
    assert not default_augment("mnist").flip and default_augment("mnist").affine
    assert default_augment("cifar10").crop_pad == 4 and default_augment("cifar10").flip
    assert default_augment("folder:/somewhere") == Augment()
    assert set(DEFAULT_AUGMENT) == {*DATASETS, "folder"}       # every data set load_dataset knows has one
    with pytest.raises(ValueError, match="no default augmentation"):
        default_augment("imagenet")
    with pytest.raises(ValueError, match="crop_pad"):
        Augment(crop_pad=-1)
    with pytest.raises(ValueError, match="scale"):
        Augment(scale=1.5)
    with pytest.raises(Exception):
        default_augment("cifar10").crop_pad = 2  # frozen


@pytest.mark.parametrize("name", ["mnist", "cifar10", "fashion-mnist", "shapes"])
def test_augment_batch_deterministic(name):
    x = images(B=16, H=16, W=16, C=1 if "mnist" in name else 3)
    aug = default_augment(name)
    a = augment_batch(x, aug, np.random.default_rng([0, 1, 2]))
    b = augment_batch(x, aug, np.random.default_rng([0, 1, 2]))
    c = augment_batch(x, aug, np.random.default_rng([0, 1, 3]))
    assert a.shape == x.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert augment_batch(x, Augment(), np.random.default_rng(0)) is x


# ---------------------------------------------------------------------------------------------------- GPU

def cupy_or_skip():
    from minivit.backend import DeviceError, import_cupy
    try:
        return import_cupy()
    except DeviceError as e:
        pytest.skip(str(e))


def test_normalize_and_mixup_on_gpu_match_cpu():
    cp = cupy_or_skip()
    x = images(B=4, C=3)
    np.testing.assert_array_equal(normalize(cp.asarray(x)).get(), normalize(x))
    mean, std = DATASET_STATS["cifar10"]
    np.testing.assert_allclose(normalize(cp.asarray(x), "mean_std", mean, std).get(),
                               normalize(x, "mean_std", mean, std), rtol=1e-6, atol=1e-6)
    xf = normalize(x)
    m_cpu, t_cpu = mixup(xf, np.arange(4), 0.5, np.random.default_rng(0), num_classes=5)
    m_gpu, t_gpu = mixup(cp.asarray(xf), cp.arange(4), 0.5, np.random.default_rng(0), num_classes=5)
    np.testing.assert_allclose(m_gpu.get(), m_cpu, atol=1e-6)
    np.testing.assert_allclose(t_gpu.get(), t_cpu, atol=1e-6)
