"""A benchmark (not a test) of pretrained checkpoints: the time to load a random ViT in the original .npz layout
and of a batch-1 forward pass.

    python -m minivit.bench.loading [FOLDER]      # writes FOLDER/minivit_bench_vit-b16.npz (346 MB; default /tmp)
"""
import os
import sys
import time

import numpy as np

from minivit.config import CONFIGS
from minivit.fileio import atomic_save_npz
from minivit.model import vit_forward
from minivit.pretrained import load_npz, npz_table


def write_random_npz(path, cfg, seed=0, scale=0.02):
    """Write a checkpoint in the original layout for `cfg` with random normal(0, scale) float32 values."""
    rng = np.random.default_rng(seed)
    arrays = {k: rng.standard_normal(s, dtype=np.float32) * np.float32(scale)
              for row in npz_table(cfg) for k, s in zip(row.keys, row.shapes)}
    atomic_save_npz(path, arrays)


def benchmark(folder="/tmp", config="vit-b16", repeats=5, seed=0):
    """Time loading a random ViT checkpoint in the original layout and a batch-1 forward; returns the numbers."""
    cfg = CONFIGS[config]
    path = os.path.join(folder, f"minivit_bench_{config}.npz")
    write_random_npz(path, cfg, seed)
    load_s, fwd_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        params, got = load_npz(path)
        load_s.append(time.perf_counter() - t)
    assert got == cfg.replace(gelu="tanh"), got
    x = np.random.default_rng(seed).uniform(-1, 1, (1, *cfg.image_hw, cfg.channels)).astype(np.float32)
    vit_forward(params, x, got)                                             # warm-up
    for _ in range(repeats):
        t = time.perf_counter()
        vit_forward(params, x, got)
        fwd_s.append(time.perf_counter() - t)
    return {"config": config, "file": path, "file_bytes": os.path.getsize(path), "load_s": load_s,
            "forward_s": fwd_s, "load_median_s": float(np.median(load_s)), "forward_median_s": float(np.median(fwd_s))}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or argv[:1] in (["-h"], ["--help"]):
        sys.exit("usage: python -m minivit.bench.loading [FOLDER]")
    r = benchmark(argv[0] if argv else "/tmp")
    print(f"{r['config']}: {r['file']} ({r['file_bytes'] / 1e6:.0f} MB), threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"load_npz     median {r['load_median_s']:.3f} s  ({', '.join(f'{t:.3f}' for t in r['load_s'])})")
    print(f"forward (1 image) median {r['forward_median_s']:.3f} s  ({', '.join(f'{t:.3f}' for t in r['forward_s'])})")


if __name__ == "__main__":
    main()
