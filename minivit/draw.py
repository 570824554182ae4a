"""The image kit on Pillow alone: colormaps, value scaling, text, heat maps, tile grids, overlays, PNG files.

`minivit inspect` (figures.py) and the lessons draw with these; the package itself never draws (house style rule
10). Charts with axes (line and scatter plots) are in minivit/charts.py, drawn with this module's text and colours.
Every function returns a `PIL.Image.Image` in mode "RGB"; `save_png` writes one to disk.

Conventions:
    - arrays are NumPy (CuPy arrays are copied to the host); images are channels-last uint8 (H, W, C);
    - white background, dark text, margins wide enough for every label; a colour bar shows the value range, so
      a picture can be read without its caption;
    - colormaps are 256 x 3 uint8 lookup tables interpolated from a few anchor colours (no matplotlib):
      'viridis' and 'inferno' (sequential, perceptually ordered), 'rdbu' (diverging: blue < 0 < red),
      'gray'. NaN values are drawn light grey;
    - text uses Pillow's built-in font: Aileron at any size with Pillow >= 10.1 and FreeType, else the old
      bitmap font enlarged by an integer factor (blocky but legible). Keep labels to ASCII.
"""
import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from minivit.backend import to_numpy
from minivit.fileio import atomic_write_bytes

_RS = getattr(Image, "Resampling", Image)          # Pillow >= 9.1 moved the filters to Image.Resampling

WHITE = (255, 255, 255)
INK = (33, 33, 33)             # text
AXIS = (90, 90, 90)            # frames and tick marks
GRID = (228, 228, 228)         # grid lines behind the data
NAN_COLOR = (205, 205, 205)    # NaN cells in a heat map
FONT_SIZE = 14                 # axis labels; ticks use FONT_SIZE - 2, titles FONT_SIZE + 2

# Categorical colours for groups and series (the "tab10" palette, the usual default in plotting libraries).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]

# Anchor colours, evenly spaced from the low end (first) to the high end (last) of each map. viridis and
# inferno are samples of matplotlib's maps at 0, 1/8, ..., 1 (and 0, 1/9, ..., 1); rdbu is ColorBrewer's RdBu
# reversed, so negative is blue and positive red, with near-white at the centre.
_ANCHORS = {
    "viridis": [(68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142),
                (31, 158, 137), (53, 183, 121), (110, 206, 88), (253, 231, 37)],
    "inferno": [(0, 0, 4), (27, 12, 65), (74, 12, 107), (120, 28, 109), (165, 44, 96),
                (207, 68, 70), (237, 105, 37), (251, 155, 6), (247, 209, 61), (252, 255, 164)],
    "rdbu": [(5, 48, 97), (33, 102, 172), (67, 147, 195), (146, 197, 222), (247, 247, 247),
             (244, 165, 130), (214, 96, 77), (178, 24, 43), (103, 0, 31)],
    "gray": [(0, 0, 0), (255, 255, 255)],
}
DIVERGING = ("rdbu",)


def _lut(anchors):
    """anchors: list of m RGB triples -> (256, 3) uint8, linear interpolation between evenly spaced anchors."""
    a = np.asarray(anchors, dtype=np.float64)                      # (m, 3)
    t = np.linspace(0.0, 1.0, 256)                                 # (256,)
    pos = np.linspace(0.0, 1.0, len(a))                            # (m,)
    lut = np.stack([np.interp(t, pos, a[:, ch]) for ch in range(3)], axis=1)  # (256, 3)
    return np.clip(np.round(lut), 0, 255).astype(np.uint8)


COLORMAPS = {name: _lut(anchors) for name, anchors in _ANCHORS.items()}


# ----------------------------------------------------------------------------------------------------------------
# colours and value scaling

def colormap(cmap="viridis"):
    """cmap: a name in COLORMAPS or a (256, 3) uint8 table -> (256, 3) uint8 lookup table."""
    if isinstance(cmap, str):
        if cmap not in COLORMAPS:
            raise ValueError(f"cmap must be one of {sorted(COLORMAPS)} or a (256, 3) table, got {cmap!r}")
        return COLORMAPS[cmap]
    lut = np.asarray(cmap)
    if lut.shape != (256, 3):
        raise ValueError(f"a colormap table must have shape (256, 3), got {lut.shape}")
    return lut.astype(np.uint8)


