"""Tests for minivit.draw and minivit.charts: every drawing function returns an RGB image of the expected size,
nothing is clipped at the edges, and save_png writes a valid PNG atomically."""
import os

import numpy as np
import pytest
from PIL import Image, ImageFont

from minivit import charts, draw


def assert_white_border(img, width=2):
    """Nothing drawn in the outer `width` pixels: labels and titles are inside the canvas, not clipped."""
    a = np.asarray(img)
    border = np.concatenate([a[:width].reshape(-1, 3), a[-width:].reshape(-1, 3),
                             a[:, :width].reshape(-1, 3), a[:, -width:].reshape(-1, 3)])
    assert (border == 255).all()


def count_colour(img, rgb):
    return int((np.asarray(img) == np.asarray(rgb, dtype=np.uint8)).all(axis=-1).sum())


# ------------------------------------------------------------------------------------------------------------
# colours

def test_colormaps_are_256x3_tables_through_their_anchors():
    for name, lut in draw.COLORMAPS.items():
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        np.testing.assert_array_equal(lut[0], draw._ANCHORS[name][0])
        np.testing.assert_array_equal(lut[-1], draw._ANCHORS[name][-1])
    with pytest.raises(ValueError, match="cmap"):
        draw.colormap("jet")


def test_apply_cmap_range_clip_and_nan():
    x = np.array([[0.0, 0.5, 1.0, 2.0, np.nan]])
    c = draw.apply_cmap(x, "viridis", vmin=0, vmax=1)
    assert c.shape == (1, 5, 3) and c.dtype == np.uint8
    lut = draw.COLORMAPS["viridis"]
    np.testing.assert_array_equal(c[0, 0], lut[0])
    np.testing.assert_array_equal(c[0, 2], lut[255])
    np.testing.assert_array_equal(c[0, 3], lut[255])                # clipped
    np.testing.assert_array_equal(c[0, 4], draw.NAN_COLOR)
    s = draw.apply_cmap(np.array([-1.0, 0.0, 3.0]), "rdbu", symmetric=True)   # -3..3: 0 in the middle
    np.testing.assert_array_equal(s[1], draw.COLORMAPS["rdbu"][128])


def test_to_uint8():
    x = np.array([[-2.0, 0.0, 1.0], [0.0, 0.5, 1.0]])
    u = draw.to_uint8(x)                                             # symmetric, one scale: 0 -> mid grey
    assert u.dtype == np.uint8 and u.shape == x.shape
    assert u[0, 0] == 0 and u[0, 1] == 128 and u[1, 1] == 159
    p = draw.to_uint8(x, symmetric=False, per_item=True)             # each row min -> 0, max -> 255
    np.testing.assert_array_equal(p.min(axis=1), [0, 0])
    np.testing.assert_array_equal(p.max(axis=1), [255, 255])
    assert (draw.to_uint8(np.zeros((2, 3))) == 128).all()


# ------------------------------------------------------------------------------------------------------------
# pictures

def test_heatmap_size_mode_and_contents():
    a = np.arange(12.0).reshape(3, 4)
    img = draw.heatmap(a, title="a title", xlabel="column", ylabel="row", scale=10)
    assert img.mode == "RGB"
    assert img.size[0] > 40 and img.size[1] > 30
    assert count_colour(img, draw.COLORMAPS["viridis"][255]) >= 100         # the max cell, 10 x 10 pixels
    assert count_colour(img, draw.COLORMAPS["viridis"][0]) >= 100            # the min cell
    assert_white_border(img)
    bare = draw.heatmap(a, scale=10, colorbar=False, ticks=False)
    assert bare.size == (40 + 20, 30 + 20)                                  # the cells plus a 10 px margin
    wider = draw.heatmap(a, scale=20, colorbar=False, ticks=False)
    assert wider.size == (80 + 20, 60 + 20)
    with pytest.raises(ValueError, match="2-D"):
        draw.heatmap(np.zeros((2, 2, 2)))


