"""Worker processes: one per framework and case, driven over a pipe, one command and one JSON answer a line.

Each framework of each case runs in its own process, so nothing pollutes the other (memory, threads, caches):

    python -m minivit.bench --worker FRAMEWORK CASE DEVICE SEED

answers `steps N` (ms of each), `step`, `mem` (RSS base and peak; device memory on the GPU), `floor REPS` (the
GEMM floor and the matmul rate), `profile STEPS`, `dump PATH` (weights, a batch, logits and gradients),
`check PATH` (the torch worker: recompute a dump and compare) and `quit`. `Worker` is the parent's side.
"""
import json
import os
import subprocess
import sys

from minivit.backend import synchronize, tune_allocator
from minivit.bench.cases import CASES, matmul_shapes
from minivit.bench.floor import gemm_floor, matmul_peak
from minivit.bench.profiler import Profiler
from minivit.bench.runner import MinivitRunner, peak_rss_mb, reset_peak_rss, rss_mb, time_ms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # holds minivit/


def serve(argv):
    """The worker process: `argv` = FRAMEWORK CASE DEVICE SEED; answer commands from stdin, one JSON line each."""
    framework, case_name, device, seed = argv[0], argv[1], argv[2], int(argv[3])
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr                             # nothing else may write to the answer pipe
    allocator = tune_allocator() if os.environ.get("MINIVIT_BENCH_ALLOCATOR") != "default" else False
    case = CASES[case_name]
    if framework == "torch":
        # Deferred: PyTorch is optional (never a dependency of minivit) and torch_twin imports it at its top, so
        # only a worker asked for torch loads it (and the minivit worker's memory holds no torch libraries).
        from minivit.bench.torch_twin import TorchRunner
        runner = TorchRunner(case, device, seed)
    else:
        runner = MinivitRunner(case, device, seed)
    base = rss_mb()
    reset_peak_rss()
    out.write(json.dumps({"ready": True, "allocator_tuned": allocator, "rss_base_mb": base}) + "\n")
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "step":
            reply = {"ms": time_ms(runner.step)[0]}                 # (runner.step synchronizes a GPU itself)
        elif cmd == "steps":
            reply = {"ms": time_ms(runner.step, int(rest[0]))}
        elif cmd == "mem":
            reply = {"rss_base_mb": base, "rss_peak_mb": max(peak_rss_mb(), base)}
            reply.update(runner.device_memory() if hasattr(runner, "device_memory") else {})
        elif cmd == "floor":
            cfg = runner.cfg
            shapes = matmul_shapes(cfg, case.batch, case.train)
            reply = {"gemm_floor_ms": gemm_floor(shapes, reps=int(rest[0]), xp=runner.xp),
                     "matmul_peak_gflops": matmul_peak(xp=runner.xp)}
        elif cmd == "profile":
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
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else ROOT
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
