"""Gradient checks of every leaf layer and composite piece, plus references that share no code with minivit."""
import math

import numpy as np
import pytest

from minivit.attention import attention_backward, attention_forward
from minivit.config import get_config
from minivit.gradcheck import gradcheck
from minivit.erf import erf
from minivit.layers import (drop_path_backward, drop_path_forward, dropout_backward, dropout_forward,
                            gelu_backward, gelu_forward, layernorm_backward, layernorm_forward, linear_backward,
                            linear_forward, patch_embed_backward, patch_embed_forward, patchify, softmax_backward,
                            softmax_forward, tokens_backward, tokens_forward, unpatchify)
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.model import block_backward, block_forward, init_params, mlp_backward, mlp_forward
from minivit.tree import flatten, unflatten

TOL = 1e-6   # house rule: relative error per tensor <= 1e-6 in float64 (we expect 1e-8 or better)


def rand(xp, *shape, seed=0, scale=1.0):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale)


def assert_gradcheck(forward, backward, inputs, tol=TOL):
    results = gradcheck(forward, backward, inputs)
    for r in results:
        assert r.rel_error <= tol, f"{r.name}: relative error {r.rel_error:.2e} > {tol:.0e}"
    return results


def test_linear(xp):
    inp = {"x": rand(xp, 2, 3, 5), "w": rand(xp, 5, 4, seed=1), "b": rand(xp, 4, seed=2)}
    fwd = lambda i: linear_forward(i["x"], i["w"], i["b"])[0]
    def bwd(i, dy):
        dx, dw, db = linear_backward(dy, linear_forward(i["x"], i["w"], i["b"])[1])
        assert dx.shape == i["x"].shape and dw.shape == i["w"].shape and db.shape == i["b"].shape
        return {"x": dx, "w": dw, "b": db}
    assert_gradcheck(fwd, bwd, inp)


def test_layernorm(xp):
    # non-trivial weight and bias: an all-ones weight can hide a wrong backward
    inp = {"x": rand(xp, 2, 3, 6, scale=2.0) + 0.5, "w": rand(xp, 6, seed=1), "b": rand(xp, 6, seed=2)}
    fwd = lambda i: layernorm_forward(i["x"], i["w"], i["b"], 1e-6)[0]
    def bwd(i, dy):
        dx, dw, db = layernorm_backward(dy, layernorm_forward(i["x"], i["w"], i["b"], 1e-6)[1])
        return {"x": dx, "w": dw, "b": db}
    assert_gradcheck(fwd, bwd, inp)


def test_layernorm_matches_closed_form():
    x = np.random.default_rng(0).standard_normal((4, 7))
    w, b = np.arange(7.0), np.ones(7)
    y, _ = layernorm_forward(x, w, b, eps=1e-5)
    ref = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approximate", ["tanh", "exact"])
def test_gelu(xp, approximate):
    inp = {"x": rand(xp, 3, 50, scale=3.0)}
    fwd = lambda i: gelu_forward(i["x"], approximate)[0]
    bwd = lambda i, dy: {"x": gelu_backward(dy, gelu_forward(i["x"], approximate)[1])}
    results = assert_gradcheck(fwd, bwd, inp)
    assert results[0].rel_error < 1e-10   # the exact GELU needs a float64-accurate erf to get here


def test_gelu_reference_values():
    x = np.linspace(-6, 6, 101)
    exact = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in x])
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(gelu_forward(x, "exact")[0], exact, rtol=0, atol=1e-15)
    np.testing.assert_allclose(gelu_forward(x, "tanh")[0], tanh, rtol=0, atol=1e-15)
    assert np.abs(exact - tanh).max() < 1e-3   # the two forms differ by well under 1e-3
    with pytest.raises(ValueError, match="approximate"):
        gelu_forward(x, "sigmoid")


