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
workers wait on each other (a save's lock is taken last and held alone). The lock files live
in the cache's folder.
"""
import fcntl
import hashlib
import os
from pathlib import Path

_installed = False


def install():
    """Lock each kernel's compilation across the xdist workers; nothing outside xdist, without
    an on-disk cache to share, or where the cache's folder takes no lock files."""
    global _installed
    if _installed or not os.environ.get("PYTEST_XDIST_WORKER"):
        return False
    from numba.core import sigutils
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.dispatcher import Dispatcher

    from normcore.kernels import cpu
    cache = cpu.rows_forward._cache
    if not type(cache).__name__.endswith("FunctionCache"):
        return False
    # beside the cache the workers share, so that another user's run cannot hold the folder
    root = Path(cache._cache_path) / "compiling"
    try:
        root.mkdir(exist_ok=True)
        open(root / "probe", "w").close()
    except OSError:
        return False
    held = set()
    compile_ = Dispatcher.compile

    def locked(key, call):
        with open(root / key, "w") as lock:      # closing it releases the lock
            fcntl.flock(lock, fcntl.LOCK_EX)
            held.add(key)
            try:
                return call()
            finally:
                held.discard(key)

    def compile(self, sig):
        func = self.py_func
        if func.__module__ != cpu.__name__ or "<" in func.__qualname__:
            return compile_(self, sig)
        with global_compiler_lock:
            args, _ = sigutils.normalize_signature(sig)
            key = hashlib.sha1(f"{func.__qualname__} {args}".encode()).hexdigest()[:20]
            if key in held or tuple(args) in self.overloads:
                return compile_(self, sig)
            return locked(key, lambda: compile_(self, sig))

    # Numba rewrites a function's cache index read-modify-write: two workers saving two
    # signatures of one function at once could both take the same data file's number
    save_ = type(cache).save_overload

    def save_overload(self, sig, data):
        index = str(getattr(self._cache_file, "_index_path", self._name))
        key = "save-" + hashlib.sha1(index.encode()).hexdigest()[:20]
        if key in held:
            return save_(self, sig, data)
        return locked(key, lambda: save_(self, sig, data))

    Dispatcher.compile = compile
    type(cache).save_overload = save_overload
    _installed = True
    return True


def warm_up():
    """The backward kernels the tests use most, float32 and float64, with and without ReLU:
    the parallel rows and columns and their serial twins."""
    import numpy as np

    import normcore as nc
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for shape, axis in (((8, 4, 6, 6), 1), ((8, 6, 6, 4), -1), ((16, 32, 24, 24), 1),
                            ((32, 24, 24, 16), -1)):
            x = rng.standard_normal(shape).astype(dtype)
            mean = np.zeros(shape[axis], dtype)
            for activation in (None, "relu"):
                nc.batch_norm_backward(x, x, mean, mean + 1, axis=axis, activation=activation,
                                       y=x)
        for shape in ((4, 64), (256, 1024)):
            x = rng.standard_normal(shape).astype(dtype)
            stats = np.zeros(shape[0], dtype)
            for activation in (None, "relu"):
                nc.layer_norm_backward(x, x, stats, stats + 1, activation=activation, y=x)