def _host(x):
    """NumPy or CuPy array (or list) -> NumPy array on the host."""
    return np.asarray(to_numpy(x))


def _value_range(x, vmin=None, vmax=None, symmetric=False):
    """Limits for colour scaling: the data's finite min/max unless given; symmetric: -m..m with m = max |x|."""
    finite = x[np.isfinite(x)]
    if symmetric and vmin is None and vmax is None:
        m = float(np.abs(finite).max()) if finite.size else 1.0
        vmin, vmax = -m, m
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    return float(vmin), float(vmax)


def apply_cmap(x, cmap="viridis", vmin=None, vmax=None, symmetric=False):
    """x: (...) numbers -> (..., 3) uint8: vmin maps to the first colour, vmax to the last, NaN to light grey.

    vmin/vmax default to the data's finite min and max (or -m..m, m = max |x|, when symmetric=True);
    values outside are clipped. A constant array maps to the middle colour.
    """
    x = _host(x).astype(np.float64)
    lut = colormap(cmap)
    vmin, vmax = _value_range(x, vmin, vmax, symmetric)
    if vmax > vmin:
        t = (x - vmin) / (vmax - vmin)
    else:
        t = np.full_like(x, 0.5)
    idx = np.clip(np.round(np.nan_to_num(t, nan=0.0) * 255), 0, 255).astype(np.intp)
    out = lut[idx]                                                 # (..., 3)
    out[np.isnan(x)] = NAN_COLOR
    return out


def to_uint8(x, symmetric=True, per_item=False):
    """x: (...) numbers -> the same shape in uint8 [0, 255], for showing filters, embeddings or float images.

    symmetric=True: 0 maps to 128 (mid grey) and the largest |x| to 0 or 255, so the sign stays visible;
    symmetric=False: min maps to 0 and max to 255. per_item=True scales each x[i] on its own (one filter,
    one image at a time); otherwise one scale for the whole array. A constant (or all-zero) item maps to 128.
    """
    x = _host(x).astype(np.float64)
    axes = tuple(range(1, x.ndim)) if per_item else None
    if symmetric:
        m = np.abs(x).max(axis=axes, keepdims=per_item)
        t = 0.5 + 0.5 * x / np.where(m > 0, m, 1.0)
    else:
        lo = x.min(axis=axes, keepdims=per_item)
        hi = x.max(axis=axes, keepdims=per_item)
        span = hi - lo
        t = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.5)
    return np.clip(np.round(t * 255), 0, 255).astype(np.uint8)


def _as_picture(img):
    """PIL image or (H, W) / (H, W, C) uint8 array -> RGB PIL image."""
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    a = _host(img)
    if a.dtype != np.uint8:
        raise ValueError(f"images must be uint8 arrays (use to_uint8 first), got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"an image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


# ----------------------------------------------------------------------------------------------------------------
# text

@functools.lru_cache(maxsize=None)
def _font(size):
    """size in pixels -> (font, factor): a scalable font when available (factor 1), else the bitmap font and
    the integer factor to enlarge its rendering by."""
    try:
        return ImageFont.load_default(size=size), 1        # Pillow >= 10.1 with FreeType: Aileron
    except (TypeError, ImportError, OSError):              # older Pillow (no size argument), or no FreeType
        pass
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), 1
    except (ImportError, OSError):
        pass
    return ImageFont.load_default(), max(1, round(size / 8))   # the bitmap font is about 11 px tall


def font(size):
    """A PIL font of about `size` pixels for drawing with ImageDraw.text: Pillow's scalable default font
    (Pillow >= 10.1), else DejaVu Sans, else the small bitmap font (then `size` is not honoured)."""
    f, factor = _font(size)
    return f


def _bbox(font, text):
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    try:
        return draw.textbbox((0, 0), text, font=font)
    except (AttributeError, ValueError):                   # Pillow < 9.2 with the bitmap font
        w, h = draw.textsize(text, font=font)
        return 0, 0, w, h


