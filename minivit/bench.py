"""`minivit bench`: time a training step against the machine's matmul limit and against PyTorch eager.

A case is a model config, a batch size and a kind of step, all float32:

    training step = forward + softmax cross-entropy + backward + AdamW update   (weight decay 0.05, lr 1e-3)
    forward only  = vit_forward in evaluation mode

    mnist-tiny     28x28x1, patch 7, width 64, depth 4, heads 4, MLP 128, 10 classes, batch 128, training
    cifar-small    32x32x3, patch 4, width 192, depth 6, heads 3, MLP 768, 10 classes, batch 128, training
    vit-s16        224x224x3, ViT-S/16, 1000 classes, batch 8, training
    vit-b16-infer  224x224x3, ViT-B/16, 1000 classes, batch 8, forward only

What is reported per case:
- ms per step: median, min and max over `--steps` steps after `--warmup` steps; images per second.
- Matmul FLOPs per step, counted analytically (`matmul_flops`; a multiply-add is 2 FLOPs), the GFLOP/s achieved,
  and that rate as a fraction of the machine's float32 matmul rate (`matmul_peak`, one large square product timed
  in the same run, with the same threads).
- The GEMM floor: the time of exactly the step's matrix products (`matmul_shapes`: the same shapes, batch
  dimensions and transpositions) into preallocated outputs, each at the best of two ways NumPy can run it (plain
  np.matmul on BLAS's threads, or backend.matmul as the layers call it: large products split over the threads,
  one BLAS thread each), and the step's
  ratio to it. A step cannot be faster than its products; everything above the floor is elementwise work,
  copies, allocation and Python.
- Memory: the resident set size (RSS) of the process. Each framework of each case runs in its own process, so
  nothing pollutes the other. `base` is the RSS once parameters, optimizer state and the batch exist, before the
  first step; `peak` is the RSS high-water mark over the steps (Linux: VmHWM, reset after setup); `step` =
  peak - base is the memory a step needs (activations kept for backward, gradients, temporaries), which is what
  the comparison with PyTorch uses: their bases differ by the size of the libraries loaded.
- `--profile`: a few more steps with every `*_forward`, `*_backward` and `optimizer_step` of the package timed,
  each op's own time (its callees excluded), in ms per step.
- `--vs-torch` (PyTorch installed; never a dependency): the same model in PyTorch eager (bench_torch.py: explicit
  attention math, GELU tanh, LayerNorm eps 1e-6, torch.optim.AdamW with the same decay mask) with the same
  weights, timed the same way in its own process, the two processes taking turns (so drift on a shared machine
  hits both; a short pause between turns lets the idle one's threads go to sleep). A turn is one step when steps
  take 0.1 s or more; shorter steps go in turns of about half a second (at least five turns each), after one
  untimed step that wakes the threads and refills the caches the other process took (else a 30 ms step measures
  its cold start);
  then the logits and every gradient compared on one batch (max relative difference), and the ratio minivit/torch.

`--device gpu`: the same steps on CuPy (and PyTorch on CUDA), synchronized before every clock read. Memory is
device memory: base = bytes in use after setup, peak = the high-water mark of a step (CuPy's memory pool, recorded
by its allocator over one more step; PyTorch: memory_allocated, max_memory_allocated), step = peak - base. The GEMM
floor and the matmul rate are measured on the GPU with CuPy's matmul (cuBLAS), products queued back to back
between two synchronizations.

The FLOP formula (`matmul_flops`). With R = B*N token rows, Np patches, P*P*C patch length and L blocks, one forward
pass costs

    F = 2 B Np (P*P*C) D                      patch embedding
      + L (2 R D 3D + 2 R D D + 2 R D M + 2 R M D)   qkv, proj, fc1, fc2   = L 2R (4D^2 + 2DM)
      + L (2 B nh N N hs + 2 B nh N N hs)            q k^T and A v          = L 4 B N^2 D
      + 2 B D K                                      head (2 B D rep + 2 B rep K with a pre-logits layer)

and a training step 3F: the backward pass does two products of the forward one's size for each forward product
(dx = dy w^T and dw = x^T dy; for attention dq, dk and dA, dv), the input gradient of the patch embedding
included (vit_backward returns dimages).

Stable numbers: run on an idle machine with `--threads` equal to the physical cores; the benchmark sets
OMP/OpenBLAS/MKL thread counts and OMP_WAIT_POLICY=PASSIVE in each worker process and keeps freed memory in the
process (backend.tune_allocator, glibc). OPENBLAS_CORETYPE forces an older BLAS kernel and slows everything:
the header names the kernel in use (with threadpoolctl installed). Repeat the run: medians of separate runs
differ by a few percent on a shared machine.
"""
import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np


