"""Device selection and the errors for a missing CuPy or GPU."""
import ast
import pathlib
import sys
import types

import numpy as np
import pytest

from minivit.backend import DeviceError, get_backend, get_xp, resolve_device, to_device, to_numpy


def test_resolve_device(monkeypatch):
    monkeypatch.delenv("MINIVIT_DEVICE", raising=False)
    assert resolve_device() == "cpu"
    monkeypatch.setenv("MINIVIT_DEVICE", "gpu")
    assert resolve_device() == "gpu"
    assert resolve_device("cpu") == "cpu"        # the argument wins over the environment
    monkeypatch.setenv("MINIVIT_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MINIVIT_DEVICE must be one of"):
        resolve_device()
    with pytest.raises(ValueError, match="device argument must be one of .* got 'npu'"):
        resolve_device("npu")


def test_gpu_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)   # makes `import cupy` raise ImportError
    with pytest.raises(DeviceError, match=r"CuPy, which is not installed.*minivit\[cuda12\]"):
        get_backend("gpu")


def test_gpu_with_cupy_but_no_gpu(monkeypatch):
    fake = types.ModuleType("cupy")
    fake.is_available = lambda: False
    fake.ndarray = type("ndarray", (), {})
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(DeviceError, match="CuPy is installed but no usable CUDA GPU"):
        get_backend("gpu")


def test_cpu_helpers_are_numpy():
    x = np.ones(3)
    assert get_xp(x) is np and get_backend("cpu") is np
    tree = {"a": [x, None], "b": 3}
    assert to_device(tree, "cpu")["b"] == 3
    assert to_numpy(to_device(tree, "cpu"))["a"][0] is not None


def test_set_threads_validates_and_sets(monkeypatch):
    from minivit import backend
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(backend, "_threads", None)
    before = backend._openblas()[1]() if backend._openblas() else None
    try:
        backend.set_threads(1)
        assert backend.num_threads() == 1 and backend.os.environ["OPENBLAS_NUM_THREADS"] == "1"
        if before is not None:
            assert backend._openblas()[1]() == 1
    finally:
        if before is not None:
            backend._openblas()[0](before)
        backend.set_num_threads(None)
    with pytest.raises(ValueError, match="threads must be a positive integer, got 0"):
        backend.set_threads(0)


def test_every_array_routine_the_package_calls_exists_in_cupy():
    """Every `xp.name` (and `xp.a.b`) in the package's source is an attribute of CuPy too, so the one code path
    runs on both: checked by reading the source, no GPU needed (skips without CuPy)."""
    cupy = pytest.importorskip("cupy")
    calls = {}
    for path in sorted(pathlib.Path(__file__).parents[1].joinpath("minivit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            parts = []
            while isinstance(node, ast.Attribute):       # xp.cuda.Device -> ["Device", "cuda"], then Name xp
                parts.append(node.attr)
                node = node.value
            if parts and isinstance(node, ast.Name) and node.id == "xp":
                calls.setdefault(".".join(reversed(parts)), path.name)
    assert {"matmul", "tanh", "exp", "empty_like"} <= set(calls)     # the scan found the layers' calls

    def has(module, dotted):
        for part in dotted.split("."):
            if not hasattr(module, part):
                return False
            module = getattr(module, part)
        return True
    missing = {name: where for name, where in calls.items() if not has(cupy, name)}
    assert not missing, f"not in CuPy: {missing}"
