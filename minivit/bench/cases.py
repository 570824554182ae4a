"""What `minivit bench` measures: the cases, the FLOP model, the matrix products of a step, weights and batch.

The formula and the list of products are explained in the package docstring (`help(minivit.bench)`); tests check
the formula against the list and the list against the products a real step runs.
"""
import math
from dataclasses import dataclass

import numpy as np

from minivit.model import init_params


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
    """Matmul FLOPs of one step (2 per multiply-add), by the formula in the package docstring:

        F = 2 B [Np P^2 C D + L (N (4 D^2 + 2 D M) + 2 N^2 D) + D K]     (+ 2 B rep (D + K) - 2 B D K with pre-logits)
        training step: 3 F;  forward only: F
    """
    B, N, Np, D, M, K, L = batch, cfg.seq_len, cfg.num_patches, cfg.width, cfg.mlp_dim, cfg.num_classes, cfg.depth
    P, C, rep = cfg.patch_size, cfg.channels, cfg.representation_size
    head = rep * (D + K) if rep else D * K
    F = 2 * B * (Np * P * P * C * D + L * (N * (4 * D * D + 2 * D * M) + 2 * N * N * D) + head)
    return 3 * F if train else F


def shapes_flops(shapes):
    """FLOPs of a list from `matmul_shapes` (the cross-check of the formula)."""
    return sum(2 * math.prod(bd) * m * k * n for _, bd, m, k, n, _, _ in shapes)


def bench_params(cfg, seed=0):
    """Float32 host parameters for a case: `init_params` with the zero head replaced by normal(0.02) entries.

    A zero head would make the logits constant and every gradient below the head zero: the comparison with
    PyTorch would then agree trivially.
    """
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