@functools.lru_cache(maxsize=4096)
def _text_mask(text, size):
    """-> 'L' image: the text in white on black, one line box high (so labels of one size line up)."""
    font, factor = _font(size)
    l, _, r, b = _bbox(font, text) if text else (0, 0, 0, 0)
    line_b = _bbox(font, "Ag")[3]
    x0 = -min(l, 0)
    w, h = max(1, r + x0), max(1, b, line_b)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).text((x0, 0), text, fill=255, font=font)
    if factor > 1:
        mask = mask.resize((w * factor, h * factor), _RS.NEAREST)
    return mask


def _text_size(text, size, rotate=False):
    w, h = _text_mask(str(text), size).size
    return (h, w) if rotate else (w, h)


def _put_text(img, xy, text, size, anchor="lt", fill=INK, rotate=False):
    """Draw `text` on `img` at `xy`; anchor: horizontal l/m/r then vertical t/m/b; rotate: read bottom to top."""
    mask = _text_mask(str(text), size)
    if rotate:
        mask = mask.rotate(90, expand=True)
    w, h = mask.size
    x = int(round(xy[0] - {"l": 0, "m": w / 2, "r": w}[anchor[0]]))
    y = int(round(xy[1] - {"t": 0, "m": h / 2, "b": h}[anchor[1]]))
    img.paste(tuple(fill[:3]), (x, y, x + w, y + h), mask)


# ----------------------------------------------------------------------------------------------------------------
# number labels

def _fmt(v, sig=3):
    """A short label for one number: 0.25, 12.5, 3000, 1e-5, 2.5e6."""
    v = float(v)
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    if 1e-3 <= abs(v) < 1e5:
        s = f"{v:.{sig}g}"
        if "e" in s:                                   # e.g. 1.23e+03 at sig=3: write 1230 instead
            s = f"{v:.0f}"
        return s
    mant, exp = f"{v:.{max(sig - 1, 1)}e}".split("e")            # '2.50e+06' -> '2.5e6'
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


# ----------------------------------------------------------------------------------------------------------------
# heat maps and tile grids

def _range_labels(values, vmin, vmax):
    """Labels for colour-bar values, all with the decimals that resolve 5% of the range (0.097, 0.049, 0.001)."""
    span = abs(vmax - vmin)
    big = max(abs(vmin), abs(vmax))
    if big >= 1e5 or 0 < big < 1e-4 or (0 < span < 1e-4 * big):
        return [_fmt(v) for v in values]
    d = max(0, math.ceil(-math.log10(span / 20))) if span > 0 else 3
    out = []
    for v in values:
        s = f"{float(v) + 0.0:.{d}f}"
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        out.append("0" if s in ("-0", "") else s)
    return out


def _colorbar(img, box, cmap, vmin, vmax, size, n_labels=3):
    """Draw a vertical colour bar in box (x0, y0, x1, y1): vmax at the top, vmin at the bottom, labels right."""
    x0, y0, x1, y1 = box
    h = y1 - y0
    ramp = colormap(cmap)[::-1]                                    # (256, 3) top = high
    bar = Image.fromarray(ramp[:, None, :].repeat(x1 - x0, axis=1)).resize((x1 - x0, h), _RS.BILINEAR)
    img.paste(bar, (x0, y0))
    draw = ImageDraw.Draw(img)
    draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=AXIS)
    values = np.linspace(vmax, vmin, n_labels)
    for i, (v, label) in enumerate(zip(values, _range_labels(values, vmin, vmax))):
        y = y0 + (h - 1) * i / max(n_labels - 1, 1)
        draw.line((x1, y, x1 + 3, y), fill=AXIS)
        anchor = "lt" if i == 0 else ("lb" if i == n_labels - 1 else "lm")
        _put_text(img, (x1 + 6, y if 0 < i < n_labels - 1 else (y0 - 2 if i == 0 else y1 + 2)), label, size,
                  anchor)


def _colorbar_width(vmin, vmax, size, n_labels=3):
    labels = _range_labels(np.linspace(vmax, vmin, n_labels), vmin, vmax)
    return 14 + 6 + max(_text_size(s, size)[0] for s in labels)


def _index_step(n, cell_px, label_px):
    """Every how many cells to label so that labels `label_px` wide do not collide."""
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        if step * cell_px >= label_px + 4:
            return step
    return max(1, n)


