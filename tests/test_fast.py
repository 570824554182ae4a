"""Every fast twin (minivit.fast) against its reference pair (minivit.reference: layers.py, attention.py).

Forward outputs and every backward output, in float64 (to ~1e-12) and float32 (to the tolerance below), on odd
shapes, with the work cut into many row blocks and shared over 1 and 3 threads; then the whole model on both
paths (logits and every gradient, with dropout and stochastic depth on), the whole-model gradient check on the
reference path, and a few training steps on each path. The reference pairs themselves are checked against finite
differences and closed forms in test_layers.py.
"""
import inspect

import numpy as np
import pytest

import minivit.fast.rows as rows
from minivit import attention, fast, layers, optim, reference
from minivit.config import get_config
from minivit.gradcheck import gradcheck_model
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.model import attention_probs, block_forward, init_params, layer_ops, vit_backward, vit_forward
from minivit.optim import optimizer_init, optimizer_step
from minivit.threads import set_num_threads
from minivit.tree import flatten, tree_map

F32 = dict(rtol=2e-5, atol=2e-6)        # float32: both sides round differently (blocked sums, fused passes)
F64 = dict(rtol=1e-12, atol=1e-12)


def tol(dtype):
    return F32 if dtype == np.float32 else F64


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def blocks(request, monkeypatch):
    """Small row blocks (3000 elements) so that every test array is cut into many blocks, on 1 or 3 threads."""
    monkeypatch.setattr(rows, "BLOCK_ELEMS", 3000)
    set_num_threads(request.param)
    yield request.param
    set_num_threads(None)


def rand(*shape, dtype=np.float64, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def assert_same(got, want, dtype):
    """Nested tuples/lists/dicts of arrays (or None) equal to the tolerance of `dtype`; dtypes kept."""
    if want is None:
        assert got is None
    elif isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            assert_same(got[k], want[k], dtype)
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w, dtype)
    else:
        assert got.shape == want.shape and got.dtype == want.dtype == dtype
        np.testing.assert_allclose(got, want, **tol(dtype))


DTYPES = [np.float32, np.float64]


# ---- the two namespaces

def test_fast_and_reference_offer_the_same_pairs_with_the_same_signatures():
    for name in reference.LAYER_PAIRS:
        for half in ("_forward", "_backward"):
            f, r = getattr(fast, name + half), getattr(reference, name + half)
            assert inspect.signature(f).parameters.keys() == inspect.signature(r).parameters.keys(), name + half
            if f is not r:                                   # a twin names its reference in its docstring
                assert "twin of" in f.__doc__ and name + half in f.__doc__, name + half
    twins = [n for n in reference.LAYER_PAIRS
             if getattr(fast, n + "_forward") is not getattr(reference, n + "_forward")]
    assert twins == ["attention", "gelu", "layernorm", "linear", "linear_gelu", "patch_embed", "softmax"]
    adam = [inspect.signature(f).parameters.keys() for f in (fast.adam_update, optim.adam_update)]
    assert adam[0] == adam[1]


def test_reference_files_hold_only_the_math():
    """layers.py and attention.py: no row blocks, scratch buffers, thread pools or device branches."""
    for module in (layers, attention):
        src = inspect.getsource(module)
        for word in ("row_blocks", "scratch", "thread", "xp is not np", "gpu_kernel", "cuda", "(out=", " out="):
            assert word not in src, f"{word!r} in {module.__name__}"


def test_the_switch(monkeypatch):
    monkeypatch.delenv("MINIVIT_REFERENCE", raising=False)
    assert layer_ops() is fast and layer_ops(True) is reference
    monkeypatch.setenv("MINIVIT_REFERENCE", "1")
    assert layer_ops() is reference and layer_ops(False) is fast
    cfg = get_config("test")
    _, cache = vit_forward(init_params(cfg), np.zeros((1, 8, 8, 3), np.float32), cfg)
    assert cache["ops"] is reference and type(cache["blocks"][0].attn).__module__ == "minivit.attention"
    p = init_params(cfg)["blocks"][0]                                  # a block called on its own follows it too
    _, block_cache = block_forward(np.zeros((1, 5, 12), np.float32), p, cfg)
    assert block_cache.ops is reference and block_cache.mlp.ops is reference
    monkeypatch.delenv("MINIVIT_REFERENCE")
    assert block_forward(np.zeros((1, 5, 12), np.float32), p, cfg)[1].ops is fast


