"""The error function erf(x) for NumPy and CuPy arrays (NumPy has none), for the exact GELU.

    erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt
"""
import math

import numpy as np

from minivit.backend import get_xp

# Float32: a rational approximation erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (the form vectorized math libraries such
# as Eigen use; |error| < 1e-7, i.e. float32 rounding), and erf = +-1 beyond 4, where 1 - erf(4) = 1.5e-8.
_ERF32_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF32_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)


def erf(x):
    """x: any shape -> erf(x), same dtype.

    float64: accurate to float64 rounding (a few ulp), so float64 gradient checks of the exact GELU reach 1e-10:
      |x| < 2:  erf(x) = 2/sqrt(pi) exp(-x^2) sum_n (2x^2)^n x / (1*3*...*(2n+1))   (all terms positive:
                no cancellation);
      |x| >= 2: erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))   (continued fraction).
    float32 (and float16): the rational approximation above, computed in the input dtype.
    """
    xp = get_xp(x)
    if x.dtype != np.float64:
        xc = xp.clip(x, -4.0, 4.0)
        x2 = xc * xc
        p = xp.full_like(x, _ERF32_P[0])
        for c in _ERF32_P[1:]:
            p = p * x2 + c
        q = xp.full_like(x, _ERF32_Q[0])
        for c in _ERF32_Q[1:]:
            q = q * x2 + c
        return xc * p / q
    ax = xp.abs(x)
    small = ax < 2.0
    xs = xp.where(small, ax, 0.0)                        # series branch (|x| < 2)
    x2 = xs * xs
    term, total = xs.copy(), xs.copy()
    for n in range(1, 80):
        term = term * (2.0 * x2) / (2 * n + 1)
        total += term
    erf_small = (2.0 / math.sqrt(math.pi)) * xp.exp(-x2) * total
    xl = xp.where(small, 2.0, ax)                        # continued-fraction branch (|x| >= 2)
    f = xl.copy()
    for k in range(100, 0, -1):
        f = xl + (0.5 * k) / f
    erf_large = 1.0 - xp.exp(-xl * xl) / (math.sqrt(math.pi) * f)
    return xp.sign(x) * xp.where(small, erf_small, erf_large)
