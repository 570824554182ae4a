"""Softmax cross-entropy with label smoothing, numerically stable.

    loss = -(1/B) sum_b sum_k t_bk log softmax(z_b)_k,   t = (1 - s) onehot(y) + s / K   (label smoothing s)
    dloss/dz = (softmax(z) - t) / B

log softmax is computed as z - max(z) - log(sum(exp(z - max(z)))), so logits of magnitude 1e4 give a finite loss
and gradient. Integer labels are checked on the host before they index anything: CuPy wraps out-of-range
indices silently instead of raising.
"""
import numpy as np

from minivit.backend import get_xp, to_numpy


def check_labels(labels, num_classes):
    """Integer labels (B,) in [0, K) -> host int64 array; ValueError naming the bad value otherwise."""
    y = np.asarray(to_numpy(labels))
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (B,), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0]
        raise ValueError(f"label {bad} is out of range for {num_classes} classes (expected 0..{num_classes - 1})")
    return y.astype(np.int64)


def check_distributions(t, tol=1e-3):
    """Soft targets (B, K): every row non-negative and summing to 1 (within tol), else ValueError naming the row."""
    sums = to_numpy(t.sum(axis=1))                                       # (B,)
    low = to_numpy(t.min(axis=1))                                        # (B,)
    bad = np.flatnonzero(~(np.abs(sums - 1.0) <= tol) | ~(low >= 0))
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"soft targets must be probabilities (rows >= 0 summing to 1): row {b} sums to "
                         f"{float(sums[b]):.6g} with smallest entry {float(low[b]):.6g}")


def cross_entropy_forward(logits, targets, smoothing=0.0):
    """logits: (B, K), targets: (B,) integer labels or (B, K) probabilities -> (loss: 0-d array, cache).

    Returns the mean loss over the batch as a 0-d array of logits' dtype (no device sync; float(loss) to read it).
    """
    xp = get_xp(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, K), got {logits.shape}")
    B, K = logits.shape
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    if getattr(targets, "ndim", 1) == 2 and not np.issubdtype(targets.dtype, np.floating):
        raise ValueError(f"targets must be (B,) integer labels or (B, K) floating probabilities, got "
                         f"{targets.dtype} of shape {tuple(targets.shape)}" +
                         (": flatten the labels with .ravel()" if targets.shape[1:] == (1,) else ""))
    if getattr(targets, "ndim", 1) == 2:
        if tuple(targets.shape) != (B, K):
            raise ValueError(f"soft targets must have shape {(B, K)}, got {tuple(targets.shape)}")
        t = xp.asarray(targets, dtype=logits.dtype)                       # (B, K)
        check_distributions(t)
        if smoothing:
            t = (1.0 - smoothing) * t + smoothing / K
    else:
        y = check_labels(targets, K)
        if y.shape[0] != B:
            raise ValueError(f"got {y.shape[0]} labels for {B} logits rows")
        t = np.full((B, K), smoothing / K, dtype=logits.dtype)           # (B, K), built on the host
        t[np.arange(B), y] += 1.0 - smoothing
        t = xp.asarray(t)
    z = logits - logits.max(axis=1, keepdims=True)                       # (B, K), max 0 per row
    logsumexp = xp.log(xp.exp(z).sum(axis=1, keepdims=True))            # (B, 1)
    logp = z - logsumexp                                                 # (B, K) log-probabilities
    loss = -(t * logp).sum() / B
    return loss, (xp.exp(logp), t)


def cross_entropy_backward(dloss, cache):
    """dloss: a number (the upstream gradient of the scalar loss, 1.0 at the top of a graph) -> dlogits (B, K).

    dlogits = dloss * (softmax(logits) - t) / B   (the house order: the upstream gradient first, then the cache).
    """
    probs, t = cache
    return (probs - t) * (dloss / probs.shape[0])