def heatmap(array2d, title=None, cmap="viridis", vmin=None, vmax=None, scale=None, colorbar=True,
            xlabel=None, ylabel=None, ticks=True, symmetric=False, font_size=FONT_SIZE):
    """array2d: (h, w) -> RGB image: the array as coloured cells, with index ticks, axis labels, title, colour bar.

    scale: pixels per cell (default: the larger side becomes about 256 px); cells are enlarged with nearest
    neighbour, so each value stays one flat square. ticks: label row and column indices (0-based). The colour
    bar shows vmax (top), the midpoint and vmin (bottom); vmin/vmax default to the data's range (-m..m with
    symmetric=True, the natural choice with the diverging 'rdbu' map).
    """
    a = _host(array2d).astype(np.float64)
    if a.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D array, got shape {a.shape}")
    h, w = a.shape
    vmin, vmax = _value_range(a, vmin, vmax, symmetric)
    s = int(scale) if scale else max(1, 256 // max(h, w))
    body = Image.fromarray(apply_cmap(a, cmap, vmin, vmax)).resize((w * s, h * s), _RS.NEAREST)
    bw, bh = body.size

    fs, ts, ls = font_size - 2, font_size + 2, font_size         # ticks, title, axis labels
    pad, gap, tick = 10, 6, 4
    th = _text_size("0", fs)[1]
    xstep = _index_step(w, s, _text_size(str(w - 1), fs)[0])
    ystep = _index_step(h, s, th)
    left = pad + (_text_size(ylabel, ls)[1] + gap if ylabel else 0)
    left += (_text_size(str(h - 1), fs)[0] + tick + 3) if ticks else 0
    top = pad + (_text_size(title, ts)[1] + gap if title else 0)
    bar_h = max(bh, 4 * th)
    right = pad + (12 + _colorbar_width(vmin, vmax, fs) if colorbar else 0)
    bottom = pad + (tick + 2 + th if ticks else 0) + (gap + _text_size(xlabel, ls)[1] if xlabel else 0)
    width = max(left + bw + right, (_text_size(title, ts)[0] + 2 * pad) if title else 0)
    height = top + max(bh, bar_h if colorbar else 0) + bottom
    img = Image.new("RGB", (width, height), WHITE)
    x0, y0 = left, top
    img.paste(body, (x0, y0))
    draw = ImageDraw.Draw(img)
    draw.rectangle((x0 - 1, y0 - 1, x0 + bw, y0 + bh), outline=AXIS)
    if ticks:
        for c in range(0, w, xstep):
            x = x0 + c * s + s / 2
            draw.line((x, y0 + bh, x, y0 + bh + tick), fill=AXIS)
            _put_text(img, (x, y0 + bh + tick + 2), str(c), fs, "mt")
        for r in range(0, h, ystep):
            y = y0 + r * s + s / 2
            draw.line((x0 - 1 - tick, y, x0 - 1, y), fill=AXIS)
            _put_text(img, (x0 - tick - 4, y), str(r), fs, "rm")
    if xlabel:
        _put_text(img, (x0 + bw / 2, height - pad), xlabel, ls, "mb")
    if ylabel:
        _put_text(img, (pad, y0 + bh / 2), ylabel, ls, "lm", rotate=True)
    if title:
        _put_text(img, (max(width / 2, pad + _text_size(title, ts)[0] / 2), pad), title, ts, "mt")
    if colorbar:
        bx = x0 + bw + 12
        _colorbar(img, (bx, y0, bx + 14, y0 + bar_h), cmap, vmin, vmax, fs)
    return img


def _split_items(items):
    """Sequence (or stacked array) of 2-D arrays / pictures -> list of ('data', float array) | ('image', PIL)."""
    if isinstance(items, np.ndarray) or hasattr(items, "__cuda_array_interface__"):
        items = list(_host(items))
    out = []
    for i, it in enumerate(items):
        if isinstance(it, Image.Image):
            out.append(("image", it.convert("RGB")))
            continue
        a = _host(it)
        if a.ndim == 2:
            out.append(("data", a.astype(np.float64)))
        elif a.ndim == 3 and a.shape[2] in (1, 3, 4):
            out.append(("image", _as_picture(a)))
        else:
            raise ValueError(f"item {i}: expected a 2-D array, an (h, w, C) uint8 image or a PIL image, "
                             f"got shape {a.shape}")
    return out


def tile_grid(items, nrows=None, ncols=None, titles=None, pad=4, cmap="viridis", vmin=None, vmax=None,
              symmetric=False, scale=None, title=None, xlabel=None, ylabel=None, colorbar=True,
              font_size=FONT_SIZE):
    """items: n 2-D arrays and/or pictures -> RGB image: an nrows x ncols grid of small tiles, row-major.

    2-D arrays are coloured with ONE shared scale (vmin/vmax over all of them, or given) and a shared colour
    bar on the right; (h, w, 3) uint8 arrays and PIL images are pasted as they are. scale: pixels per array
    cell / image pixel (default: tiles about 64 px). titles: one short label above each tile. xlabel/ylabel:
    an axis label under / left of the grid, which also turns on index labels for the columns / rows
    (e.g. xlabel="input patch column", ylabel="input patch row" for position-embedding similarity).
    """
    parts = _split_items(items)
    n = len(parts)
    if n == 0:
        raise ValueError("tile_grid needs at least one item")
    if nrows is None and ncols is None:
        ncols = math.ceil(math.sqrt(n))
    if ncols is None:
        ncols = math.ceil(n / nrows)
    if nrows is None:
        nrows = math.ceil(n / ncols)
    if nrows * ncols < n:
        raise ValueError(f"{n} items do not fit a {nrows} x {ncols} grid")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles must have one entry per item ({n}), got {len(titles)}")
    data = [a for kind, a in parts if kind == "data"]
    if data:
        flat = np.concatenate([a.ravel() for a in data])
        vmin, vmax = _value_range(flat, vmin, vmax, symmetric)
    biggest = max(max(a.shape[:2] if kind == "data" else a.size) for kind, a in parts)   # longest side
    s = int(scale) if scale else max(1, 64 // biggest)
    tiles = []
    for kind, a in parts:
        if kind == "data":
            h, w = a.shape
            tiles.append(Image.fromarray(apply_cmap(a, cmap, vmin, vmax)).resize((w * s, h * s), _RS.NEAREST))
        else:
            tiles.append(a.resize((a.size[0] * s, a.size[1] * s), _RS.NEAREST) if s > 1 else a)
    cw = max(t.size[0] for t in tiles)
    ch = max(t.size[1] for t in tiles)

    fs, ts, ls = font_size - 2, font_size + 2, font_size
    margin, gap = 10, 6
    th = _text_size("0", fs)[1]
    tt = (th + 2) if titles is not None else 0                    # room for the tile titles
    if titles is not None:
        cw = max(cw, max(_text_size(str(t), fs)[0] for t in titles))
    cell_w, cell_h = cw + pad, ch + tt + pad
    row_idx = ylabel is not None and nrows > 1
    col_idx = xlabel is not None and ncols > 1
    left = margin + (_text_size(ylabel, ls)[1] + gap if ylabel else 0)
    left += (_text_size(str(nrows - 1), fs)[0] + gap) if row_idx else 0
    top = margin + (_text_size(title, ts)[1] + gap if title else 0)
    grid_w, grid_h = ncols * cell_w - pad, nrows * cell_h - pad
    show_bar = colorbar and bool(data)
    right = margin + (12 + _colorbar_width(vmin, vmax, fs) if show_bar else 0)
    bottom = margin + (th + gap if col_idx else 0) + (_text_size(xlabel, ls)[1] + gap if xlabel else 0)
    bar_h = max(grid_h - tt, 4 * th)                              # level with the tiles, below the first titles
    width = max(left + grid_w + right, (_text_size(title, ts)[0] + 2 * margin) if title else 0)
    height = top + (max(grid_h, tt + bar_h) if show_bar else grid_h) + bottom
    img = Image.new("RGB", (width, height), WHITE)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        x = left + c * cell_w + (cw - tile.size[0]) // 2
        y = top + r * cell_h + tt + (ch - tile.size[1]) // 2
        img.paste(tile, (x, y))
        if titles is not None:
            _put_text(img, (left + c * cell_w + cw / 2, top + r * cell_h), str(titles[i]), fs, "mt")
    if row_idx:
        for r in range(nrows):
            _put_text(img, (left - gap, top + r * cell_h + tt + ch / 2), str(r), fs, "rm")
    if col_idx:
        for c in range(ncols):
            _put_text(img, (left + c * cell_w + cw / 2, top + grid_h + gap // 2), str(c), fs, "mt")
    if xlabel:
        _put_text(img, (left + grid_w / 2, height - margin), xlabel, ls, "mb")
    if ylabel:
        _put_text(img, (margin, top + grid_h / 2), ylabel, ls, "lm", rotate=True)
    if title:
        _put_text(img, (width / 2, margin), title, ts, "mt")
    if show_bar:
        bx = left + grid_w + 12
        _colorbar(img, (bx, top + tt, bx + 14, top + tt + bar_h), cmap, vmin, vmax, fs)
    return img


def image_grid(images, ncols=None, scale=1, titles=None, pad=2, title=None, font_size=FONT_SIZE):
    """images: (n, h, w, C) or (n, h, w) uint8 -> RGB image: a sample sheet, row-major, ncols per row.

    For float data (embedding filters, principal components) convert first: to_uint8(x, per_item=True).
    """
    a = _host(images)
    if a.dtype != np.uint8:
        raise ValueError(f"image_grid needs uint8 images (use to_uint8 first), got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[..., None]                                           # (n, h, w, 1)
    if a.ndim != 4 or a.shape[3] not in (1, 3, 4):
        raise ValueError(f"images must have shape (n, h, w), (n, h, w, 1), (n, h, w, 3) or (n, h, w, 4), "
                         f"got {a.shape}")
    pics = [_as_picture(im) for im in a]
    return tile_grid(pics, ncols=ncols, titles=titles, pad=pad, scale=scale, title=title, colorbar=False,
                     font_size=font_size)


def overlay(image, heat, alpha=0.5, cmap="inferno", vmin=None, vmax=None, scale=1):
    """image: (H, W, C) uint8 (or PIL), heat: (h, w) -> RGB image (W*scale, H*scale): the heat map blended on top.

    The heat map is scaled to [0, 1] by vmin/vmax (default its min and max), upsampled bilinearly to the
    image size, coloured and mixed in: out = (1 - alpha) * image + alpha * colour.
    """
    pic = _as_picture(image)
    if scale > 1:
        pic = pic.resize((pic.size[0] * int(scale), pic.size[1] * int(scale)), _RS.NEAREST)
    h = _host(heat).astype(np.float64)
    if h.ndim != 2:
        raise ValueError(f"heat must be a 2-D array, got shape {h.shape}")
    lo, hi = _value_range(h, vmin, vmax)
    t = np.clip((h - lo) / (hi - lo), 0, 1) if hi > lo else np.full_like(h, 0.5)
    t = np.nan_to_num(t, nan=0.0).astype(np.float32)
    up = np.asarray(Image.fromarray(t).resize(pic.size, _RS.BILINEAR))      # (H, W) in [0, 1]
    colour = apply_cmap(up, cmap, 0.0, 1.0).astype(np.float64)              # (H, W, 3)
    base = np.asarray(pic, dtype=np.float64)                                # (H, W, 3)
    out = (1.0 - alpha) * base + alpha * colour
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def side_by_side(panels, pad=10, align="top"):
    """Pictures -> one RGB image: the panels left to right, `pad` white pixels apart, aligned at the top or
    centred vertically (align="center")."""
    if align not in ("top", "center"):
        raise ValueError(f"align must be 'top' or 'center', got {align!r}")
    canvas = Image.new("RGB", (sum(p.width for p in panels) + pad * (len(panels) - 1),
                               max(p.height for p in panels)), WHITE)
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0 if align == "top" else (canvas.height - p.height) // 2))
        x += p.width + pad
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# files

def save_png(image, path):
    """Write a PIL image (or a uint8 (H, W[, C]) array) to `path` as PNG, atomically; create parent folders."""
    img = image if isinstance(image, Image.Image) else _as_picture(image)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
