"""What a trained ViT learned: the paper's figures 6 and 7 as PNG images (`minivit inspect`).

    embedding_filters.png      figure 7 left: top principal components of the patch-embedding filters
    pos_embed_similarity.png   figure 7 centre: cosine similarity of each position's embedding with all others
    attention_distance.png     figure 7 right: mean attention distance of every head against depth
    rollout.png                figure 6: attention rollout of the class token, overlaid on each input image
    attention_maps.png         the class token's attention over the grid, for every layer and head (first image)

The analysis functions (minivit.analysis) return arrays; this module runs the model, calls them and draws.
"""
from pathlib import Path

import numpy as np

from minivit import analysis, charts, draw
from minivit.backend import to_numpy
from minivit.inference import run_batched
from minivit.model import attention_probs, vit_forward

ANALYSES = ("filters", "posemb", "distance", "rollout", "maps")


def run_attention(params, cfg, images, batch_size=64):
    """images: float (B, H, W, C) -> list over layers of host arrays (B, nh, N, N), in evaluation mode."""
    batches = run_batched(lambda x, _: attention_probs(vit_forward(params, x, cfg)[1]), images, params, batch_size)
    return [np.concatenate(layer) for layer in zip(*batches)] if batches else None


def inspect_model(params, cfg, images_uint8, normalize_fn, out_dir, analyses=ANALYSES, max_overlays=8):
    """Compute and draw the selected analyses for uint8 images (n, H, W, C); returns {name: (path, numbers)}."""
    out_dir = Path(out_dir)
    unknown = set(analyses) - set(ANALYSES)
    if unknown:
        raise ValueError(f"unknown analyses {sorted(unknown)}; choose from {ANALYSES}")
    results = {}
    P, C, grid = cfg.patch_size, cfg.channels, cfg.grid
    if "filters" in analyses:
        w = to_numpy(params["patch_embed"]["w"])                                   # (P*P*C, D)
        filters, evr = analysis.embedding_filters(w, P, C, k=28)                   # (k, P, P, C), (k,)
        pics = draw.to_uint8(filters if C > 1 else filters[..., 0], symmetric=True, per_item=True)
        img = draw.image_grid(pics, ncols=7, scale=max(1, 64 // P),
                              titles=[f"{100 * v:.1f}%" for v in evr],
                              title="Patch-embedding filters: top principal components (% variance)")
        results["filters"] = (_save(img, out_dir / "embedding_filters.png"), {"explained_variance": evr})
    if "posemb" in analyses:
        sim = analysis.pos_embed_similarity(to_numpy(params["pos_embed"]), grid, cfg.n_prefix)  # (gh, gw, gh, gw)
        tiles = [sim[r, c] for r in range(grid[0]) for c in range(grid[1])]
        img = draw.tile_grid(tiles, nrows=grid[0], ncols=grid[1], vmin=-1.0, vmax=1.0, cmap="viridis",
                             title="Position embedding similarity (cosine)", xlabel="input patch column",
                             ylabel="input patch row")
        results["posemb"] = (_save(img, out_dir / "pos_embed_similarity.png"), {"similarity": sim})
    need_attention = {"distance", "rollout", "maps"} & set(analyses)
    if need_attention:
        attns = run_attention(params, cfg, normalize_fn(images_uint8))
    if "distance" in analyses:
        dist = analysis.mean_attention_distance(attns, grid, P, cfg.n_prefix)       # (L, nh)
        L, nh = dist.shape
        x = np.repeat(np.arange(1, L + 1), nh)
        groups = [f"head {h + 1}" for _ in range(L) for h in range(nh)]
        img = charts.scatter_plot(x, dist.ravel(), groups=groups if nh <= 8 else None,
                                  title=f"Mean attention distance ({len(images_uint8)} images)",
                                  xlabel="network depth (layer)", ylabel="mean attention distance (pixels)")
        results["distance"] = (_save(img, out_dir / "attention_distance.png"), {"distance": dist})
    if "rollout" in analyses:
        roll = analysis.attention_rollout(attns, cfg.n_prefix, grid)                 # (B, gh, gw)
        n = min(max_overlays, len(images_uint8))
        scale = max(1, 128 // max(cfg.image_hw))
        pics = []
        for i in range(n):
            pics.append(draw.overlay(images_uint8[i], roll[i], alpha=0.0, scale=scale))   # the input
            pics.append(draw.overlay(images_uint8[i], roll[i], alpha=0.6, scale=scale))   # with the rollout
        img = draw.tile_grid(pics, ncols=min(8, 2 * n), titles=["input", "rollout"] * n,
                             title="Attention rollout of the class token" if cfg.n_prefix else
                                   "Attention rollout (mean over patch queries)")
        results["rollout"] = (_save(img, out_dir / "rollout.png"), {"rollout": roll})
    if "maps" in analyses:
        tiles, titles = [], []
        for layer, a in enumerate(attns):
            maps = analysis.attention_map(a[:1], cfg.n_prefix, grid)                  # (1, nh, gh, gw)
            for h in range(maps.shape[1]):
                tiles.append(maps[0, h])
                titles.append(f"L{layer + 1} h{h + 1}")
        img = draw.tile_grid(tiles, nrows=len(attns), ncols=cfg.heads, titles=titles,
                             title="Class-token attention per layer (rows) and head (columns), image 1"
                                   if cfg.n_prefix else "Mean attention of the patches, image 1")
        results["maps"] = (_save(img, out_dir / "attention_maps.png"), {})
    return results


def _save(img, path):
    draw.save_png(img, path)
    return path
