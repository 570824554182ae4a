"""One case in minivit, in one process: the step that is timed, and the memory it needs.

`MinivitRunner.step()` runs (and synchronizes) one training step or forward pass; the torch twin
(`torch_twin.TorchRunner`) has the same interface. Memory is the resident set size (RSS) of the process, with a
resettable high-water mark on Linux; on the GPU, device memory from CuPy's pool.
"""
import sys
import time

import numpy as np

# The step calls the package through its modules (minivit.model.vit_forward, not a name bound here), looked up at
# every call, so that the wrappers `--profile` puts on the modules' attributes (profiler.py) time these calls too.
import minivit.loss
import minivit.model
import minivit.optim
from minivit.backend import get_backend, synchronize, to_device, to_numpy
from minivit.bench.cases import LR, WEIGHT_DECAY, bench_batch, bench_params
from minivit.config import get_config
from minivit.tree import flatten


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
    import resource     # deferred: Unix only (no such module on Windows), and needed only where /proc is missing
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
# Timing

def time_ms(fn, reps=1, warmup=0, sync=None):
    """[ms of each of `reps` calls of fn()], after `warmup` untimed calls: the benchmark's clock. `sync` (e.g.
    lambda: synchronize(cupy)) runs before each clock read, so queued GPU work is inside the time it belongs to."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ms.append((time.perf_counter() - t0) * 1e3)
    return ms


# ----------------------------------------------------------------------------------------------------------------
# The minivit step

class MinivitRunner:
    """One case in minivit: `step()` runs (and synchronizes) one training step or forward pass."""
    framework = "minivit"

    def __init__(self, case, device="cpu", seed=0):
        self.case, self.cfg = case, get_config(case.config)
        self.xp = get_backend(device)
        self.params = to_device(bench_params(self.cfg, seed), device)
        images, self.labels = bench_batch(self.cfg, case.batch, seed)
        self.images = self.xp.asarray(images)
        self.state = minivit.optim.optimizer_init(self.params, "adamw") if case.train else None
        self.rng = np.random.default_rng(seed + 3)      # dropout masks (none at the configs' rate 0)
        self.gpu_base = None if self.xp is np else self.xp.get_default_memory_pool().used_bytes()

    def step(self):
        """One step on the fast twins (reference=False: MINIVIT_REFERENCE does not change what the bench times)."""
        if self.case.train:
            logits, cache = minivit.model.vit_forward(self.params, self.images, self.cfg, train=True, rng=self.rng,
                                                      reference=False)
            _, ce_cache = minivit.loss.cross_entropy_forward(logits, self.labels)
            _, grads = minivit.model.vit_backward(minivit.loss.cross_entropy_backward(1.0, ce_cache), cache)
            minivit.optim.optimizer_step(self.params, grads, self.state, LR, kind="adamw",
                                         weight_decay=WEIGHT_DECAY, reference=False)
        else:
            minivit.model.vit_forward(self.params, self.images, self.cfg, keep_cache=False,
                                      reference=False)                            # as torch.no_grad
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
        n = min(n, self.case.batch)
        x, y = self.images[:n], self.labels[:n]
        logits, cache = minivit.model.vit_forward(self.params, x, self.cfg, train=False)
        _, ce_cache = minivit.loss.cross_entropy_forward(logits, y)
        _, grads = minivit.model.vit_backward(minivit.loss.cross_entropy_backward(1.0, ce_cache), cache)
        out = {"images": to_numpy(x), "labels": y, "logits": to_numpy(logits)}
        out.update({"param." + k: to_numpy(v) for k, v in flatten(self.params).items()})
        out.update({"grad." + k: to_numpy(v) for k, v in flatten(grads).items()})
        np.savez(path, **out)
