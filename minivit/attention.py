"""Multi-head scaled dot-product self-attention, forward and backward: the reference, the math as written.

Shapes (glossary in layers.py): x (B, N, D); q, k, v (B, nh, N, hs); attention (B, nh, N, N).

    qkv = x @ qkv_w + qkv_b                      qkv_w (D, 3D): columns [q | k | v], each split into nh heads
    A = softmax(q k^T / sqrt(hs))                one (N, N) matrix per image and head; rows sum to 1
    o = A v, heads concatenated                  (B, N, D)
    y = o @ proj_w + proj_b

The cache is an `AttentionCache`; its `att` is A (B, nh, N, N), which the analysis code reads. The fast twin
(minivit/fast/attention.py) computes the same on chunks of images that stay in cache.
"""
import math
from typing import NamedTuple

from minivit.backend import get_xp
from minivit.layers import (dropout_backward, dropout_forward, linear_backward, linear_forward, softmax_backward,
                            softmax_forward)


class AttentionCache(NamedTuple):
    qkv: tuple            # linear cache of the qkv projection
    q: object             # (B, nh, N, hs)
    k: object             # (B, nh, N, hs)
    v: object             # (B, nh, N, hs)
    softmax: tuple        # softmax cache: (A, scale)
    att_drop: tuple       # dropout cache of A
    att_d: object         # (B, nh, N, N) A after dropout (A itself without)
    proj: tuple           # linear cache of the output projection
    proj_drop: tuple      # dropout cache of the output

    @property
    def att(self):
        """A = softmax(q k^T / sqrt(hs)): (B, nh, N, N), the attention probabilities."""
        return self.softmax[0]


def attention_forward(x, p, heads, train=False, rng=None, attn_dropout=0.0, proj_dropout=0.0):
    """x: (B, N, D), p: {qkv_w (D, 3D), qkv_b (3D,), proj_w (D, D), proj_b (D,)} -> (B, N, D)."""
    B, N, D = x.shape
    nh, hs = heads, D // heads
    qkv, qkv_cache = linear_forward(x, p["qkv_w"], p["qkv_b"])          # (B, N, 3D)
    q, k, v = qkv.reshape(B, N, 3, nh, hs).transpose(2, 0, 3, 1, 4)     # (B, nh, N, hs) each
    s = q @ k.swapaxes(-1, -2)                                          # (B, nh, N, N)  q k^T
    att, softmax_cache = softmax_forward(s, 1.0 / math.sqrt(hs))        # (B, nh, N, N)  A = softmax(s / sqrt(hs))
    att_d, att_drop_cache = dropout_forward(att, attn_dropout, train, rng)
    o = att_d @ v                                                       # (B, nh, N, hs)
    o = o.transpose(0, 2, 1, 3).reshape(B, N, D)                        # (B, N, D): heads concatenated
    y, proj_cache = linear_forward(o, p["proj_w"], p["proj_b"])         # (B, N, D)
    y, proj_drop_cache = dropout_forward(y, proj_dropout, train, rng)
    return y, AttentionCache(qkv_cache, q, k, v, softmax_cache, att_drop_cache, att_d, proj_cache, proj_drop_cache)


def attention_backward(dy, cache):
    """dy: (B, N, D) -> dx (B, N, D), grads {qkv_w, qkv_b, proj_w, proj_b}.

    o = A_d v, A_d = drop(A):   dA_d = do v^T,  dv = A_d^T do,  dA = drop_backward(dA_d)
    A = softmax(s / sqrt(hs)):  ds = A * (dA - sum_j dA * A) / sqrt(hs)
    s = q k^T:                  dq = ds k,  dk = ds^T q
    """
    c = cache
    xp = get_xp(dy)
    B, nh, N, hs = c.q.shape
    D = nh * hs
    dy = dropout_backward(dy, c.proj_drop)                              # fwd: y = drop(y)
    do, dproj_w, dproj_b = linear_backward(dy, c.proj)                  # fwd: y = o @ proj_w + proj_b
    do = do.reshape(B, N, nh, hs).transpose(0, 2, 1, 3)                 # (B, nh, N, hs): heads split
    datt_d = do @ c.v.swapaxes(-1, -2)                                  # (B, nh, N, N)  fwd: o = A_d v
    dv = c.att_d.swapaxes(-1, -2) @ do                                  # (B, nh, N, hs)
    datt = dropout_backward(datt_d, c.att_drop)                         # fwd: A_d = drop(A)
    ds = softmax_backward(datt, c.softmax)                              # (B, nh, N, N)  fwd: A = softmax(s / sqrt(hs))
    dq = ds @ c.k                                                       # (B, nh, N, hs) fwd: s = q k^T
    dk = ds.swapaxes(-1, -2) @ c.q                                      # (B, nh, N, hs)
    dqkv = xp.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4)              # (B, N, 3, nh, hs): laid out as qkv
    dx, dqkv_w, dqkv_b = linear_backward(dqkv.reshape(B, N, 3 * D), c.qkv)   # fwd: qkv = x @ qkv_w + qkv_b
    return dx, {"qkv_w": dqkv_w, "qkv_b": dqkv_b, "proj_w": dproj_w, "proj_b": dproj_b}
