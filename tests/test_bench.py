"""The benchmark: its FLOP formula against the products a step really runs, and a short run of a tiny case."""
import argparse
import importlib.util
import json
import sys
import time
import types

import numpy as np
import pytest

import minivit.fast.attention
import minivit.fast.layers
from minivit.bench import loading, main
from minivit.bench.cases import CASES, matmul_flops, matmul_shapes, shapes_flops
from minivit.bench.floor import gemm_floor, matmul_peak
from minivit.bench.profiler import Profiler
from minivit.bench.report import add_bench_arguments, format_table, run_bench
from minivit.bench.runner import MinivitRunner, peak_rss_mb, reset_peak_rss, rss_mb
from minivit.bench.timing import run_case
from minivit.config import get_config
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.model import init_params, vit_backward, vit_forward

from conftest import install_standin


CONFIGS = [("test", {}), ("test", {"pooling": "gap"}), ("test", {"representation_size": 7}),
           ("test", {"gelu": "exact"}), ("mnist-tiny", {})]


def record_products(monkeypatch, cfg, batch, train):
    """Run a real step with the package's matmul wrapped; return its products as matmul_shapes' tuples (no names)."""
    seen = []
    real = minivit.fast.layers.matmul

    def recording(a, b, out=None):
        bd = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
        seen.append((bd, a.shape[-2], a.shape[-1], b.shape[-1],
                     a.strides[-1] != a.itemsize, b.strides[-1] != b.itemsize))   # transposed views
        return real(a, b, out=out)
    monkeypatch.setattr(minivit.fast.layers, "matmul", recording)
    monkeypatch.setattr(minivit.fast.attention, "matmul", recording)
    params = init_params(cfg, seed=0)
    x = np.random.default_rng(0).standard_normal((batch,) + cfg.image_hw + (cfg.channels,)).astype(np.float32)
    logits, cache = vit_forward(params, x, cfg, train=train)
    if train:
        _, ce = cross_entropy_forward(logits, np.zeros(batch, dtype=np.int64))
        vit_backward(cross_entropy_backward(1.0, ce), cache)
    return seen


@pytest.mark.parametrize("name,overrides", CONFIGS)
@pytest.mark.parametrize("train", [True, False])
def test_flop_formula_matches_the_products_a_step_runs(monkeypatch, name, overrides, train):
    cfg = get_config(name, **overrides)
    batch = 3
    shapes = matmul_shapes(cfg, batch, train)
    assert shapes_flops(shapes) == matmul_flops(cfg, batch, train)           # the formula = the list
    real = record_products(monkeypatch, cfg, batch, train)
    listed = [s[1:] for s in shapes]
    assert sorted(real) == sorted(listed)                                    # the list = what really runs
    assert matmul_flops(cfg, batch, True) == 3 * matmul_flops(cfg, batch, False)


def test_flop_formula_by_hand_for_vit_b16():
    # forward: 2 B [196*768*768 + 12 (197 (4*768^2 + 2*768*3072) + 2*197^2*768) + 768*1000]
    F = 2 * 8 * (196 * 768 * 768 + 12 * (197 * (4 * 768 ** 2 + 2 * 768 * 3072) + 2 * 197 ** 2 * 768) + 768 * 1000)
    assert matmul_flops(get_config("vit-b16"), 8, train=False) == F
    assert abs(F / 1e9 - 281.02) < 0.01                                     # about 35 GFLOP per image


def test_gemm_floor_times_the_list():
    shapes = matmul_shapes(get_config("test"), 2, True)
    ms = gemm_floor(shapes, reps=1)
    assert 0 < ms < 1000


