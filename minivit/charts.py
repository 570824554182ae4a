"""The chart kit on Pillow alone: line plots and scatter plots with axes, round-number ticks and a legend.

The lessons' charts (loss curves, schedules, timings) and `minivit inspect`'s attention-distance plot draw with
these, in the image kit's colours and text (minivit/draw.py). Every function returns a `PIL.Image.Image` in mode
"RGB" (save it with draw.save_png). Axes show tick values, so a chart can be read without its caption; lines and
dots are drawn at twice the size and downsampled, which smooths their edges.
"""
import math

import numpy as np
from PIL import Image, ImageDraw

# the image kit's colours, text and host-array helpers (one copy of each, in draw.py)
from minivit.draw import AXIS, FONT_SIZE, GRID, PALETTE, WHITE, _fmt, _host, _put_text, _RS, _text_size

# ----------------------------------------------------------------------------------------------------------------
# ticks

def _nice_step(span, n=5, integer=False):
    """A step from {1, 2, 2.5, 5} x 10^k giving about n intervals over span (integers only if integer)."""
    raw = span / max(n, 1)
    if not raw > 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    step = 10 * mag
    for m in (1, 2, 2.5, 5):
        if integer and m == 2.5:
            continue
        if m * mag >= raw * (1 - 1e-9):
            step = m * mag
            break
    return float(max(1, round(step))) if integer else step


def _clean(ticks):
    return np.array([float(f"{t:.12g}") for t in ticks]) + 0.0     # round away 0.30000000000000004; no -0.0


def _linear_ticks(lo, hi, n=5, integer=False):
    """-> (ticks, lo2, hi2): nice ticks and limits on tick multiples with lo2 <= lo and hi2 >= hi."""
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    step = _nice_step(hi - lo, n, integer)
    a = math.floor(lo / step + 1e-9) * step
    b = math.ceil(hi / step - 1e-9) * step
    ticks = _clean(a + step * np.arange(int(round((b - a) / step)) + 1))
    return ticks, float(ticks[0]), float(ticks[-1])


def _ticks_within(lo, hi, n=5, integer=False):
    """Nice ticks that lie inside [lo, hi] (the limits stay as given)."""
    ticks, _, _ = _linear_ticks(lo, hi, n, integer)
    eps = 1e-9 * max(abs(hi - lo), 1e-300)
    return ticks[(ticks >= lo - eps) & (ticks <= hi + eps)]


def _log_ticks(lo, hi):
    """lo, hi > 0 -> (ticks, lo2, hi2) for a log axis: 1-2-5 ticks up to 2.5 decades, else powers of ten."""
    a, b = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    if b <= a:
        b = a + 1
    if math.log10(hi / lo) <= 2.5:
        cands = _clean([m * 10.0 ** e for e in range(a, b + 1) for m in (1, 2, 5)])
        lo2 = max(c for c in cands if c <= lo * (1 + 1e-9))
        hi2 = min(c for c in cands if c >= hi * (1 - 1e-9))
        ticks = np.array([c for c in cands if lo2 <= c <= hi2])
        return ticks, float(lo2), float(hi2)
    every = max(1, math.ceil((b - a) / 6))
    b = a + every * math.ceil((b - a) / every)
    ticks = _clean(10.0 ** np.arange(a, b + 1, every))
    return ticks, float(ticks[0]), float(ticks[-1])


def _tick_labels(ticks):
    """Labels for evenly spaced ticks with just enough decimals to tell them apart (0, 0.25, 0.5, ...)."""
    ticks = np.asarray(ticks, dtype=np.float64)
    big = np.abs(ticks).max() if ticks.size else 0
    if big >= 1e5 or (0 < big < 1e-3):
        return [_fmt(t, 2) for t in ticks]
    for d in range(0, 7):
        if np.allclose(ticks * 10 ** d, np.round(ticks * 10 ** d), rtol=0, atol=1e-6):
            return [f"{t:.{d}f}" for t in ticks]
    return [_fmt(t) for t in ticks]


# ----------------------------------------------------------------------------------------------------------------
# axes: scatter and line plots

_SS = 2   # supersampling factor for plots with lines and dots
_CORNERS = ("upper right", "upper left", "lower right", "lower left")


def _check_legend(legend):
    if legend is True or legend is False or legend is None or legend in _CORNERS:
        return legend
    raise ValueError(f"legend must be True (the emptiest corner), False or one of {_CORNERS}, got {legend!r}")