# ----------------------------------------------------------------------------------------------------------------
# Cases, FLOPs and the matrix products of a step

@dataclass(frozen=True)
class Case:
    name: str
    config: str          # a name in minivit.config.CONFIGS
    batch: int
    train: bool          # True: training step; False: forward only


CASES = {c.name: c for c in [
    Case("mnist-tiny", "mnist-tiny", 128, True),
    Case("cifar-small", "cifar-small", 128, True),
    Case("vit-s16", "vit-s16", 8, True),
    Case("vit-b16-infer", "vit-b16", 8, False),
    Case("tiny", "test", 4, True),            # for the tests: runs in milliseconds (not in the default list)
]}
DEFAULT_CASES = ("mnist-tiny", "cifar-small", "vit-s16", "vit-b16-infer")

LR, WEIGHT_DECAY = 1e-3, 0.05    # the AdamW update of a training step (both frameworks)


def matmul_shapes(cfg, batch, train=True):
    """Every matrix product of one step: a list of (name, batch_dims, m, k, n, trans_a, trans_b).

    Each entry is C (batch_dims..., m, n) = op(A) @ op(B) with op(A) (m, k) and op(B) (k, n); trans_a says A is
    stored (k, m) and read transposed (a transposed view, as BLAS sees it). Forward products in the order of
    vit_forward; in training, then for each forward product C = A B its two backward products
    dA = dC B^T and dB = A^T dC (for q k^T: dq = ds k and dk = ds^T q). Attention copies k^T and v^T to
    contiguous memory before its products with them (attention.py), so q k^T and do v^T are listed untransposed.
    """
    B, N, Np, D, M, K = batch, cfg.seq_len, cfg.num_patches, cfg.width, cfg.mlp_dim, cfg.num_classes
    nh, hs, P, C, rep = cfg.heads, cfg.head_dim, cfg.patch_size, cfg.channels, cfg.representation_size
    R = B * N
    fwd = [("patch_embed", (), B * Np, P * P * C, D, False, False)]
    for i in range(cfg.depth):
        fwd += [(f"blocks.{i}.qkv", (), R, D, 3 * D, False, False),
                (f"blocks.{i}.scores", (B, nh), N, hs, N, False, False),     # q k^T (k^T copied contiguous)
                (f"blocks.{i}.att_v", (B, nh), N, N, hs, False, False),      # A v
                (f"blocks.{i}.proj", (), R, D, D, False, False),
                (f"blocks.{i}.fc1", (), R, D, M, False, False),
                (f"blocks.{i}.fc2", (), R, M, D, False, False)]
    if rep:
        fwd.append(("pre_logits", (), B, D, rep, False, False))
    fwd.append(("head", (), B, rep or D, K, False, False))
    if not train:
        return fwd
    bwd = []
    for name, bd, m, k, n, ta, tb in reversed(fwd):
        if name.endswith(".scores"):   # s = q k^T: dq = ds k (m, n)@(n, k); dk = ds^T q (n, m)@(m, k)
            bwd += [(name + ".dA", bd, m, n, k, False, False), (name + ".dB", bd, n, m, k, True, False)]
        elif name.endswith(".att_v"):  # o = A v: dA = do v^T (v^T copied contiguous, as k^T); dv = A^T do
            bwd += [(name + ".dA", bd, m, n, k, False, False), (name + ".dB", bd, k, m, n, True, False)]
        else:    # C = A B: dA = dC B^T (m, n)@(n, k); dB = A^T dC (k, m)@(m, n)
            bwd += [(name + ".dA", bd, m, n, k, False, True), (name + ".dB", bd, k, m, n, True, False)]
    return fwd + bwd


