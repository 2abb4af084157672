"""Fresh NumPy outputs of POOL_MIN bytes or more, from a bounded cache of freed outputs.

glibc serves allocations above 32 MiB with a fresh mmap and unmaps them on free (and hands
smaller ones' pages back when its heap's top runs free), so such an output costs a page fault
per 4 KiB page on its first write: LayerNorm (8192, 1024) forward
with fresh outputs took 4.4-5.7 ms here against 1.7-2.4 ms into a reused `out=` buffer. Each
large output normcore returns is therefore a plain ndarray over a block of anonymous memory
that goes back to this module when the output (and every view of it) is gone, and the next
output of the same size reuses it, pages already mapped. At most `max_bytes` of idle blocks
are kept (oldest dropped first); ``set_output_cache(0)`` turns the cache off.

The chain that returns a block: output.base is a `_Lease` (an ndarray subclass over the
block) and lease.base the mmap. NumPy collapses a view's base to the first array that owns
its data or differs in type, so views of the output keep the output alive, the output keeps
the lease alive, and the lease's __del__ runs only when no view of the block is left.
"""
import mmap
import os
import threading

import numpy as np

# From here up (NumPy's own threshold for asking for huge pages) outputs come from the cache.
# Above glibc's mmap threshold (up to 32 MiB) every allocation is a fresh mapping; below it,
# the heap gives the pages back whenever more than twice that threshold lies free at its top,
# which a program that frees other large arrays between calls does often: the bench's default
# run (numpy and torch peers interleaved) saw fresh 25.7 MB outputs 1.3-1.9x slower than into
# out=. A cache hit costs ~4 us, the faults of a 4 MiB output (4 KiB pages, zeroed) ~0.5 ms.
POOL_MIN = 1 << 22
MAX_BYTES = 1 << 29

_lock = threading.Lock()
_idle = []                      # mmaps, oldest first
_state = {"max_bytes": MAX_BYTES, "idle_bytes": 0, "hits": 0, "misses": 0}
_holder = [None]                # the thread inside a critical section


class _Critical:
    """The lock, with the holding thread recorded for _release. Not a contextlib
    contextmanager: its generator and wrapper object are code that a call after the kernels'
    streams finds evicted (~60 us of every fresh output, taken and given back)."""

    __slots__ = ()

    def __enter__(self):
        _lock.acquire()
        _holder[0] = threading.get_ident()

    def __exit__(self, *exc):
        _holder[0] = None
        _lock.release()


_critical = _Critical()


def _release(block):
    # Runs from __del__, in whichever thread dropped the last view, possibly from a garbage
    # collection that started inside this thread's own critical section: then the block is
    # simply unmapped (waiting for the lock would wait forever, and re-entering it would move
    # the list under the loop in _take).
    try:
        if _holder[0] == threading.get_ident():
            return
        with _critical:
            if len(block) <= _state["max_bytes"]:
                _idle.append(block)
                _state["idle_bytes"] += len(block)
                while _state["idle_bytes"] > _state["max_bytes"]:
                    _state["idle_bytes"] -= len(_idle.pop(0))
    except Exception:   # interpreter shutdown: module globals already gone
        pass


class _Lease(np.ndarray):
    """The bytes of one block while an output uses them."""

    def __del__(self, release=_release):   # bound now: module globals are gone at exit
        release(self.base)


# Private anonymous memory, as malloc's: mmap.mmap(-1, n) maps it shared (shmem), and kernels
# wrote into such blocks slower here (BatchNorm (256, 256, 14, 14) eval 2.97-3.25 ms against
# 2.51-2.87 private and 2.48 into np.empty's memory, in one process; with fresh outputs,
# A/B against shared blocks: its eval 1.15-1.21x, training forward 1.07-1.20x, LayerNorm
# (8192, 1024) / (16384, 1024) forward 0.80-1.15x / 0.96-1.05x).
_PRIVATE = ({"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS}
            if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS") else {})


def _take(nbytes):
    block = None
    with _critical:
        for i in range(len(_idle) - 1, -1, -1):
            if len(_idle[i]) == nbytes:
                block = _idle.pop(i)
                _state["idle_bytes"] -= nbytes
                break
        _state["hits" if block is not None else "misses"] += 1
    if block is None:
        block = mmap.mmap(-1, nbytes, **_PRIVATE)
        try:
            block.madvise(mmap.MADV_HUGEPAGE)     # as NumPy does for its allocations of 4 MiB+
        except (AttributeError, OSError):
            pass
    return block


def empty(shape, dtype):
    """np.empty(shape, dtype), from the cache when it is large enough to be worth it."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if nbytes < POOL_MIN or _state["max_bytes"] < nbytes:
        return np.empty(shape, dtype)
    lease = np.ndarray.__new__(_Lease, (nbytes,), np.uint8, buffer=_take(nbytes))
    return np.ndarray(shape, dtype, buffer=lease)


def set_output_cache(max_bytes):
    """Keep at most `max_bytes` of freed output blocks for reuse (default 512 MiB; 0 turns the
    cache off and releases what it holds). Only NumPy outputs of 4 MiB or more use it: their
    memory would otherwise be mapped afresh, and page-faulted, on every call (above 32 MiB) or
    whenever glibc's heap gives its free top back (below). Returns the previous limit.

    >>> normcore.set_output_cache(0)          # every output from np.empty
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes: expected a non-negative int, got {max_bytes!r}")
    dropped = []
    with _critical:
        previous = _state["max_bytes"]
        _state["max_bytes"] = max_bytes
        while _state["idle_bytes"] > max_bytes:
            dropped.append(_idle.pop(0))
            _state["idle_bytes"] -= len(dropped[-1])
    del dropped         # unmapped outside the lock
    return previous


def cache_info():
    """{'max_bytes', 'idle_bytes', 'idle_blocks', 'hits', 'misses'}: for tests and tuning."""
    info = dict(_state)
    info["idle_blocks"] = len(_idle)
    return info


def _after_fork():
    global _lock
    _lock = threading.Lock()    # a fork while another thread held it would leave it held
    _holder[0] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
