"""What a trained ViT has learned: the measurements of the paper's section 4.5 (figures 6 and 7).

Pure functions on arrays that a forward pass already produced; nothing here runs the model or draws. Every
function takes NumPy arrays (CuPy arrays are copied to the host first), computes in float64 and returns NumPy.

Shapes:
    B        batch
    L        layers (encoder blocks)
    nh       heads
    P        patch size (pixels)
    C        image channels
    gh, gw   patch grid (rows, columns); G = gh * gw patches, stored row-major (flat index = row * gw + col)
    n_prefix tokens before the patches: 1 (the class token) for 'token' models, 0 for 'gap' models
    N        tokens = n_prefix + G
    D        width
    k        principal components kept

Attention probabilities are one array per layer, `(B, nh, N, N)`: row i (a query) is a distribution over the N
keys, so every row sums to 1.

The measurements:
    attention_map            one layer's attention of the class token (or of one patch) over the patch grid.
    attention_rollout        Abnar & Zuidema (2020): how much each input patch flows into the class token's
                             output, through all layers (the paper's figure 6 and appendix D.8).
    mean_attention_distance  per head, how far (in pixels) a query looks on average (figure 7, right).
    pos_embed_similarity     cosine similarity between position embeddings (figure 7, centre).
    embedding_filters        principal components of the patch-embedding filters (figure 7, left).
"""
import numpy as np

from .backend import to_numpy


# ----------------------------------------------------------------------------------------------------------------
# argument checks

def _host(x):
    """Any array (NumPy, CuPy, nested list) -> NumPy float64 on the host."""
    return np.asarray(to_numpy(x), dtype=np.float64)


def _check_grid(grid):
    """grid: int g (a g x g grid) or a pair (gh, gw) of positive integers -> (gh, gw); else ValueError."""
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        grid = (grid, grid)
    try:
        gh, gw = grid
    except (TypeError, ValueError):
        raise ValueError(f"grid must be an int or a pair (gh, gw), got {grid!r}") from None
    for v in (gh, gw):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"grid must hold positive integers, got {grid!r}")
    return int(gh), int(gw)


def _check_prefix(n_prefix):
    if isinstance(n_prefix, bool) or not isinstance(n_prefix, (int, np.integer)) or n_prefix < 0:
        raise ValueError(f"n_prefix must be an integer >= 0, got {n_prefix!r}")
    return int(n_prefix)


def _check_attn(attn, n_prefix, grid, name="attn"):
    """One layer's attention -> float64 (B, nh, N, N), checked against N = n_prefix + gh * gw."""
    a = _host(attn)
    n = n_prefix + grid[0] * grid[1]
    if a.ndim != 4 or a.shape[2] != n or a.shape[3] != n:
        raise ValueError(f"{name} must have shape (B, nh, {n}, {n}) for n_prefix={n_prefix} and grid={grid}, "
                         f"got {a.shape}")
    return a


def _check_attns(attns, n_prefix, grid):
    """A list over layers of (B, nh, N, N) -> list of float64 arrays (at least one layer)."""
    if isinstance(attns, np.ndarray) or hasattr(attns, "__cuda_array_interface__"):
        attns = list(attns)                                        # a stacked (L, B, nh, N, N) array
    attns = [_check_attn(a, n_prefix, grid, name=f"attns[{i}]") for i, a in enumerate(attns)]
    if not attns:
        raise ValueError("attns must hold at least one layer")
    return attns


def _patch_centres(grid):
    """(gh, gw) -> (G, 2) float64 (row, col) of each patch, row-major."""
    gh, gw = grid
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")   # (gh, gw) each
    return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)  # (G, 2)