def test_heatmap_handles_constant_nan_and_one_row():
    for a in (np.ones((4, 4)), np.array([[np.nan, 1.0], [2.0, 3.0]]), np.arange(50.0)[None]):
        img = draw.heatmap(a, title="t")
        assert img.mode == "RGB"
        assert_white_border(img)


def test_tile_grid_shared_scale_labels_and_pictures():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(6, 4, 4))
    img = draw.tile_grid(maps, nrows=2, ncols=3, title="similarity", xlabel="input patch column",
                         ylabel="input patch row", scale=8)
    assert img.mode == "RGB"
    assert_white_border(img)
    no_bar = draw.tile_grid(maps, 2, 3, scale=8, colorbar=False, pad=4)
    assert no_bar.size == (3 * 32 + 2 * 4 + 20, 2 * 32 + 4 + 20)
    # one shared scale: the global max appears in exactly one tile, as viridis's top colour
    assert count_colour(no_bar, draw.COLORMAPS["viridis"][255]) == 64
    # pictures are pasted as they are, next to colour-mapped arrays
    pic = np.full((4, 4, 3), (10, 200, 30), dtype=np.uint8)
    mixed = draw.tile_grid([maps[0], pic, Image.new("RGB", (4, 4), (1, 2, 3))], nrows=1, scale=8,
                           titles=["map", "array", "PIL"])
    assert count_colour(mixed, (10, 200, 30)) == 32 * 32 and count_colour(mixed, (1, 2, 3)) == 32 * 32
    assert_white_border(mixed)
    with pytest.raises(ValueError, match="fit"):
        draw.tile_grid(maps, 2, 2)


def test_image_grid_size_and_checks():
    imgs = np.zeros((5, 6, 8, 3), dtype=np.uint8)
    g = draw.image_grid(imgs, ncols=3, scale=2, pad=2)
    assert g.mode == "RGB"
    assert g.size == (3 * 16 + 2 * 2 + 20, 2 * 12 + 2 + 20)
    t = draw.image_grid(imgs[..., 0], ncols=5, titles=list("abcde"), title="sheet")
    assert t.mode == "RGB"
    assert_white_border(t)
    with pytest.raises(ValueError, match="uint8"):
        draw.image_grid(imgs.astype(np.float32), ncols=3)


def test_overlay_size_and_blend():
    image = np.full((16, 24, 3), 100, dtype=np.uint8)
    heat = np.array([[0.0, 1.0], [0.5, 0.25]])
    out = draw.overlay(image, heat, alpha=0.5)
    assert out.mode == "RGB" and out.size == (24, 16)
    assert draw.overlay(image, heat, scale=3).size == (72, 48)
    np.testing.assert_array_equal(np.asarray(draw.overlay(image, heat, alpha=0.0)), image)
    full = np.asarray(draw.overlay(image, heat, alpha=1.0, cmap="gray"))
    assert full.min() == 0 and full.max() == 255                   # heat scaled to its own min..max
    gray = draw.overlay(image[:, :, 0], heat)                        # (H, W) images are fine too
    assert gray.size == (24, 16)


def test_scatter_plot_size_and_groups():
    x = np.repeat(np.arange(1, 13), 4)
    y = np.random.default_rng(1).uniform(0, 120, size=x.size)
    img = charts.scatter_plot(x, y, groups=np.tile(["a", "b", "c", "d"], 12), title="mean attention distance",
                              xlabel="network depth (layer)", ylabel="mean attention distance (pixels)")
    assert img.mode == "RGB" and img.size == (560, 420)
    assert_white_border(img)
    assert charts.scatter_plot([0.5], [2.0], size=(300, 200)).size == (300, 200)
    with pytest.raises(ValueError, match="same length"):
        charts.scatter_plot([1, 2], [1])


