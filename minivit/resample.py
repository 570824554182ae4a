"""Position-embedding resampling: fine-tuning a ViT at a new resolution.

The paper (section 3.2, "Fine-tuning and higher resolution"): keep the patch size, so a larger image gives a
larger patch grid and a longer sequence; the learned position embeddings no longer fit, so "we therefore
perform 2D interpolation of the pre-trained position embeddings, according to their location in the original
image". The class token's embedding has no location and is carried over unchanged.

Shapes:
    N        tokens = n_prefix + gh * gw (the class token first when the model has one)
    n_prefix 1 with a class token, 0 without ('gap' models)
    gh, gw   patch grid before the resize (rows, columns); the grid part is stored row-major
    gh2, gw2 patch grid after the resize
    D        width

The resize is written as an explicit separable linear map. Along each grid axis a small interpolation matrix,
R_h (gh2, gh) and R_w (gw2, gw), says how much each old row (column) contributes to each new one, and

    out[i, j, :] = sum_{h, w} R_h[i, h] * R_w[j, w] * grid[h, w, :]      i.e.  out = R_h @ grid @ R_w^T

per channel. Because the map is linear, its backward pass is its transpose, dgrid = R_h^T @ dout @ R_w, so a
model can train through a resize (e.g. keep one set of embeddings and resample it to each training
resolution), and the gradient check below proves the pair. The matrices are tiny (at most a few dozen
rows), are built once on the host in float64 and then cast to the embeddings' dtype and array module, so
float32 stays float32 and CuPy arrays stay on the GPU.

Methods (all use the same separable form; only the per-axis matrix differs, see interpolation_matrix):
    linear    the original ViT code: scipy.ndimage.zoom(grid, (gh2/gh, gw2/gw, 1), order=1), corner-aligned.
    bilinear  PyTorch F.interpolate(mode='bilinear', align_corners=False, antialias=False): half-pixel
              centres; what timm uses when it loads the original .npz checkpoints.
    bicubic   PyTorch F.interpolate(mode='bicubic', align_corners=False, antialias=False): cubic
              convolution with a = -0.75. timm's default resample_abs_pos_embed uses antialias=True, which
              makes PyTorch switch to the a = -0.5 kernel and, when downsampling, to a kernel stretched by
              the downsampling factor; that variant is not implemented here: our 'bicubic' matches timm
              called with antialias=False.
None of the methods low-pass filters when downsampling: each output position reads only its 2 (linear,
bilinear) or 4 (bicubic) nearest input rows/columns, so some input rows/columns can get no weight at all.
"""

import math

import numpy as np

from minivit.backend import get_xp

METHODS = ("linear", "bilinear", "bicubic")

BICUBIC_A = -0.75  # PyTorch's cubic convolution coefficient without antialias (Keys 1981 uses -0.5)