# ---- leaf pairs

@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(blocks, dtype):
    x, w, b = rand(3, 137, 29, dtype=dtype), rand(29, 41, dtype=dtype, seed=1), rand(41, dtype=dtype, seed=2)
    dy = rand(3, 137, 41, dtype=dtype, seed=3)
    yf, cf = fast.linear_forward(x, w, b)
    yr, cr = reference.linear_forward(x, w, b)
    assert_same(yf, yr, dtype)
    assert_same(fast.linear_backward(dy, cf), reference.linear_backward(dy, cr), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_embed(blocks, dtype):
    x, w, b = rand(5, 12, 18, 3, dtype=dtype), rand(27, 10, dtype=dtype, seed=1), rand(10, dtype=dtype, seed=2)
    yf, cf = fast.patch_embed_forward(x, w, b, 3)
    yr, cr = reference.patch_embed_forward(x, w, b, 3)
    assert_same(yf, yr, dtype)
    dy = rand(*yr.shape, dtype=dtype, seed=3)
    assert_same(fast.patch_embed_backward(dy, cf), reference.patch_embed_backward(dy, cr), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm(blocks, dtype):
    x = rand(4, 301, 37, dtype=dtype, scale=2.0) + 0.5
    w, b = rand(37, dtype=dtype, seed=1), rand(37, dtype=dtype, seed=2)
    dy = rand(4, 301, 37, dtype=dtype, seed=3)
    yf, cf = fast.layernorm_forward(x, w, b, 1e-6)
    yr, cr = reference.layernorm_forward(x, w, b, 1e-6)
    assert_same(yf, yr, dtype)
    assert_same(cf, cr, dtype)                                  # the same cache: xhat, rstd, w
    t = {**tol(dtype), "atol": 2e-5} if dtype == np.float32 else tol(dtype)   # dw, db: sums of 1204 rows
    for g, r in zip(fast.layernorm_backward(dy, cf), reference.layernorm_backward(dy, cr)):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, r, **t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "exact"])
def test_gelu(blocks, dtype, approximate):
    x = rand(211, 53, dtype=dtype, scale=3.0)
    dy = rand(211, 53, dtype=dtype, seed=1)
    yf, cf = fast.gelu_forward(x, approximate)
    yr, cr = reference.gelu_forward(x, approximate)
    assert_same(yf, yr, dtype)
    assert_same(fast.gelu_backward(dy, cf), reference.gelu_backward(dy, cr), dtype)
    y0, c0 = fast.gelu_forward(np.asarray(0.7, dtype), approximate)            # 0-d: one row of one
    assert y0.shape == () and abs(float(y0) - float(reference.gelu_forward(np.asarray(0.7), approximate)[0])) < 1e-6
    with pytest.raises(ValueError, match="'tanh' or 'exact'"):
        fast.gelu_forward(x, "fast")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "exact"])
