"""One case, all frameworks: the workers take turns at the timed steps, then memory, the floor, the profile and
the comparison with PyTorch; `run_case` returns the case's result dict (its --json entry)."""
import math
import os
import statistics
import tempfile
import time

from minivit.bench.cases import matmul_flops
from minivit.bench.worker import Worker
from minivit.config import get_config

TURN_MS = 500   # a turn of the interleaved timing lasts about this long (at least one step)


def _stats(ms):
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def run_case(case, device="cpu", threads=2, steps=10, warmup=2, vs_torch=False, profile=False, floor_reps=3,
             pause=0.15, seed=0):
    """Measure one case; returns its result dict (the --json entry)."""
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
