"""Fast twin of minivit/attention.py: the same attention_forward / attention_backward, on chunks of images.

The core (scores, softmax, A v, and their backward) runs a few images at a time (`row_blocks` over the batch):
one chunk's scores are computed, normalized and used while they sit in the core's cache, and the chunks go to
every core. Backward's (N, N) gradients live only in a per-thread chunk buffer, never as whole arrays. No head
split or merge copies: q, k, v are strided views of the qkv output, and A v is written straight into a
(B, N, nh, hs) array, which is o (B, N, D) with its heads merged. The cache keeps the qkv output (as q, k, v), A and
the dropout mask on A; not the scores (softmax runs in place) nor A * mask.
"""
import math
from functools import partial
from typing import NamedTuple

from minivit.backend import get_xp
from minivit.fast.layers import linear_backward, linear_forward, softmax_grad_rows, softmax_rows
from minivit.fast.rows import matmul, row_blocks, scratch
from minivit.layers import dropout_backward, dropout_forward, keep_mask


class FastAttentionCache(NamedTuple):
    qkv: tuple            # linear cache of the qkv projection
    q: object             # (B, nh, N, hs) views of the qkv output
    k: object
    v: object
    att: object           # (B, nh, N, N) A, the attention probabilities
    mask: object          # (B, nh, N, N) dropout mask on A, or None
    scale: float          # 1 / sqrt(hs)
    proj: tuple           # linear cache of the output projection
    proj_drop: tuple      # dropout cache of the output


def _attention_rows(q, k, v, att, o, mask=None, *, scale):
    """One chunk of images: att = softmax(q k^T * scale);  o = (att * mask) v, heads merged. In place in att, o."""
    xp = get_xp(q)
    N = att.shape[-1]
    # k^T copied to contiguous memory: OpenBLAS ran q @ (a k^T view) at half speed at cifar-small's 65x64 heads
    kT = scratch(k, k.shape[:2] + (k.shape[3], N), slot=2)
    xp.copyto(kT, k.swapaxes(-1, -2))                     # (b, nh, hs, N)  k^T
    matmul(q, kT, out=att)                                # (b, nh, N, N)  q k^T
    softmax_rows(att.reshape(-1, N), att.reshape(-1, N), scale)   # softmax(q k^T / sqrt(hs)), row by row
    att_d = att if mask is None else att * mask           # dropout on the probabilities
    matmul(att_d, v, out=o.transpose(0, 2, 1, 3))         # o[:, :, h] = A_h v_h, (b, N, nh, hs)


def _attention_grad_rows(q, k, v, att, do, dq, dk, dv, mask=None, *, scale):
    """One chunk of images: dq, dk, dv (b, nh, N, hs) in place, from do (b, nh, N, hs)."""
    xp = get_xp(q)
    N = att.shape[-1]
    datt = scratch(att, slot=0)                           # (b, nh, N, N)
    ds = scratch(att, slot=1)                             # (b, nh, N, N)
    att_d = att if mask is None else att * mask
    vT = scratch(v, v.shape[:2] + (v.shape[3], N), slot=2)
    xp.copyto(vT, v.swapaxes(-1, -2))                     # v^T in contiguous memory (as k^T in forward)
    matmul(do, vT, out=datt)                              # dA_d = do v^T
    matmul(att_d.swapaxes(-1, -2), do, out=dv)            # dv = A_d^T do
    if mask is not None:
        datt *= mask                                      # dA = dA_d * mask
    softmax_grad_rows(datt.reshape(-1, N), att.reshape(-1, N), ds.reshape(-1, N), scale)   # ds, 1/sqrt(hs) in
    matmul(ds, k, out=dq)                                 # dq = ds k
    matmul(ds.swapaxes(-1, -2), q, out=dk)                # dk = ds^T q


def attention_forward(x, p, heads, train=False, rng=None, attn_dropout=0.0, proj_dropout=0.0):
    """x: (B, N, D) -> (B, N, D)   (twin of attention.attention_forward; the same dropout draws)"""
    xp = get_xp(x)
    B, N, D = x.shape
    nh, hs = heads, D // heads
    scale = 1.0 / math.sqrt(hs)
    qkv, qkv_cache = linear_forward(x, p["qkv_w"], p["qkv_b"])          # (B, N, 3D)
    q, k, v = qkv.reshape(B, N, 3, nh, hs).transpose(2, 0, 3, 1, 4)     # (B, nh, N, hs) each (views)
    att = xp.empty((B, nh, N, N), x.dtype)                              # (B, nh, N, N)  A
    o = xp.empty((B, N, nh, hs), x.dtype)                               # (B, N, nh, hs): heads merged in memory
    # the dropout mask, drawn for the whole batch at once (the same draw as dropout_forward(A))
    mask = keep_mask(att.shape, attn_dropout, rng, x.dtype, xp) if train and attn_dropout > 0 else None
    masks = () if mask is None else (mask,)
    row_blocks(partial(_attention_rows, scale=scale), q, k, v, att, o, *masks)   # chunks of images
    y, proj_cache = linear_forward(o.reshape(B, N, D), p["proj_w"], p["proj_b"])   # (B, N, D)
    y, proj_drop_cache = dropout_forward(y, proj_dropout, train, rng)
    return y, FastAttentionCache(qkv_cache, q, k, v, att, mask, scale, proj_cache, proj_drop_cache)


def attention_backward(dy, cache):
    """dy: (B, N, D) -> dx, grads {qkv_w, qkv_b, proj_w, proj_b}   (twin of attention.attention_backward)"""
    c = cache
    xp = get_xp(dy)
    B, nh, N, hs = c.q.shape
    D = nh * hs
    dy = dropout_backward(dy, c.proj_drop)
    do, dproj_w, dproj_b = linear_backward(dy, c.proj)                  # fwd: y = o @ proj_w + proj_b
    do = do.reshape(B, N, nh, hs).transpose(0, 2, 1, 3)                 # (B, nh, N, hs): heads split (a view)
    # fwd: o = A_d v, A = softmax(q k^T / sqrt(hs)); dq, dk, dv are written straight into dqkv, laid out as qkv
    dqkv = xp.empty((B, N, 3, nh, hs), dy.dtype)                        # (B, N, 3, nh, hs) = (B, N, 3D)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)                          # (B, nh, N, hs) each (views)
    masks = () if c.mask is None else (c.mask,)
    row_blocks(partial(_attention_grad_rows, scale=c.scale), c.q, c.k, c.v, c.att, do, dq, dk, dv, *masks)
    dx, dqkv_w, dqkv_b = linear_backward(dqkv.reshape(B, N, 3 * D), c.qkv)   # fwd: qkv = x @ qkv_w + qkv_b
    return dx, {"qkv_w": dqkv_w, "qkv_b": dqkv_b, "proj_w": dproj_w, "proj_b": dproj_b}