def test_erf_float64_matches_math_erf():
    x = np.concatenate([np.linspace(-12, 12, 48001), np.logspace(-300, 1.2, 500), -np.logspace(-300, 1.2, 500)])
    ref = np.array([math.erf(t) for t in x])
    got = erf(x)
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
    assert rel.max() < 4e-15, rel.max()   # a few ulp of float64
    assert got.dtype == np.float64


def test_erf_float32_is_float32_accurate():
    x = np.linspace(-9, 9, 36001).astype(np.float32)
    ref = np.array([math.erf(float(t)) for t in x])
    got = erf(x)
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() < 4e-7   # a few float32 ulp (an ulp just below 1 is 6e-8)


def test_softmax(xp):
    inp = {"x": rand(xp, 2, 3, 7, scale=2.0)}
    fwd = lambda i: softmax_forward(i["x"])[0]
    bwd = lambda i, dy: {"x": softmax_backward(dy, softmax_forward(i["x"])[1])}
    assert_gradcheck(fwd, bwd, inp)
    y, _ = softmax_forward(rand(xp, 4, 9) * 1e4)
    assert bool(xp.isfinite(y).all()) and np.allclose(float(y.sum()), 4.0)


def test_patchify_matches_naive_loop_and_inverts():
    x = np.random.default_rng(0).standard_normal((2, 8, 12, 3))
    P = 4
    patches = patchify(x, P)
    assert patches.shape == (2, 6, 48)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                ref = [x[b, i * P + r, j * P + c, ch] for r in range(P) for c in range(P) for ch in range(3)]
                np.testing.assert_array_equal(patches[b, i * 3 + j], ref)   # (row, col, channel) order
    np.testing.assert_array_equal(unpatchify(patches, P, (2, 3)), x)