def matmul_flops(cfg, batch, train=True):
    """Matmul FLOPs of one step (2 per multiply-add), by the formula in the module docstring:

        F = 2 B [Np P^2 C D + L (N (4 D^2 + 2 D M) + 2 N^2 D) + D K]     (+ 2 B rep (D + K) - 2 B D K with pre-logits)
        training step: 3 F;  forward only: F
    """
    B, N, Np, D, M, K, L = batch, cfg.seq_len, cfg.num_patches, cfg.width, cfg.mlp_dim, cfg.num_classes, cfg.depth
    P, C, rep = cfg.patch_size, cfg.channels, cfg.representation_size
    head = rep * (D + K) if rep else D * K
    F = 2 * B * (Np * P * P * C * D + L * (N * (4 * D * D + 2 * D * M) + 2 * N * N * D) + head)
    return 3 * F if train else F


def _shapes_flops(shapes):
    """FLOPs of a list from `matmul_shapes` (the cross-check of the formula)."""
    return sum(2 * math.prod(bd) * m * k * n for _, bd, m, k, n, _, _ in shapes)


def _operand(rng, bd, rows, cols, trans, xp=np):
    """A float32 operand of module xp that reads as (bd..., rows, cols): stored (cols, rows) and transposed when
    `trans`."""
    if trans:
        return xp.asarray(rng.standard_normal(bd + (cols, rows), dtype=np.float32)).swapaxes(-1, -2)
    return xp.asarray(rng.standard_normal(bd + (rows, cols), dtype=np.float32))


def gemm_floor(shapes, reps=3, seed=0, xp=np):
    """Milliseconds for the products of `shapes` (float32, into preallocated outputs): a lower bound.

    NumPy: each distinct product is timed `reps` times in two ways, plain `np.matmul` (BLAS's own threads) and
    `backend.matmul` (as the layers call it: large products split over the threads), and costs the best time.
    CuPy (xp=cupy): `cupy.matmul` on the GPU, max(reps, 10) launches back to back between two synchronizations
    (launch overhead overlapping the work, as in a step), the better of two such rounds per launch; cupy.matmul
    copies transposed operands of batched products to contiguous memory first, and that copy, which the step
    pays too, is in the time. The floor is the sum over the step's list. Operands are random float32 in the
    stated layouts.
    """
    from minivit.backend import synchronize
    from minivit.fast.rows import matmul
    rng = np.random.default_rng(seed)
    counts = {}
    for _, bd, m, k, n, ta, tb in shapes:
        key = (bd, m, k, n, ta, tb)
        counts[key] = counts.get(key, 0) + 1
    total = 0.0
    for (bd, m, k, n, ta, tb), count in counts.items():
        a, b = _operand(rng, bd, m, k, ta, xp), _operand(rng, bd, k, n, tb, xp)
        c = xp.empty(bd + (m, n), np.float32)
        best = float("inf")
        if xp is np:
            for _ in range(reps + 1):                     # the first round warms up (threads, pages)
                for run in (lambda: np.matmul(a, b, out=c), lambda: matmul(a, b, out=c)):
                    t0 = time.perf_counter()
                    run()                                 # C = op(A) @ op(B), nothing else
                    best = min(best, time.perf_counter() - t0)
        else:
            n = max(reps, 10)
            xp.matmul(a, b, out=c)                        # warm-up: kernel choice, workspace
            for _ in range(2):
                synchronize(xp)
                t0 = time.perf_counter()
                for _ in range(n):
                    xp.matmul(a, b, out=c)                # queued back to back, as a step queues them
                synchronize(xp)
                best = min(best, (time.perf_counter() - t0) / n)
        total += count * best
    return total * 1e3


