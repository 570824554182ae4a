"""NumPy standing in for CuPy, so that the lines only a GPU runs can run (and be checked) on the CPU.

`run_gpu_source` evaluates a fused kernel's CUDA body with NumPy; `NumpyAsCupy` is a module to install as
sys.modules["cupy"] (monkeypatch.setitem): its `ndarray` is NumPy's, so `get_xp` takes every array for a CuPy one
and every `xp is not np` branch of the package runs. What this cannot check is CuPy itself (its kernels'
compilation is checked by NVRTC in test_kernels.py; their results on a real GPU by the tests marked requires_gpu).
"""
import re
import types

import numpy as np

import minivit.backend as backend


def run_gpu_source(name, **arrays):
    """Evaluate the body of GPU kernel `name` with NumPy: the CUDA statements are plain arithmetic, so dropping the
    (T) casts and the `T` declarations leaves Python. Returns the output variables."""
    params, outs, body = backend._GPU_SOURCES[name]
    env = {"tanh": np.tanh, "sqrt": np.sqrt, **arrays}
    for decl in outs.split(","):
        env.setdefault(decl.split()[-1], None)
    code = re.sub(r"\(T\)", "", body)
    code = re.sub(r"\bT\s+(\w+)\s*=", r"\1 =", code)
    for statement in code.split(";"):
        if statement.strip():
            exec(statement.strip(), {"__builtins__": {}}, env)
    return [env[decl.split()[-1]] for decl in outs.split(",")]


class _MemoryPool:
    """CuPy's default memory pool, as far as the package uses it: malloc and the bytes in use (here only what
    goes through malloc, as NumPy allocates the arrays itself)."""

    def __init__(self):
        self.used = 0

    def malloc(self, size):
        self.used += size
        return size

    def used_bytes(self):
        return self.used


class NumpyAsCupy(types.ModuleType):
    """NumPy under the name cupy. ElementwiseKernel evaluates the kernel's body (run_gpu_source) and writes the
    outputs into the arrays passed, as CuPy does; `calls` records which kernels ran, `syncs` the device
    synchronizations, `allocators` what cuda.set_allocator was given."""
    ndarray = np.ndarray

    def __init__(self):
        super().__init__("cupy")
        self.calls, self.syncs, self.allocators = [], 0, []
        self.pool = _MemoryPool()
        outer = self

        class ElementwiseKernel:
            def __init__(self, params, outs, body, name):
                self.kernel = name.removeprefix("minivit_")
                self.ins = [d.split()[-1] for d in params.split(",")]
                self.outs = [d.split()[-1] for d in outs.split(",")]

            def __call__(self, *args):
                outer.calls.append(self.kernel)
                values = run_gpu_source(self.kernel, **dict(zip(self.ins + self.outs, args)))
                for out, value in zip(args[len(self.ins):], values):
                    np.copyto(out, value)

        class Device:
            def synchronize(self):
                outer.syncs += 1

        self.ElementwiseKernel = ElementwiseKernel
        self.cuda = types.SimpleNamespace(Device=Device, set_allocator=self.allocators.append,
                                          runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))

    def is_available(self):
        return True

    def get_default_memory_pool(self):
        return self.pool

    def __getattr__(self, name):
        return getattr(np, name)
