"""The embedded shapes data set: determinism, layout, balance, resizing, the cache, and colour carrying no class."""
import numpy as np
import pytest
from PIL import Image

from minivit.data import shapes
from minivit.data.shapes import CLASSES, GENERATOR_VERSION, load_shapes, render_shapes

K = len(CLASSES)


def test_classes_and_version():
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10
    assert isinstance(GENERATOR_VERSION, int) and GENERATOR_VERSION >= 1


def test_render_is_deterministic_and_extends():
    x1, y1 = render_shapes(25, seed=3)
    x2, y2 = render_shapes(25, seed=3)
    assert x1.tobytes() == x2.tobytes() and y1.tobytes() == y2.tobytes()
    x3, y3 = render_shapes(37, seed=3)                     # a larger set starts with the smaller one
    assert np.array_equal(x3[:25], x1) and np.array_equal(y3[:25], y1)
    x4, _ = render_shapes(25, seed=4)                      # another seed, other images
    assert not np.array_equal(x4, x1)
    x5, _ = render_shapes(25, seed=3, split="test")        # the test split is another stream
    assert not np.any(np.all(x5[:, None] == x1[None], axis=(2, 3, 4)))   # no test image equals a train image


def test_render_shapes_dtypes_and_ranges():
    for size in (16, 32, 64):
        x, y = render_shapes(12, seed=0, size=size)
        assert x.shape == (12, size, size, 3) and x.dtype == np.uint8
        assert y.shape == (12,) and y.dtype == np.int64
        assert y.min() >= 0 and y.max() < K
        assert x.std() > 20                                # not blank: shapes, gradients and noise are drawn
    x, y = render_shapes(0, seed=0)
    assert x.shape == (0, 64, 64, 3) and y.shape == (0,)


def test_classes_are_balanced():
    _, y = render_shapes(100, seed=1, size=8)
    assert np.array_equal(np.bincount(y, minlength=K), np.full(K, 10))    # exact in every multiple of ten
    _, y = render_shapes(57, seed=1, size=8)
    counts = np.bincount(y, minlength=K)
    assert counts.max() - counts.min() <= 1
    assert not np.array_equal(y[:10], y[10:20])            # shuffled blocks, not a fixed cycle


@pytest.mark.parametrize("bad", [0, -32, 32.0, "32", None, True])
def test_bad_image_size_is_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="image_size"):
        load_shapes(tmp_path, image_size=bad, n_train=10, n_test=10, progress=False)


def test_bad_render_arguments_are_rejected():
    with pytest.raises(ValueError, match="seed"):
        render_shapes(5, seed=-1)
    with pytest.raises(ValueError, match="split"):
        render_shapes(5, seed=0, split="valid")


def test_served_at_any_size(tmp_path):
    full = load_shapes(tmp_path, image_size=64, n_train=20, n_test=10, progress=False)
    x64, y64 = render_shapes(20, seed=0, size=64)          # the cache holds exactly what render_shapes draws
    assert np.array_equal(full.train_images, x64) and np.array_equal(full.train_labels, y64)
    for size in (32, 48, 64):
        d = load_shapes(tmp_path, image_size=size, n_train=20, n_test=10, progress=False)
        assert d.train_images.shape == (20, size, size, 3) and d.test_images.shape == (10, size, size, 3)
        assert d.image_shape == (size, size, 3) and d.num_classes == K and d.classes == CLASSES
        assert np.array_equal(d.train_labels, full.train_labels)
        assert d.meta["version"] == GENERATOR_VERSION and d.meta["seed"] == 0
    # 64 -> 32 with the BOX filter is the mean of each 2 x 2 block (up to rounding)
    d32 = load_shapes(tmp_path, image_size=32, n_train=20, n_test=10, progress=False)
    blocks = full.train_images.astype(np.float64).reshape(20, 32, 2, 32, 2, 3).mean(axis=(2, 4))
    assert np.abs(d32.train_images - blocks).max() <= 1.0
    # 48 is Pillow's BOX resize of the stored 64 x 64 image
    d48 = load_shapes(tmp_path, image_size=48, n_train=20, n_test=10, progress=False)
    ref = np.asarray(Image.fromarray(full.test_images[3]).resize((48, 48), Image.BOX))
    assert np.array_equal(d48.test_images[3], ref)


def _count_renders(monkeypatch):
    calls = []
    real = shapes.render_shapes

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(shapes, "render_shapes", counting)
    return calls


