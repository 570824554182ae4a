"""The fast paths against plain references: row-block kernels, the split matrix product, the blocked optimizer.

Each fast function is compared with the textbook NumPy expression it replaces (sharing no code with it), in
float32 and float64, on arrays large enough to be cut into several row blocks and shared over threads; float32
must stay float32. The GPU twins: their CUDA bodies evaluated with NumPy against the references, compiled with
NVRTC where CuPy is installed (no GPU needed), and the GPU-only lines of a whole training step run with NumPy
standing in for CuPy (tests/fake_cupy.py); where CuPy and a GPU are present, the same functions run on CuPy and
must match NumPy.
"""
import math

import numpy as np
import pytest

import minivit.backend as backend
from minivit.backend import (blas_threads, matmul, row_blocks, scratch, set_num_threads, to_device, to_numpy,
                             tune_allocator)
from minivit.config import get_config
from minivit.layers import (gelu_backward, gelu_forward, layernorm_backward, layernorm_forward, linear_gelu_backward,
                            linear_gelu_forward, softmax_backward, softmax_forward)
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.model import init_params, vit_backward, vit_forward
from minivit.optim import optimizer_init, optimizer_step
from minivit.tree import flatten, tree_map

from conftest import CUPY, install_standin, requires_gpu, without_key_bias
from fake_cupy import run_gpu_source

C = math.sqrt(2 / math.pi)
DTYPES = [np.float32, np.float64]


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """1 or 2 threads, with small row blocks (4096 elements), so that the test arrays are cut into many blocks
    and, with 2 threads, shared over the pool."""
    monkeypatch.setattr(backend, "BLOCK_ELEMS", 4096)
    set_num_threads(request.param)
    yield request.param
    set_num_threads(None)


@pytest.fixture(params=["default", "split"])
def split(request, monkeypatch):
    """Products at the package's own thresholds, or every product split over the threads."""
    if request.param == "split":
        monkeypatch.setattr(backend, "SPLIT_GEMM", 0)
        monkeypatch.setattr(backend, "SPLIT_GEMM_2D", 0)
    return request.param


def rand(*shape, dtype=np.float64, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


# ---- references: the plain expressions

def ref_gelu(x):
    return 0.5 * x * (1 + np.tanh(C * (x + 0.044715 * x ** 3)))


def ref_gelu_grad(x):
    t = np.tanh(C * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * C * (1 + 3 * 0.044715 * x ** 2)


def ref_layernorm(x, w, b, eps):
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return xhat * w + b, xhat


def ref_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- row blocks and the thread pool

def test_chains_really_run_in_several_blocks_on_the_pool(threads, monkeypatch):
    seen = []                                                 # (thread name, rows) of each block of a GELU pass
    real = backend.row_blocks
    monkeypatch.setattr("minivit.layers.row_blocks", lambda fn, *arrays, **kw: real(
        lambda *blk: (seen.append((backend.threading.current_thread().name, blk[0].shape[0])), fn(*blk))[1],
        *arrays, **kw))
    gelu_forward(rand(300, 500))
    assert len(seen) > 4 and sum(rows for _, rows in seen) == 300
    assert len({name for name, _ in seen}) == threads         # the caller, and a pool thread with 2


def test_row_blocks_cover_every_row_once_in_order(threads):
    a = np.arange(10_000 * 7, dtype=np.float64).reshape(10_000, 7)
    out = np.zeros_like(a)
    sums = row_blocks(lambda x, y: (np.multiply(x, 2.0, out=y), x.sum(axis=0))[1], a, out, block_elems=700)
    np.testing.assert_array_equal(out, 2 * a)
    assert len(sums) == 100                                   # 100 rows a block
    np.testing.assert_array_equal(sums[0], a[:100].sum(0))    # in row order
    np.testing.assert_array_equal(np.sum(sums, axis=0), a.sum(0))


def test_scratch_is_reused_per_thread_and_slot():
    like = np.zeros((4, 5), np.float32)
    a, b = scratch(like, slot=0), scratch(like, slot=1)
    assert a.shape == (4, 5) and a.dtype == np.float32 and not np.shares_memory(a, b)
    assert np.shares_memory(scratch(like, slot=0), a)         # the same buffer next time


def test_set_num_threads_validates():
    with pytest.raises(ValueError, match="positive integer, got 0"):
        set_num_threads(0)
    set_num_threads(3)
    assert backend.num_threads() == 3
    set_num_threads(None)


def test_blas_threads_restores_and_allocator_tuning_is_a_bool():
    blas = backend._openblas()
    before = blas[1]() if blas else None
    with blas_threads(1):
        if blas:
            assert blas[1]() == 1
    if blas:
        assert blas[1]() == before
    assert tune_allocator() in (True, False)


# ---- the split matrix product

@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False)])
def test_matmul_2d_matches_numpy(threads, split, ta, tb):
    m, k, n = 300, 70, 90
    a = rand(k, m, seed=1).T if ta else rand(m, k, seed=1)
    b = rand(n, k, seed=2).T if tb else rand(k, n, seed=2)
    np.testing.assert_allclose(matmul(a, b), a @ b, rtol=1e-12, atol=1e-12)
    few_rows = rand(4, 300, seed=3)                           # few rows: split by columns
    big = rand(300, 400, seed=4)
    np.testing.assert_allclose(matmul(few_rows, big), few_rows @ big, rtol=1e-12, atol=1e-12)


