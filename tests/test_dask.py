"""dask arrays on a two-process LocalCluster: welford / moments stay lazy and merge per-chunk
kernel moments in dask's tree reduction; batch_norm normalizes chunk by chunk with the global
statistics; all against the NumPy path on the same data."""
import functools

import numpy as np
import pytest
from helpers import assert_close

import normcore as nc

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("dask.distributed")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                  dashboard_address=None, host="127.0.0.1") as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.fixture
def data(rng):
    x = rng.standard_normal((10, 6, 7, 3)) * 3 + 5
    return x, da.from_array(x, chunks=(3, 4, 7, 2))      # uneven chunks on every axis


@pytest.mark.parametrize("axis", [None, 0, (0, 2, 3), (1, 3), -1])
def test_welford_and_moments_are_lazy_and_match_numpy(client, data, axis):
    x, dx = data
    m, ref = nc.welford(dx, axis=axis), nc.welford(x, axis=axis)
    assert isinstance(m.mean, da.Array) and m.count == ref.count
    mean, m2 = client.compute([m.mean, m.m2], sync=True)
    assert mean.shape == ref.mean.shape and m2.shape == ref.m2.shape
    assert_close(mean, ref.mean, dtype=np.float64, n=m.count, cond=2, scale=np.abs(x).max())
    assert_close(m2, ref.m2, dtype=np.float64, n=m.count)
    got = nc.moments(dx.astype(np.float32), axis=axis, correction=1)
    assert all(isinstance(g, da.Array) for g in got)
    for g, e in zip(client.compute(got, sync=True),
                    nc.moments(x.astype(np.float32), axis=axis, correction=1)):
        assert g.dtype == np.float32
        assert_close(g, e, dtype=np.float32, n=m.count, cond=2)


def test_batch_norm_training_updates_numpy_running_statistics(client, data, rng):
    x, dx = data
    w, b = rng.random(6) + 0.5, rng.standard_normal(6)
    rm, rv, rm_ref, rv_ref = np.zeros(6), np.ones(6), np.zeros(6), np.ones(6)
    f = nc.batch_norm_forward(dx, w, b, running_mean=rm, running_var=rv)
    ref = nc.batch_norm_forward(x, w, b, running_mean=rm_ref, running_var=rv_ref)
    assert isinstance(f.y, da.Array) and f.running_mean is rm
    n = x.size // 6
    assert_close(rm, rm_ref, dtype=np.float64, n=n, cond=2)
    assert_close(rv, rv_ref, dtype=np.float64, n=n, cond=2)
    y, mean, rstd = client.compute([f.y, f.mean, f.rstd], sync=True)
    assert_close(y, ref.y, dtype=np.float64, n=n, cond=2)
    assert_close(mean, ref.mean, dtype=np.float64, n=n, cond=2, scale=np.abs(x).max())
    assert_close(rstd, ref.rstd, dtype=np.float64, n=n, cond=2)


def test_batch_norm_lazy_running_statistics_eval_and_channels_last(client, data, rng):
    x, dx = data
    f = nc.batch_norm_forward(dx, running_mean=da.zeros(6), running_var=da.ones(6))
    ref = nc.batch_norm_forward(x, running_mean=np.zeros(6), running_var=np.ones(6))
    rm, rv = client.compute([f.running_mean, f.running_var], sync=True)
    assert_close(rm, ref.running_mean, dtype=np.float64, n=210, cond=2)
    assert_close(rv, ref.running_var, dtype=np.float64, n=210, cond=2)
    y = nc.batch_norm(dx, running_mean=rm, running_var=rv, training=False,
                      activation="relu", residual=dx)
    assert_close(y.compute(), nc.batch_norm(x, running_mean=rm, running_var=rv, training=False,
                                            activation="relu", residual=x),
                 dtype=np.float64, n=210, cond=2)
    w = rng.random(3)
    assert_close(nc.batch_norm(dx, w, axis=-1).compute(), nc.batch_norm(x, w, axis=-1),
                 dtype=np.float64, n=420, cond=2)


def test_synchronized_batch_norm_on_workers(client, rng):
    """Each worker computes its shard's moments; merged on the client they are the whole
    batch's, and BatchNorm of each shard with them equals BatchNorm of the whole batch."""
    x = rng.standard_normal((9, 4, 6)) * 2 - 1
    shards = np.array_split(x, [2, 2, 7])                 # uneven, one empty
    parts = client.gather(client.map(functools.partial(nc.welford, axis=(0, 2)), shards))
    total = functools.reduce(nc.merge_moments, parts)
    y = np.concatenate([nc.batch_norm(s, running_mean=total.mean, running_var=total.var(),
                                      training=False) for s in shards])
    assert_close(y, nc.batch_norm(x), dtype=np.float64, n=54)


def test_dask_errors(data):
    _, dx = data
    with pytest.raises(TypeError, match="x: dask arrays work with moments, welford"):
        nc.layer_norm(dx)
    with pytest.raises(TypeError, match="x: expected a float16 or float32 or float64"):
        nc.welford(da.ones((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"weight: expected shape \(6,\)"):
        nc.batch_norm(dx, np.ones(5))
    with pytest.raises(ValueError, match="running_mean: expected running statistics"):
        nc.batch_norm(dx, training=False)
    with pytest.raises(ValueError, match="correction: expected a number >= 0"):
        nc.moments(dx, correction=-1)