def test_patch_embed_is_a_strided_convolution():
    rng = np.random.default_rng(1)
    B, H, W, C, P, D = 2, 8, 8, 3, 4, 5
    x, kernel, b = rng.standard_normal((B, H, W, C)), rng.standard_normal((P, P, C, D)), rng.standard_normal(D)
    y, _ = patch_embed_forward(x, kernel.reshape(P * P * C, D), b, P)
    conv = np.zeros((B, H // P, W // P, D))   # naive convolution, kernel P, stride P (the original's Conv)
    for n in range(B):
        for i in range(H // P):
            for j in range(W // P):
                for d in range(D):
                    conv[n, i, j, d] = b[d] + sum(x[n, i * P + r, j * P + c, ch] * kernel[r, c, ch, d]
                                                  for r in range(P) for c in range(P) for ch in range(C))
    np.testing.assert_allclose(y, conv.reshape(B, -1, D), rtol=1e-12, atol=1e-12)


def test_patch_embed_gradcheck(xp):
    inp = {"x": rand(xp, 2, 8, 4, 3), "w": rand(xp, 48, 5, seed=1), "b": rand(xp, 5, seed=2)}
    fwd = lambda i: patch_embed_forward(i["x"], i["w"], i["b"], 4)[0]
    def bwd(i, dy):
        dx, dw, db = patch_embed_backward(dy, patch_embed_forward(i["x"], i["w"], i["b"], 4)[1])
        return {"x": dx, "w": dw, "b": db}
    assert_gradcheck(fwd, bwd, inp)


@pytest.mark.parametrize("with_cls", [True, False])
def test_tokens(xp, with_cls):
    inp = {"x": rand(xp, 3, 4, 5), "pos": rand(xp, 1, 4 + with_cls, 5, seed=1)}
    if with_cls:
        inp["cls"] = rand(xp, 1, 1, 5, seed=2)
    fwd = lambda i: tokens_forward(i["x"], i.get("cls"), i["pos"])[0]
    def bwd(i, dy):
        dx, dcls, dpos = tokens_backward(dy, tokens_forward(i["x"], i.get("cls"), i["pos"])[1])
        return {"x": dx, "cls": dcls, "pos": dpos}
    assert_gradcheck(fwd, bwd, inp)


def test_dropout_and_drop_path_fixed_mask(xp):
    inp = {"x": rand(xp, 4, 3, 6)}
    for f, b in [(dropout_forward, dropout_backward), (drop_path_forward, drop_path_backward)]:
        fwd = lambda i: f(i["x"], 0.3, True, np.random.default_rng(5))[0]
        bwd = lambda i, dy: {"x": b(dy, f(i["x"], 0.3, True, np.random.default_rng(5))[1])}
        assert_gradcheck(fwd, bwd, inp)
    y, _ = dropout_forward(inp["x"], 0.3, False)
    assert y is inp["x"]                                   # evaluation: identity
    big = xp.ones((200, 500))
    y, _ = dropout_forward(big, 0.25, True, np.random.default_rng(0))
    assert abs(float(y.mean()) - 1.0) < 0.01               # inverted dropout keeps the expectation
    assert abs(float((y == 0).mean()) - 0.25) < 0.01
    y, _ = drop_path_forward(big, 0.5, True, np.random.default_rng(0))
    rows = y[:, 0]
    assert bool(((y == rows[:, None])).all())              # one decision per sample
    with pytest.raises(ValueError, match="random generator"):
        dropout_forward(big, 0.1, True, None)


def attention_inputs(xp, D=6, heads=3):
    rng = np.random.default_rng(3)
    p = {"qkv_w": rng.standard_normal((D, 3 * D)) * 0.5, "qkv_b": rng.standard_normal(3 * D) * 0.5,
         "proj_w": rng.standard_normal((D, D)) * 0.5, "proj_b": rng.standard_normal(D)}
    inp = {"x": rng.standard_normal((2, 5, D))}
    inp.update(p)
    return {k: xp.asarray(v) for k, v in inp.items()}


@pytest.mark.parametrize("train", [False, True])
def test_attention_gradcheck(xp, train):
    inp = attention_inputs(xp)
    split = lambda i: (i["x"], {k: v for k, v in i.items() if k != "x"})
    def run(i):
        x, p = split(i)
        return attention_forward(x, p, 3, train=train, rng=np.random.default_rng(7), attn_dropout=0.2,
                                 proj_dropout=0.2)
    def bwd(i, dy):
        dx, grads = attention_backward(dy, run(i)[1])
        assert set(grads) == {"qkv_w", "qkv_b", "proj_w", "proj_b"}
        return dict(grads, x=dx)
    assert_gradcheck(lambda i: run(i)[0], bwd, inp)


def test_attention_matches_per_head_loop():
    """The batched, fused-qkv attention equals a naive per-image, per-head loop written from the formulas."""
    inp = attention_inputs(np)
    x = inp["x"]
    y, cache = attention_forward(x, inp, heads=3)
    D, hs = 6, 2
    ref = np.zeros_like(x)
    for b in range(x.shape[0]):
        heads = []
        for h in range(3):
            cols = slice(h * hs, (h + 1) * hs)
            q = x[b] @ inp["qkv_w"][:, :D][:, cols] + inp["qkv_b"][:D][cols]
            k = x[b] @ inp["qkv_w"][:, D:2 * D][:, cols] + inp["qkv_b"][D:2 * D][cols]
            v = x[b] @ inp["qkv_w"][:, 2 * D:][:, cols] + inp["qkv_b"][2 * D:][cols]
            s = q @ k.T / math.sqrt(hs)
            a = np.exp(s - s.max(1, keepdims=True))
            a /= a.sum(1, keepdims=True)
            np.testing.assert_allclose(cache.att[b, h], a, rtol=1e-12)
            heads.append(a @ v)
        ref[b] = np.concatenate(heads, axis=1) @ inp["proj_w"] + inp["proj_b"]
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache.att.sum(-1), 1.0, rtol=1e-12)


def random_params(cfg, seed=0):
    """Float64 parameters with every entry perturbed (LayerNorm weights away from 1, non-zero biases)."""
    rng = np.random.default_rng(seed)
    flat = flatten(init_params(cfg, seed=seed, dtype=np.float64))
    return {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in flat.items()}


@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_mlp_gradcheck(xp, gelu):
    cfg = get_config("test", gelu=gelu)
    flat = random_params(cfg)
    inp = {k.split(".")[-1]: xp.asarray(v) for k, v in flat.items() if k.startswith("blocks.0.mlp.")}
    inp["x"] = rand(xp, 2, 5, cfg.width, seed=9)
    run = lambda i: mlp_forward(i["x"], i, gelu, train=True, rng=np.random.default_rng(1), dropout=0.1)
    def bwd(i, dy):
        dx, grads = mlp_backward(dy, run(i)[1])
        return dict(grads, x=dx)
    assert_gradcheck(lambda i: run(i)[0], bwd, inp)


@pytest.mark.parametrize("train", [False, True])
def test_block_gradcheck(xp, train):
    cfg = get_config("test", dropout=0.1, attn_dropout=0.1, drop_path=0.2)
    flat = random_params(cfg)
    inp = {k[len("blocks.0."):]: xp.asarray(v) for k, v in flat.items() if k.startswith("blocks.0.")}
    inp["x"] = rand(xp, 3, cfg.seq_len, cfg.width, seed=9)
    def run(i):
        p = unflatten({k: v for k, v in i.items() if k != "x"})
        return block_forward(i["x"], p, cfg, train=train, rng=np.random.default_rng(4), drop_path=0.3)
    def bwd(i, dy):
        dx, grads = block_backward(dy, run(i)[1])
        g = flatten(grads)
        assert list(g) == [k for k in i if k != "x"]            # grads mirror params, same order
        return dict(g, x=dx)
    assert_gradcheck(lambda i: run(i)[0], bwd, inp)


@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy_gradcheck(xp, soft):
    rng = np.random.default_rng(0)
    targets = rng.dirichlet(np.ones(5), size=4) if soft else rng.integers(0, 5, size=4)
    inp = {"z": rand(xp, 4, 5, scale=3.0)}
    fwd = lambda i: cross_entropy_forward(i["z"], xp.asarray(targets) if soft else targets, 0.1)[0]
    bwd = lambda i, dy: {"z": cross_entropy_backward(
        dy, cross_entropy_forward(i["z"], xp.asarray(targets) if soft else targets, 0.1)[1])}
    assert_gradcheck(fwd, bwd, inp)


def test_cross_entropy_closed_form_and_stability():
    z = np.array([[1.0, 2.0, 3.0]])
    loss, _ = cross_entropy_forward(z, np.array([2]))
    assert abs(float(loss) - (math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 3.0)) < 1e-12
    loss, _ = cross_entropy_forward(z, np.array([2]), smoothing=0.3)   # t = 0.1, 0.1, 0.8
    lp = z - math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert abs(float(loss) + (0.1 * lp[0, 0] + 0.1 * lp[0, 1] + 0.8 * lp[0, 2])) < 1e-12
    big = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]], dtype=np.float32)
    loss, cache = cross_entropy_forward(big, np.array([1, 1]))
    d = cross_entropy_backward(1.0, cache)
    assert np.isfinite(float(loss)) and np.isfinite(d).all() and loss.dtype == np.float32
    assert abs(float(loss) - 1e4) < 1.0                                 # first row: 2e4 / 2 images


def test_cross_entropy_rejects_bad_labels():
    z = np.zeros((3, 4))
    with pytest.raises(ValueError, match="label 4 is out of range for 4 classes"):
        cross_entropy_forward(z, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="label -1"):
        cross_entropy_forward(z, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="integers"):
        cross_entropy_forward(z, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="3 labels for 2"):
        cross_entropy_forward(np.zeros((2, 4)), np.array([0, 1, 1]))