def matmul_peak(n=None, reps=5, xp=np):
    """The float32 matmul rate of this machine (xp=cupy: of the GPU) in GFLOP/s: the best of `reps` (n, n) @ (n, n)
    products, n = 2048 on the CPU and 8192 on the GPU (large enough to fill it)."""
    from minivit.backend import synchronize
    n = n or (2048 if xp is np else 8192)
    rng = np.random.default_rng(0)
    a, b = (xp.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    c = xp.empty((n, n), np.float32)
    xp.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        synchronize(xp)
        t0 = time.perf_counter()
        xp.matmul(a, b, out=c)
        synchronize(xp)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# ----------------------------------------------------------------------------------------------------------------
# Memory: resident set size, with a resettable high-water mark on Linux

def _status_kb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb():
    """Current RSS in MB (Linux; else the high-water mark from getrusage)."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else peak_rss_mb()


def peak_rss_mb():
    """RSS high-water mark in MB since the last `reset_peak_rss` (or process start)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024   # bytes on macOS, KB elsewhere


def reset_peak_rss():
    """Reset the high-water mark to the current RSS (Linux >= 4.0); returns False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Weights, data and the minivit step

def bench_params(cfg, seed=0):
    """Float32 host parameters for a case: `init_params` with the zero head replaced by normal(0.02) entries.

    A zero head would make the logits constant and every gradient below the head zero: the comparison with
    PyTorch would then agree trivially.
    """
    from minivit.model import init_params
    params = init_params(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    params["head"]["w"] = (rng.standard_normal(params["head"]["w"].shape) * 0.02).astype(np.float32)
    return params


def bench_batch(cfg, batch, seed=0):
    """(images (B, H, W, C) float32 in [-1, 1], labels (B,) int64): the fixed batch every step uses."""
    rng = np.random.default_rng(seed + 2)
    H, W = cfg.image_hw
    images = (rng.random((batch, H, W, cfg.channels), dtype=np.float32) * 2 - 1).astype(np.float32)
    return images, rng.integers(0, cfg.num_classes, size=batch)


class MinivitRunner:
    """One case in minivit: `step()` runs (and synchronizes) one training step or forward pass."""
    framework = "minivit"

    def __init__(self, case, device="cpu", seed=0):
        from minivit.backend import get_backend, to_device
        from minivit.config import get_config
        from minivit.optim import optimizer_init
        self.case, self.cfg = case, get_config(case.config)
        self.xp = get_backend(device)
        self.params = to_device(bench_params(self.cfg, seed), device)
        images, self.labels = bench_batch(self.cfg, case.batch, seed)
        self.images = self.xp.asarray(images)
        self.state = optimizer_init(self.params, "adamw") if case.train else None
        self.rng = np.random.default_rng(seed + 3)      # dropout masks (none at the configs' rate 0)
        self.gpu_base = None if self.xp is np else self.xp.get_default_memory_pool().used_bytes()

    def step(self):
        from minivit.backend import synchronize
        from minivit.loss import cross_entropy_backward, cross_entropy_forward
        from minivit.model import vit_backward, vit_forward
        from minivit.optim import optimizer_step
        if self.case.train:
            logits, cache = vit_forward(self.params, self.images, self.cfg, train=True, rng=self.rng)
            loss, ce_cache = cross_entropy_forward(logits, self.labels)
            _, grads = vit_backward(cross_entropy_backward(1.0, ce_cache), cache)
            optimizer_step(self.params, grads, self.state, LR, kind="adamw", weight_decay=WEIGHT_DECAY)
        else:
            vit_forward(self.params, self.images, self.cfg, keep_cache=False)   # inference: as torch.no_grad
        synchronize(self.xp)

    def device_memory(self):
        """GPU only: device memory in use before a step (parameters, optimizer state, batch) and at the step's peak,
        from CuPy's memory pool. The peak comes from one more step with an allocator that records the pool's
        high-water mark after each allocation (the timed steps ran without it). Not counted: what CuPy and cuBLAS
        allocate outside the pool (cuBLAS's workspace); PyTorch may count its workspace in max_memory_allocated."""
        if self.xp is np:
            return {}
        pool = self.xp.get_default_memory_pool()
        peak = pool.used_bytes()

        def malloc(size):                                # the pool's allocator, noting the bytes in use
            nonlocal peak
            memory = pool.malloc(size)
            peak = max(peak, pool.used_bytes())
            return memory
        with self.xp.cuda.using_allocator(malloc):
            self.step()
        return {"gpu_base_mb": self.gpu_base / 2 ** 20, "gpu_peak_mb": peak / 2 ** 20}

    def dump(self, path, n=4):
        """Save the current parameters, a batch of n, its logits and every gradient of its loss (for --vs-torch)."""
        from minivit.backend import to_numpy
        from minivit.loss import cross_entropy_backward, cross_entropy_forward
        from minivit.model import vit_backward, vit_forward
        from minivit.tree import flatten
        n = min(n, self.case.batch)
        x, y = self.images[:n], self.labels[:n]
        logits, cache = vit_forward(self.params, x, self.cfg, train=False)
        _, ce_cache = cross_entropy_forward(logits, y)
        _, grads = vit_backward(cross_entropy_backward(1.0, ce_cache), cache)
        out = {"images": to_numpy(x), "labels": y, "logits": to_numpy(logits)}
        out.update({"param." + k: to_numpy(v) for k, v in flatten(self.params).items()})
        out.update({"grad." + k: to_numpy(v) for k, v in flatten(grads).items()})
        np.savez(path, **out)


# ----------------------------------------------------------------------------------------------------------------
# Per-operation profile (--profile): wrap the package's *_forward / *_backward functions and optimizer_step

class Profiler:
    """Exclusive time per operation: each wrapped call's time minus the time of wrapped calls inside it."""

    MODULES = ("minivit.layers", "minivit.attention", "minivit.reference", "minivit.fast", "minivit.fast.layers",
               "minivit.fast.attention", "minivit.model", "minivit.loss", "minivit.optim")

    def __init__(self, sync=None):
        self.sync = sync or (lambda: None)
        self.totals, self.calls, self._stack, self._saved = {}, {}, [], []

    @staticmethod
    def op_name(fn_name):
        for suffix, kind in (("_forward", "forward"), ("_backward", "backward")):
            if fn_name.endswith(suffix):
                return f"{fn_name[:-len(suffix)]} {kind}"
        return fn_name

    def _wrap(self, fn):
        name = self.op_name(fn.__name__)

        def timed(*args, **kwargs):
            self.sync()
            self._stack.append(0.0)                 # time spent in wrapped callees
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                inner = self._stack.pop()
                if self._stack:
                    self._stack[-1] += dt
                self.totals[name] = self.totals.get(name, 0.0) + dt - inner
                self.calls[name] = self.calls.get(name, 0) + 1
        timed.__wrapped__ = fn
        return timed

    def __enter__(self):
        import importlib
        wrappers = {}
        for modname in self.MODULES:
            mod = importlib.import_module(modname)
            for attr, fn in list(vars(mod).items()):
                if not callable(fn) or not getattr(fn, "__module__", "").startswith("minivit"):
                    continue
                if attr.endswith(("_forward", "_backward")) or attr == "optimizer_step":
                    if fn not in wrappers:
                        wrappers[fn] = self._wrap(fn)
                    self._saved.append((mod, attr, fn))
                    setattr(mod, attr, wrappers[fn])
        return self

    def __exit__(self, *exc):
        for mod, attr, fn in reversed(self._saved):
            setattr(mod, attr, fn)
        self._saved.clear()

    def table(self, steps):
        """{op: {"ms": ms per step, "calls": calls per step}}, largest first."""
        order = sorted(self.totals, key=self.totals.get, reverse=True)
        return {k: {"ms": self.totals[k] * 1e3 / steps, "calls": self.calls[k] // steps} for k in order}


# ----------------------------------------------------------------------------------------------------------------
# Worker processes: one per framework and case, driven over a pipe

def _worker(argv):
    """`python -m minivit.bench --worker FRAMEWORK CASE DEVICE SEED`: answer commands from stdin, one JSON line each."""
    framework, case_name, device, seed = argv[0], argv[1], argv[2], int(argv[3])
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr                             # nothing else may write to the answer pipe
    from minivit.backend import tune_allocator
    allocator = tune_allocator() if os.environ.get("MINIVIT_BENCH_ALLOCATOR") != "default" else False
    case = CASES[case_name]
    if framework == "torch":
        from minivit.bench_torch import TorchRunner
        runner = TorchRunner(case, device, seed)
    else:
        runner = MinivitRunner(case, device, seed)
    base = rss_mb()
    reset_peak_rss()
    out.write(json.dumps({"ready": True, "allocator_tuned": allocator, "rss_base_mb": base}) + "\n")
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "step":
            t0 = time.perf_counter()
            runner.step()
            reply = {"ms": (time.perf_counter() - t0) * 1e3}
        elif cmd == "steps":
            reply = {"ms": []}
            for _ in range(int(rest[0])):
                t0 = time.perf_counter()
                runner.step()
                reply["ms"].append((time.perf_counter() - t0) * 1e3)
        elif cmd == "mem":
            reply = {"rss_base_mb": base, "rss_peak_mb": max(peak_rss_mb(), base)}
            reply.update(runner.device_memory() if hasattr(runner, "device_memory") else {})
        elif cmd == "floor":
            cfg = runner.cfg
            shapes = matmul_shapes(cfg, case.batch, case.train)
            reply = {"gemm_floor_ms": gemm_floor(shapes, reps=int(rest[0]), xp=runner.xp),
                     "matmul_peak_gflops": matmul_peak(xp=runner.xp)}
        elif cmd == "profile":
            from minivit.backend import synchronize
            steps = int(rest[0])
            with Profiler(sync=lambda: synchronize(runner.xp)) as prof:
                for _ in range(steps):
                    runner.step()
            reply = {"profile": prof.table(steps)}
        elif cmd == "dump":
            runner.dump(rest[0])
            reply = {"done": True}
        elif cmd == "check":
            reply = runner.check(rest[0])
        elif cmd == "quit":
            break
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        out.write(json.dumps(reply) + "\n")
    return 0


def worker_env(threads):
    """The environment of a worker process: thread counts, passive OpenMP waiting, and the package importable."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINIVIT_NUM_THREADS"):
        env[var] = str(threads)
    env["OMP_WAIT_POLICY"] = "PASSIVE"                 # idle OpenMP threads sleep instead of spinning
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    return env


class Worker:
    """A worker process for one framework and case; `ask(cmd)` sends one command and returns the JSON answer."""

    def __init__(self, framework, case, device, threads, seed=0):
        self.framework = framework
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minivit.bench", "--worker", framework, case.name, device, str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_env(threads))
        self.ready = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the {self.framework} benchmark worker exited with status {code} (see its messages "
                               "above)")
        return json.loads(line)

    def ask(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ----------------------------------------------------------------------------------------------------------------
# One case, all frameworks

TURN_MS = 500   # a turn of the interleaved timing lasts about this long (at least one step)


def _stats(ms):
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def run_case(case, device="cpu", threads=2, steps=10, warmup=2, vs_torch=False, profile=False, floor_reps=3,
             pause=0.15, seed=0):
    """Measure one case; returns its result dict (the --json entry)."""
    from minivit.config import get_config
    cfg = get_config(case.config)
    flops = matmul_flops(cfg, case.batch, case.train)
    workers = [Worker("minivit", case, device, threads, seed)]
    try:
        if vs_torch:
            workers.append(Worker("torch", case, device, threads, seed))
        times = {w.framework: [] for w in workers}
        warm_ms = min(w.ask(f"steps {max(1, warmup)}")["ms"][-1] for w in workers)   # warm-up, and a step's time
        short = warm_ms < TURN_MS / 5                     # short steps: turns of ~TURN_MS, at least 5 turns each
        per_turn = max(1, min(steps // 5, math.ceil(TURN_MS / warm_ms))) if short else 1
        turn = 0
        while min(len(t) for t in times.values()) < steps:   # interleaved: the workers take turns
            for w in (workers if turn % 2 == 0 else workers[::-1]):
                n = min(per_turn, steps - len(times[w.framework]))
                if len(workers) > 1:
                    time.sleep(pause)                     # let the other process's idle threads go to sleep
                if short:                                 # one untimed step after the switch, then the turn
                    times[w.framework] += w.ask(f"steps {n + 1}")["ms"][1:]
                else:
                    times[w.framework] += w.ask(f"steps {n}")["ms"]
            turn += 1
        result = {"case": case.name, "config": case.config, "batch": case.batch,
                  "step": "training" if case.train else "forward", "device": device, "threads": threads,
                  "matmul_gflop": flops / 1e9, "steps_per_turn": per_turn}
        for w in workers:
            mem = w.ask("mem")
            st = _stats(times[w.framework])
            r = {"ms": st, "steps_ms": times[w.framework], "images_per_s": case.batch / st["median"] * 1e3,
                 "gflops": flops / st["median"] / 1e6, "allocator_tuned": w.ready.get("allocator_tuned"),
                 "rss_base_mb": mem["rss_base_mb"], "rss_peak_mb": mem["rss_peak_mb"],
                 "step_mem_mb": mem["rss_peak_mb"] - mem["rss_base_mb"]}
            r.update({k: v for k, v in mem.items() if k.startswith("gpu_")})
            if "gpu_peak_mb" in r:                        # on the GPU, a step's memory is device memory
                r["step_mem_mb"] = r["gpu_peak_mb"] - r["gpu_base_mb"]
            result[w.framework] = r
        m = result["minivit"]
        floor = workers[0].ask(f"floor {floor_reps}")
        m["gemm_floor_ms"] = floor["gemm_floor_ms"]
        result["matmul_peak_gflops"] = floor["matmul_peak_gflops"]
        if floor["gemm_floor_ms"]:
            m["floor_ratio"] = m["ms"]["median"] / floor["gemm_floor_ms"]
        for w in workers:
            if floor["matmul_peak_gflops"]:
                result[w.framework]["peak_fraction"] = result[w.framework]["gflops"] / floor["matmul_peak_gflops"]
        if profile:
            m["profile"] = workers[0].ask(f"profile {max(2, min(steps, 5))}")["profile"]
        if vs_torch:
            t = result["torch"]
            result["ratio_vs_torch"] = m["ms"]["median"] / t["ms"]["median"]
            result["mem_ratio_vs_torch"] = m["step_mem_mb"] / t["step_mem_mb"] if t["step_mem_mb"] > 0 else None
            if floor["gemm_floor_ms"]:
                t["floor_ratio"] = t["ms"]["median"] / floor["gemm_floor_ms"]
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "minivit.npz")
                workers[0].ask(f"dump {path}")
                result["check"] = workers[1].ask(f"check {path}")
        return result
    finally:
        for w in workers:
            w.close()


# ----------------------------------------------------------------------------------------------------------------
# Report

def machine_info(threads):
    info = {"platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "cpus": os.cpu_count(), "threads": threads, "processor": _cpu_name(),
            "env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                                "OPENBLAS_NUM_THREADS", "MALLOC_ARENA_MAX") if k in os.environ}}
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                        for d in threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:
        info["blas"] = "unknown (pip install threadpoolctl to see the BLAS kernel)"
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def format_table(results):
    """The human-readable table: one row per case and framework, then the ratios."""
    head = (f"{'case':<14} {'framework':<8} {'median':>8} {'min':>8} {'max':>8} {'img/s':>7} {'GFLOP/s':>8} "
            f"{'peak':>5} {'floor':>8} {'x floor':>7} {'base MB':>8} {'peak MB':>8} {'step MB':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        for fw in ("minivit", "torch"):
            if fw not in r:
                continue
            m = r[fw]
            base, peak = (m["gpu_base_mb"], m["gpu_peak_mb"]) if "gpu_peak_mb" in m else (m["rss_base_mb"],
                                                                                         m["rss_peak_mb"])
            floor = r["minivit"].get("gemm_floor_ms")
            frac = m.get("peak_fraction")
            lines.append(
                f"{r['case'] if fw == 'minivit' else '':<14} {fw:<8} {m['ms']['median']:>8.1f} {m['ms']['min']:>8.1f} "
                f"{m['ms']['max']:>8.1f} {m['images_per_s']:>7.1f} {m['gflops']:>8.1f} "
                f"{_fmt(frac, '.0%'):>5} {_fmt(floor if fw == 'minivit' else None, '.1f', ''):>8} "
                f"{_fmt(m.get('floor_ratio'), '.2f'):>7} {base:>8.0f} {peak:>8.0f} {m['step_mem_mb']:>8.0f}")
        if "ratio_vs_torch" in r:
            c = r.get("check", {})
            mr = r.get("mem_ratio_vs_torch")
            lines.append(f"{'':<14} minivit/torch: time {r['ratio_vs_torch']:.2f}x, step memory "
                         f"{_fmt(mr, '.2f')}x; check: logits max rel diff "
                         f"{c.get('logits_max_rel', float('nan')):.1e}, gradients "
                         f"{c.get('grads_max_rel', float('nan')):.1e} ({c.get('grads_worst', '?')})"
                         f"{'' if c.get('ok', True) else '  DISAGREE'}")
    lines.append("ms per step (median, min, max); floor: the GEMM floor in ms; peak: fraction of the machine's "
                 "matmul rate; step MB = peak RSS - base RSS (--device gpu: of device memory, not RSS)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line (the lead wires `minivit bench` to add_bench_arguments and run_bench)

def add_bench_arguments(parser):
    """Declare the `bench` flags on an argparse parser."""
    parser.add_argument("--case", action="append", choices=sorted(CASES), default=None,
                        help=f"case to run (repeatable; default: {' '.join(DEFAULT_CASES)})")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1: the last one also "
                        "tells how long a step takes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for BLAS, OpenMP and minivit's elementwise pool (default: the usable cores)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--vs-torch", action="store_true",
                        help="also run the same model in PyTorch eager (needs torch) and compare")
    parser.add_argument("--profile", action="store_true", help="add a per-operation breakdown of the minivit step")
    parser.add_argument("--floor-reps", type=int, default=3, help="rounds of the GEMM floor (median)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_bench(args):
    """Run the cases of `args` (from add_bench_arguments), print the table, write --json; exit status 0, or 1 when
    minivit and PyTorch disagree."""
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    threads = args.threads or default_threads()
    if args.vs_torch and importlib.util.find_spec("torch") is None:   # fail early; torch loads in the workers only
        raise RuntimeError("--vs-torch needs PyTorch: pip install torch (it is never a dependency of minivit)")
    if args.device == "gpu":
        from minivit.backend import import_cupy
        import_cupy()
    info = machine_info(threads)
    print(f"minivit bench on {info['processor']} ({info['cpus']} cpus), {threads} threads, numpy {info['numpy']}, "
          f"BLAS {info['blas']}, device {args.device}")
    if "OPENBLAS_CORETYPE" in info["env"]:
        print(f"note: OPENBLAS_CORETYPE={info['env']['OPENBLAS_CORETYPE']} is set: OpenBLAS runs that kernel, not "
              "the best one for this CPU (unset it, and OPENBLAS_L2_SIZE, for this command to measure the machine)")
    results = []
    for name in args.case or DEFAULT_CASES:
        print(f"  {name} ...", flush=True)
        results.append(run_case(CASES[name], args.device, threads, args.steps, args.warmup, args.vs_torch,
                                args.profile, args.floor_reps, seed=args.seed))
    peaks = [r["matmul_peak_gflops"] for r in results if r.get("matmul_peak_gflops")]
    if peaks:
        where = "the GPU" if args.device == "gpu" else f"this machine ({threads} threads)"
        print(f"float32 matmul rate of {where}: {max(peaks):.0f} GFLOP/s")
    print(format_table(results))
    if args.profile:
        for r in results:
            print(f"\nprofile of {r['case']} (ms per step, each op's own time):")
            for op, v in r["minivit"]["profile"].items():
                print(f"  {op:<28} {v['ms']:>9.2f}  ({v['calls']} calls)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "cases": [asdict(CASES[r["case"]]) | r for r in results]}, f, indent=1)
    disagree = [r["case"] for r in results if not r.get("check", {}).get("ok", True)]
    if disagree:
        print(f"minivit and PyTorch disagree on {disagree}", file=sys.stderr)
    return 1 if disagree else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    parser = add_bench_arguments(argparse.ArgumentParser(prog="minivit bench", description=__doc__.split("\n")[0]))
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
