"""Gradient checking: compare a hand-written backward pass with central finite differences.

For a function y = f(inputs) and a fixed random "upstream gradient" dy, the scalar L = sum(f(inputs) * dy) has
dL/dinput = the vector-Jacobian product the backward pass computes. For each input tensor we perturb coordinates
one at a time:

    numeric_i = sum((f(x + eps e_i) - f(x - eps e_i)) * dy) / (2 eps)          (error O(eps^2))

and compare with the analytic gradient by the relative error of the whole tensor

    rel = ||numeric - analytic|| / max(||numeric||, ||analytic||, 1e-12)

(an elementwise maximum would blow up wherever a gradient is near zero). Large tensors are checked on a random
sample of coordinates; every tensor is checked. Do this in float64: in float32 the rounding of L swamps the
differences (lesson 04 shows it).
"""
from dataclasses import dataclass

import numpy as np

from minivit.backend import get_xp, to_device, to_numpy
from minivit.loss import cross_entropy_backward, cross_entropy_forward
from minivit.model import init_params, vit_backward, vit_forward
from minivit.tree import flatten, unflatten


@dataclass
class GradcheckResult:
    name: str
    shape: tuple
    checked: int            # coordinates compared
    rel_error: float
    max_abs_error: float

    def passed(self, tol):
        return self.rel_error <= tol


def relative_error(numeric, analytic):
    """||numeric - analytic|| / max(||numeric||, ||analytic||, 1e-12)."""
    num = float(np.linalg.norm(numeric - analytic))
    den = max(float(np.linalg.norm(numeric)), float(np.linalg.norm(analytic)), 1e-12)
    return num / den


def gradcheck(forward, backward, inputs, eps=1e-5, max_coords=64, seed=0):
    """Check backward against central differences of forward, for every tensor in `inputs`.

    forward(inputs) -> y        inputs: dict name -> float64 array (NumPy or CuPy); y: any array
    backward(inputs, dy) -> dict name -> gradient, for the same names (missing names count as zero gradient)

    `forward` must be deterministic (fix any dropout mask through a freshly seeded generator inside it).
    Returns a list of GradcheckResult, one per input, in the order of `inputs`.
    """
    rng = np.random.default_rng(seed)
    y = forward(inputs)
    dy_host = rng.standard_normal(size=y.shape)
    dy = get_xp(y).asarray(dy_host, dtype=y.dtype)       # the same array module and dtype as y
    grads = backward(inputs, dy)
    results = []
    for name, x in inputs.items():
        if x.dtype != np.float64:
            raise ValueError(f"gradcheck needs float64 inputs; {name} is {x.dtype}")
        analytic_full = to_numpy(grads.get(name)) if grads.get(name) is not None else np.zeros(x.shape)
        if tuple(analytic_full.shape) != tuple(x.shape):
            raise ValueError(f"gradient of {name} has shape {analytic_full.shape}, expected {tuple(x.shape)}")
        n = x.size
        coords = np.arange(n) if n <= max_coords else np.sort(rng.choice(n, size=max_coords, replace=False))
        numeric = np.empty(len(coords))
        flat = x.reshape(-1)                            # a view: perturbations write into x itself
        for j, i in enumerate(coords):
            i = int(i)
            old = float(flat[i])
            flat[i] = old + eps
            y_plus = forward(inputs)
            flat[i] = old - eps
            y_minus = forward(inputs)
            flat[i] = old
            # subtract the outputs before weighting by dy: outputs that the coordinate does not touch cancel
            # exactly, so their rounding does not pollute the difference
            numeric[j] = float(((y_plus - y_minus) * dy).sum()) / (2 * eps)
        analytic = analytic_full.reshape(-1)[coords]
        results.append(GradcheckResult(name, tuple(x.shape), len(coords), relative_error(numeric, analytic),
                                       float(np.abs(numeric - analytic).max(initial=0.0))))
    return results


def gradcheck_model(cfg, seed=0, batch=2, train=False, eps=1e-5, max_coords=32, device=None,
                    perturb_params=True, labels=True, reference=None):
    """Whole-ViT gradient check on float64 parameters and images; returns [GradcheckResult] (input first).

    Parameters are randomized (non-trivial LayerNorm weights, non-zero head and biases), since an all-ones
    LayerNorm weight or a zero head can hide a wrong backward. With `train=True` dropout and stochastic depth are
    on under a fixed mask (the same seeded generator on every forward). With `labels=True` the checked function
    is the cross-entropy loss, so the loss backward is checked too; else the logits. `reference=True` checks the
    model on the reference layer pairs (None: MINIVIT_REFERENCE decides, as in vit_forward).
    """

    rng = np.random.default_rng(seed)
    params = flatten(init_params(cfg, seed=seed, dtype=np.float64))
    if perturb_params:
        params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    H, W = cfg.image_hw
    inputs = {"images": rng.standard_normal((batch, H, W, cfg.channels))}
    inputs.update(params)
    inputs = to_device(inputs, device)
    y = rng.integers(0, cfg.num_classes, size=batch)
    smoothing = 0.1

    def forward_full(inp):
        p = unflatten({k: v for k, v in inp.items() if k != "images"})
        mask_rng = np.random.default_rng(seed + 1) if train else None
        logits, cache = vit_forward(p, inp["images"], cfg, train=train, rng=mask_rng, reference=reference)
        if labels:
            loss, ce_cache = cross_entropy_forward(logits, y, smoothing)
            return loss, (cache, ce_cache)
        return logits, (cache, None)

    def forward(inp):
        return forward_full(inp)[0]

    def backward(inp, dy):
        _, (cache, ce_cache) = forward_full(inp)
        dlogits = cross_entropy_backward(dy, ce_cache) if labels else dy
        dimages, grads = vit_backward(dlogits, cache)
        g = flatten(grads)
        g["images"] = dimages
        return g

    return gradcheck(forward, backward, inputs, eps=eps, max_coords=max_coords, seed=seed)