def test_line_plot_size_log_and_legend():
    steps = np.arange(0, 1000, 10)
    series = {"train": (steps, np.exp(-steps / 300)), "val": (steps, np.exp(-steps / 400) + 0.05),
              "bare y": np.linspace(1, 0.1, 50)}
    img = charts.line_plot(series, title="loss", xlabel="step", ylabel="loss", logy=True)
    assert img.mode == "RGB" and img.size == (560, 420)
    assert_white_border(img)
    with_zero = charts.line_plot({"a": (np.arange(3), np.array([1.0, 0.0, 0.1]))}, logy=True, size=(320, 240))
    assert with_zero.size == (320, 240)
    assert charts.line_plot({"const": np.ones(5)}, legend=False).mode == "RGB"
    assert charts.line_plot({"a": ([0, 1], [0, 1])}, legend="lower right").mode == "RGB"
    with pytest.raises(ValueError, match="legend"):
        charts.line_plot({"a": ([0, 1], [0, 1])}, legend="middle")
    with pytest.raises(ValueError, match="at least one"):
        charts.line_plot({})


def test_ticks_are_round_numbers():
    ticks, lo, hi = charts._linear_ticks(0.0, 187.3)
    assert lo == 0 and hi >= 187.3 and list(ticks) == [0, 50, 100, 150, 200]
    assert charts._tick_labels([0.0, 0.25, 0.5]) == ["0.00", "0.25", "0.50"]
    assert charts._tick_labels([0.0, 0.5, 1.0]) == ["0.0", "0.5", "1.0"]
    log, lo, hi = charts._log_ticks(1e-4, 3.0)
    assert lo == 1e-4 and hi == 10.0 and len(log) == 6
    assert draw._fmt(2.5e6) == "2.5e6" and draw._fmt(0.1234) == "0.123"


@pytest.fixture
def bitmap_font(monkeypatch):
    """Pretend FreeType is missing: the old bitmap font, enlarged."""
    monkeypatch.setattr(draw, "_font", lambda size: (ImageFont.load_default_imagefont()
                                                     if hasattr(ImageFont, "load_default_imagefont")
                                                     else ImageFont.load_default(), max(1, round(size / 8))))
    draw._text_mask.cache_clear()
    yield
    draw._text_mask.cache_clear()


def test_drawing_without_freetype(bitmap_font):
    img = draw.heatmap(np.eye(3), title="bitmap font", xlabel="x", ylabel="y")
    assert img.mode == "RGB"
    assert_white_border(img)
    assert charts.line_plot({"a": np.arange(5.0)}, title="t", xlabel="x", ylabel="y").size == (560, 420)


# ------------------------------------------------------------------------------------------------------------
# files

def test_save_png_roundtrip_and_no_temp_files(tmp_path):
    img = draw.heatmap(np.arange(6.0).reshape(2, 3))
    path = tmp_path / "nested" / "folder" / "map.png"
    draw.save_png(img, path)
    assert os.listdir(path.parent) == ["map.png"]
    with Image.open(path) as back:
        assert back.format == "PNG" and back.size == img.size
        np.testing.assert_array_equal(np.asarray(back.convert("RGB")), np.asarray(img))
    draw.save_png(np.zeros((4, 5, 3), dtype=np.uint8), path)        # uint8 arrays too; overwrite in place
    assert os.listdir(path.parent) == ["map.png"]
    with Image.open(path) as back:
        assert back.size == (5, 4)


def test_side_by_side_pads_and_aligns():
    tall, short = Image.new("RGB", (3, 6), (255, 0, 0)), Image.new("RGB", (2, 2), (0, 0, 255))
    top = draw.side_by_side([tall, short], pad=4)
    assert top.size == (3 + 4 + 2, 6)
    a = np.asarray(top)
    assert (a[:, :3] == (255, 0, 0)).all() and (a[:, 3:7] == 255).all()       # the gap is white
    assert (a[:2, 7:] == (0, 0, 255)).all() and (a[2:, 7:] == 255).all()      # top-aligned
    mid = np.asarray(draw.side_by_side([tall, short], pad=0, align="center"))
    assert mid.shape == (6, 5, 3) and (mid[2:4, 3:] == (0, 0, 255)).all() and (mid[:2, 3:] == 255).all()
    with pytest.raises(ValueError, match="align"):
        draw.side_by_side([tall], align="bottom")
