"""The report and the command line of `minivit bench`: the machine's header, the table, --json, the flags.

`python -m minivit.bench` runs `main` (and, with --worker first, a worker process: worker.py).
"""
import argparse
import importlib.util
import json
import os
import platform
import sys
from dataclasses import asdict

import numpy as np

from minivit.backend import import_cupy
from minivit.threads import blas_info
from minivit.bench.cases import CASES, DEFAULT_CASES
from minivit.bench.timing import run_case
from minivit.bench.worker import serve
from minivit.ranges import POSITIVE, SEED

DESCRIPTION = "`minivit bench`: time a training step against the machine's matmul limit and against PyTorch eager."


# ----------------------------------------------------------------------------------------------------------------
# Report

def machine_info(threads):
    info = {"platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "cpus": os.cpu_count(), "threads": threads, "processor": _cpu_name(),
            "env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                                "OPENBLAS_NUM_THREADS", "MALLOC_ARENA_MAX") if k in os.environ}}
    info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                    for d in blas_info()]
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
# Command line: `minivit bench` (minivit/cli.py) declares add_bench_arguments and calls run_bench

def add_bench_arguments(parser):
    """Declare the `bench` flags on an argparse parser."""
    parser.add_argument("--case", action="append", choices=sorted(CASES), default=None,
                        help=f"case to run (repeatable; default: {' '.join(DEFAULT_CASES)})")
    parser.add_argument("--steps", type=POSITIVE, default=10, help="timed steps per case (after the warm-up)")
    parser.add_argument("--warmup", type=POSITIVE, default=2, help="untimed steps first (at least 1: the last one also "
                        "tells how long a step takes)")
    parser.add_argument("--threads", type=POSITIVE, default=None,
                        help="threads for BLAS, OpenMP and minivit's elementwise pool (default: the usable cores)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--vs-torch", action="store_true",
                        help="also run the same model in PyTorch eager (needs torch) and compare")
    parser.add_argument("--profile", action="store_true", help="add a per-operation breakdown of the minivit step")
    parser.add_argument("--floor-reps", type=POSITIVE, default=3, help="rounds of the GEMM floor (median)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    parser.add_argument("--seed", type=SEED, default=0)
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
        return serve(argv[1:])
    parser = add_bench_arguments(argparse.ArgumentParser(prog="minivit bench", description=DESCRIPTION))
    return run_bench(parser.parse_args(argv))