def _check_size(n, name):
    """A positive Python or NumPy integer, else ValueError naming the value."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def _check_grid(grid, name):
    """(gh, gw) of positive integers, else ValueError naming the value."""
    try:
        gh, gw = grid
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (gh, gw), got {grid!r}") from None
    return _check_size(gh, f"{name}[0]"), _check_size(gw, f"{name}[1]")


def _cubic_weights(t, a=BICUBIC_A):
    """t: (n,) in [0, 1) -> (n, 4) weights of the taps at floor(src) - 1, ..., floor(src) + 2.

    Cubic convolution kernel (Keys 1981), distance x from the sample point:
        k(x) = (a + 2)|x|^3 - (a + 3)|x|^2 + 1           for |x| <= 1
        k(x) = a|x|^3 - 5a|x|^2 + 8a|x| - 4a             for 1 < |x| < 2
    The four taps sit at distances 1 + t, t, 1 - t, 2 - t.
    """
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    return np.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], axis=1)  # (n, 4)


def interpolation_matrix(n_in, n_out, method="linear"):
    """n_in, n_out -> R: (n_out, n_in) float64, out = R @ x resamples a length-n_in axis to n_out.

    Output index o (0 .. n_out - 1) reads the input at a real position src(o):
        linear    src = o * (n_in - 1) / (n_out - 1)   (src = 0 when n_out == 1): corner-aligned, as
                  scipy.ndimage.zoom(order=1) with its default grid_mode=False; first and last samples
                  coincide with the input's. Weights 1 - t, t on floor(src), floor(src) + 1, t = src - floor.
        bilinear  src = max((o + 0.5) * n_in / n_out - 0.5, 0): half-pixel centres, negative src clamped to
                  0 as PyTorch does for linear modes; weights 1 - t, t on i0 = floor(src) and
                  min(i0 + 1, n_in - 1).
        bicubic   src = (o + 0.5) * n_in / n_out - 0.5, not clamped; t = src - floor(src); weights
                  _cubic_weights(t) (a = -0.75) on floor(src) - 1 .. floor(src) + 2, each index clamped to
                  [0, n_in - 1] (border replicate), so weights of clamped taps add up on the edge row.
    Every row sums to 1, so a constant stays constant; n_out == n_in gives the identity for every method;
    n_in == 1 gives a column of ones (the single value is copied; for bicubic up to the rounding of the
    four tap weights that all clamp onto it).
    """
    n_in = _check_size(n_in, "n_in")
    n_out = _check_size(n_out, "n_out")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    o = np.arange(n_out, dtype=np.float64)  # (n_out,)
    rows = np.arange(n_out)  # (n_out,)
    R = np.zeros((n_out, n_in))  # (n_out, n_in)
    if method == "bicubic":
        src = (o + 0.5) * (n_in / n_out) - 0.5  # (n_out,)
        i0 = np.floor(src)  # (n_out,)
        w = _cubic_weights(src - i0)  # (n_out, 4)
        for k in range(4):  # tap k at floor(src) - 1 + k, clamped to the edge
            idx = np.clip(i0.astype(np.int64) - 1 + k, 0, n_in - 1)  # (n_out,)
            np.add.at(R, (rows, idx), w[:, k])
        return R
    if method == "linear":
        # scipy's zoom factor (n_in - 1) / (n_out - 1), replaced by 1 when n_out == 1 (then only o = 0 exists)
        step = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
        src = np.minimum(o * step, n_in - 1)  # (n_out,) clip float rounding past the last row
    else:  # bilinear
        src = np.maximum((o + 0.5) * (n_in / n_out) - 0.5, 0.0)  # (n_out,)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)  # (n_out,)
    i1 = np.minimum(i0 + 1, n_in - 1)  # (n_out,) upper neighbour, clamped to the edge
    t = src - i0  # (n_out,) weight of the upper neighbour
    np.add.at(R, (rows, i0), 1.0 - t)  # add.at: i0 == i1 on the last row must add up, not overwrite
    np.add.at(R, (rows, i1), t)
    return R


def resample_pos_embed_forward(pos_embed, new_grid, old_grid=None, n_prefix=1, method="linear"):
    """pos_embed: (N, D) or (1, N, D) -> out: (n_prefix + gh2*gw2, D) (same rank), cache.

    prefix = pos_embed[:n_prefix] unchanged; grid = pos_embed[n_prefix:] as (gh, gw, D), row-major;
    out_grid = R_h @ grid @ R_w^T along the two grid axes, R_h = interpolation_matrix(gh, gh2, method),
    R_w = interpolation_matrix(gw, gw2, method). old_grid None means square: gh = gw = sqrt(N - n_prefix).
    cache = (R_h, R_w, n_prefix, (gh, gw), (gh2, gw2), batched): what the backward needs.
    """
    xp = get_xp(pos_embed)
    if isinstance(n_prefix, bool) or not isinstance(n_prefix, (int, np.integer)) or n_prefix not in (0, 1):
        raise ValueError(f"n_prefix must be 0 or 1, got {n_prefix!r}")
    batched = pos_embed.ndim == 3
    if not (pos_embed.ndim == 2 or (batched and pos_embed.shape[0] == 1)):
        raise ValueError(f"pos_embed must be (N, D) or (1, N, D), got shape {tuple(pos_embed.shape)}")
    if not np.issubdtype(pos_embed.dtype, np.floating):
        raise ValueError(f"pos_embed must be floating point, got dtype {pos_embed.dtype}")
    x = pos_embed[0] if batched else pos_embed  # (N, D)
    N, D = x.shape
    n_grid = N - n_prefix  # gh * gw
    if old_grid is None:
        g = math.isqrt(max(n_grid, 0))
        if n_grid < 1 or g * g != n_grid:
            raise ValueError(
                f"cannot infer a square grid: N - n_prefix = {N} - {n_prefix} = {n_grid} is not a perfect "
                f"square; pass old_grid=(gh, gw)")
        old_grid = (g, g)
    gh, gw = _check_grid(old_grid, "old_grid")
    gh2, gw2 = _check_grid(new_grid, "new_grid")
    if gh * gw != n_grid:
        raise ValueError(f"old_grid {gh}x{gw} = {gh * gw} positions, but pos_embed has N - n_prefix = "
                         f"{N} - {n_prefix} = {n_grid}")
    R_h = xp.asarray(interpolation_matrix(gh, gh2, method), dtype=x.dtype)  # (gh2, gh)
    R_w = xp.asarray(interpolation_matrix(gw, gw2, method), dtype=x.dtype)  # (gw2, gw)

    prefix = x[:n_prefix]  # (n_prefix, D)
    grid = x[n_prefix:].reshape(gh, gw * D)  # (gh, gw*D): row h holds grid row h, all columns and channels
    tmp = (R_h @ grid).reshape(gh2, gw, D)  # (gh2, gw, D): rows resampled
    out_grid = R_w @ tmp  # (gh2, gw2, D): columns resampled; (gw2, gw) @ (gw, D) broadcast over gh2 rows
    out = xp.concatenate([prefix, out_grid.reshape(gh2 * gw2, D)], axis=0)  # (n_prefix + gh2*gw2, D)
    if batched:
        out = out[None]  # (1, n_prefix + gh2*gw2, D)
    cache = (R_h, R_w, n_prefix, (gh, gw), (gh2, gw2), batched)
    return out, cache


def resample_pos_embed_backward(dout, cache):
    """dout: like out -> dpos_embed: like pos_embed ((N, D) or (1, N, D)).

    The forward is linear, so its backward is its transpose: dgrid = R_h^T @ dout_grid @ R_w along the
    grid axes; dprefix = dout[:n_prefix] passes through.
    """
    R_h, R_w, n_prefix, (gh, gw), (gh2, gw2), batched = cache
    xp = get_xp(dout)
    g = dout[0] if batched else dout  # (n_prefix + gh2*gw2, D)
    D = g.shape[-1]
    dprefix = g[:n_prefix]  # fwd: prefix = x[:n_prefix]
    dout_grid = g[n_prefix:].reshape(gh2, gw2, D)  # (gh2, gw2, D)
    dtmp = R_w.T @ dout_grid  # fwd: out_grid = R_w @ tmp; (gh2, gw, D)
    dgrid = R_h.T @ dtmp.reshape(gh2, gw * D)  # fwd: tmp = R_h @ grid; (gh, gw*D)
    dx = xp.concatenate([dprefix, dgrid.reshape(gh * gw, D)], axis=0)  # (N, D)
    return dx[None] if batched else dx  # like pos_embed


def resample_pos_embed(pos_embed, new_grid, old_grid=None, n_prefix=1, method="linear"):
    """pos_embed: (N, D) or (1, N, D) -> (n_prefix + gh2*gw2, D) (same rank); the forward without cache."""
    out, _ = resample_pos_embed_forward(pos_embed, new_grid, old_grid, n_prefix, method)
    return out