def _maybe_renormalize(m, renormalize):
    """m: (..., gh, gw) -> the same, each map divided by its sum when `renormalize` (zero maps stay zero)."""
    if not renormalize:
        return m
    s = m.sum(axis=(-2, -1), keepdims=True)
    return m / np.where(s > 0, s, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# attention maps

def attention_map(attn, n_prefix, grid, query=None, renormalize=False):
    """attn: (B, nh, N, N) -> (B, nh, gh, gw): one layer's attention of one query over the patch grid.

    The query:
        None         the class token (token 0) when n_prefix >= 1; for a 'gap' model (n_prefix = 0), which has
                     no class token, the mean of the rows of all patch queries (what the pooled output reads).
        (row, col)   the patch at that grid position.
        int          the patch with that flat (row-major) index, row * gw + col.
    The prefix keys (the class token's column) are dropped. By default the map is NOT renormalized: its values
    are the query's real attention weights, so a map summing to 0.6 says 40% went to the class token. With
    renormalize=True each map is divided by its sum and becomes a distribution over the patches.
    """
    n_prefix = _check_prefix(n_prefix)
    gh, gw = _check_grid(grid)
    a = _check_attn(attn, n_prefix, (gh, gw))                      # (B, nh, N, N)
    B, nh = a.shape[:2]
    if query is None:
        if n_prefix >= 1:
            row = a[:, :, 0, n_prefix:]                            # (B, nh, G) the class token's row
        else:
            row = a.mean(axis=2)                                   # (B, nh, G) mean over the patch queries
    else:
        q = _query_index(query, (gh, gw))
        row = a[:, :, n_prefix + q, n_prefix:]                     # (B, nh, G)
    m = row.reshape(B, nh, gh, gw)                                 # (B, nh, gh, gw)
    return _maybe_renormalize(m, renormalize)


def _query_index(query, grid):
    """(row, col) or a flat patch index -> the flat patch index, checked against the grid."""
    gh, gw = grid
    if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
        if not 0 <= query < gh * gw:
            raise ValueError(f"query patch index must be in [0, {gh * gw}), got {query!r}")
        return int(query)
    try:
        r, c = query
    except (TypeError, ValueError):
        raise ValueError(f"query must be None, a flat patch index or a pair (row, col), got {query!r}") from None
    if not (0 <= r < gh and 0 <= c < gw):
        raise ValueError(f"query (row, col) must lie in the {gh} x {gw} grid, got {query!r}")
    return int(r) * gw + int(c)


def attention_rollout_matrix(attns, residual=True):
    """attns: list over L layers of (B, nh, N, N) -> R: (B, N, N), the rollout of attention through all layers.

    Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers":
        A_l = mean over heads of layer l's attention                  (B, N, N)
        residual=True:  A_l <- (A_l + I) / rowsum(A_l + I)            the residual connection carries the token
                                                                      itself forward; = 0.5 A_l + 0.5 I when
                                                                      A_l's rows sum to 1 (their step)
        residual=False: A_l unchanged                                 the paper's appendix: a plain product
        R = A_L @ ... @ A_2 @ A_1                                     first layer rightmost
    Row i of R says how much each input token flows into token i's output; rows of R sum to 1 when the rows
    of every A_l do. The array shapes do not depend on n_prefix, so it is not an argument here.
    """
    if isinstance(attns, np.ndarray) or hasattr(attns, "__cuda_array_interface__"):
        attns = list(attns)
    R = None
    for i, attn in enumerate(attns):
        a = _host(attn)
        if a.ndim != 4 or a.shape[2] != a.shape[3]:
            raise ValueError(f"attns[{i}] must have shape (B, nh, N, N), got {a.shape}")
        A = a.mean(axis=1)                                         # (B, N, N) average over heads
        if residual:
            A = A + np.eye(A.shape[-1])                            # (B, N, N) the residual path
            A = A / A.sum(axis=-1, keepdims=True)                  # rows sum to 1 again
        if R is not None and R.shape != A.shape:
            raise ValueError(f"attns[{i}] has shape {a.shape}, unlike the layers before it")
        R = A if R is None else A @ R                              # (B, N, N) R = A_l @ R
    if R is None:
        raise ValueError("attns must hold at least one layer")
    return R


def attention_rollout(attns, n_prefix, grid, residual=True, renormalize=False):
    """attns: list over L layers of (B, nh, N, N) -> (B, gh, gw): the class token's rollout over the patch grid.

    R = attention_rollout_matrix(attns, residual); the map is the class token's row of R with the prefix
    columns dropped, R[:, 0, n_prefix:]. A 'gap' model (n_prefix = 0) has no class token; its output is the
    mean of the patch tokens, so the map is the mean of R's rows. As in attention_map, the map is not
    renormalized unless renormalize=True (then each map sums to 1).
    """
    n_prefix = _check_prefix(n_prefix)
    gh, gw = _check_grid(grid)
    attns = _check_attns(attns, n_prefix, (gh, gw))
    R = attention_rollout_matrix(attns, residual=residual)         # (B, N, N)
    B = R.shape[0]
    row = R[:, 0, n_prefix:] if n_prefix >= 1 else R.mean(axis=1)  # (B, G)
    m = row.reshape(B, gh, gw)                                     # (B, gh, gw)
    return _maybe_renormalize(m, renormalize)


# ----------------------------------------------------------------------------------------------------------------
# mean attention distance

def patch_distances(grid, patch_size):
    """grid (gh, gw), P -> (G, G) float64: Euclidean distance in pixels between the centres of every two patches.

    dist[q, k] = P * sqrt((row_q - row_k)^2 + (col_q - col_k)^2), patches in row-major order.
    """
    gh, gw = _check_grid(grid)
    xy = _patch_centres((gh, gw))                                  # (G, 2)
    diff = xy[:, None, :] - xy[None, :, :]                         # (G, G, 2)
    return float(patch_size) * np.sqrt((diff ** 2).sum(axis=-1))   # (G, G)


def mean_attention_distance(attns, grid, patch_size, n_prefix):
    """attns: list over L layers of (B, nh, N, N) -> (L, nh): each head's mean attention distance in pixels.

    The paper's figure 7 (right), "analogous to receptive field size in CNNs": for each query patch q,
        d_q = sum_k a[q, k] * dist[q, k] / sum_k a[q, k]       over patch keys k only
    where dist is the distance between patch centres in pixels (patch_distances). The class token's row and
    column are left out and the remaining weights renormalized over the patch keys. d_q is then averaged over
    the query patches and the batch (the paper: over 128 images). A query that gives the patches no weight
    at all (everything on the class token) has no distance and is left out of the average; a head where that
    holds for every query gets NaN.
    """
    n_prefix = _check_prefix(n_prefix)
    gh, gw = _check_grid(grid)
    attns = _check_attns(attns, n_prefix, (gh, gw))
    dist = patch_distances((gh, gw), patch_size)                   # (G, G)
    out = []
    for a in attns:                                                # one layer at a time: (B, nh, N, N)
        p = a[:, :, n_prefix:, n_prefix:]                          # (B, nh, G, G) patch queries, patch keys
        mass = p.sum(axis=-1)                                      # (B, nh, G) weight left on the patches
        valid = mass > 0                                           # (B, nh, G)
        d = (p * dist).sum(axis=-1) / np.where(valid, mass, 1.0)   # (B, nh, G) renormalized mean distance
        count = valid.sum(axis=(0, 2))                             # (nh,)
        total = np.where(valid, d, 0.0).sum(axis=(0, 2))           # (nh,)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(total / count)                              # (nh,) NaN where no query was valid
    return np.stack(out)                                           # (L, nh)


# ----------------------------------------------------------------------------------------------------------------
# position embeddings and patch-embedding filters

def pos_embed_similarity(pos_embed, grid, n_prefix):
    """pos_embed: (1, N, D) or (N, D) -> (gh, gw, gh, gw): cosine similarity between grid positions' embeddings.

    sim[r1, c1, r2, c2] = <e(r1, c1), e(r2, c2)> / (|e(r1, c1)| |e(r2, c2)|), the prefix (class token)
    embedding dropped. sim[r, c] is the (gh, gw) map the paper draws in tile (r, c) of figure 7 (centre).
    A zero embedding has similarity 0 with everything, itself included.
    """
    n_prefix = _check_prefix(n_prefix)
    gh, gw = _check_grid(grid)
    e = _host(pos_embed)
    if e.ndim == 3 and e.shape[0] == 1:
        e = e[0]                                                   # (N, D)
    if e.ndim != 2 or e.shape[0] != n_prefix + gh * gw:
        raise ValueError(f"pos_embed must have shape (1, {n_prefix + gh * gw}, D) or ({n_prefix + gh * gw}, D) "
                         f"for n_prefix={n_prefix} and grid={(gh, gw)}, got {_host(pos_embed).shape}")
    e = e[n_prefix:]                                               # (G, D)
    norm = np.linalg.norm(e, axis=1, keepdims=True)                # (G, 1)
    u = e / np.where(norm > 0, norm, 1.0)                          # (G, D) unit rows (zero rows stay zero)
    sim = u @ u.T                                                  # (G, G)
    return sim.reshape(gh, gw, gh, gw)                             # (gh, gw, gh, gw)


def embedding_filters(patch_w, patch_size, channels, k=28):
    """patch_w: (P*P*C, D) -> (filters (k, P, P, C), explained_variance_ratio (k,)).

    The paper's figure 7 (left), "RGB embedding filters (first 28 principal components)": the D columns of
    the patch-embedding matrix are D filters, each a P*P*C vector with entries ordered (row, col, channel).
        X = patch_w.T - mean over the D filters          (D, P*P*C) centred
        X = U S V^T (SVD);  component j = row j of V^T   unit length, orthogonal to each other
        explained_variance_ratio[j] = S_j^2 / sum(S^2)   sorted, largest first
    k is capped at min(D, P*P*C) (there are no more components). The sign of a component is arbitrary; we
    fix it so that each component's largest-magnitude entry is positive, which makes the output reproducible.
    """
    P, C = int(patch_size), int(channels)
    w = _host(patch_w)
    if w.ndim != 2 or w.shape[0] != P * P * C:
        raise ValueError(f"patch_w must have shape ({P * P * C}, D) for patch_size={P}, channels={C}, "
                         f"got {w.shape}")
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    X = w.T - w.T.mean(axis=0, keepdims=True)                      # (D, F) F = P*P*C, centred over the filters
    _, S, Vt = np.linalg.svd(X, full_matrices=False)               # S (r,), Vt (r, F), r = min(D, F)
    k = min(int(k), Vt.shape[0])
    comps = Vt[:k]                                                 # (k, F)
    big = np.argmax(np.abs(comps), axis=1)                         # (k,)
    comps = comps * np.sign(comps[np.arange(k), big])[:, None]     # (k, F) largest entry positive
    var = S ** 2                                                   # (r,)
    total = var.sum()
    ratio = var[:k] / total if total > 0 else np.zeros(k)          # (k,)
    return comps.reshape(k, P, P, C), ratio                        # (k, P, P, C), (k,)
