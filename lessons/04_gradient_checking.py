"""Lesson 4: gradient checking, and the LayerNorm backward derived.

Goal: learn the one tool that proves every backward pass in minivit right: compare it with finite differences.

The math. Pick a fixed random dy (the "upstream gradient") and the scalar L(x) = sum(f(x) * dy). Its gradient
dL/dx is exactly what a backward pass computes (the vector-Jacobian product dy^T J). Numerically, per coordinate,

    central difference:  (L(x + eps e_i) - L(x - eps e_i)) / (2 eps) = dL/dx_i + O(eps^2)

(the eps^1 terms of the two Taylor series cancel; a one-sided difference would be O(eps)). Two errors compete:
truncation ~ eps^2 wants eps small, rounding ~ u / eps (u = 1e-16 in float64, 6e-8 in float32) wants eps large.
In float64 the best eps is near 1e-5 and the error reaches ~1e-10. In float32 the best is ~1e-5 (at eps ~ 1e-2):
too close to the 1e-6 bar to tell a right backward from a slightly wrong one; smaller eps only make it worse (below
~1e-7, x + eps rounds back to x, the difference is 0 and the error 1). So checks run in float64. The tensor-wide
relative error
    rel = ||numeric - analytic|| / max(||numeric||, ||analytic||)
is 1e-10 for a right backward and 1e-2 ... 1 for a wrong one: minivit asserts rel <= 1e-6.

The LayerNorm backward, derived (minivit.layers.layernorm_backward uses the result). Over the last axis, size D:
    mu = mean(x),  xc = x - mu,  var = mean(xc^2),  rstd = 1/sqrt(var + eps),  xhat = xc * rstd,  y = xhat * w + b
1. y = xhat * w + b:        db = sum over rows of dy;  dw = sum over rows of dy * xhat;  g := dL/dxhat = dy * w.
2. rstd depends on every x_i: dvar/dx_i = (2/D) xc_i (the mean's part sums to zero, as sum_j xc_j = 0),
   so drstd/dx_i = -1/2 (var + eps)^(-3/2) dvar/dx_i = -rstd^3 xc_i / D.
3. xhat_j = (x_j - mu) rstd:  dxhat_j/dx_i = rstd (delta_ij - 1/D) + xc_j drstd/dx_i
                                           = rstd (delta_ij - 1/D - xhat_j xhat_i / D).
4. dx_i = sum_j g_j dxhat_j/dx_i = rstd * (g_i - mean(g) - xhat_i * mean(g * xhat)).
Dropping the last term (forgetting that the variance depends on x) is a classic bug; forgetting the "* w" in g is
another, and it hides when w is all ones (as LayerNorm is initialized): check with random parameters.

Run:   python lessons/04_gradient_checking.py [--quick] [--out DIR]
Time:  under 1 s on a 2-core CPU, Python start-up included (--quick: 0.7 s, fewer eps values).

You should see:
    package gradcheck, float64: linear rel error ~ 1e-10 (x, w, b); layernorm ~ 1e-10 (x, w, b)
    best central-difference rel error: float64 ~ 1e-10 (eps ~ 1e-5 .. 1e-6), float32 ~ 2e-5 (eps ~ 3e-2)
    wrong backward (variance path dropped): rel error ~ 0.25: caught
    wrong backward (forgot * w): rel ~ 1e-10 with w = ones (hidden!), ~ 0.8 with random w (caught)
and lessons/out/04_gradient_checking.png: relative error against eps for float64, float32 and a wrong backward.
"""
import argparse
import time
from pathlib import Path

import numpy as np

from minivit.charts import line_plot
from minivit.draw import save_png
from minivit.gradcheck import gradcheck, relative_error
from minivit.layers import layernorm_backward, layernorm_forward, linear_backward, linear_forward


def numeric_grad(f, x, dy, eps):
    """dL/dx for L = sum(f(x) * dy) by central differences, computed in x's own dtype (float32 or float64)."""
    grad = np.zeros(x.size)
    flat = x.reshape(-1)                                   # a view: we perturb x in place
    for i in range(x.size):
        old = flat[i]
        flat[i] = old + x.dtype.type(eps)
        l_plus = (f(x) * dy).sum(dtype=x.dtype)             # L in x's dtype: its rounding is what float32 suffers
        flat[i] = old - x.dtype.type(eps)
        l_minus = (f(x) * dy).sum(dtype=x.dtype)
        flat[i] = old
        grad[i] = float(l_plus - l_minus) / (2 * eps)
    return grad.reshape(x.shape)


def layernorm_backward_no_var(dy, cache):
    """WRONG: treats rstd as a constant, i.e. drops the '- xhat * mean(g * xhat)' term of step 4."""
    xhat, rstd, w = cache
    g = dy * w
    return rstd * (g - g.mean(axis=-1, keepdims=True))


def layernorm_backward_no_w(dy, cache):
    """WRONG: uses g = dy instead of g = dy * w (step 1)."""
    xhat, rstd, w = cache
    g = dy
    return rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))


