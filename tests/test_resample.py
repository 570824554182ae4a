"""Tests for minivit.resample: position-embedding resampling for a new grid.

References that do not share the module's code: matrices written out by hand, an affine field (which
corner-aligned linear interpolation reproduces exactly), a naive per-pixel 2D loop that samples the grid
directly (no separable matrices), and central differences for the backward. scipy/torch are only used in the
last test, skipped when they are not installed.
"""

import math

import numpy as np
import pytest

from minivit.resample import (
    METHODS,
    interpolation_matrix,
    resample_pos_embed,
    resample_pos_embed_backward,
    resample_pos_embed_forward,
)

A = -0.75  # PyTorch's cubic coefficient without antialias


def _pos_embed(rng, n_prefix, gh, gw, D, batched=False):
    """Random (n_prefix + gh*gw, D) embeddings, or (1, N, D) when batched."""
    pe = rng.standard_normal((n_prefix + gh * gw, D))
    return pe[None] if batched else pe


# ---------- a naive reference: sample the 2D grid point by point, no matrices ----------

def _src(o, n_in, n_out, method):
    """Real input position read by output index o (the formulas of the module docstring, restated)."""
    if method == "linear":
        return 0.0 if n_out == 1 else o * (n_in - 1) / (n_out - 1)
    s = (o + 0.5) * n_in / n_out - 0.5
    return max(s, 0.0) if method == "bilinear" else s


def _cubic_kernel(x):
    """Cubic convolution kernel k(x), a = -0.75, as a function of the signed distance x."""
    x = abs(x)
    if x <= 1:
        return (A + 2) * x**3 - (A + 3) * x**2 + 1
    if x < 2:
        return A * x**3 - 5 * A * x**2 + 8 * A * x - 4 * A
    return 0.0


def _taps(s, n_in, method):
    """[(index, weight)] for one axis at real position s; indices clamped to the edge."""
    clamp = lambda i: min(max(i, 0), n_in - 1)
    f = math.floor(s)
    if method == "bicubic":
        return [(clamp(f + k), _cubic_kernel(s - (f + k))) for k in (-1, 0, 1, 2)]
    if f >= n_in - 1:  # at (or rounding past) the last row: all weight there
        return [(n_in - 1, 1.0)]
    return [(clamp(f), 1.0 - (s - f)), (clamp(f + 1), s - f)]


def _naive_resample(grid, gh2, gw2, method):
    """grid: (gh, gw, D) -> (gh2, gw2, D), one output pixel at a time, 2D taps = product of 1D taps."""
    gh, gw, D = grid.shape
    out = np.zeros((gh2, gw2, D))
    for i in range(gh2):
        for j in range(gw2):
            for h, wy in _taps(_src(i, gh, gh2, method), gh, method):
                for w, wx in _taps(_src(j, gw, gw2, method), gw, method):
                    out[i, j] += wy * wx * grid[h, w]
    return out


# ---------- matrices ----------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_in,n_out", [(1, 1), (1, 5), (5, 1), (2, 3), (3, 2), (7, 12), (24, 14), (14, 24)])
def test_matrix_shape_and_rows_sum_to_one(method, n_in, n_out):
    R = interpolation_matrix(n_in, n_out, method)
    assert R.shape == (n_out, n_in) and R.dtype == np.float64
    np.testing.assert_allclose(R.sum(axis=1), 1.0, rtol=0, atol=1e-14)


