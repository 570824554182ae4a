"""The one image loader (minivit.data.images): channels made explicit, the resize, uint8 out, errors naming the file."""
import numpy as np
import pytest
from PIL import Image

from minivit.data.images import load_image, load_image_files
from minivit.data.transforms import normalize


def test_load_image_scales_to_minus_one_one(tmp_path):
    Image.new("RGB", (5, 3), (255, 0, 128)).save(tmp_path / "c.png")
    x = normalize(load_image(tmp_path / "c.png", (8, 8), 3))       # the pretrained models' input, [-1, 1]
    assert x.shape == (8, 8, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], 1.0)
    np.testing.assert_allclose(x[..., 1], -1.0)
    np.testing.assert_allclose(x[..., 2], (128 - 127.5) / 127.5, atol=1e-6)
    g = normalize(load_image(tmp_path / "c.png", (4, 6), channels=1))
    # Pillow's luma L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 = 91 for (255, 0, 128)
    assert g.shape == (4, 6, 1)
    np.testing.assert_allclose(g, (91 - 127.5) / 127.5, atol=1e-6)
    (tmp_path / "not.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "not.png", (8, 8))


def test_channels_are_converted_as_asked_or_kept_from_the_file(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20                 # (H, W)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    Image.fromarray(np.dstack([gray, gray]), "LA").save(tmp_path / "la.png")
    Image.new("RGB", (4, 3), (10, 20, 30)).save(tmp_path / "c.png")
    own = load_image(tmp_path / "g.png")                                     # channels=None: the file's own
    assert own.shape == (3, 4, 1) and own.dtype == np.uint8 and np.array_equal(own[..., 0], gray)
    assert load_image(tmp_path / "la.png").shape == (3, 4, 1)               # gray with alpha: still gray
    assert load_image(tmp_path / "c.png").shape == (3, 4, 3)
    rgb = load_image(tmp_path / "g.png", channels=3)                         # gray repeated into RGB
    assert rgb.shape == (3, 4, 3) and all(np.array_equal(rgb[..., c], gray) for c in range(3))
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        load_image(tmp_path / "g.png", channels=4)


def test_load_image_files_resizes_each_as_pillow_bilinear(tmp_path):
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (9, 13, 3), dtype=np.uint8), rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)]
    paths = []
    for i, a in enumerate(pics):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    got = load_image_files(paths, (5, 7), 3)
    assert got.shape == (2, 5, 7, 3) and got.dtype == np.uint8
    for a, g in zip(pics, got):                      # the reference: Pillow's bilinear resize of the array, (W, H)
        want = np.asarray(Image.fromarray(a).resize((7, 5), getattr(Image, "Resampling", Image).BILINEAR))
        assert np.array_equal(g, want)
    assert np.array_equal(load_image(paths[1], (6, 6), 3), pics[1])           # its own size: the pixels as stored


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "nothere.png"
    with pytest.raises(FileNotFoundError, match="nothere.png does not exist"):
        load_image_files([missing], (4, 4), 3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="cannot read image") as e:
        load_image(broken, (4, 4), 3)
    assert str(broken) in str(e.value)