def check_layernorm_dx(backward_dx, x, w, b):
    """Relative error of a LayerNorm dx against the package's central differences (float64)."""
    fwd = lambda inp: layernorm_forward(inp["x"], w, b)[0]                          # noqa: E731
    bwd = lambda inp, dy: {"x": backward_dx(dy, layernorm_forward(inp["x"], w, b)[1])}   # noqa: E731
    return gradcheck(fwd, bwd, {"x": x.copy()})[0].rel_error


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    rng = np.random.default_rng(seed)
    out = {}

    # 1. The package's gradcheck on two leaf layers, float64, random (non-trivial) parameters.
    lin = {"x": rng.standard_normal((3, 5, 8)), "w": rng.standard_normal((8, 6)), "b": rng.standard_normal(6)}
    res = gradcheck(lambda p: linear_forward(p["x"], p["w"], p["b"])[0],
                    lambda p, dy: dict(zip("xwb", linear_backward(dy, linear_forward(p["x"], p["w"], p["b"])[1]))),
                    lin)
    out["linear_rel"] = {r.name: r.rel_error for r in res}
    ln = {"x": rng.standard_normal((3, 5, 8)) * 2 + 1, "w": rng.standard_normal(8), "b": rng.standard_normal(8)}
    res = gradcheck(lambda p: layernorm_forward(p["x"], p["w"], p["b"])[0],
                    lambda p, dy: dict(zip("xwb", layernorm_backward(dy, layernorm_forward(p["x"], p["w"],
                                                                                            p["b"])[1]))), ln)
    out["layernorm_rel"] = {r.name: r.rel_error for r in res}
    for layer in ("linear", "layernorm"):
        errs = out[f"{layer}_rel"]
        assert max(errs.values()) < 1e-8, errs
        print(f"package gradcheck, float64, {layer}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))

    # 2. The eps sweep: float64 against float32, and a wrong backward for scale.
    x64 = rng.standard_normal((2, 16)) * 2 + 1
    w64, b64 = rng.standard_normal(16), rng.standard_normal(16)
    dy64 = rng.standard_normal((2, 16))
    y, cache = layernorm_forward(x64, w64, b64)
    exact = layernorm_backward(dy64, cache)[0]                      # the analytic dx (proven in part 1)
    wrong = layernorm_backward_no_var(dy64, cache)
    eps_list = 10.0 ** np.arange(-1.0, -10.5, -1.0 if quick else -0.5)
    curves = {"float64": [], "float32": [], "wrong backward (float64)": []}
    for eps in eps_list:
        for dt in ("float64", "float32"):
            x, w, b, dy = (a.astype(dt) for a in (x64, w64, b64, dy64))
            num = numeric_grad(lambda v: layernorm_forward(v, w, b)[0], x.copy(), dy, eps)
            curves[dt].append(relative_error(num, exact))
            if dt == "float64":
                curves["wrong backward (float64)"].append(relative_error(num, wrong))
    for k in ("float64", "float32"):
        i = int(np.argmin(curves[k]))
        out[f"best_{k}"], out[f"best_eps_{k}"] = float(curves[k][i]), float(eps_list[i])
        print(f"best central-difference rel error, {k}: {out[f'best_{k}']:.1e} at eps = {eps_list[i]:.0e}")
    assert out["best_float64"] < 1e-9 and out["best_float32"] > 1e-6      # float32 cannot reach the 1e-6 bar

    # 3. Wrong backwards are caught, but one of them only with random parameters.
    x = rng.standard_normal((4, 8)) * 2 + 1
    out["wrong_no_var"] = check_layernorm_dx(layernorm_backward_no_var, x, rng.standard_normal(8), np.zeros(8))
    out["wrong_no_w_ones"] = check_layernorm_dx(layernorm_backward_no_w, x, np.ones(8), np.zeros(8))
    out["wrong_no_w_random"] = check_layernorm_dx(layernorm_backward_no_w, x, rng.standard_normal(8), np.zeros(8))
    assert out["wrong_no_var"] > 1e-2 and out["wrong_no_w_random"] > 1e-2 and out["wrong_no_w_ones"] < 1e-8
    print(f"wrong backward (variance path dropped): rel error {out['wrong_no_var']:.2f}: caught")
    print(f"wrong backward (forgot * w): rel {out['wrong_no_w_ones']:.1e} with w = ones (hidden!), "
          f"{out['wrong_no_w_random']:.2f} with random w (caught)")

    curves["tolerance 1e-6"] = [1e-6] * len(eps_list)
    pic = line_plot({k: (np.log10(eps_list), np.maximum(v, 1e-16)) for k, v in curves.items()}, logy=True,
                    markers=True, title="LayerNorm dx: central differences vs the analytic backward",
                    xlabel="log10(eps)", ylabel="relative error", size=(640, 440), legend="lower left")
    png = save_png(pic, out_dir / "04_gradient_checking.png")
    print(f"picture: {png}")
    out.update(png=str(png), seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer eps values")
    ap.add_argument("--out", default=None, help="folder for the PNG (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
