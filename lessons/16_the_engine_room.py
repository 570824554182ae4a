"""Lesson 16: the engine room: how the fast twins make NumPy fast, each trick measured against its reference.

Goal: see why minivit runs its layers from minivit/fast/ and not from the reference pairs of lessons 4-8
(minivit/layers.py, minivit/attention.py), what each trick buys, and that every twin computes the same numbers.

The idea. A reference line such as `y = 0.5 * x * (1 + tanh(c * (x + 0.044715 * x * x * x)))` is one NumPy pass per
operation, and each pass writes a new temporary array the size of x: for the MLP's (8320, 768) activations that is
25 MB per pass, streamed from and to main memory (about 20 GB/s on a laptop core) several times. The twins do the
same arithmetic with four tricks:
    in place         `xp.multiply(a, b, out=t)`, `t += b`: the chain writes into arrays it already has, no new
                     temporaries (no allocation, no page faults, half the memory traffic)
    row blocks       the chain runs on blocks of 1 MiB per array (`row_blocks`, minivit/fast/rows.py): a block
                     stays in the core's cache from the first operation of the chain to the last
    threads          the blocks go to every core (NumPy releases the GIL inside its loops, so Python threads
                     run them in parallel; the matrix products are split over the same threads)
    fusion           the GELU pass computes gelu'(u) beside gelu(u) (they share tanh(u)) and keeps it for the
                     backward, which becomes one multiply instead of recomputing tanh
Each twin has the reference's name and signature (minivit.fast.layernorm_forward mirrors
minivit.layers.layernorm_forward) and tests/test_fast.py holds each one equal to its reference; the model runs the
twins, or the references with MINIVIT_REFERENCE=1 (`minivit ... --reference`), the same model either way.

Timing is the benchmark's own (`minivit.bench.runner.time_ms`: warm-up calls, then the median of timed calls, with a
device synchronization before each clock read), at the sizes of cifar-small's training step (B=128, N=65, D=192,
M=768; --quick: B=8).

Run:   python lessons/16_the_engine_room.py [--quick] [--out DIR]
Time:  about 18 s on a 2-core CPU, Python start-up included (--quick: about 1.5 s).

You should see (2-core AMD EPYC, NumPy 2.4 / OpenBLAS, B=128; timings move by 10-30% from run to run on a shared
machine):
    LayerNorm forward, (8320, 192): reference 2.5 ms; in place 1.5 ms; row blocks 1.7 ms; row blocks + threads
      1.0 ms; every variant equal to the reference (max difference 9.5e-07, float32). Row blocks alone buy
      nothing here: LayerNorm's arrays (6 MB each) fit this machine's 32 MB L3 cache whole. At the MLP's width
      they do not:
    GELU pass, (8320, 768), one thread, by block size: fastest at 65,536 elements per array (256 KiB), ~9.5 ms;
      blocks of 16 M elements (the whole array) ~18 ms; 1,024-element blocks ~85 ms (Python per block)
    fc1 + GELU forward + backward, (8320, 192) -> 768: reference 83 ms, fused twin 41 ms (max difference 1.7e-06)
    softmax forward, (128, 3, 65, 65): reference 4.1 ms, twin 1.6 ms (max difference 3.7e-09)
    a training step (forward, loss, backward), cifar-small, batch 128: reference 1300-1450 ms, twins 870-890 ms
      (1.4-1.7x); the same loss on both paths
And lessons/out/16_block_size.png: the GELU pass's time against its block size.
"""
import argparse
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import minivit.fast.rows as rows
from minivit import fast, reference
from minivit.bench.runner import time_ms
from minivit.charts import line_plot
from minivit.config import get_config
from minivit.draw import save_png
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.model import init_params, vit_backward, vit_forward
from minivit.threads import num_threads, set_num_threads


def median_ms(fn, reps):
    """The benchmark's timing of fn(): its median in ms over `reps` timed calls after one warm-up call."""
    return float(np.median(time_ms(fn, reps=reps, warmup=1)))


@contextmanager
def with_blocks(block_elems, threads):
    """Run the twins with row blocks of `block_elems` elements on `threads` threads (the settings restored after)."""
    saved = rows.BLOCK_ELEMS
    rows.BLOCK_ELEMS = block_elems
    set_num_threads(threads)
    try:
        yield
    finally:
        rows.BLOCK_ELEMS = saved
        set_num_threads(None)


