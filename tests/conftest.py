"""Shared fixtures: the array backends every layer test runs on.

NumPy always; CuPy only when CuPy is installed and a CUDA GPU is usable, otherwise those cases are skipped with
the reason (no test needs a GPU).
"""
import numpy as np
import pytest

from minivit.backend import DeviceError, import_cupy


def _cupy_or_reason():
    try:
        return import_cupy(), None
    except DeviceError as e:
        return None, str(e).split(".")[0]


CUPY, CUPY_REASON = _cupy_or_reason()
requires_gpu = pytest.mark.skipif(CUPY is None, reason=f"GPU backend unavailable: {CUPY_REASON}")


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=requires_gpu)])
def device(request):
    """'cpu', and 'gpu' where CuPy and a GPU are present."""
    return request.param


@pytest.fixture
def xp(device):
    return np if device == "cpu" else CUPY
