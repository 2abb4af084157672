"""Large fresh outputs come from normcore._outputs' cache of freed outputs: a block is reused
only once nothing views it, the cache stays within its limit, and threads share it safely.
Most tests lower POOL_MIN so that small arrays take the cached path."""
import gc
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import normcore as nc
from normcore import _outputs


@pytest.fixture
def cache(monkeypatch):
    """The cache from 4 KiB up, emptied before and after the test."""
    monkeypatch.setattr(_outputs, "POOL_MIN", 1 << 12)
    previous = nc.set_output_cache(0)
    nc.set_output_cache(previous)
    yield _outputs
    nc.set_output_cache(0)
    nc.set_output_cache(previous)


def _address(a):
    return a.__array_interface__["data"][0]


def test_freed_output_is_reused(cache, rng):
    x = rng.standard_normal((64, 256), dtype=np.float32)          # 64 KiB
    y = nc.layer_norm(x)
    first, expected = _address(y), y.copy()
    assert type(y) is np.ndarray and y.flags.c_contiguous and y.flags.writeable
    del y
    assert cache.cache_info()["idle_blocks"] == 1
    y = nc.layer_norm(x)
    assert _address(y) == first
    assert cache.cache_info()["idle_blocks"] == 0
    np.testing.assert_array_equal(y, expected)


def test_a_view_keeps_its_block(cache, rng):
    x = rng.standard_normal((64, 256), dtype=np.float32)
    row = nc.layer_norm(x)[3]                     # the output itself is gone, its view is not
    kept = row.copy()
    ys = [nc.layer_norm(x + i) for i in range(3)]
    assert all(_address(row) - 3 * 256 * 4 != _address(y) for y in ys)
    np.testing.assert_array_equal(row, kept)
    del ys, row
    assert cache.cache_info()["idle_blocks"] == 4


def test_strided_inputs_are_copied_into_cached_blocks(cache, rng):
    x = rng.standard_normal((8, 16, 64), dtype=np.float32)
    view = np.moveaxis(x, 1, -1)                        # channels-last view, not contiguous
    expected = nc.batch_norm(np.ascontiguousarray(view), axis=-1)
    nc.set_output_cache(0)
    nc.set_output_cache(1 << 20)
    y = nc.batch_norm(view, axis=-1)
    np.testing.assert_array_equal(y, expected)
    assert cache.cache_info()["idle_blocks"] == 1        # the copy, back after the call
    first = cache.cache_info()["hits"]
    del y
    nc.batch_norm(view, axis=-1)
    assert cache.cache_info()["hits"] == first + 2      # the copy and the output reused


def test_backward_outputs_and_residual_gradient(cache, rng):
    x = rng.standard_normal((8, 16, 64), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    f = nc.batch_norm_forward(x, activation="relu", residual=x)
    g = nc.batch_norm_backward(dy, x, f.mean, f.rstd, activation="relu", y=f.y, residual=True)
    assert isinstance(g.dx.base, _outputs._Lease)
    assert isinstance(g.dresidual.base, _outputs._Lease)
    nc.set_output_cache(0)
    g0 = nc.batch_norm_backward(dy, x, f.mean, f.rstd, activation="relu", y=f.y, residual=True)
    assert g0.dx.base is None and g0.dresidual.base is None
    np.testing.assert_array_equal(g.dx, g0.dx)
    np.testing.assert_array_equal(g.dresidual, g0.dresidual)


def test_limit_drops_the_oldest_blocks(cache, rng):
    x = rng.standard_normal((16, 256), dtype=np.float32)          # 16 KiB outputs
    nc.set_output_cache(40 << 10)
    ys = [nc.layer_norm(x), nc.layer_norm(x), nc.layer_norm(x)]
    addresses = [_address(y) for y in ys]
    for i in range(3):             # freed first to last (deleting the list frees last first)
        ys[i] = None
    info = cache.cache_info()
    assert info["idle_blocks"] == 2 and info["idle_bytes"] == 32 << 10
    y1, y2 = nc.layer_norm(x), nc.layer_norm(x)
    assert {_address(y1), _address(y2)} == set(addresses[1:])
    del y1, y2
    assert nc.set_output_cache(0) == 40 << 10
    assert cache.cache_info()["idle_bytes"] == 0


def test_blocks_serve_their_own_size_only(cache, rng):
    big = nc.layer_norm(rng.standard_normal((16, 256), dtype=np.float32))
    where = _address(big)
    del big
    small = nc.layer_norm(rng.standard_normal((8, 256), dtype=np.float32))
    assert _address(small) != where
    del small
    info = cache.cache_info()
    assert info["idle_blocks"] == 2 and info["idle_bytes"] == 24 << 10


def test_blocks_above_the_limit_are_not_kept(cache, rng):
    nc.set_output_cache(8 << 10)
    y = nc.layer_norm(rng.standard_normal((16, 256), dtype=np.float32))
    assert y.base is None and y.flags.owndata       # plain np.empty: it could never be kept
    del y
    assert cache.cache_info()["idle_bytes"] == 0


def test_outputs_in_a_collected_cycle_come_back(cache, rng):
    x = rng.standard_normal((64, 256), dtype=np.float32)
    loop = [nc.layer_norm(x)]
    loop.append(loop)
    del loop
    gc.collect()
    assert cache.cache_info()["idle_blocks"] == 1


def test_release_inside_a_critical_section_drops_the_block(cache):
    # a collection that starts while this thread holds the lock finalizes the lease there
    block = _outputs._take(1 << 12)
    _outputs._holder[0] = threading.get_ident()
    try:
        _outputs._release(block)
    finally:
        _outputs._holder[0] = None
    assert cache.cache_info()["idle_blocks"] == 0


def test_threads_share_the_cache(cache, rng):
    xs = [rng.standard_normal((32, 512), dtype=np.float32) + i for i in range(8)]
    expected = [nc.layer_norm(x, out=np.empty_like(x)) for x in xs]

    def work(i):
        ys = [nc.layer_norm(xs[i]) for _ in range(20)]     # held together: distinct blocks
        assert len({_address(y) for y in ys}) == len(ys)
        return ys[-1]

    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(work, range(len(xs))), expected):
                np.testing.assert_array_equal(got, want)
    info = cache.cache_info()
    assert info["hits"] > 0 and info["idle_bytes"] <= info["max_bytes"]


def test_default_size_threshold(rng):
    """Outputs from 32 MiB up use the cache, smaller ones are np.empty's."""
    small = nc.layer_norm(rng.standard_normal((16, 64), dtype=np.float32))
    assert small.base is None
    x = np.ones((_outputs.POOL_MIN // 4 // 1024, 1024), np.float32)
    x[:, 0] = 0
    y = nc.layer_norm(x)
    assert isinstance(y.base, _outputs._Lease)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("value", [-1, 1.5, True, None])
def test_set_output_cache_rejects(value):
    with pytest.raises(ValueError, match="max_bytes: expected a non-negative int"):
        nc.set_output_cache(value)


def test_release_outlives_the_module_globals(cache, monkeypatch, rng):
    """At interpreter exit module globals become None before the last outputs die."""
    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    y = nc.layer_norm(rng.standard_normal((64, 256), dtype=np.float32))
    monkeypatch.setattr(cache, "_release", None)
    del y
    assert not raised and cache.cache_info()["idle_blocks"] == 1
