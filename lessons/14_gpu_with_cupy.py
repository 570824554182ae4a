"""Lesson 14: the same code on a GPU with CuPy: moving arrays, timing correctly, what changes and what does not.

Goal: run the ViT of lessons 8-10 on a GPU without changing a line of the model, and measure it honestly.

The idea. CuPy is NumPy's interface on a CUDA GPU: cupy.matmul, cupy.exp, cupy.zeros take the same arguments as
numpy's and return arrays that live in GPU memory. Every minivit function that needs a module-level routine
starts with
    xp = get_xp(x)          # numpy for a NumPy array, cupy for a CuPy array (CuPy's get_array_module idiom)
and then calls xp.exp, xp.zeros, ... (operators such as x @ w work on both by themselves), so the arrays decide
where the work runs. What changes on a GPU:
    where the arrays live   to_device(tree, "gpu") copies host arrays into GPU memory (cupy.asarray) and
                            to_numpy(tree) copies them back (.get()). One operation cannot mix a NumPy and a CuPy
                            array: move the inputs, keep the parameters there, bring back only the results.
    when the work is done   a CuPy call queues a kernel and returns at once (asynchronous). A clock read right
                            after it measures the queueing, not the arithmetic: the wrong way to time. The right
                            way calls synchronize(xp) (cupy.cuda.Device().synchronize(): wait until the queue is
                            empty) before reading the clock at the start AND at the end. NumPy is synchronous and
                            synchronize(numpy) does nothing, so one timing function serves both.
    the first call          CuPy compiles and caches its kernels and grows its memory pool on first use: warm up
                            before timing, and report a median of several runs (on the CPU too).
What does not change: the layers, the model, the loss, the optimizer and the training loop. Only
minivit/backend.py imports CuPy (this lesson checks it by reading the package's source). Weights are drawn on the
host from a seeded NumPy generator and then copied, so CPU and GPU start from the same numbers and agree up to
float32 rounding (the order of the sums differs).

Run:   python lessons/14_gpu_with_cupy.py [--quick] [--out DIR] [--device gpu|cpu]
Time:  about 4-8 s on a 2-core CPU without a GPU, Python start-up included (--quick: about 3 s).
Where there is no GPU (or no CuPy) the lesson says so, returns {"gpu": False, "reason": ...} and still runs the
CPU part. `pip install -e '.[cuda12]'` on a machine with an NVIDIA GPU gives the GPU part.

You should see (no GPU):
    only minivit/backend.py imports CuPy; N modules call get_xp
    CPU forward, shapes-small (32x32, 65 tokens, D=96, 4 blocks): batch 1 ~ 5 ms ... batch 64 ~ 0.4 s
    no GPU here: <why: CuPy not installed, or no usable CUDA GPU> -> the CPU part only
With a GPU, also: the GPU's class-token outputs equal the CPU's up to float32 rounding (~1e-6); timed the wrong way a forward looks
shorter than it is (the clock stops when the kernels are queued, not done), timed the right way it grows with the
batch; and the cost of moving a batch in and the logits out, which a fair CPU/GPU comparison includes.
And lessons/out/14_gpu_timing.png: seconds per forward against the batch size (CPU, and GPU right and wrong).
"""
import argparse
import time
from pathlib import Path

import numpy as np

import minivit
from minivit.backend import DeviceError, get_backend, get_xp, synchronize, to_device, to_numpy
from minivit.charts import line_plot
from minivit.config import get_config
from minivit.data.shapes import render_shapes
from minivit.draw import save_png
from minivit.model import init_params, vit_forward


def modules_importing_cupy():
    """The package's .py files that import CuPy, and those that call get_xp (read from the source)."""
    root = Path(minivit.__file__).resolve().parent
    files = sorted(root.rglob("*.py"))
    imports = [f.relative_to(root).as_posix() for f in files
               if any(line.strip().startswith(("import cupy", "from cupy")) for line in f.read_text().splitlines())]
    uses_xp = [f.relative_to(root).as_posix() for f in files if "get_xp(" in f.read_text()]
    return imports, uses_xp


def clock_wrong(fn):
    """Seconds from calling fn() to its return: on a GPU only the time to queue the work."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def clock_right(fn, xp):
    """Seconds for fn()'s work to finish: empty the queue, read the clock, run, wait for the queue, read again."""
    synchronize(xp)
    t = time.perf_counter()
    fn()
    synchronize(xp)
    return time.perf_counter() - t


def median_time(clock, repeats):
    """Median of `repeats` timings after one warm-up call (the first call pays for compilation and allocation)."""
    clock()
    return float(np.median([clock() for _ in range(repeats)]))