def test_small_2d_products_leave_the_blas_thread_count_as_it_was(threads):
    blas = backend._openblas()
    if not blas:
        pytest.skip("OpenBLAS's thread count cannot be read here")
    before = blas[1]()
    a = rand(50, 60)
    np.testing.assert_allclose(matmul(a, a.T), a @ a.T, rtol=1e-12)
    assert blas[1]() == before


def test_matmul_batched_into_strided_views(threads, split):
    B, N, nh, hs = 6, 40, 3, 16
    qkv = rand(B, N, 3, nh, hs, dtype=np.float32)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)                    # strided (B, nh, N, hs) views
    s = matmul(q, k.swapaxes(-1, -2))
    assert s.dtype == np.float32
    np.testing.assert_allclose(s, q @ k.swapaxes(-1, -2), rtol=1e-5, atol=1e-5)
    o = np.empty((B, N, nh, hs), np.float32)
    matmul(s, v, out=o.transpose(0, 2, 1, 3))                 # written straight into the merged layout
    np.testing.assert_allclose(o, (s @ v).transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_and_column_sums_as_blas_products(dtype):
    from minivit.layers import _col_sum, _row_sum
    for shape in [(1, 5), (7, 3), (333, 65)]:
        x = rand(*shape, dtype=dtype)
        np.testing.assert_allclose(_col_sum(x), x.sum(axis=0), **tol(dtype))
        np.testing.assert_allclose(_row_sum(x), x.sum(axis=1, keepdims=True), **tol(dtype))
        assert _col_sum(x).dtype == _row_sum(x).dtype == dtype


# ---- GELU, LayerNorm, softmax

@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_kernels_match_formula(threads, dtype):
    x = rand(300, 500, dtype=dtype, scale=3.0)
    dy = rand(300, 500, dtype=dtype, seed=1)
    y, cache = gelu_forward(x, "tanh")
    dx = gelu_backward(dy, cache)
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_allclose(y, ref_gelu(x), **tol(dtype))
    np.testing.assert_allclose(dx, dy * ref_gelu_grad(x), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_gelu_is_linear_then_gelu(threads, dtype):
    x, w, b = rand(3, 200, 64, dtype=dtype), rand(64, 400, dtype=dtype, seed=1, scale=0.2), rand(400, dtype=dtype, seed=2)
    dy = rand(3, 200, 400, dtype=dtype, seed=3)
    y, cache = linear_gelu_forward(x, w, b, "tanh")
    dx, dw, db = linear_gelu_backward(dy, cache)
    u = x @ w + b
    du = dy * ref_gelu_grad(u)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == dtype
    np.testing.assert_allclose(y, ref_gelu(u), **tol(dtype))
    t = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else tol(dtype)
    np.testing.assert_allclose(dx, du @ w.T, **t)
    np.testing.assert_allclose(dw, x.reshape(-1, 64).T @ du.reshape(-1, 400), **t)
    np.testing.assert_allclose(db, du.reshape(-1, 400).sum(0), **t)
    y_infer, no_cache = linear_gelu_forward(x, w, b, "tanh", grad=False)   # inference: gelu(u) only
    assert no_cache is None
    np.testing.assert_allclose(y_infer, y, **tol(dtype))
    ye, ce = linear_gelu_forward(x, w, b, "exact")           # the exact form goes through the plain layers
    dxe, dwe, dbe = linear_gelu_backward(dy, ce)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(u.astype(np.float64) / math.sqrt(2)))     # Phi(u)
    np.testing.assert_allclose(ye, u * cdf, **tol(dtype))
    due = dy * (cdf + u * np.exp(-0.5 * u * u) / math.sqrt(2 * math.pi))              # dy * (Phi(u) + u phi(u))
    np.testing.assert_allclose(dxe, due @ w.T, **t)
    np.testing.assert_allclose(dbe, due.reshape(-1, 400).sum(0), **t)
    assert dwe.shape == w.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_kernels_match_formula(threads, dtype):
    x, w, b = rand(4, 900, 96, dtype=dtype, scale=2.0) + 0.5, rand(96, dtype=dtype, seed=1), rand(96, dtype=dtype, seed=2)
    dy = rand(4, 900, 96, dtype=dtype, seed=3)
    y, cache = layernorm_forward(x, w, b, 1e-6)
    ref_y, xhat = ref_layernorm(x.astype(np.float64), w, b, 1e-6)
    assert y.dtype == dtype and all(a.dtype == dtype for a in cache[:2])
    np.testing.assert_allclose(y, ref_y, **tol(dtype))
    dx, dw, db = layernorm_backward(dy, cache)
    g = dy * w
    rstd = 1 / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    ref_dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    t = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else tol(dtype)
    np.testing.assert_allclose(dx, ref_dx, **t)
    np.testing.assert_allclose(dw, (dy * xhat).sum((0, 1)), **t)
    np.testing.assert_allclose(db, dy.sum((0, 1)), **t)
    assert dx.dtype == dw.dtype == db.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_with_scale_in_place(threads, dtype):
    s = rand(8, 3, 65, 65, dtype=dtype, scale=4.0)
    dy = rand(8, 3, 65, 65, dtype=dtype, seed=1)
    ref = ref_softmax(0.125 * s)
    y, cache = softmax_forward(s.copy(), 0.125)
    np.testing.assert_allclose(y, ref, **tol(dtype))
    buf = s.copy()
    y2, _ = softmax_forward(buf, 0.125, out=buf)                # in place
    assert np.shares_memory(y2, buf) and y2.dtype == dtype
    np.testing.assert_allclose(y2, ref, **tol(dtype))
    dx = softmax_backward(dy, cache)
    np.testing.assert_allclose(dx, 0.125 * ref * (dy - (dy * ref).sum(-1, keepdims=True)), **tol(dtype))


# ---- the optimizer

@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_adamw_matches_plain_formula(threads, dtype):
    shapes = {"w": (300, 400), "b": (400,)}                  # w: several blocks; b: one
    p = {k: rand(*s, dtype=dtype, seed=i) for i, (k, s) in enumerate(shapes.items())}
    ref = {k: v.astype(np.float64) for k, v in p.items()}
    m = {k: np.zeros(v.shape) for k, v in p.items()}
    v2 = {k: np.zeros(v.shape) for k, v in p.items()}
    state = optimizer_init(p, "adamw")
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
    for t in range(1, 4):
        g = {k: rand(*s, dtype=dtype, seed=10 * t + i) for i, (k, s) in enumerate(shapes.items())}
        optimizer_step(p, g, state, lr, kind="adamw", weight_decay=wd)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k].astype(np.float64) ** 2
            if k == "w":
                ref[k] *= 1 - lr * wd
            ref[k] -= lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v2[k] / (1 - b2 ** t)) + eps)
    for k in p:
        assert p[k].dtype == state["m"][k].dtype == state["v"][k].dtype == dtype
        np.testing.assert_allclose(p[k], ref[k], rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


# ---- GPU twins: their CUDA formulas, checked on the CPU

def test_gpu_kernel_formulas_match_the_references():
    x, dy = rand(500, scale=3.0), rand(500, seed=1)
    (y,) = run_gpu_source("gelu_tanh", x=x)
    np.testing.assert_allclose(y, ref_gelu(x), rtol=1e-12, atol=1e-14)
    (dx,) = run_gpu_source("gelu_tanh_grad", x=x, dy=dy)
    np.testing.assert_allclose(dx, dy * ref_gelu_grad(x), rtol=1e-12, atol=1e-14)
    b = rand(500, seed=2)
    u2, y2 = run_gpu_source("bias_gelu_tanh_value_deriv", b=b, u=x - b)   # fc1's pass: u + b in, u <- gelu'
    np.testing.assert_allclose(y2, ref_gelu(x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(u2, ref_gelu_grad(x), rtol=1e-12, atol=1e-14)
    p, g, m, v = rand(50), rand(50, seed=1), rand(50, seed=2), np.abs(rand(50, seed=3))
    lr, b1, b2, eps, c2, decay = 0.01, 0.9, 0.999, 1e-8, 0.3, 0.99
    p1, m1, v1 = run_gpu_source("adam", g=g, b1=b1, b2=b2, eps=eps, c2=c2, step=lr, decay=decay,
                                p=p.copy(), m=m.copy(), v=v.copy())
    m_ref = b1 * m + (1 - b1) * g
    v_ref = b2 * v + (1 - b2) * g * g
    np.testing.assert_allclose(m1, m_ref, rtol=1e-13)
    np.testing.assert_allclose(v1, v_ref, rtol=1e-13)
    np.testing.assert_allclose(p1, p * decay - lr * m_ref / (np.sqrt(v_ref / c2) + eps), rtol=1e-12)


def cuda_wrapper(name, T):
    """GPU kernel `name` as a plain CUDA C kernel over arrays (what ElementwiseKernel generates, less its
    indexing machinery): one element per thread, inputs read into constants, outputs bound as references."""
    params, outs, body = backend._GPU_SOURCES[name]
    ins, outs = [d.split()[-1] for d in params.split(",")], [d.split()[-1] for d in outs.split(",")]
    args = ", ".join([f"const T* {n}_" for n in ins] + [f"T* {n}_" for n in outs] + ["int n"])
    binds = " ".join([f"const T {n} = {n}_[i];" for n in ins] + [f"T& {n} = {n}_[i];" for n in outs])
    return (f"typedef {T} T;\n"
            f'extern "C" __global__ void {name}({args}) {{\n'
            f"  int i = blockIdx.x * blockDim.x + threadIdx.x;\n  if (i >= n) return;\n"
            f"  {binds}\n  {body};\n}}\n")


@pytest.mark.parametrize("T", ["float", "double"])
def test_gpu_kernel_sources_compile(T):
    """Each CUDA body compiles with NVRTC, in float and double: a typo in a kernel that no GPU has run yet fails
    here. Needs CuPy and its NVRTC library only, no GPU (skips without them)."""
    pytest.importorskip("cupy")
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as e:   # CuPy without the NVRTC shared library
        pytest.skip(f"no NVRTC library: {e}")
    for name in backend._GPU_SOURCES:
        program = nvrtc.createProgram(cuda_wrapper(name, T), f"{name}.cu", [], [])
        try:
            nvrtc.compileProgram(program, ["-arch=compute_75"])   # Turing: the oldest CUDA 13 still takes
        except nvrtc.NVRTCError:
            pytest.fail(f"GPU kernel {name!r} ({T}) does not compile:\n{nvrtc.getProgramLog(program)}")
        assert nvrtc.getPTX(program)


def random_params(cfg, seed=1):
    """init_params with every entry moved by normal(0.1) noise: a nonzero head (a zero one makes every gradient
    below it 0), LayerNorm scales away from 1, nonzero biases, so that every parameter shows in every gradient."""
    rng = np.random.default_rng(seed)
    return tree_map(lambda p: (p + 0.1 * rng.standard_normal(p.shape)).astype(p.dtype), init_params(cfg, seed=seed))


def test_gpu_path_on_the_cpu_matches_the_cpu_path(monkeypatch):
    """The lines only the GPU runs (fused kernels called with their arguments in order, whole-array calls instead
    of row blocks, plain reductions, the optimizer's kernel with its scalars, arrays kept on the device) give the
    CPU path's training step and inference, with NumPy standing in for CuPy: what a GPU would run, less CuPy."""
    cfg = get_config("test", dropout=0.1, attn_dropout=0.1, drop_path=0.1)   # masks drawn on the host, then moved
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, cfg.num_classes, 6)

    def train_step_and_predict(device):
        params, x = to_device(random_params(cfg), device), to_device(images, device)      # float32
        logits, cache = vit_forward(params, x, cfg, train=True, rng=np.random.default_rng(2))
        _, loss_cache = cross_entropy_forward(logits, labels)
        _, grads = vit_backward(cross_entropy_backward(1.0, loss_cache), cache)
        optimizer_step(params, grads, optimizer_init(params), 1e-2, weight_decay=0.1)   # in place
        infer, _ = vit_forward(params, x, cfg, keep_cache=False)             # inference: no gelu'
        gelu_y, gelu_cache = gelu_forward(x)                                 # the GELU layer on its own
        params = without_key_bias(flatten(params))                          # the key bias aside: see there
        return to_numpy([logits, infer, gelu_y, gelu_backward(x, gelu_cache), *flatten(grads).values(),
                         *params.values()])

    expected = train_step_and_predict("cpu")
    fake = install_standin(monkeypatch)
    got = train_step_and_predict("gpu")
    assert set(fake.calls) == set(backend._GPU_SOURCES)                     # every kernel ran
    for g, e in zip(got, expected):
        assert type(g) is np.ndarray and g.dtype == e.dtype == np.float32
        assert np.abs(e).max() > 0                                          # a gradient of 0 would compare trivially
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-6)


# ---- GPU twins (CuPy), where a GPU exists

@requires_gpu
def test_gpu_kernels_match_numpy():
    x, w, b = rand(2, 50, 16, dtype=np.float32), rand(16, 40, dtype=np.float32, seed=1), rand(40, dtype=np.float32, seed=2)
    dy = rand(2, 50, 40, dtype=np.float32, seed=3)
    y, c = linear_gelu_forward(x, w, b)
    yg, cg = linear_gelu_forward(CUPY.asarray(x), CUPY.asarray(w), CUPY.asarray(b))
    np.testing.assert_allclose(CUPY.asnumpy(yg), y, rtol=1e-5, atol=1e-5)
    for a, ag in zip(linear_gelu_backward(dy, c), linear_gelu_backward(CUPY.asarray(dy), cg)):
        np.testing.assert_allclose(CUPY.asnumpy(ag), a, rtol=1e-4, atol=1e-4)
    yi, _ = linear_gelu_forward(CUPY.asarray(x), CUPY.asarray(w), CUPY.asarray(b), grad=False)   # inference kernel
    np.testing.assert_allclose(CUPY.asnumpy(yi), y, rtol=1e-5, atol=1e-5)
    s = rand(2, 3, 7, 7, dtype=np.float32)
    np.testing.assert_allclose(CUPY.asnumpy(softmax_forward(CUPY.asarray(s), 0.5)[0]), softmax_forward(s, 0.5)[0],
                               rtol=1e-5, atol=1e-6)
    ln = layernorm_forward(CUPY.asarray(x), CUPY.asarray(w[:, 0]), CUPY.asarray(w[:, 1]))[0]
    np.testing.assert_allclose(CUPY.asnumpy(ln), layernorm_forward(x, w[:, 0], w[:, 1])[0], rtol=1e-5, atol=1e-5)


@requires_gpu
def test_gpu_fused_gelu_and_adam_match_numpy():
    x, dy = rand(300, 70, dtype=np.float32, scale=3.0), rand(300, 70, dtype=np.float32, seed=1)
    y, cache = gelu_forward(x)
    yg, cache_g = gelu_forward(CUPY.asarray(x))
    np.testing.assert_allclose(CUPY.asnumpy(yg), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(CUPY.asnumpy(gelu_backward(CUPY.asarray(dy), cache_g)), gelu_backward(dy, cache),
                               rtol=1e-5, atol=1e-5)
    p, g = {"w": rand(300, 70, dtype=np.float32)}, {"w": x}
    pg, gg = {"w": CUPY.asarray(p["w"])}, {"w": CUPY.asarray(x)}
    s, sg = optimizer_init(p), optimizer_init(pg)
    for _ in range(2):
        optimizer_step(p, g, s, 1e-2, weight_decay=0.1)
        optimizer_step(pg, gg, sg, 1e-2, weight_decay=0.1)
    np.testing.assert_allclose(CUPY.asnumpy(pg["w"]), p["w"], rtol=1e-5, atol=1e-6)
    assert pg["w"].dtype == CUPY.float32


def test_gpu_kernels_construct():
    cupy = pytest.importorskip("cupy")
    for name in backend._GPU_SOURCES:
        assert isinstance(backend.gpu_kernel(name), cupy.ElementwiseKernel)
