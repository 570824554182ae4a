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
    back = to_numpy(to_device(tree, "cpu"))
    assert back["a"][0] is x and back["a"][1] is None          # the CPU copies nothing; None passes through


def test_set_threads_validates_and_sets(monkeypatch):
    from minivit import threads
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_threads", None)
    libs = threads.blas_controllers()
    before = [lib.get_num_threads() for lib in libs]
    try:
        assert threads.set_threads(1) is bool(libs)
        assert threads.num_threads() == 1 and threads.os.environ["OPENBLAS_NUM_THREADS"] == "1"
        assert [lib.get_num_threads() for lib in libs] == [1] * len(libs)
    finally:
        for lib, n in zip(libs, before):
            lib.set_num_threads(n)
        threads.set_num_threads(None)
    with pytest.raises(ValueError, match="threads must be a positive integer, got 0"):
        threads.set_threads(0)


def test_every_array_routine_the_package_calls_exists_in_cupy():
    """Every routine the package takes from its array module (`xp.name`, `xp.a.b`, `self.xp.name`,
    `get_xp(x).name`) is an attribute of CuPy too, so the one code path runs on both: checked by reading the
    source, no GPU needed (skips without CuPy). Names only: not their signatures."""
    cupy = pytest.importorskip("cupy")
    calls = {}
    for path in sorted(pathlib.Path(__file__).parents[1].joinpath("minivit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            parts, base = [], node
            while isinstance(base, ast.Attribute):           # self.xp.cuda.Device -> ["xp", "cuda", "Device"]
                parts.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id == "xp":
                name = parts
            elif isinstance(base, ast.Call) and getattr(base.func, "id", None) == "get_xp":
                name = parts
            elif "xp" in parts:
                name = parts[parts.index("xp") + 1:]
            else:
                continue
            if name:
                calls.setdefault(".".join(name), path.name)
    assert {"matmul", "tanh", "exp", "empty_like", "multiply", "get_default_memory_pool", "cuda.using_allocator"} \
        <= set(calls)                                        # the scan finds the layers' and the bench's calls

    def has(module, dotted):
        for part in dotted.split("."):
            if not hasattr(module, part):
                return False
            module = getattr(module, part)
        return True
    missing = {name: where for name, where in calls.items() if not has(cupy, name)}
    assert not missing, f"not in CuPy: {missing}"
