"""Fast twin of the Adam(W) update in minivit/optim.py (`adam_update`): the same update, on row blocks over the
threads (one scratch array, no other temporaries), and on CuPy as one fused kernel."""
import numpy as np

from minivit.backend import get_xp
from minivit.fast.rows import cuda_kernel, row_blocks, scratch

# m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p = p * decay - step m / (sqrt(v / c2) + eps)
_adam_gpu = cuda_kernel("adam", "T g, T b1, T b2, T eps, T c2, T step, T decay", "T p, T m, T v",
                        "m = b1 * m + ((T)1 - b1) * g; v = b2 * v + ((T)1 - b2) * (g * g);"
                        "p = p * decay - step * (m / (sqrt(v * ((T)1 / c2)) + eps))")


def _adam_rows(p, g, m, v, beta1, beta2, eps, c2, step_size, decay_factor):
    """The Adam(W) update of one block, in place in p, m, v."""
    xp = get_xp(p)
    tmp = scratch(g)
    xp.multiply(g, 1.0 - beta1, out=tmp)
    m *= beta1
    m += tmp                                                   # m = b1 m + (1 - b1) g
    xp.multiply(g, g, out=tmp)
    tmp *= 1.0 - beta2
    v *= beta2
    v += tmp                                                   # v = b2 v + (1 - b2) g^2
    if decay_factor is not None:
        p *= decay_factor                                      # decoupled decay: p -= lr wd p
    xp.multiply(v, 1.0 / c2, out=tmp)                          # vhat = v / (1 - b2^t)
    xp.sqrt(tmp, out=tmp)
    tmp += eps                                                 # sqrt(vhat) + eps
    xp.divide(m, tmp, out=tmp)                                 # m / (sqrt(vhat) + eps)
    tmp *= step_size
    p -= tmp                                                   # p -= lr mhat / (sqrt(vhat) + eps), mhat = m / c1


def adam_update(p, g, m, v, beta1, beta2, eps, c2, step_size, decay_factor=None):
    """In place on p, m, v   (twin of optim.adam_update)."""
    xp = get_xp(p)
    if xp is not np:
        _adam_gpu(g, beta1, beta2, eps, c2, step_size, 1.0 if decay_factor is None else decay_factor, p, m, v)
    elif p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous:
        # flat row blocks (views: the updates land in p, m, v), on all cores
        row_blocks(lambda *blk: _adam_rows(*blk, beta1, beta2, eps, c2, step_size, decay_factor),
                   p.reshape(-1), xp.ascontiguousarray(g).reshape(-1), m.reshape(-1), v.reshape(-1))
    else:
        _adam_rows(p, g, m, v, beta1, beta2, eps, c2, step_size, decay_factor)
