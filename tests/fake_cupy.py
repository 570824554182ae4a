"""NumPy standing in for CuPy, so that the lines only a GPU runs can run (and be checked) on the CPU.

`NumpyAsCupy` is a module to install as sys.modules["cupy"] (monkeypatch.setitem). Its arrays are `DeviceArray`s,
a NumPy subclass that plays the part of GPU memory: `get_xp` returns this module for them (and numpy for plain
arrays), so every `xp is not np` branch of the package runs, and, as with real CuPy, an operation that mixes a
device array with a host array of one or more dimensions raises TypeError, `asarray` copies host data in and
`.get()` copies it back. `ElementwiseKernel` evaluates the fused kernel's CUDA body with NumPy (`run_gpu_source`)
into the arrays passed, and refuses host arrays and mixed dtypes, as CuPy does.

What this cannot check is CuPy itself: its compilation of the kernels (test_kernels.py compiles them with NVRTC),
their results on a GPU (the tests marked requires_gpu), and C semantics in a kernel body that Python reads
differently (`1 / 2` is 0 in C, 0.5 here: the bodies write every constant as a float for that reason). Python
scalars and 0-d host arrays pass, as NumPy scalars do in CuPy.
"""
import contextlib
import re
import types

import numpy as np

from minivit.fast.rows import GPU_SOURCES


def run_gpu_source(name, **arrays):
    """Evaluate the body of GPU kernel `name` with NumPy: the CUDA statements are plain arithmetic, so dropping the
    (T) casts and the `T` declarations leaves Python. Returns the output variables."""
    params, outs, body = GPU_SOURCES[name]
    env = {"tanh": np.tanh, "sqrt": np.sqrt, **arrays}
    for decl in outs.split(","):
        env.setdefault(decl.split()[-1], None)
    code = re.sub(r"\(T\)", "", body)
    code = re.sub(r"\bT\s+(\w+)\s*=", r"\1 =", code)
    for statement in code.split(";"):
        if statement.strip():
            exec(statement.strip(), {"__builtins__": {}}, env)
    return [env[decl.split()[-1]] for decl in outs.split(",")]


def _refuse_host(values, where):
    """TypeError if `values` (nested lists/tuples/dicts) hold a host array of one or more dimensions."""
    for v in values:
        if isinstance(v, (list, tuple)):
            _refuse_host(v, where)
        elif isinstance(v, dict):
            _refuse_host(v.values(), where)
        elif isinstance(v, np.ndarray) and not isinstance(v, DeviceArray) and v.ndim > 0:
            raise TypeError(f"a host array {v.shape} {v.dtype} was given to {where} with device arrays "
                            f"(CuPy refuses this: move it with to_device / cupy.asarray first)")


def _host_operand(x, where):
    """One operand of a ufunc: a device array as a plain view; a host array of one or more dimensions refused.
    (The flat, fast form of _refuse_host + _host: ufuncs are most of the calls.)"""
    if type(x) is DeviceArray:
        return x.view(np.ndarray)
    if isinstance(x, np.ndarray) and x.ndim > 0 and not isinstance(x, DeviceArray):
        _refuse_host((x,), where)
    return x


def _host(x):
    """Device arrays (nested) as plain ndarray views, for NumPy to compute on."""
    if isinstance(x, DeviceArray):
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_host(v) for v in x)
    if isinstance(x, dict):
        return {k: _host(v) for k, v in x.items()}
    return x


def _device(x):
    """NumPy results (nested) as device arrays; NumPy scalars from reductions become 0-d arrays, as in CuPy."""
    if isinstance(x, np.ndarray) and not isinstance(x, DeviceArray):
        return x.view(DeviceArray)
    if isinstance(x, np.generic):
        return np.asarray(x).view(DeviceArray)
    if isinstance(x, tuple):
        return tuple(_device(v) for v in x)
    return x


class DeviceArray(np.ndarray):
    """An array "in GPU memory": NumPy computes on it, but not together with host arrays."""

    def get(self):
        """A host copy (cupy.ndarray.get)."""
        return np.array(self.view(np.ndarray), copy=True)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        where = f"{ufunc.__name__}.{method}"
        if out is not None:
            kwargs["out"] = tuple(_host_operand(o, where) for o in out)
        result = getattr(ufunc, method)(*(_host_operand(a, where) for a in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _device(result)

    def __array_function__(self, func, types, args, kwargs):
        _refuse_host((args, kwargs), f"numpy.{func.__name__}")
        return _device(func(*_host(args), **_host(kwargs)))


class _MemoryPool:
    """CuPy's default memory pool, as far as the package uses it: malloc and the bytes in use (only what goes
    through malloc: NumPy allocates the arrays itself)."""

    def __init__(self):
        self.used = 0

    def malloc(self, size):
        self.used += size
        return size

    def used_bytes(self):
        return self.used


class NumpyAsCupy(types.ModuleType):
    """NumPy under the name cupy, with DeviceArray as its ndarray. `calls` records the kernels that ran, `syncs`
    the device synchronizations, `allocator` the allocator in force (the pool's malloc unless replaced)."""
    ndarray = DeviceArray

    def __init__(self):
        super().__init__("cupy")
        self.calls, self.syncs = [], 0
        self.pool = _MemoryPool()
        self.allocator = self.pool.malloc
        outer = self

        class ElementwiseKernel:
            def __init__(self, params, outs, body, name):
                self.kernel = name.removeprefix("minivit_")
                self.ins = [d.split()[-1] for d in params.split(",")]
                self.outs = [d.split()[-1] for d in outs.split(",")]

            def __call__(self, *args):
                _refuse_host(args, f"kernel {self.kernel}")
                dtypes = {a.dtype for a in args if isinstance(a, np.ndarray)}
                if len(dtypes) > 1:
                    raise TypeError(f"Type is mismatched in kernel {self.kernel}: {sorted(map(str, dtypes))}")
                outer.calls.append(self.kernel)
                values = run_gpu_source(self.kernel, **dict(zip(self.ins + self.outs, _host(args))))
                for out, value in zip(args[len(self.ins):], values):
                    np.copyto(out.view(np.ndarray), value)

        class Device:
            def synchronize(self):
                outer.syncs += 1

        @contextlib.contextmanager
        def using_allocator(allocator):
            before, self.allocator = self.allocator, allocator
            try:
                yield
            finally:
                self.allocator = before

        self.ElementwiseKernel = ElementwiseKernel
        self.cuda = types.SimpleNamespace(Device=Device, using_allocator=using_allocator,
                                          runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))

    def is_available(self):
        return True

    def get_default_memory_pool(self):
        return self.pool

    def asarray(self, a, dtype=None):
        """Host data are copied in; a device array of the dtype asked is returned as it is (as cupy.asarray)."""
        if isinstance(a, DeviceArray) and (dtype is None or a.dtype == dtype):
            return a
        return np.array(_host(a), dtype=dtype, copy=True).view(DeviceArray)

    def array(self, a, dtype=None, copy=True):
        return np.array(_host(a), dtype=dtype, copy=True).view(DeviceArray)

    def asnumpy(self, a):
        return a.get() if isinstance(a, DeviceArray) else np.asarray(a)

    def __getattr__(self, name):
        value = getattr(np, name)
        if isinstance(value, np.ufunc) or not callable(value) or isinstance(value, type):
            return value                                 # ufuncs: DeviceArray.__array_ufunc__ checks them

        def on_device(*args, **kwargs):                  # cupy.empty, cupy.zeros, cupy.concatenate, ...
            _refuse_host((args, kwargs), f"cupy.{name}")
            return _device(value(*_host(args), **_host(kwargs)))
        return on_device
