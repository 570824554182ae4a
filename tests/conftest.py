"""Shared fixtures: the array backends every layer test runs on.

NumPy always; CuPy only when CuPy is installed and a CUDA GPU is usable, otherwise those cases are skipped with
the reason (no test needs a GPU); and NumPy standing in for CuPy (tests/fake_cupy.py), which runs the GPU lines
of the package everywhere.
"""
import sys

import numpy as np
import pytest

from minivit.backend import DeviceError, get_backend, import_cupy


def _cupy_or_reason():
    try:
        return import_cupy(), None
    except DeviceError as e:
        return None, str(e).split(".")[0]


CUPY, CUPY_REASON = _cupy_or_reason()
requires_gpu = pytest.mark.skipif(CUPY is None, reason=f"GPU backend unavailable: {CUPY_REASON}")


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=requires_gpu), "gpu-standin"])
def device(request, monkeypatch):
    """'cpu'; 'gpu' where CuPy and a GPU are present; and 'gpu' again under the id gpu-standin, with NumPy standing
    in for CuPy (tests/fake_cupy.py): every GPU line of the package runs, on the CPU, with or without a GPU."""
    if request.param == "gpu-standin":
        install_standin(monkeypatch)
        return "gpu"
    return request.param


def install_standin(monkeypatch):
    """Make NumPy stand in for CuPy for one test (undone after it); returns the stand-in module."""
    from fake_cupy import NumpyAsCupy
    import minivit.fast.rows
    fake = NumpyAsCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(minivit.fast.rows, "_gpu_kernels", {})
    return fake


@pytest.fixture
def xp(device):
    """The array module of `device`: numpy, or CuPy (real, or the stand-in)."""
    return np if device == "cpu" else get_backend("gpu")


def without_key_bias(params):
    """A flat parameter dict with each qkv bias's key part [D, 2D) removed (host arrays). Two runs that round
    differently cannot be compared there after an Adam step: that bias's gradient is 0 up to rounding (softmax
    ignores a shift shared by all scores), and Adam turns the rounding noise into lr-sized steps."""
    from minivit.backend import to_numpy
    out = {}
    for k, p in params.items():
        p = to_numpy(p)
        if k.endswith("attn.qkv_b"):
            D = p.size // 3
            p = np.delete(p, np.s_[D:2 * D])
        out[k] = p
    return out