def main(quick=False, seed=0, out_dir=None, device="gpu"):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    out = {}

    # 1. What does not change: the model code never names CuPy.
    imports, uses_xp = modules_importing_cupy()
    out["cupy_importers"], out["get_xp_modules"] = imports, len(uses_xp)
    assert imports == ["backend.py"], imports
    print(f"only minivit/{imports[0]} imports CuPy; {len(uses_xp)} modules call get_xp "
          f"({', '.join(uses_xp[:4])}, ...)")

    # 2. The CPU: the same forward, timed properly.
    cfg = get_config("shapes-small")                                   # 32x32, P=4: 65 tokens, D=96, 4 blocks
    params = init_params(cfg, seed=seed)                               # on the host, from a seeded generator
    images, _ = render_shapes(64, seed)                                # (64, 64, 64, 3) uint8
    x_all = images[:, ::2, ::2].astype(np.float32) / 127.5 - 1.0      # (64, 32, 32, 3) in [-1, 1]
    assert get_xp(x_all) is np and to_numpy(x_all) is x_all and get_xp(to_device(x_all, "cpu")) is np
    assert synchronize(np) is None                                     # nothing to wait for on the CPU
    batches = [1, 32, 64] if quick else [1, 16, 32, 48, 64]
    repeats = 2 if quick else 5
    first = clock_right(lambda: vit_forward(params, x_all[:8], cfg), np)
    cpu = {B: median_time(lambda: clock_right(lambda: vit_forward(params, x_all[:B], cfg), np), repeats)
           for B in batches}
    out["cpu_first_call_b8"], out["cpu_seconds"] = first, cpu
    print(f"CPU forward, shapes-small ({cfg.image_size}x{cfg.image_size}, {cfg.seq_len} tokens, D={cfg.width}, "
          f"{cfg.depth} blocks), median of {repeats}: "
          + ", ".join(f"batch {B} {s * 1e3:.1f} ms" for B, s in cpu.items())
          + f"; first call (batch 8) {first * 1e3:.1f} ms")
    _, cache_cpu = vit_forward(params, x_all, cfg)
    feats_cpu = cache_cpu["pooled"]                                    # (64, D) the class token's output (the
                                                                       # logits are all 0: the head starts at 0)

    # 3. The GPU: the same call on arrays that live there.
    series = {"CPU (NumPy)": (batches, [cpu[B] for B in batches])}
    try:
        cp = get_backend(device)
        if cp is np:
            raise DeviceError(f"device {device!r} was asked for: the CPU part only")
    except DeviceError as e:
        out.update(gpu=False, reason=str(e))
        print(f"no GPU here: {e}\n  -> the CPU part only; run this lesson on a machine with an NVIDIA GPU and CuPy "
              f"to see the rest")
    else:
        params_gpu = to_device(params, "gpu")                          # every array of the tree, copied once
        x_gpu = to_device(x_all, "gpu")                                # (64, 32, 32, 3) in GPU memory
        assert get_xp(x_gpu) is cp and get_xp(params_gpu["pos_embed"]) is cp
        logits_gpu, cache_gpu = vit_forward(params_gpu, x_gpu, cfg)    # the same function, the same arguments
        feats_gpu = to_numpy(cache_gpu["pooled"])                      # (64, D) back on the host
        diff = float(np.abs(feats_gpu - feats_cpu).max() / np.abs(feats_cpu).max())
        assert diff < 1e-4, diff                                       # float32 rounding only
        run = {B: (lambda B=B: vit_forward(params_gpu, x_gpu[:B], cfg)) for B in batches}
        wrong = {B: median_time(lambda: clock_wrong(run[B]), repeats) for B in batches}
        right = {B: median_time(lambda: clock_right(run[B], cp), repeats) for B in batches}
        move_in = median_time(lambda: clock_right(lambda: to_device(x_all, "gpu"), cp), repeats)
        move_out = median_time(lambda: clock_right(lambda: to_numpy(logits_gpu), cp), repeats)
        out.update(gpu=True, reason="", gpu_rel_diff=diff, gpu_wrong=wrong, gpu_right=right,
                   to_device_s=move_in, to_numpy_s=move_out)
        series["GPU, timed right (synchronize)"] = (batches, [right[B] for B in batches])
        series["GPU, timed wrong (no synchronize)"] = (batches, [wrong[B] for B in batches])
        print(f"GPU vs CPU, the class token's output: max difference {diff:.1e} of its largest value")
        for B in batches:
            print(f"  batch {B:3d}: GPU timed wrong {wrong[B] * 1e3:7.2f} ms, right {right[B] * 1e3:7.2f} ms, "
                  f"CPU {cpu[B] * 1e3:7.1f} ms")
        print(f"moving the 64-image batch in: {move_in * 1e3:.2f} ms, the logits out: {move_out * 1e3:.2f} ms")

    title = "one forward pass, shapes-small" + ("" if out["gpu"] else " (no GPU here: CPU only)")
    png = save_png(line_plot(series, title=title, xlabel="batch size (images)", ylabel="seconds per forward (median)",
                             logy=True, markers=True, legend="upper left", size=(620, 420)),
                   out_dir / "14_gpu_timing.png")
    print(f"picture: {png}")
    out.update(png=str(png), seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    ap.add_argument("--out", default=None, help="folder for the PNG (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="gpu", choices=["gpu", "cpu"], help="'cpu' skips the GPU part")
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out, device=a.device)
