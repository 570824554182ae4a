"""`minivit bench --profile`: each operation's own time in a step.

Kept apart from the rest of the benchmark because it monkeypatches: while a `Profiler` is entered, every
`*_forward`, `*_backward` and `optimizer_step` attribute of the package's model modules is replaced by a timed
wrapper (on every module that binds it), and restored on exit. Code reaches the wrappers only through those module
attributes, as the model's own calls do and as `runner.MinivitRunner.step` does on purpose.
"""
import importlib
import time


class Profiler:
    """Exclusive time per operation: each wrapped call's time minus the time of wrapped calls inside it."""

    MODULES = ("minivit.layers", "minivit.attention", "minivit.reference", "minivit.fast", "minivit.fast.layers",
               "minivit.fast.attention", "minivit.fast.optim", "minivit.model", "minivit.loss", "minivit.optim")

    def __init__(self, sync=None):
        self.sync = sync or (lambda: None)
        self.totals, self.calls, self._stack, self._saved = {}, {}, [], []

    @staticmethod
    def op_name(fn_name):
        for suffix, kind in (("_forward", "forward"), ("_backward", "backward")):
            if fn_name.endswith(suffix):
                return f"{fn_name[:-len(suffix)]} {kind}"
        return fn_name

    def _wrap(self, fn):
        name = self.op_name(fn.__name__)

        def timed(*args, **kwargs):
            self.sync()
            self._stack.append(0.0)                 # time spent in wrapped callees
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                inner = self._stack.pop()
                if self._stack:
                    self._stack[-1] += dt
                self.totals[name] = self.totals.get(name, 0.0) + dt - inner
                self.calls[name] = self.calls.get(name, 0) + 1
        timed.__wrapped__ = fn
        return timed

    def __enter__(self):
        wrappers = {}
        for modname in self.MODULES:
            mod = importlib.import_module(modname)
            for attr, fn in list(vars(mod).items()):
                if not callable(fn) or not getattr(fn, "__module__", "").startswith("minivit"):
                    continue
                if attr.endswith(("_forward", "_backward")) or attr == "optimizer_step":
                    if fn not in wrappers:
                        wrappers[fn] = self._wrap(fn)
                    self._saved.append((mod, attr, fn))
                    setattr(mod, attr, wrappers[fn])
        return self

    def __exit__(self, *exc):
        for mod, attr, fn in reversed(self._saved):
            setattr(mod, attr, fn)
        self._saved.clear()

    def table(self, steps):
        """{op: {"ms": ms per step, "calls": calls per step}}, largest first."""
        order = sorted(self.totals, key=self.totals.get, reverse=True)
        return {k: {"ms": self.totals[k] * 1e3 / steps, "calls": self.calls[k] // steps} for k in order}
