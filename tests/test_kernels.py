"""The engine room's tools (minivit/fast/rows.py, minivit/threads.py) and the GPU twins.

Row blocks, scratch buffers, the split matrix product and the BLAS row/column sums against the plain NumPy they
replace, in float32 and float64, on arrays cut into several blocks and shared over threads. The GPU twins: their
CUDA bodies evaluated with NumPy against the textbook formulas, compiled with NVRTC where CuPy is installed (no GPU
needed), and the GPU-only lines of a whole training step run with NumPy standing in for CuPy (tests/fake_cupy.py);
where CuPy and a GPU are present, the same functions run on CuPy and must match NumPy. (Each fast layer twin
against its reference: tests/test_fast.py.)
"""
import math
import threading

import numpy as np
import pytest

import minivit.fast.rows as rows
from minivit import threads as threads_mod
from minivit.backend import to_device, to_numpy, tune_allocator
from minivit.config import get_config
from minivit.fast import (gelu_backward, gelu_forward, layernorm_forward, linear_gelu_backward, linear_gelu_forward,
                          softmax_forward)
from minivit.fast.rows import GPU_SOURCES, col_sum, matmul, row_blocks, row_sum, scratch
from minivit.threads import blas_controllers, blas_threads, set_num_threads
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
    monkeypatch.setattr(rows, "BLOCK_ELEMS", 4096)
    set_num_threads(request.param)
    yield request.param
    set_num_threads(None)


@pytest.fixture(params=["default", "split"])
def split(request, monkeypatch):
    """Products at the package's own thresholds, or every product split over the threads."""
    if request.param == "split":
        monkeypatch.setattr(rows, "SPLIT_GEMM", 0)
        monkeypatch.setattr(rows, "SPLIT_GEMM_2D", 0)
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
    real = rows.row_blocks
    monkeypatch.setattr("minivit.fast.layers.row_blocks", lambda fn, *arrays, **kw: real(
        lambda *blk: (seen.append((threading.current_thread().name, blk[0].shape[0])), fn(*blk))[1],
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
    assert threads_mod.num_threads() == 3
    set_num_threads(None)


def test_blas_threads_sets_and_restores():
    libs = blas_controllers()
    if not libs:
        pytest.skip("threadpoolctl finds no BLAS library here")
    before = [lib.get_num_threads() for lib in libs]
    with blas_threads(1):
        assert [lib.get_num_threads() for lib in libs] == [1] * len(libs)
    assert [lib.get_num_threads() for lib in libs] == before


def test_allocator_tuning_applies_on_glibc():
    import sys
    assert tune_allocator() is sys.platform.startswith("linux")   # glibc: mallopt takes it; elsewhere a no-op


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
    libs = blas_controllers()
    if not libs:
        pytest.skip("threadpoolctl finds no BLAS library here")
    before = [lib.get_num_threads() for lib in libs]
    a = rand(50, 60)
    np.testing.assert_allclose(matmul(a, a.T), a @ a.T, rtol=1e-12)
    assert [lib.get_num_threads() for lib in libs] == before


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
    for shape in [(1, 5), (7, 3), (333, 65)]:
        x = rand(*shape, dtype=dtype)
        np.testing.assert_allclose(col_sum(x), x.sum(axis=0), **tol(dtype))
        np.testing.assert_allclose(row_sum(x), x.sum(axis=1, keepdims=True), **tol(dtype))
        assert col_sum(x).dtype == row_sum(x).dtype == dtype


# ---- GPU twins: their CUDA formulas, checked on the CPU

def test_gpu_kernel_formulas_match_the_references():
    x, b = rand(500, scale=3.0), rand(500, seed=2)
    (y,) = run_gpu_source("bias_gelu_tanh", u=x - b, b=b)              # inference: gelu(u + b)
    np.testing.assert_allclose(y, ref_gelu(x), rtol=1e-12, atol=1e-14)
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
    params, outs, body = GPU_SOURCES[name]
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
    for name in GPU_SOURCES:
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
        # eps 1e-3, not 1e-8: a first Adam step moves a parameter by ~lr g / (|g| + eps), so with a tiny eps a
        # gradient that is nearly 0 by cancellation (one q-bias entry here: -2.8e-7, with a rounding noise of 1%
        # that depends on the BLAS kernel) would move its parameter by a noise-sized fraction of lr
        optimizer_step(params, grads, optimizer_init(params), 1e-2, eps=1e-3, weight_decay=0.1)   # in place
        infer, _ = vit_forward(params, x, cfg, keep_cache=False)             # inference: no gelu'
        gelu_y, gelu_cache = gelu_forward(x)                                 # the GELU layer on its own
        params = without_key_bias(flatten(params))                          # the key bias aside: see there
        return to_numpy([logits, infer, gelu_y, gelu_backward(x, gelu_cache), *flatten(grads).values(),
                         *params.values()])

    expected = train_step_and_predict("cpu")
    fake = install_standin(monkeypatch)
    got = train_step_and_predict("gpu")
    assert set(fake.calls) == set(GPU_SOURCES)                     # every kernel ran
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
    yi, _ = linear_gelu_forward(CUPY.asarray(x), CUPY.asarray(w), CUPY.asarray(b), keep_cache=False)   # inference kernel
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
    for name in GPU_SOURCES:
        assert isinstance(rows.gpu_kernel(name), cupy.ElementwiseKernel)