def test_cache_is_written_and_reused(tmp_path, monkeypatch):
    calls = _count_renders(monkeypatch)
    d1 = load_shapes(tmp_path, image_size=32, n_train=20, n_test=10, seed=5, progress=False)
    path = tmp_path / f"shapes-v{GENERATOR_VERSION}-train20-test10-seed5.npz"
    assert path.is_file() and d1.meta["source"] == str(path)
    assert len(calls) == 2                                 # train and test drawn once
    d2 = load_shapes(tmp_path, image_size=32, n_train=20, n_test=10, seed=5, progress=False)
    assert len(calls) == 2                                 # read back, not drawn again
    assert np.array_equal(d1.train_images, d2.train_images) and np.array_equal(d1.test_labels, d2.test_labels)
    with np.load(path, allow_pickle=False) as f:
        assert f["train_images"].shape == (20, 64, 64, 3) and int(f["version"]) == GENERATOR_VERSION
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # no temporary files left behind


def test_corrupt_cache_is_reported_and_redrawn(tmp_path, monkeypatch):
    d1 = load_shapes(tmp_path, image_size=32, n_train=20, n_test=10, progress=False)
    path = tmp_path / f"shapes-v{GENERATOR_VERSION}-train20-test10-seed0.npz"
    data = path.read_bytes()
    calls = _count_renders(monkeypatch)
    for broken in (data[: len(data) // 2], b"", b"not a zip file at all"):
        path.write_bytes(broken)
        with pytest.warns(RuntimeWarning, match=path.name):
            d2 = load_shapes(tmp_path, image_size=32, n_train=20, n_test=10, progress=False)
        assert np.array_equal(d1.train_images, d2.train_images)
        assert path.read_bytes() == data                   # the same bytes were written back
    assert len(calls) == 6


def test_cache_with_wrong_contents_is_redrawn(tmp_path):
    path = tmp_path / f"shapes-v{GENERATOR_VERSION}-train20-test10-seed0.npz"
    x, y = render_shapes(20, seed=0)
    xt, yt = render_shapes(10, seed=0, split="test")
    np.savez(path, train_images=x, train_labels=y, test_images=xt, test_labels=yt,
             version=np.array(GENERATOR_VERSION + 1))      # right name, other version inside
    with pytest.warns(RuntimeWarning, match="version"):
        d = load_shapes(tmp_path, image_size=64, n_train=20, n_test=10, progress=False)
    assert np.array_equal(d.train_images, x)


def test_new_version_ignores_old_files(tmp_path, monkeypatch):
    load_shapes(tmp_path, image_size=32, n_train=20, n_test=10, progress=False)
    old = tmp_path / f"shapes-v{GENERATOR_VERSION}-train20-test10-seed0.npz"
    monkeypatch.setattr(shapes, "GENERATOR_VERSION", GENERATOR_VERSION + 1)
    calls = _count_renders(monkeypatch)
    d = load_shapes(tmp_path, image_size=32, n_train=20, n_test=10, progress=False)
    new = tmp_path / f"shapes-v{GENERATOR_VERSION + 1}-train20-test10-seed0.npz"
    assert len(calls) == 2 and new.is_file() and old.is_file()
    assert d.meta["source"] == str(new) and d.meta["version"] == GENERATOR_VERSION + 1


def _colour_f_statistic(images, labels):
    """One-way analysis of variance of each image's mean R, G and B across the classes: the largest F of the three.

    F = (variance of the class means, scaled by the class size) / (variance within the classes). When every class
    has the same colour distribution F follows an F(K - 1, n - K) distribution, about 1 (99.9th percentile 3.1
    for K = 10, n = 1000); when the class moves the colour, F grows with the number of images.
    """
    rgb = images.reshape(len(images), -1, 3).mean(axis=1)                       # (n, 3) mean colour per image
    n = len(rgb)
    means = np.stack([rgb[labels == k].mean(axis=0) for k in range(K)])        # (K, 3)
    counts = np.bincount(labels, minlength=K)[:, None]                         # (K, 1)
    between = (counts * (means - rgb.mean(axis=0)) ** 2).sum(axis=0) / (K - 1)           # (3,)
    within = ((rgb - means[labels]) ** 2).sum(axis=0) / (n - K)                          # (3,)
    return (between / within).max()


def test_mean_colour_carries_no_class_information():
    x, y = render_shapes(1000, seed=0, size=12)            # 100 a class; colour statistics barely depend on size
    # every class has one colour distribution (inversion-symmetric, mean 127.5 in every pixel): F stays near 1
    f = _colour_f_statistic(x, y)
    assert f < 3.0, f
    # and the test has teeth: a generator that tints each class by its own offset of up to 25 (in 255) is caught
    tint = np.random.default_rng(0).uniform(-25, 25, (K, 3))                   # (K, 3)
    tinted = np.clip(x + tint[y][:, None, None, :], 0, 255).astype(np.uint8)
    f_tinted = _colour_f_statistic(tinted, y)
    assert f_tinted > 5.0, f_tinted