def test_linear_gelu(blocks, dtype, approximate):
    x, w, b = rand(2, 151, 23, dtype=dtype), rand(23, 67, dtype=dtype, seed=1, scale=0.3), rand(67, dtype=dtype, seed=2)
    dy = rand(2, 151, 67, dtype=dtype, seed=3)
    yf, cf = fast.linear_gelu_forward(x, w, b, approximate)
    yr, cr = reference.linear_gelu_forward(x, w, b, approximate)
    assert_same(yf, yr, dtype)
    t = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else F64          # dw, db: sums over 302 rows
    for g, r in zip(fast.linear_gelu_backward(dy, cf), reference.linear_gelu_backward(dy, cr)):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, r, **t)
    y_infer, no_cache = fast.linear_gelu_forward(x, w, b, approximate, keep_cache=False)   # inference
    assert no_cache is None and reference.linear_gelu_forward(x, w, b, approximate, keep_cache=False)[1] is None
    assert_same(y_infer, yr, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(blocks, dtype):
    s = rand(7, 3, 29, 29, dtype=dtype, scale=4.0)
    dy = rand(7, 3, 29, 29, dtype=dtype, seed=1)
    yf, cf = fast.softmax_forward(s, 0.125)
    yr, cr = reference.softmax_forward(s, 0.125)
    assert_same(yf, yr, dtype)
    assert_same(fast.softmax_backward(dy, cf), reference.softmax_backward(dy, cr), dtype)
    big = np.array([[1e4, -1e4, 0.0]], dtype)                 # the max shift: no overflow on either side
    assert_same(fast.softmax_forward(big)[0], reference.softmax_forward(big)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [False, True])
def test_attention(blocks, dtype, train):
    B, N, D, nh = 9, 17, 24, 3                                # odd N; 9 images over the chunks
    x = rand(B, N, D, dtype=dtype)
    p = {"qkv_w": rand(D, 3 * D, dtype=dtype, seed=1, scale=0.3), "qkv_b": rand(3 * D, dtype=dtype, seed=2),
         "proj_w": rand(D, D, dtype=dtype, seed=3, scale=0.3), "proj_b": rand(D, dtype=dtype, seed=4)}
    dy = rand(B, N, D, dtype=dtype, seed=5)
    drop = dict(attn_dropout=0.2, proj_dropout=0.1) if train else {}
    yf, cf = fast.attention_forward(x, p, nh, train, np.random.default_rng(7), **drop)
    yr, cr = reference.attention_forward(x, p, nh, train, np.random.default_rng(7), **drop)   # the same draws
    assert_same(yf, yr, dtype)
    assert_same(cf.att, cr.att, dtype)
    t = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else F64
    dxf, gf = fast.attention_backward(dy, cf)
    dxr, gr = reference.attention_backward(dy, cr)
    np.testing.assert_allclose(dxf, dxr, **t)
    assert set(gf) == set(gr)
    for k in gr:
        assert gf[k].dtype == dtype
        # the key bias's gradient is 0 up to rounding (softmax ignores a shift shared by a row's scores), so in
        # float32 its entries are rounding noise of the tensor's scale: an absolute tolerance relative to that
        scale = float(np.abs(gr[k]).max()) if dtype == np.float32 else 0.0
        np.testing.assert_allclose(gf[k], gr[k], rtol=t["rtol"], atol=max(t["atol"], 2e-6 * scale))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_update(blocks, dtype):
    shapes = [(301, 41), (41,), (1, 17, 41)]                  # several blocks; one; a 3-d one
    for decay in (None, 0.99):
        for shape in shapes:
            p, g = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype, seed=1)
            m, v = rand(*shape, dtype=dtype, seed=2), np.abs(rand(*shape, dtype=dtype, seed=3))
            pf, mf, vf = p.copy(), m.copy(), v.copy()
            fast.adam_update(pf, g, mf, vf, 0.9, 0.999, 1e-8, 0.3, 1e-2, decay)
            optim.adam_update(p, g, m, v, 0.9, 0.999, 1e-8, 0.3, 1e-2, decay)
            for a, b in ((pf, p), (mf, m), (vf, v)):
                assert a.dtype == dtype
                np.testing.assert_allclose(a, b, **tol(dtype))
    pt = rand(30, 41).T                                       # not contiguous: the twin's unblocked branch
    pr, g = pt.copy(), rand(41, 30, seed=1)
    m, v = np.zeros_like(pr), np.zeros_like(pr)
    fast.adam_update(pt, g, m.copy(), v.copy(), 0.9, 0.999, 1e-8, 0.3, 1e-2)
    optim.adam_update(pr, g, m, v, 0.9, 0.999, 1e-8, 0.3, 1e-2)
    np.testing.assert_allclose(pt, pr, **F64)


