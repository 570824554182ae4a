"""Lesson 12: what the ViT learned: embedding filters, position embeddings, attention distance, attention rollout.

Goal: open up the model trained in lesson 10 and make the paper's figures 6 and 7 from it (minivit.analysis
computes, minivit.figures.inspect_model draws), checking the properties each measurement must have.

The measurements (section 4.5 of the paper; minivit.analysis):
    embedding filters    the D columns of the patch embedding w (P*P*C, D) are D filters of P x P x C pixels. Their
                         principal components (SVD of the centred filters) are the few patterns the embedding is
                         built from; the paper finds "plausible basis functions for a low-dimensional
                         representation of the fine structure within each patch". The components are orthonormal.
    position embeddings  the cosine similarity of each grid position's learned embedding with every other one,
                         sim = <e_i, e_j> / (|e_i| |e_j|), drawn as one small map per position. The diagonal is 1.
                         In the paper closer patches have more similar embeddings, with row and column structure.
    attention distance   per head, the attention-weighted mean image distance between a query patch and the
                         patches it attends to, d = sum_k a_qk dist(q, k) / sum_k a_qk, averaged over queries and
                         images (the paper: 128 images). "Analogous to receptive field size in CNNs". It lies
                         between 0 (each patch looks only at itself) and the largest distance on the grid,
                         P sqrt((gh-1)^2 + (gw-1)^2); uniform attention gives the mean of all pairwise distances.
    attention rollout    Abnar and Zuidema 2020: average each layer's attention over heads, add the identity for
                         the residual path and renormalize the rows, A_l = (mean_h attn + I) / 2, then multiply
                         through the layers, R = A_L ... A_1. Row 0 of R (the class token) says how much of each
                         input patch reaches the class token at the top (figure 6). Every A_l is row-stochastic,
                         so R is too: its rows sum to 1.

Run:   python lessons/12_what_the_vit_learned.py [--quick] [--out DIR]
Time:  about 3 s on a busy 2-core CPU, Python start-up included, with lesson 10's run present (without it the
       lesson first trains a model with lesson 10's recipe, shorter: ~25 s more). --quick: about 2 s.

You should see (with lesson 10's model; a 4x4 grid of 8x8 patches, 3 layers of 4 heads):
    filters: the first 28 components explain ~73% of the variance (~6% the first); orthonormal (error ~1e-15)
    position embeddings: similarity diagonal 1; neighbours ~0.15 more similar than far positions (at init: 0.01),
    and the picture shows the edge positions alike and unlike the centre ones
    mean attention distance per head: 15-16 px, within [0, 33.9], close to uniform attention's 16.1 px: on a 4x4
    grid after a few epochs the patch queries spread their attention almost evenly (the paper's local and global
    heads come from larger grids and far more training); the class-token maps (12_attention_maps.png) are sharper
    rollout: rows of R sum to 1 (error ~1e-16); the class token keeps ~25% on itself, the rest on the patches,
    and the rollout overlays (12_rollout.png) light up the shapes
and five pictures in lessons/out/: 12_embedding_filters.png, 12_pos_embed_similarity.png,
12_attention_distance.png, 12_rollout.png, 12_attention_maps.png.
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np

from minivit.analysis import attention_rollout_matrix, embedding_filters, patch_distances, pos_embed_similarity
from minivit.data import load_dataset, normalizer
from minivit.figures import inspect_model, run_attention
from minivit.model import init_params
from minivit.recipes import lesson_base_model

norm_fn = normalizer("minus_one_one")


def neighbour_contrast(sim):
    """sim (gh, gw, gh, gw) -> mean similarity of 4-neighbours minus that of positions >= 2 cells apart."""
    gh, gw = sim.shape[:2]
    r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    d = np.abs(r.ravel()[:, None] - r.ravel()[None]) + np.abs(c.ravel()[:, None] - c.ravel()[None])   # (G, G)
    s = sim.reshape(gh * gw, gh * gw)
    return float(s[d == 1].mean() - s[d >= 2].mean())


def main(quick=False, seed=0, out_dir=None):
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else Path(__file__).resolve().parent / "out"
    out = {}
    params, cfg, source = lesson_base_model(out_dir, quick, seed, epochs=2 if quick else 4, run_name="12_run")
    ds = load_dataset("shapes", n_train=400 if quick else 5000, n_test=200 if quick else 500, image_size=32,
                      progress=False)
    images = ds.test_images[:32 if quick else 128]                     # the paper averages over 128 images
    P, (gh, gw), L, nh = cfg.patch_size, cfg.grid, cfg.depth, cfg.heads
    print(f"model: {source}\n  {cfg.image_size}x{cfg.image_size} images, {P}x{P} patches ({gh}x{gw} grid), "
          f"{L} layers x {nh} heads, width {cfg.width}; analysed on {len(images)} test images")

    # The five figures, written by the package; renamed to this lesson's prefix.
    results = inspect_model(params, cfg, images, norm_fn, out_dir)
    pngs = []
    for name, (path, _) in results.items():
        pngs.append(str(Path(path).replace(out_dir / f"12_{Path(path).name}")))

    # 1. Embedding filters: orthonormal principal components, sorted by the variance they explain.
    filters, evr = embedding_filters(params["patch_embed"]["w"], P, cfg.channels, k=28)   # (k, P, P, C), (k,)
    F = filters.reshape(len(filters), -1)                              # (k, P*P*C)
    out["filters_orthonormal_error"] = float(np.abs(F @ F.T - np.eye(len(F))).max())
    assert out["filters_orthonormal_error"] < 1e-10
    assert np.all(np.diff(evr) <= 1e-12) and evr.sum() <= 1 + 1e-12
    out["filters_explained"] = float(evr.sum())
    print(f"filters: the first {len(F)} components explain {100 * evr.sum():.0f}% of the variance "
          f"(first three: {', '.join(f'{100 * v:.1f}%' for v in evr[:3])}); orthonormal to "
          f"{out['filters_orthonormal_error']:.0e}")

    # 2. Position embeddings: cosine similarity, diagonal 1; neighbours against far positions, trained vs init.
    sim = results["posemb"][1]["similarity"]                           # (gh, gw, gh, gw)
    diag = np.array([sim[r, c, r, c] for r in range(gh) for c in range(gw)])
    out["similarity_diag_error"] = float(np.abs(diag - 1).max())
    assert out["similarity_diag_error"] < 1e-6 and np.all(np.abs(sim) <= 1 + 1e-6)
    sim0 = pos_embed_similarity(init_params(cfg, seed=seed)["pos_embed"], cfg.grid, cfg.n_prefix)
    out["neighbour_contrast"] = {"trained": neighbour_contrast(sim), "init": neighbour_contrast(sim0)}
    print(f"position embeddings: similarity diagonal = 1 (error {out['similarity_diag_error']:.0e}); neighbours "
          f"minus far positions: trained {out['neighbour_contrast']['trained']:+.2f}, at init "
          f"{out['neighbour_contrast']['init']:+.2f}")

    # 3. Mean attention distance: within [0, the largest distance on the grid].
    dist = results["distance"][1]["distance"]                          # (L, nh) pixels
    far = P * math.hypot(gh - 1, gw - 1)
    uniform = float(patch_distances(cfg.grid, P).mean())               # what uniform attention would give
    assert dist.shape == (L, nh) and np.all((dist >= 0) & (dist <= far + 1e-9))
    out.update(distance=dist, max_distance=far, uniform_distance=uniform)
    print(f"mean attention distance (px), max possible {far:.1f}, uniform attention {uniform:.1f}:")
    for layer in range(L):
        print(f"  layer {layer + 1}: " + "  ".join(f"{d:5.1f}" for d in dist[layer]) +
              f"   (mean {dist[layer].mean():.1f})")

    # 4. Attention rollout: every A_l is row-stochastic, so R is; the class token's row over the patches.
    attns = run_attention(params, cfg, norm_fn(images))                # L x (B, nh, N, N)
    R = attention_rollout_matrix(attns)                                # (B, N, N)
    out["rollout_row_sum_error"] = float(np.abs(R.sum(axis=-1) - 1).max())
    assert out["rollout_row_sum_error"] < 1e-6
    plain = attention_rollout_matrix(attns, residual=False)            # the paper's appendix: a plain product
    assert np.abs(plain.sum(axis=-1) - 1).max() < 1e-6
    roll = results["rollout"][1]["rollout"]                            # (B, gh, gw) = R[:, 0, 1:]
    assert np.allclose(roll.reshape(len(images), -1), R[:, 0, cfg.n_prefix:])
    out["rollout_cls_self"] = float(R[:, 0, 0].mean())
    out["rollout_patch_share"] = float(roll.sum(axis=(1, 2)).mean())
    print(f"rollout: rows of R sum to 1 (error {out['rollout_row_sum_error']:.0e}); the class token's row: "
          f"{100 * out['rollout_cls_self']:.0f}% on itself, {100 * out['rollout_patch_share']:.0f}% on the patches "
          f"(largest patch share {100 * roll.max(axis=(1, 2)).mean():.0f}% on average)")

    print("pictures: " + ", ".join(Path(p).name for p in pngs) + f" in {out_dir}")
    out.update(source=source, explained_variance=evr, png=pngs, seconds=time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 images; a short model of its own if lesson 10's is absent")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default lessons/out/)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(quick=a.quick, seed=a.seed, out_dir=a.out)