def test_gpu_bench_lines_run_with_numpy_standing_in_for_cupy(monkeypatch):
    """--device gpu's own lines (floor and matmul rate on the device, synchronized; device memory through the
    pool's allocator; the GPU memory columns) run, with NumPy standing in for CuPy (no GPU here)."""
    fake = install_standin(monkeypatch)
    assert 0 < gemm_floor(matmul_shapes(get_config("test"), 2, True), reps=1, xp=fake) < 1000
    assert fake.syncs > 0
    assert matmul_peak(n=64, reps=1, xp=fake) > 0
    runner = MinivitRunner(CASES["mnist-tiny"], device="gpu")
    assert runner.xp is fake and isinstance(runner.params["pos_embed"], fake.ndarray)
    runner.step()
    assert "adam" in fake.calls                                   # the step ran the GPU kernels
    step = runner.step

    def step_that_allocates():                                    # the fake pool sees only what goes through
        step()                                                    # the allocator: 1 MiB of it during the step
        fake.allocator(2 ** 20)
    runner.step = step_that_allocates
    mem = runner.device_memory()
    assert mem["gpu_peak_mb"] - mem["gpu_base_mb"] == 1.0
    assert fake.allocator == fake.pool.malloc                     # the pool's own allocator is back
    row = {"ms": {"median": 10.0, "min": 9.0, "max": 11.0}, "images_per_s": 1.0, "gflops": 1.0,
           "rss_base_mb": 1.0, "rss_peak_mb": 2.0, "step_mem_mb": 300.0, "gpu_base_mb": 1234.0,
           "gpu_peak_mb": 1534.0}
    table = format_table([{"case": "mnist-tiny", "minivit": row}])
    assert "1234" in table and "1534" in table and "device memory" in table


def test_profiler_times_ops_and_restores_the_functions():
    cfg = get_config("test")
    params = init_params(cfg)
    x = np.zeros((2, 8, 8, 3), np.float32)
    before = minivit.layers.layernorm_forward
    with Profiler() as prof:
        t0 = time.perf_counter()
        vit_forward(params, x, cfg)
        wall_ms = (time.perf_counter() - t0) * 1e3
    assert minivit.layers.layernorm_forward is before
    table = prof.table(1)
    assert table["layernorm forward"]["calls"] == 2 * cfg.depth + 1
    assert "attention forward" in table and "linear forward" in table
    # exclusive times do not count a callee twice: together they fit in the wall time of the forward pass
    assert sum(v["ms"] for v in table.values()) <= wall_ms


def test_profiler_subtracts_the_time_of_wrapped_callees(monkeypatch):
    """outer_forward sleeps 20 ms itself and calls inner_forward, which sleeps 60 ms: outer's own time is about
    20 ms (60 ms more if the callee were not subtracted), inner's at least 60 ms."""
    fake = types.ModuleType("minivit.fake_ops")

    def inner_forward():
        time.sleep(0.06)

    def outer_forward():
        time.sleep(0.02)
        fake.inner_forward()                     # through the module attribute, as the package's calls go

    for fn in (inner_forward, outer_forward):
        fn.__module__ = fake.__name__
        setattr(fake, fn.__name__, fn)
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(Profiler, "MODULES", (fake.__name__,))
    with Profiler() as prof:
        fake.outer_forward()
    assert fake.outer_forward is outer_forward and fake.inner_forward is inner_forward   # restored
    table = prof.table(1)
    assert 20 <= table["outer forward"]["ms"] < 60 and table["inner forward"]["ms"] >= 60
    assert table["outer forward"]["calls"] == table["inner forward"]["calls"] == 1


