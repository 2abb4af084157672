"""Under pytest-xdist the workers share Numba's on-disk cache, but they start on the same tests
and compiled the same kernels side by side: in a fresh CI run on a 2-core AMD EPYC, 190
(kernel, signature) pairs were compiled by both workers, ~375 s of compilation in all. So that
the shared cache can serve them:

- a worker compiles a kernel of normcore.kernels.cpu for a signature under an inter-process
  lock on that pair, so that a worker that finds the other compiling it waits, then loads the
  result from the cache (Dispatcher.compile looks there first);
- the second worker starts by compiling the backward kernels (`warm_up`) while the first, on
  its first tests, compiles the forward ones.

The locks are taken under Numba's in-process compiler lock; a worker holds those of the
compilations on its stack, a path down the kernels' call graph, which is acyclic, so no two
workers wait on each other.
"""
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path


def install():
    """Lock each kernel's compilation across the xdist workers; nothing outside xdist or
    without an on-disk cache to share."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return False
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.dispatcher import Dispatcher

    from normcore.kernels import cpu
    if not type(cpu.rows_forward._cache).__name__.endswith("FunctionCache"):
        return False
    root = Path(tempfile.gettempdir()) / ("normcore-compiling-" + hashlib.sha1(
        cpu.__file__.encode()).hexdigest()[:12])
    root.mkdir(exist_ok=True)
    held = set()
    compile_ = Dispatcher.compile

    def compile(self, sig):
        func = self.py_func
        if func.__module__ != cpu.__name__ or "<" in func.__qualname__:
            return compile_(self, sig)
        key = hashlib.sha1(f"{func.__qualname__} {sig}".encode()).hexdigest()[:20]
        with global_compiler_lock:
            if key in held:
                return compile_(self, sig)
            with open(root / key, "w") as lock:      # closing it releases the lock
                fcntl.flock(lock, fcntl.LOCK_EX)
                held.add(key)
                try:
                    return compile_(self, sig)
                finally:
                    held.discard(key)

    Dispatcher.compile = compile
    return True


def warm_up():
    """The backward kernels the tests use most, float32 and float64, with and without ReLU:
    the parallel rows and columns and their serial twins."""
    import numpy as np

    import normcore as nc
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        stat = np.float32 if dtype == np.float32 else dtype
        for shape, axis in (((8, 4, 6, 6), 1), ((8, 6, 6, 4), -1), ((16, 32, 24, 24), 1),
                            ((32, 24, 24, 16), -1)):
            x = rng.standard_normal(shape).astype(dtype)
            mean = np.zeros(shape[axis], stat)
            for activation in (None, "relu"):
                nc.batch_norm_backward(x, x, mean, mean + 1, axis=axis, activation=activation,
                                       y=x)
        for shape in ((4, 64), (256, 1024)):
            x = rng.standard_normal(shape).astype(dtype)
            stats = np.zeros(shape[0], stat)
            for activation in (None, "relu"):
                nc.layer_norm_backward(x, x, stats, stats + 1, activation=activation, y=x)