def test_matrices_by_hand():
    # 2 -> 3. linear: src = o * 1/2 = 0, 0.5, 1.
    # bilinear: src = (o + 0.5) * 2/3 - 0.5 = -1/6 -> 0 (clamped), 1/2, 7/6 (both taps clamp to row 1).
    # bicubic: same src unclamped. o = 0: floor -1, t = 5/6, taps -2..1 -> rows 0, 0, 0, 1; the tap on row 1
    #   is at distance 7/6: k(7/6) = -0.75 * ((7/6)^3 - 5 (7/6)^2 + 8 (7/6) - 4) = -0.75 * 25/216 = -25/288,
    #   so row 0 gets 1 + 25/288 = 313/288 (the weights sum to 1). o = 1: t = 1/2, symmetric: 1/2, 1/2.
    #   o = 2 mirrors o = 0.
    expected = {
        "linear": [[1, 0], [0.5, 0.5], [0, 1]],
        "bilinear": [[1, 0], [0.5, 0.5], [0, 1]],
        "bicubic": [[313 / 288, -25 / 288], [0.5, 0.5], [-25 / 288, 313 / 288]],
    }
    for method, R in expected.items():
        np.testing.assert_allclose(interpolation_matrix(2, 3, method), R, rtol=0, atol=1e-15)
    # 2 -> 4. linear: src = o/3 -> weights on row 1: 0, 1/3, 2/3, 1.
    # bilinear: src = o/2 - 1/4 = -1/4 -> 0, 1/4, 3/4, 5/4 -> clamped to row 1.
    np.testing.assert_allclose(interpolation_matrix(2, 4, "linear"),
                               [[1, 0], [2 / 3, 1 / 3], [1 / 3, 2 / 3], [0, 1]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(interpolation_matrix(2, 4, "bilinear"),
                               [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], rtol=0, atol=1e-15)
    # 3 -> 2. linear keeps the corners: src = 0, 2. bilinear: src = 1.5 (o + 0.5) - 0.5 = 0.25, 1.75.
    np.testing.assert_allclose(interpolation_matrix(3, 2, "linear"), [[1, 0, 0], [0, 0, 1]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(interpolation_matrix(3, 2, "bilinear"),
                               [[0.75, 0.25, 0], [0, 0.25, 0.75]], rtol=0, atol=1e-15)
    # 1 -> 3: a single value is copied (bicubic sums its four clamped tap weights, so up to rounding).
    for method in METHODS:
        np.testing.assert_allclose(interpolation_matrix(1, 3, method), [[1], [1], [1]], rtol=0, atol=1e-15)


# ---------- the resample ----------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_prefix", [0, 1])
def test_same_size_is_identity(method, n_prefix):
    rng = np.random.default_rng(0)
    for gh, gw in [(4, 4), (3, 5), (1, 6)]:
        pe = _pos_embed(rng, n_prefix, gh, gw, 3)
        out = resample_pos_embed(pe, (gh, gw), (gh, gw), n_prefix=n_prefix, method=method)
        np.testing.assert_array_equal(out, pe)


@pytest.mark.parametrize("gh,gw,gh2,gw2", [(7, 7, 12, 12), (3, 5, 8, 6), (6, 9, 4, 13), (5, 4, 1, 7),
                                           (1, 6, 3, 2), (2, 2, 2, 5)])
def test_linear_reproduces_affine_field(gh, gw, gh2, gw2):
    # f(r, c) = a + b r + c c per channel; corner-aligned output (i, j) sits at r = i (gh-1)/(gh2-1),
    # c = j (gw-1)/(gw2-1) (0 when the output axis has one entry), where linear interpolation is exact.
    rng = np.random.default_rng(1)
    D = 4
    a, b, c = rng.standard_normal((3, D))
    r, q = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")  # (gh, gw) row and column index
    grid = a + b * r[..., None] + c * q[..., None]  # (gh, gw, D)
    cls = rng.standard_normal((1, D))
    pe = np.concatenate([cls, grid.reshape(-1, D)])  # (1 + gh*gw, D)
    out = resample_pos_embed(pe, (gh2, gw2), (gh, gw), n_prefix=1, method="linear")
    r2 = np.arange(gh2) * ((gh - 1) / (gh2 - 1) if gh2 > 1 else 0.0)  # (gh2,)
    q2 = np.arange(gw2) * ((gw - 1) / (gw2 - 1) if gw2 > 1 else 0.0)  # (gw2,)
    expected = a + b * r2[:, None, None] + c * q2[None, :, None]  # (gh2, gw2, D)
    np.testing.assert_array_equal(out[0], cls[0])
    np.testing.assert_allclose(out[1:].reshape(gh2, gw2, D), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_constant_field_stays_constant(method):
    for (gh, gw), (gh2, gw2) in [((7, 7), (12, 12)), ((24, 24), (14, 14)), ((3, 5), (8, 2)), ((1, 4), (5, 1))]:
        pe = np.full((gh * gw, 3), 2.5)
        out = resample_pos_embed(pe, (gh2, gw2), (gh, gw), n_prefix=0, method=method)
        np.testing.assert_allclose(out, 2.5, rtol=0, atol=1e-13)


def test_non_square_by_hand():
    # grid 2x3 (D = 1) -> 3x2.
    grid = np.array([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    pe = np.concatenate([[7.0], grid.ravel()])[:, None]  # (1 + 6, 1), class token 7
    # linear: columns 3 -> 2 keep columns 0 and 2; rows 2 -> 3 add the midpoint row.
    out = resample_pos_embed(pe, (3, 2), (2, 3), method="linear")
    np.testing.assert_allclose(out[:, 0], [7, 1, 4, 4.5, 18, 8, 32], rtol=0, atol=1e-14)
    # bilinear: columns 3 -> 2 with weights [.75 .25 0], [0 .25 .75]: row 0 -> 1.25, 3.5; row 1 -> 10, 28;
    # rows 2 -> 3 with [1 0], [.5 .5], [0 1]: the middle row is 5.625, 15.75.
    out = resample_pos_embed(pe, (3, 2), (2, 3), method="bilinear")
    np.testing.assert_allclose(out[:, 0], [7, 1.25, 3.5, 5.625, 15.75, 10, 28], rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gh,gw,gh2,gw2", [(7, 7, 12, 12), (3, 5, 8, 6), (6, 9, 4, 13), (5, 4, 1, 7),
                                           (1, 6, 3, 2), (9, 9, 4, 4)])
def test_matches_naive_loop(method, gh, gw, gh2, gw2):
    rng = np.random.default_rng(2)
    pe = _pos_embed(rng, 1, gh, gw, 3)
    out = resample_pos_embed(pe, (gh2, gw2), (gh, gw), n_prefix=1, method=method)
    expected = _naive_resample(pe[1:].reshape(gh, gw, 3), gh2, gw2, method)  # (gh2, gw2, 3)
    np.testing.assert_array_equal(out[0], pe[0])
    np.testing.assert_allclose(out[1:].reshape(gh2, gw2, 3), expected, rtol=0, atol=1e-13)


def test_prefix_batch_dim_and_square_inference():
    rng = np.random.default_rng(3)
    pe = _pos_embed(rng, 1, 4, 4, 5, batched=True)  # (1, 17, 5)
    out = resample_pos_embed(pe, (6, 3), method="bicubic")  # old grid inferred as 4x4
    assert out.shape == (1, 1 + 18, 5)
    np.testing.assert_array_equal(out[0, 0], pe[0, 0])
    np.testing.assert_allclose(out[0], resample_pos_embed(pe[0], (6, 3), (4, 4), method="bicubic"), atol=0)
    pe0 = _pos_embed(rng, 0, 3, 3, 2)  # (9, 2), no class token
    out0 = resample_pos_embed(pe0, (5, 5), n_prefix=0)
    assert out0.shape == (25, 2)
    np.testing.assert_allclose(out0[[0, 4, 20, 24]], pe0[[0, 2, 6, 8]], rtol=0, atol=1e-15)  # corners kept


# ---------- backward ----------

def _rel_err(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_prefix,batched", [(0, False), (1, False), (1, True)])
def test_gradcheck(method, n_prefix, batched):
    rng = np.random.default_rng(4)
    gh, gw, gh2, gw2, D = 3, 4, 5, 2, 3
    pe = _pos_embed(rng, n_prefix, gh, gw, D, batched)
    out, cache = resample_pos_embed_forward(pe, (gh2, gw2), (gh, gw), n_prefix, method)
    dout = rng.standard_normal(out.shape)
    dpe = resample_pos_embed_backward(dout, cache)
    assert dpe.shape == pe.shape
    num = np.zeros_like(pe)
    eps = 1e-6
    for idx in np.ndindex(pe.shape):  # central differences of the VJP sum(out * dout)
        xp, xm = pe.copy(), pe.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fp = np.sum(resample_pos_embed(xp, (gh2, gw2), (gh, gw), n_prefix, method) * dout)
        fm = np.sum(resample_pos_embed(xm, (gh2, gw2), (gh, gw), n_prefix, method) * dout)
        num[idx] = (fp - fm) / (2 * eps)
    assert _rel_err(num, dpe) <= 1e-8
    g = dpe[0] if batched else dpe
    d = dout[0] if batched else dout
    np.testing.assert_array_equal(g[:n_prefix], d[:n_prefix])  # prefix gradient passed through


@pytest.mark.parametrize("method", METHODS)
def test_float32_stays_float32(method):
    rng = np.random.default_rng(5)
    pe = _pos_embed(rng, 1, 7, 7, 8).astype(np.float32)
    out, cache = resample_pos_embed_forward(pe, (12, 12), method=method)
    assert out.dtype == np.float32
    assert resample_pos_embed_backward(np.ones_like(out), cache).dtype == np.float32
    ref = resample_pos_embed(pe.astype(np.float64), (12, 12), method=method)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


# ---------- bad input ----------

@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nearest"), "'nearest'.*linear, bilinear, bicubic"),
    (dict(n_prefix=2), "n_prefix must be 0 or 1, got 2"),
    (dict(old_grid=(4, 5)), "4x5 = 20.*17 - 1 = 16"),
    (dict(new_grid=(0, 3)), r"new_grid\[0\].*got 0"),
    (dict(new_grid=(3, -2)), r"new_grid\[1\].*got -2"),
    (dict(old_grid=(8, 2), new_grid=(3, 3), n_prefix=0), "8x2 = 16.*17 - 0 = 17"),
])
def test_bad_input_raises(kwargs, match):
    pe = np.zeros((17, 3))  # class token + 4x4
    args = dict(new_grid=(5, 5), old_grid=None, n_prefix=1, method="linear")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        resample_pos_embed(pe, **args)


def test_bad_input_raises_more():
    with pytest.raises(ValueError, match="17 - 0 = 17 is not a perfect square"):
        resample_pos_embed(np.zeros((17, 3)), (5, 5), n_prefix=0)
    with pytest.raises(ValueError, match=r"\(2, 17, 3\)"):
        resample_pos_embed(np.zeros((2, 17, 3)), (5, 5))
    with pytest.raises(ValueError, match="n_in must be a positive integer, got 0"):
        interpolation_matrix(0, 3, "linear")
    with pytest.raises(ValueError, match="'cubic'"):
        interpolation_matrix(3, 3, "cubic")


# ---------- optional: the libraries the methods are defined by ----------

@pytest.mark.parametrize("gh,gw,gh2,gw2", [(7, 7, 12, 12), (14, 14, 24, 24), (3, 5, 8, 6), (24, 24, 14, 14)])
def test_matches_scipy_and_torch(gh, gw, gh2, gw2):
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    pe = _pos_embed(rng, 1, gh, gw, 8)
    grid = pe[1:].reshape(gh, gw, 8)  # (gh, gw, D)
    # the original ViT code: zoom factors new/old, order=1
    ref = scipy_ndimage.zoom(grid, (gh2 / gh, gw2 / gw, 1), order=1)
    out = resample_pos_embed(pe, (gh2, gw2), (gh, gw), method="linear")
    np.testing.assert_allclose(out[1:].reshape(gh2, gw2, 8), ref, rtol=0, atol=1e-13)
    t = torch.from_numpy(grid).permute(2, 0, 1)[None]  # (1, D, gh, gw)
    for method in ("bilinear", "bicubic"):
        r = torch.nn.functional.interpolate(t, size=(gh2, gw2), mode=method, align_corners=False,
                                            antialias=False)
        out = resample_pos_embed(pe, (gh2, gw2), (gh, gw), method=method)
        np.testing.assert_allclose(out[1:].reshape(gh2, gw2, 8), r[0].permute(1, 2, 0).numpy(),
                                   rtol=0, atol=1e-13)