def max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def main(quick=False, seed=0, out_dir=None):
    out_dir = Path(out_dir or Path(__file__).parent / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    B, N, D, M, nh = (8 if quick else 128), 65, 192, 768, 3
    reps = 2 if quick else 7
    threads = max(2, num_threads())
    out = {"rows": B * N}
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)   # noqa: E731

    # 1. LayerNorm: reference, then the twin with one trick added at a time.
    x, w, b = f32(B * N, D), 1.0 + 0.1 * f32(D), 0.1 * f32(D)
    y_ref = reference.layernorm_forward(x, w, b)[0]
    ln, diffs = {"reference": median_ms(lambda: reference.layernorm_forward(x, w, b), reps)}, []
    for name, block, t in (("in place", 1 << 30, 1), ("row blocks", rows.BLOCK_ELEMS, 1),
                           ("row blocks + threads", rows.BLOCK_ELEMS, threads)):
        with with_blocks(block, t):
            ln[name] = median_ms(lambda: fast.layernorm_forward(x, w, b), reps)
            diffs.append(max_diff(fast.layernorm_forward(x, w, b)[0], y_ref))
    out["layernorm_ms"], out["layernorm_max_diff"] = ln, max(diffs)
    print(f"LayerNorm forward, ({B * N}, {D}): " + "; ".join(f"{k} {v:.1f} ms" for k, v in ln.items()))
    print(f"  every variant equal to the reference: max difference {out['layernorm_max_diff']:.1e} (float32)")
    assert out["layernorm_max_diff"] < 1e-5

    # The block size: one thread, the GELU pass (gelu(x) and gelu'(x), four arrays of the MLP's width) on blocks
    # of 2^k elements. Too small, and Python's per-block overhead dominates; too large, and a block's arrays no
    # longer fit the core's caches between the chain's operations.
    xg = f32(B * N, M)
    sizes = [1 << k for k in range(12 if quick else 10, 25, 4 if quick else 2)]
    curve = []
    for size in sizes:
        with with_blocks(size, 1):
            curve.append(median_ms(lambda: fast.gelu_forward(xg), reps))
    out["block_curve"] = dict(zip(sizes, curve))
    best = sizes[int(np.argmin(curve))]
    print(f"GELU pass (value and derivative), ({B * N}, {M}), one thread, by block size: fastest at {best:,} "
          f"elements per array ({best * 4 // 1024} KiB), {min(curve):.1f} ms; blocks of {sizes[-1]:,} elements "
          f"{curve[-1]:.1f} ms (the package's default: {rows.BLOCK_ELEMS:,})")
    img = line_plot({"gelu_forward twin, 1 thread": (np.log2(sizes), curve)}, xlabel="log2(elements per block)",
                    ylabel="ms", title=f"GELU pass on ({B * N}, {M}) by row-block size")
    out["png"] = str(out_dir / "16_block_size.png")
    save_png(img, out["png"])

    # 2. Fusion: GELU forward + backward inside the MLP's first layer.
    xm, w1, b1, dy = f32(B * N, D), 0.05 * f32(D, M), 0.1 * f32(M), f32(B * N, M)

    def fwd_bwd(ops):
        y, cache = ops.linear_gelu_forward(xm, w1, b1)
        return y, ops.linear_gelu_backward(dy, cache)
    (y_r, g_r), (y_f, g_f) = fwd_bwd(reference), fwd_bwd(fast)
    out["gelu_max_diff"] = max(max_diff(y_r, y_f), max_diff(g_r[0], g_f[0]) / max(1.0, float(np.abs(g_r[0]).max())))
    gelu = {"reference": median_ms(lambda: fwd_bwd(reference), reps),
            "fused twin": median_ms(lambda: fwd_bwd(fast), reps)}
    out["linear_gelu_ms"] = gelu
    print(f"fc1 + GELU forward + backward, ({B * N}, {D}) -> {M}: reference {gelu['reference']:.1f} ms, "
          f"fused twin {gelu['fused twin']:.1f} ms (max difference {out['gelu_max_diff']:.1e})")
    assert out["gelu_max_diff"] < 1e-4

    # 3. Softmax over attention scores.
    s = f32(B, nh, N, N)
    out["softmax_max_diff"] = max_diff(fast.softmax_forward(s, 0.125)[0], reference.softmax_forward(s, 0.125)[0])
    sm = {"reference": median_ms(lambda: reference.softmax_forward(s, 0.125), reps),
          "twin": median_ms(lambda: fast.softmax_forward(s, 0.125), reps)}
    out["softmax_ms"] = sm
    print(f"softmax forward, ({B}, {nh}, {N}, {N}): reference {sm['reference']:.1f} ms, twin {sm['twin']:.1f} ms "
          f"(max difference {out['softmax_max_diff']:.1e})")
    assert out["softmax_max_diff"] < 1e-6

    # 4. The whole training step (forward, loss, backward) on both paths.
    cfg = get_config("cifar-small")
    params = init_params(cfg, seed=seed)
    params["head"]["w"] += 0.01 * rng.standard_normal(params["head"]["w"].shape).astype(np.float32)
    images, labels = f32(B, 32, 32, 3), rng.integers(0, 10, B)

    def step(ref):
        logits, cache = vit_forward(params, images, cfg, reference=ref)
        loss, ce = cross_entropy_forward(logits, labels)
        vit_backward(cross_entropy_backward(1.0, ce), cache)
        return float(loss)
    out["step_loss"] = {"reference": step(True), "fast": step(False)}
    steps = {"reference": median_ms(lambda: step(True), 1 if quick else 3),
             "fast": median_ms(lambda: step(False), 1 if quick else 3)}
    out["step_ms"] = steps
    print(f"a training step, cifar-small, batch {B}: reference {steps['reference']:.0f} ms, twins "
          f"{steps['fast']:.0f} ms ({steps['reference'] / steps['fast']:.1f}x); loss {out['step_loss']['fast']:.6f} "
          f"vs {out['step_loss']['reference']:.6f}")
    assert abs(out["step_loss"]["fast"] - out["step_loss"]["reference"]) < 1e-5
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 8 instead of 128, fewer timed calls")
    ap.add_argument("--out", default=None, help="where to write the PNG (default: lessons/out)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
