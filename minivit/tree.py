"""Parameter trees: nested dicts and lists of arrays, flattened to dotted names and back.

`params["blocks"][3]["attn"]["qkv_w"]` <-> `"blocks.3.attn.qkv_w"`. Gradients and optimizer state use the same
tree shape as the parameters, so one flat name identifies a tensor everywhere (checkpoints, gradcheck tables).
"""
import math


def _is_array(v):
    return hasattr(v, "shape") and hasattr(v, "dtype")


def flatten(tree, prefix="", is_leaf=_is_array):
    """{dotted name: leaf} in a fixed order (dict insertion order, list index order)."""
    out = {}
    if is_leaf(tree):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k), is_leaf))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i), is_leaf))
    else:
        raise TypeError(f"{prefix or 'tree'}: expected an array, dict or list, got {type(tree).__name__}")
    return out


def unflatten(flat):
    """Inverse of `flatten`: numeric path parts become list indices."""
    root = {}
    for name, value in flat.items():
        parts = name.split(".")
        node = root
        for part, nxt in zip(parts[:-1], parts[1:]):
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _lists(root)


def _lists(node):
    if not isinstance(node, dict):
        return node
    node = {k: _lists(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node):
        keys = sorted(node, key=int)
        if [int(k) for k in keys] != list(range(len(keys))):
            raise ValueError(f"list indices must run 0..n-1, got {keys}")
        return [node[k] for k in keys]
    return node


def tree_map(fn, tree, *rest):
    """Apply `fn(leaf, *matching leaves)` over one or more trees of the same structure."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [tree_map(fn, v, *(r[i] for r in rest)) for i, v in enumerate(tree)]
    return fn(tree, *rest)


def num_params(tree):
    """Total number of scalars in a tree of arrays."""
    return sum(math.prod(v.shape) for v in flatten(tree).values())


def same_structure(a, b):
    """True when two trees have the same dotted names (in any order) and the same shapes."""
    fa, fb = flatten(a), flatten(b)
    return set(fa) == set(fb) and all(tuple(fa[k].shape) == tuple(fb[k].shape) for k in fa)


def accumulate(total, new):
    """total += new, leaf by leaf, in place (gradient accumulation over micro-batches); total None -> new."""
    if total is None:
        return new
    new = flatten(new)
    for name, acc in flatten(total).items():
        acc += new[name]                                   # matched by name: the key order may differ
    return total