def test_rss_probes_measure_what_a_step_allocates():
    """The worker's memory columns: base = RSS before the steps, then the high-water mark is reset and read after
    them. A step that also touches 64 MiB (freed at once) must show about 64 MiB more (1 MiB less allowed: RSS
    also drops by pages the process returns meanwhile); the same step without it, much less (the reset really
    forgets earlier peaks, such as the 64 MiB just before)."""
    runner = MinivitRunner(CASES["tiny"])
    runner.step()                                                 # warm: pools, threads, first-touch pages
    base = rss_mb()
    if not reset_peak_rss():
        pytest.skip("no resettable RSS high-water mark here (Linux >= 4.0 only)")
    np.ones(64 * 2 ** 20 // 8)                                    # 64 MiB touched, freed at once
    runner.step()
    with_64 = peak_rss_mb() - base
    base = rss_mb()
    assert reset_peak_rss()
    runner.step()
    plain = peak_rss_mb() - base
    assert with_64 >= 63 and plain < 32, (with_64, plain)


def check_result(r, frameworks=("minivit",)):
    assert r["case"] == "tiny" and r["batch"] == CASES["tiny"].batch and r["step"] == "training"
    assert r["matmul_gflop"] == matmul_flops(get_config("test"), CASES["tiny"].batch, True) / 1e9
    assert r["matmul_peak_gflops"] > 0
    for fw in frameworks:
        m = r[fw]
        median = m["ms"]["median"]
        assert m["ms"]["min"] <= median <= m["ms"]["max"] and len(m["steps_ms"]) == 2
        assert m["images_per_s"] == pytest.approx(r["batch"] / median * 1e3)      # the columns' units agree
        assert m["gflops"] == pytest.approx(r["matmul_gflop"] / median * 1e3)
        assert m["peak_fraction"] == pytest.approx(m["gflops"] / r["matmul_peak_gflops"]) and m["peak_fraction"] < 1
        assert 10 < m["rss_base_mb"] < 8192                                      # MB, not KB or bytes
        assert m["step_mem_mb"] == m["rss_peak_mb"] - m["rss_base_mb"]
    floor = r["minivit"]["gemm_floor_ms"]
    assert 0 < floor < r["minivit"]["ms"]["median"]                              # a step costs more than its products
    assert r["minivit"]["floor_ratio"] == pytest.approx(r["minivit"]["ms"]["median"] / floor)


def test_bench_runs_a_tiny_case_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["--case", "tiny", "--steps", "2", "--warmup", "1", "--threads", "1", "--floor-reps", "1",
                 "--profile", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "median" in out and "profile of tiny" in out
    data = json.loads(path.read_text())
    assert data["machine"]["threads"] == 1
    (r,) = data["cases"]
    check_result(r)
    assert "linear forward" in r["minivit"]["profile"]


def test_short_steps_are_timed_in_turns_of_several():
    # a tiny step takes milliseconds: 11 steps go in turns of 2 (at least five turns: 2, 2, 2, 2, 2, 1), each
    # turn after one untimed step, and exactly the 11 asked for are timed
    r = run_case(CASES["tiny"], threads=1, steps=11, warmup=1, floor_reps=1, pause=0.0)
    assert r["steps_per_turn"] == 2 and len(r["minivit"]["steps_ms"]) == 11
    r = run_case(CASES["tiny"], threads=1, steps=2, warmup=0, floor_reps=1, pause=0.0)
    assert r["steps_per_turn"] == 1 and len(r["minivit"]["steps_ms"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_bench_vs_torch_agrees_on_a_tiny_case():
    r = run_case(CASES["tiny"], threads=1, steps=2, warmup=0, vs_torch=True, floor_reps=1, pause=0.0)
    check_result(r, ("minivit", "torch"))
    assert r["check"]["ok"], r["check"]
    assert r["check"]["logits_max_rel"] < 1e-4 and r["check"]["grads_max_rel"] < 1e-3
    assert r["ratio_vs_torch"] == pytest.approx(r["minivit"]["ms"]["median"] / r["torch"]["ms"]["median"])


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:            # refused at parse time, the flag named
        main(["--case", "tiny", "--steps", "0"])
    assert e.value.code == 2 and "argument --steps: expected an integer >= 1, got '0'" in capsys.readouterr().err
    args = add_bench_arguments(argparse.ArgumentParser()).parse_args(["--case", "tiny"])
    args.steps = 0                                  # and by run_bench itself, for a namespace built in Python
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        run_bench(args)


def test_loading_benchmark_writes_and_loads_a_random_checkpoint(tmp_path):
    r = loading.benchmark(tmp_path, config="vit-ti16", repeats=1)
    assert r["file"] == str(tmp_path / "minivit_bench_vit-ti16.npz") and r["file_bytes"] > 4 * 5e6   # ~5.7M float32
    assert len(r["load_s"]) == len(r["forward_s"]) == 1 and r["load_median_s"] == r["load_s"][0]