class _Axes:
    """A plot frame on a white canvas drawn at _SS times the final size: limits, ticks, grid, labels, title."""

    def __init__(self, size, xlim, ylim, xticks, yticks, title, xlabel, ylabel, logy, font_size):
        ss = _SS
        self.ss, self.logy = ss, logy
        self.xlim, self.ylim = xlim, ylim
        fs, ts, ls = (font_size - 2) * ss, (font_size + 2) * ss, font_size * ss
        self.fs = fs
        pad, gap, tick = 10 * ss, 6 * ss, 5 * ss
        xl = _tick_labels(xticks)
        yl = [_fmt(v) for v in yticks] if logy else _tick_labels(yticks)
        th = _text_size("0", fs)[1]
        left = pad + (_text_size(ylabel, ls)[1] + gap if ylabel else 0)
        left += max(_text_size(s, fs)[0] for s in yl) + tick + 3 * ss
        top = pad + (_text_size(title, ts)[1] + gap if title else th // 2)
        bottom = pad + tick + 3 * ss + th + (gap + _text_size(xlabel, ls)[1] if xlabel else 0)
        right = pad + max(_text_size(xl[-1], fs)[0] // 2, 4 * ss)
        W, H = size[0] * ss, size[1] * ss
        self.box = (left, top, W - right, H - bottom)
        if self.box[2] - self.box[0] < 40 * ss or self.box[3] - self.box[1] < 40 * ss:
            raise ValueError(f"size {size} leaves no room for the plot; make it larger")
        self.img = Image.new("RGB", (W, H), WHITE)
        self.draw = ImageDraw.Draw(self.img, "RGBA")
        d, (x0, y0, x1, y1) = self.draw, self.box
        for v in xticks:
            x = self.px(v, None)[0]
            d.line((x, y0, x, y1), fill=GRID, width=ss)
        for v in yticks:
            y = self.px(None, v)[1]
            d.line((x0, y, x1, y), fill=GRID, width=ss)
        self._labels = (xticks, xl, yticks, yl, tick, th)
        self._texts = (title, xlabel, ylabel, ts, ls, pad)

    def px(self, x, y):
        """Data coordinates (numbers or arrays) -> canvas pixels; NaN stays NaN."""
        x0, y0, x1, y1 = self.box
        px = py = None
        if x is not None:
            a, b = self.xlim
            px = x0 + (np.asarray(x, dtype=np.float64) - a) / (b - a) * (x1 - x0)
        if y is not None:
            yv = np.asarray(y, dtype=np.float64)
            a, b = self.ylim
            if self.logy:
                with np.errstate(divide="ignore", invalid="ignore"):
                    yv = np.where(yv > 0, np.log10(np.where(yv > 0, yv, 1.0)), np.nan)
                a, b = math.log10(a), math.log10(b)
            py = y1 - (yv - a) / (b - a) * (y1 - y0)
        return px, py

    def finish(self, legend=None):
        """Clip the data to the frame, draw the frame, ticks, labels and legend; downsample -> final image."""
        img, d, ss = self.img, self.draw, self.ss
        x0, y0, x1, y1 = self.box
        W, H = img.size
        r = 6 * ss                                     # let dots on the frame's edge show whole
        for rect in ((0, 0, W, y0 - r), (0, y1 + r, W, H), (0, 0, x0 - r, H), (x1 + r, 0, W, H)):
            d.rectangle(rect, fill=WHITE)
        d.rectangle((x0, y0, x1, y1), outline=AXIS, width=ss)
        xticks, xl, yticks, yl, tick, th = self._labels
        for v, s in zip(xticks, xl):
            x = float(self.px(v, None)[0])
            d.line((x, y1, x, y1 + tick), fill=AXIS, width=ss)
            _put_text(img, (x, y1 + tick + 3 * ss), s, self.fs, "mt")
        for v, s in zip(yticks, yl):
            y = float(self.px(None, v)[1])
            d.line((x0 - tick, y, x0, y), fill=AXIS, width=ss)
            _put_text(img, (x0 - tick - 3 * ss, y), s, self.fs, "rm")
        title, xlabel, ylabel, ts, ls, pad = self._texts
        if xlabel:
            _put_text(img, ((x0 + x1) / 2, H - pad), xlabel, ls, "mb")
        if ylabel:
            _put_text(img, (pad, (y0 + y1) / 2), ylabel, ls, "lm", rotate=True)
        if title:
            _put_text(img, ((x0 + x1) / 2, pad), title, ts, "mt")
        if legend:
            self._legend(*legend)                      # (entries, points, style, where)
        return img.resize((W // ss, H // ss), _RS.LANCZOS)

    def _legend(self, entries, points, style, where=True):
        """entries: [(name, colour)]; points: (K, 2) canvas points of the data, to pick the emptiest corner."""
        img, d, ss, fs = self.img, self.draw, self.ss, self.fs
        x0, y0, x1, y1 = self.box
        th = _text_size("0", fs)[1]
        sw = 22 * ss                                   # swatch width
        row_h = th + 4 * ss
        w = 8 * ss + sw + 6 * ss + max(_text_size(str(n), fs)[0] for n, _ in entries) + 8 * ss
        h = 6 * ss + row_h * len(entries) + 2 * ss
        m = 8 * ss
        corners = [(x1 - m - w, y0 + m), (x0 + m, y0 + m), (x1 - m - w, y1 - m - h), (x0 + m, y1 - m - h)]
        if len(points):
            def hits(c):
                inside = ((points[:, 0] >= c[0]) & (points[:, 0] <= c[0] + w)
                          & (points[:, 1] >= c[1]) & (points[:, 1] <= c[1] + h))
                return int(inside.sum())
            lx, ly = min(corners, key=hits)            # the first corner with the fewest data points wins
        else:
            lx, ly = corners[0]
        if isinstance(where, str):
            lx, ly = corners[_CORNERS.index(where)]
        d.rectangle((lx, ly, lx + w, ly + h), fill=(255, 255, 255, 225), outline=(170, 170, 170), width=ss)
        for i, (name, colour) in enumerate(entries):
            cy = ly + 6 * ss + row_h * i + row_h / 2
            sx = lx + 8 * ss
            if style == "line":
                d.line((sx, cy, sx + sw, cy), fill=colour, width=3 * ss)
            else:
                rr = 4 * ss
                d.ellipse((sx + sw / 2 - rr, cy - rr, sx + sw / 2 + rr, cy + rr), fill=colour)
            _put_text(img, (sx + sw + 6 * ss, cy), str(name), fs, "lm")


def _densify(px, py, per_segment=8):
    """Canvas polyline -> points along it (for judging where the legend would hide data)."""
    if len(px) < 2:
        return np.stack([px, py], axis=1)
    t = np.linspace(0, 1, per_segment, endpoint=False)
    xs = (px[:-1, None] + (px[1:] - px[:-1])[:, None] * t).ravel()
    ys = (py[:-1, None] + (py[1:] - py[:-1])[:, None] * t).ravel()
    return np.stack([np.append(xs, px[-1]), np.append(ys, py[-1])], axis=1)


def _padded(lo, hi, margin=0.03):
    """Data limits widened by `margin` of the span on both sides (so lines do not run along the frame)."""
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        d = abs(lo) * 0.1 or 1.0
        return lo - d, hi + d
    m = margin * (hi - lo)
    return lo - m, hi + m


def _is_integer(v):
    v = v[np.isfinite(v)]
    return v.size > 0 and np.allclose(v, np.round(v))


def scatter_plot(x, y, groups=None, title=None, xlabel=None, ylabel=None, size=(560, 420), xlim=None,
                 ylim=None, legend=True, radius=4, font_size=FONT_SIZE):
    """x, y: (n,) -> RGB image: dots with axes, ticks and labels; groups: (n,) labels, one colour each + legend.

    The y axis starts at 0 when all y >= 0 and ends at a round number >= max(y). When x holds integers
    (e.g. layer 1..L, as in the paper's figure 7 mean-attention-distance plot) each one gets a tick and the
    axis leaves half a step on both sides. Dots are slightly transparent so that overlapping ones show.
    legend (shown with groups): True for the emptiest corner, a corner name as in line_plot, or False.
    """
    xv = _host(x).astype(np.float64).ravel()
    yv = _host(y).astype(np.float64).ravel()
    if xv.shape != yv.shape:
        raise ValueError(f"x and y must have the same length, got {xv.shape} and {yv.shape}")
    ok = np.isfinite(xv) & np.isfinite(yv)
    fx, fy = (xv[ok], yv[ok]) if ok.any() else (np.zeros(1), np.zeros(1))
    if xlim is None and _is_integer(fx) and fx.max() - fx.min() <= 15:
        lo, hi = int(fx.min()), int(fx.max())
        xticks, xlim = np.arange(lo, hi + 1, dtype=np.float64), (lo - 0.5, hi + 0.5)
    elif xlim is None:
        integer = _is_integer(fx)
        xticks, a, b = _linear_ticks(fx.min(), fx.max(), 6, integer)
        xlim = (a - 0.5, b + 0.5) if integer else (a, b)
    else:
        xticks = _ticks_within(*xlim, 6, _is_integer(fx))
    if ylim is None:
        lo = 0.0 if fy.min() >= 0 else fy.min()
        yticks, a, b = _linear_ticks(lo, max(fy.max(), lo), 5)
        ylim = (a, b)
    else:
        yticks = _ticks_within(*ylim, 5)
    ax = _Axes(size, xlim, ylim, xticks, yticks, title, xlabel, ylabel, False, font_size)
    if groups is None:
        labels, names = np.zeros(xv.shape, dtype=np.intp), [None]
    else:
        g = list(_host(groups).ravel()) if not isinstance(groups, (list, tuple)) else list(groups)
        if len(g) != xv.size:
            raise ValueError(f"groups must have one label per point ({xv.size}), got {len(g)}")
        names = list(dict.fromkeys(g))                             # unique, in order of first appearance
        index = {n: i for i, n in enumerate(names)}
        labels = np.array([index[v] for v in g], dtype=np.intp)
    px, py = ax.px(xv, yv)
    rr = radius * ax.ss
    for i in np.flatnonzero(ok):
        c = PALETTE[labels[i] % len(PALETTE)]
        ax.draw.ellipse((px[i] - rr, py[i] - rr, px[i] + rr, py[i] + rr), fill=c + (190,), outline=c + (255,),
                        width=max(1, ax.ss // 2))
    show = _check_legend(legend) and groups is not None
    entries = [(n, PALETTE[i % len(PALETTE)]) for i, n in enumerate(names)]
    points = np.stack([px[ok], py[ok]], axis=1)
    return ax.finish((entries, points, "dot", legend) if show else None)


def line_plot(series, title=None, xlabel=None, ylabel=None, logy=False, size=(560, 420), xlim=None, ylim=None,
              markers=False, legend=True, font_size=FONT_SIZE):
    """series: {name: (x, y) or y} -> RGB image: one coloured line per series, axes, ticks, legend.

    A bare y means x = 0, 1, ..., len(y) - 1. NaN (and, with logy=True, values <= 0) break a line. Both axes
    span the data plus 3% on each side (in log space with logy), with round-number ticks inside (decades or
    1-2-5 steps with logy).
    legend: True puts it in the corner of the frame that hides the fewest data points; or name the corner
    ("upper right", "upper left", "lower right", "lower left"); False: none. markers: a dot per point.
    """
    if not series:
        raise ValueError("line_plot needs at least one series")
    data = []
    for name, s in series.items():
        if isinstance(s, tuple) and len(s) == 2:
            xs, ys = (_host(v).astype(np.float64).ravel() for v in s)
        else:
            ys = _host(s).astype(np.float64).ravel()
            xs = np.arange(ys.size, dtype=np.float64)
        if xs.shape != ys.shape:
            raise ValueError(f"series {name!r}: x and y must have the same length, got {xs.shape} and {ys.shape}")
        if logy:
            ys = np.where(ys > 0, ys, np.nan)
        data.append((name, xs, ys))
    allx = np.concatenate([d[1] for d in data])
    ally = np.concatenate([d[2] for d in data])
    ok = np.isfinite(allx) & np.isfinite(ally)
    fx, fy = (allx[ok], ally[ok]) if ok.any() else (np.zeros(1), np.ones(1))
    if xlim is None:
        xlim = _padded(fx.min(), fx.max())
    xticks = _ticks_within(*xlim, 6, _is_integer(fx))
    if ylim is None:
        if logy:
            a, b = _padded(math.log10(fy.min()), math.log10(fy.max()))
            ylim = (10.0 ** a, 10.0 ** b)
        else:
            ylim = _padded(fy.min(), fy.max())
    if logy:
        yticks = _log_ticks(*ylim)[0]
        yticks = yticks[(yticks >= ylim[0] * (1 - 1e-9)) & (yticks <= ylim[1] * (1 + 1e-9))]
        if len(yticks) < 2:                                        # less than a 1-2-5 step: plain ticks
            yticks = _ticks_within(*ylim, 4)
            yticks = yticks[yticks > 0]
    else:
        yticks = _ticks_within(*ylim, 5)
    ax = _Axes(size, xlim, ylim, xticks, yticks, title, xlabel, ylabel, logy, font_size)
    entries, points = [], []
    for i, (name, xs, ys) in enumerate(data):
        c = PALETTE[i % len(PALETTE)]
        px, py = ax.px(xs, ys)
        good = np.isfinite(px) & np.isfinite(py)
        # one polyline per run of finite points
        edges = np.flatnonzero(np.diff(np.concatenate([[0], good.astype(np.int8), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):
            seg = list(zip(px[a:b].tolist(), py[a:b].tolist()))
            if len(seg) > 1:
                ax.draw.line(seg, fill=c, width=2 * ax.ss, joint="curve")
            if markers or len(seg) == 1:
                rr = 3 * ax.ss
                for qx, qy in seg:
                    ax.draw.ellipse((qx - rr, qy - rr, qx + rr, qy + rr), fill=c)
            points.append(_densify(px[a:b], py[a:b]))
        entries.append((name, c))
    points = np.concatenate(points) if points else np.zeros((0, 2))
    return ax.finish((entries, points, "line", legend) if _check_legend(legend) else None)
