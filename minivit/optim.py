"""Optimizers, gradient clipping and learning-rate schedules.

Parameters, gradients and optimizer state are trees of the same shape (nested dicts/lists of arrays). Updates
happen in place, so the arrays a training loop holds stay the same objects. Optimizer state is a plain dict
{"step": int, "m": tree, "v": tree} that a checkpoint saves under dotted names and restores exactly.

    SGD with momentum (the paper's fine-tuning):  m = beta m + g;  p -= lr m
    Adam (Kingma & Ba):   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr mhat / (sqrt(vhat) + eps),
                          mhat = m / (1 - b1^t), vhat = v / (1 - b2^t)
    AdamW (Loshchilov & Hutter): Adam plus decoupled decay p -= lr wd p, only on weight matrices
                          (not on biases, norms, the position embedding or the class token).
"""
import math

import numpy as np

from minivit import fast
from minivit.backend import get_xp
from minivit.reference import use_reference
from minivit.tree import flatten, tree_map, unflatten

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "linear", "constant")
NO_DECAY = ("pos_embed", "cls_token", "mask_token")   # embeddings that are never decayed


def decay_mask(params):
    """{dotted name: bool}: True where weight decay applies (matrices: ndim >= 2, not embeddings or tokens)."""
    return {k: v.ndim >= 2 and k.split(".")[-1] not in NO_DECAY for k, v in flatten(params).items()}


def optimizer_init(params, kind="adamw"):
    """Fresh optimizer state for `params`: zeros for the moments the method needs."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    zeros = lambda p: get_xp(p).zeros_like(p)   # noqa: E731
    state = {"step": 0, "m": tree_map(zeros, params)}
    if kind in ("adam", "adamw"):
        state["v"] = tree_map(zeros, params)
    return state


def optimizer_step(params, grads, state, lr, kind="adamw", beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.0, momentum=0.9, reference=None):
    """One update, in place on `params` and `state`. `lr` is this step's learning rate (from `lr_at`). Gradients
    are matched to parameters by name. reference: Adam's reference update (`adam_update`) instead of its fast twin
    (None: MINIVIT_REFERENCE decides, as in the model)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    state["step"] += 1
    t = state["step"]
    p_flat, g_flat, m_flat = flatten(params), flatten(grads), flatten(state["m"])
    if set(p_flat) != set(g_flat):
        missing, extra = sorted(set(p_flat) - set(g_flat)), sorted(set(g_flat) - set(p_flat))
        raise ValueError(f"gradients do not have the names of the parameters: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    decay = decay_mask(params)
    if kind == "sgd":
        for k, p in p_flat.items():
            g, m = g_flat[k], m_flat[k]
            if weight_decay and decay[k]:
                g = g + weight_decay * p                       # coupled L2 for SGD
            m *= momentum
            m += g                                             # m = momentum m + g
            p -= lr * m
        return
    v_flat = flatten(state["v"])
    c1 = 1.0 - beta1 ** t                                      # bias corrections
    c2 = 1.0 - beta2 ** t
    update = adam_update if use_reference(reference) else fast.adam_update
    for k, p in p_flat.items():
        decay_factor = 1.0 - lr * weight_decay if kind == "adamw" and weight_decay and decay[k] else None
        update(p, g_flat[k], m_flat[k], v_flat[k], beta1, beta2, eps, c2, lr / c1, decay_factor)


def adam_update(p, g, m, v, beta1, beta2, eps, c2, step_size, decay_factor=None):
    """One Adam(W) update of one parameter, in place on p and its moments m, v (the reference; minivit.fast has
    its twin, which the optimizer runs unless MINIVIT_REFERENCE=1).

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2;   p = p * decay - step m / (sqrt(v / c2) + eps)

    with c2 = 1 - b2^t and step = lr / (1 - b1^t) (the bias corrections), decay = 1 - lr wd (AdamW; None: none).
    """
    xp = get_xp(p)
    m[...] = beta1 * m + (1.0 - beta1) * g
    v[...] = beta2 * v + (1.0 - beta2) * (g * g)
    if decay_factor is not None:
        p *= decay_factor                                      # decoupled weight decay
    p -= step_size * (m / (xp.sqrt(v * (1.0 / c2)) + eps))


def global_norm(grads):
    """sqrt(sum of squares of every gradient entry), as a Python float."""
    total = 0.0
    flat = flatten(grads)
    for k in sorted(flat):                                     # a fixed order, whatever the tree's key order
        total += float((flat[k] * flat[k]).sum())
    return math.sqrt(total)


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients in place by min(1, max_norm / global_norm); returns the norm before clipping.

    The direction of the whole gradient vector is preserved (one common factor for every tensor).
    """
    norm = global_norm(grads)
    if max_norm and max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in flatten(grads).values():
            g *= scale
    return norm


def lr_at(step, base_lr, total_steps, warmup_steps=0, schedule="cosine", end_lr=0.0):
    """Learning rate for update number `step` (1-based), as the original ViT training code:

        progress = clip((step - warmup) / (total - warmup), 0, 1)
        cosine:   lr = end + (base - end) * 0.5 * (1 + cos(pi * progress))
        linear:   lr = end + (base - end) * (1 - progress)
        constant: lr = base
        then      lr *= min(1, step / warmup)          (linear warmup)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        lr = end_lr + (base_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        lr = end_lr + (base_lr - end_lr) * (1.0 - progress)
    else:
        lr = base_lr
    if warmup_steps:
        lr *= min(1.0, step / warmup_steps)
    return lr


def state_to_flat(state):
    """Optimizer state -> {dotted name: array} plus the step, for checkpoints."""
    flat = {f"m.{k}": v for k, v in flatten(state["m"]).items()}
    if "v" in state:
        flat.update({f"v.{k}": v for k, v in flatten(state["v"]).items()})
    flat["step"] = np.asarray(state["step"], dtype=np.int64)
    return flat


def state_from_flat(flat, params):
    """Inverse of `state_to_flat`, with the moments placed on the parameters' device and dtype."""
    xp = get_xp(next(iter(flatten(params).values())))        # (params may be the head alone: a linear probe)
    state = {"step": int(flat["step"])}
    for key in ("m", "v"):
        sub = {k[len(key) + 1:]: xp.asarray(v) for k, v in flat.items() if k.startswith(key + ".")}
        if sub:
            state[key] = unflatten(sub)
    return state