# ---- the whole model on both paths

def noisy_params(cfg, dtype, seed=1):
    """init_params moved by normal(0.1) noise: a nonzero head, so every gradient below it is nonzero."""
    rng = np.random.default_rng(seed)
    return tree_map(lambda p: (p + 0.1 * rng.standard_normal(p.shape)).astype(dtype), init_params(cfg, seed=seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("overrides", [{}, {"pooling": "gap", "gelu": "exact"}, {"representation_size": 6}],
                         ids=["token", "gap-exact", "pre_logits"])
def test_whole_model_paths_agree(blocks, dtype, overrides):
    cfg = get_config("test", dropout=0.1, attn_dropout=0.1, drop_path=0.2, **overrides)
    params = noisy_params(cfg, dtype)
    x = rand(5, 8, 8, 3, dtype=dtype, seed=2)
    labels = np.array([0, 1, 2, 3, 4])
    out = {}
    for ref in (False, True):
        logits, cache = vit_forward(params, x, cfg, train=True, rng=np.random.default_rng(3), reference=ref)
        probs = [a.copy() for a in attention_probs(cache)]
        _, ce = cross_entropy_forward(logits, labels, 0.1)
        dx, grads = vit_backward(cross_entropy_backward(1.0, ce), cache)
        out[ref] = (logits, probs, dx, flatten(grads))
    t = dict(rtol=2e-4, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    (lf, pf, dxf, gf), (lr, pr, dxr, gr) = out[False], out[True]
    np.testing.assert_allclose(lf, lr, **t)
    for a, b in zip(pf, pr):
        np.testing.assert_allclose(a, b, **t)
    np.testing.assert_allclose(dxf, dxr, **t)
    assert set(gf) == set(gr) == set(flatten(params))
    for k in gr:
        assert np.abs(gr[k]).max() > 0, k                       # a gradient of 0 would compare trivially
        np.testing.assert_allclose(gf[k], gr[k], err_msg=k, **t)


@pytest.mark.parametrize("overrides", [{}, {"pooling": "gap", "gelu": "exact", "representation_size": 5}])
def test_whole_model_gradcheck_on_the_reference_path(overrides):
    results = gradcheck_model(get_config("test", **overrides), train=True, reference=True,
                              max_coords=12 if overrides else 24)
    worst = max(results, key=lambda r: r.rel_error)
    assert len(results) == len(flatten(init_params(get_config("test", **overrides)))) + 1   # every tensor, images
    assert worst.rel_error <= 1e-6, f"{worst.name}: {worst.rel_error:.2e}"


def test_training_steps_give_the_same_losses(monkeypatch):
    """Eight AdamW steps with dropout, the reference pairs and reference Adam (MINIVIT_REFERENCE=1) against the
    fast twins: the losses agree to float32 rounding, and the losses really fall (the run learns)."""
    cfg = get_config("test", dropout=0.1, drop_path=0.1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, cfg.num_classes, 16)

    def run():
        params, losses = noisy_params(cfg, np.float32), []
        state = optimizer_init(params)
        for step in range(8):
            logits, cache = vit_forward(params, x, cfg, train=True, rng=np.random.default_rng([0, step]))
            loss, ce = cross_entropy_forward(logits, y)
            _, grads = vit_backward(cross_entropy_backward(1.0, ce), cache)
            optimizer_step(params, grads, state, 3e-3, eps=1e-6, weight_decay=0.05)
            losses.append(float(loss))
        return np.array(losses)

    monkeypatch.delenv("MINIVIT_REFERENCE", raising=False)
    fast_losses = run()
    monkeypatch.setenv("MINIVIT_REFERENCE", "1")
    ref_losses = run()
    np.testing.assert_allclose(fast_losses, ref_losses, rtol=1e-4)
    assert ref_losses[-1] < ref_losses[0] - 0.1
