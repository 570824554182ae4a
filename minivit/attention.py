"""Multi-head scaled dot-product self-attention, forward and backward.

Shapes (glossary in layers.py): x (B, N, D); q, k, v (B, nh, N, hs); attention (B, nh, N, N).

    qkv = x @ qkv_w + qkv_b                      qkv_w (D, 3D): columns [q | k | v], each split into nh heads
    A = softmax(q k^T / sqrt(hs))                one (N, N) matrix per image and head; rows sum to 1
    o = A v, heads concatenated                  (B, N, D)
    y = o @ proj_w + proj_b

The attention probabilities A of a forward pass stay in the cache (`cache[ATTN_PROBS]`); the analysis code reads
them from there.
"""
import math

from minivit.backend import get_xp, matmul
from minivit.layers import (dropout_backward, dropout_forward, linear_backward, linear_forward, softmax_backward,
                            softmax_forward)

ATTN_PROBS = 3   # index of A (B, nh, N, N) in the attention cache


def attention_forward(x, p, heads, train=False, rng=None, attn_dropout=0.0, proj_dropout=0.0):
    """x: (B, N, D), p: {qkv_w (D, 3D), qkv_b (3D,), proj_w (D, D), proj_b (D,)} -> (B, N, D).

    No head split or merge copies: q, k, v are strided views of the qkv output, and A v is written straight into
    a (B, N, nh, hs) array, which is o (B, N, D) with its heads merged.
    """
    xp = get_xp(x)
    B, N, D = x.shape
    nh, hs = heads, D // heads
    qkv, qkv_cache = linear_forward(x, p["qkv_w"], p["qkv_b"])          # (B, N, 3D)
    q, k, v = qkv.reshape(B, N, 3, nh, hs).transpose(2, 0, 3, 1, 4)     # (B, nh, N, hs) each (views)
    scores = matmul(q, k.swapaxes(-1, -2))                              # (B, nh, N, N)  q k^T
    att, att_cache = softmax_forward(scores, 1.0 / math.sqrt(hs), out=scores)   # softmax(q k^T / sqrt(hs)), in place
    att_d, drop_cache = dropout_forward(att, attn_dropout, train, rng)  # (B, nh, N, N)
    o = xp.empty((B, N, nh, hs), x.dtype)                               # (B, N, nh, hs): heads merged in memory
    matmul(att_d, v, out=o.transpose(0, 2, 1, 3))                       # o[:, :, h] = A_h v_h
    y, proj_cache = linear_forward(o.reshape(B, N, D), p["proj_w"], p["proj_b"])   # (B, N, D)
    y, proj_drop_cache = dropout_forward(y, proj_dropout, train, rng)
    return y, (qkv_cache, (q, k, v), att_d, att, drop_cache, proj_cache, proj_drop_cache, att_cache, heads)


def attention_backward(dy, cache):
    """dy: (B, N, D) -> dx (B, N, D), grads {qkv_w, qkv_b, proj_w, proj_b}.

    o = A v:                 dA = do v^T,  dv = A^T do
    A = softmax(s):          ds = A * (dA - sum_j dA * A)
    s = q k^T / sqrt(hs):    dq = ds k / sqrt(hs),  dk = ds^T q / sqrt(hs)
    """
    qkv_cache, (q, k, v), att_d, att, drop_cache, proj_cache, proj_drop_cache, att_cache, heads = cache
    xp = get_xp(dy)
    B, N, D = dy.shape
    nh, hs = heads, D // heads
    dy = dropout_backward(dy, proj_drop_cache)
    # fwd: y = o @ proj_w + proj_b
    do, dproj_w, dproj_b = linear_backward(dy, proj_cache)              # (B, N, D)
    do = do.reshape(B, N, nh, hs).transpose(0, 2, 1, 3)                 # (B, nh, N, hs): heads split (a view)
    # fwd: o = att_d @ v;  dq, dk, dv are written straight into dqkv, laid out as qkv
    dqkv = xp.empty((B, N, 3, nh, hs), dy.dtype)                        # (B, N, 3, nh, hs) = (B, N, 3D)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)                          # (B, nh, N, hs) each (views)
    datt_d = matmul(do, v.swapaxes(-1, -2))                             # (B, nh, N, N)
    matmul(att_d.swapaxes(-1, -2), do, out=dv)                          # dv = A^T do
    # fwd: att_d = dropout(att); att = softmax(scores / sqrt(hs))
    datt = dropout_backward(datt_d, drop_cache)
    dscores = softmax_backward(datt, att_cache)                         # (B, nh, N, N), 1/sqrt(hs) folded in
    # fwd: scores = q @ k^T
    matmul(dscores, k, out=dq)                                          # dq = ds k
    matmul(dscores.swapaxes(-1, -2), q, out=dk)                         # dk = ds^T q
    # fwd: qkv = x @ qkv_w + qkv_b
    dx, dqkv_w, dqkv_b = linear_backward(dqkv.reshape(B, N, 3 * D), qkv_cache)   # (B, N, D)
    return dx, {"qkv_w": dqkv_w, "qkv_b": dqkv_b, "proj_w": dproj_w, "proj_b": dproj_b}
