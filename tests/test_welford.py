"""Mergeable statistics: welford against the oracle, merge_moments over any split of a batch
(empty parts included), exactness for constant data, PopulationStats (Algorithm 2) and
synchronized BatchNorm across processes."""
import dataclasses
import functools
import itertools
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import oracle
import pytest
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

import normcore as nc


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((5, 4, 3), None), ((5, 4, 3), 0), ((5, 4, 3), (0, 2)),
                                         ((2, 3, 4, 5), (0, 2, 3)), ((6, 70), -1),
                                         ((3, 4, 5), (1,))])
def test_welford_matches_oracle(shape, axis, dtype, rng):
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    m = nc.welford(x, axis=axis)
    mean, var = oracle.moments(x, axis)
    n = x.size // max(mean.size, 1)
    assert m.count == n and m.mean.dtype == np.float64 and m.mean.shape == mean.shape
    assert_close(m.mean, mean, dtype=np.float64, n=n, scale=np.abs(x).max(), what="mean")
    assert_close(m.m2, var * n, dtype=np.float64, n=n, what="m2")
    assert_close(m.var(correction=1), var * n / (n - 1), dtype=np.float64, n=n, what="var")


@st.composite
def splits(draw):
    """A batch, a reduced axis set that contains axis 0, and cut points along axis 0 (parts may
    be empty)."""
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    n0 = draw(st.integers(0, 12))
    shape = (n0, *shape)
    other = draw(st.sets(st.integers(1, len(shape) - 1)))
    cuts = sorted(draw(st.lists(st.integers(0, n0), max_size=4)))
    return shape, (0, *sorted(other)), cuts, draw(st.integers(0, 2**32 - 1)), \
        draw(st.floats(-1e3, 1e3))


@given(splits())
def test_merge_of_any_split_equals_whole(case):
    shape, axis, cuts, seed, offset = case
    x = offset + np.random.default_rng(seed).standard_normal(shape)
    bounds = [0, *cuts, shape[0]]
    parts = [nc.welford(x[a:b], axis=axis) for a, b in itertools.pairwise(bounds)]
    merged = functools.reduce(nc.merge_moments, parts)
    whole = nc.welford(x, axis=axis)
    n = whole.count
    assert merged.count == n
    if n == 0:
        assert np.all(merged.mean == 0) and np.all(merged.m2 == 0)
        return
    cond = 1 + abs(offset)
    assert_close(merged.mean, whole.mean, dtype=np.float64, n=n, cond=cond,
                 scale=np.abs(x).max(), what="mean")
    assert_close(merged.m2, whole.m2, dtype=np.float64, n=n, cond=cond, scale=n, what="m2")


def test_merge_with_array_counts_and_empty_parts():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    ma, mb = nc.welford(a, axis=0), nc.welford(b, axis=0)
    empty = nc.Moments(np.zeros(4, np.int64), np.zeros(4), np.zeros(4))
    ma = nc.Moments(np.full(4, ma.count), ma.mean, ma.m2)       # counts as an array
    merged = nc.merge_moments(nc.merge_moments(empty, ma), nc.merge_moments(mb, empty))
    whole = nc.welford(np.concatenate([a, b]), axis=0)
    assert np.array_equal(merged.count, np.full(4, 8))
    assert_close(merged.mean, whole.mean, dtype=np.float64, n=8)
    assert_close(merged.m2, whole.m2, dtype=np.float64, n=8)
    both_empty = nc.merge_moments(empty, empty)
    assert np.array_equal(both_empty.mean, np.zeros(4)) and np.isnan(both_empty.var()).all()


def test_constant_data_merges_exactly():
    c = 0.1 + 2**-20
    parts = [nc.welford(np.full((k, 3), c), axis=0) for k in (0, 1, 7, 0, 13, 2)]
    merged = functools.reduce(nc.merge_moments, parts)
    assert merged.count == 23
    assert np.all(merged.mean == c) and np.all(merged.m2 == 0)


def test_moments_var_and_errors():
    m = nc.welford(np.array([1.0, 2.0, 4.0]))
    assert m.var() == pytest.approx(14 / 9) and m.var(correction=1) == pytest.approx(7 / 3)
    assert np.isnan(nc.welford(np.array([5.0])).var(correction=1))
    empty = nc.welford(np.zeros((0, 2)), axis=0)
    assert empty.count == 0 and np.array_equal(empty.mean, np.zeros(2))
    with pytest.raises(TypeError, match="b: expected normcore.Moments"):
        nc.merge_moments(m, (1, 2.0, 0.0))
    with pytest.raises(TypeError, match="x: expected a float16"):
        nc.welford(np.arange(4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.count = 3


def test_population_stats_are_exact_over_uneven_batches(rng):
    batches = [rng.standard_normal((n, 4, 3, 3)) * 2 + 1 for n in (5, 1, 8, 3)]
    pop = nc.PopulationStats(axis=1)
    for x in batches:
        pop.update(x)
    every = np.concatenate(batches)
    mean, var = oracle.moments(every, (0, 2, 3), correction=1)
    n = every.size // 4
    assert_close(pop.running_mean, mean, dtype=np.float64, n=n, scale=np.abs(every).max())
    assert_close(pop.running_var, var, dtype=np.float64, n=n)
    y = nc.batch_norm(every, running_mean=pop.running_mean, running_var=pop.running_var,
                      training=False)
    assert_close(y, (every - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5),
                 dtype=np.float64, n=n)


def test_population_stats_channels_last_and_errors(rng):
    pop = nc.PopulationStats(axis=-1)
    with pytest.raises(ValueError, match="PopulationStats: expected at least one update"):
        _ = pop.running_mean
    x = rng.standard_normal((6, 5, 3))
    pop.update(x).update(x)
    assert_close(pop.running_mean, x.reshape(-1, 3).mean(0), dtype=np.float64, n=30)
    with pytest.raises(ValueError, match="x: expected 3 channels along axis -1"):
        pop.update(np.zeros((6, 5, 4)))
    with pytest.raises(TypeError, match="x: expected an array, got list"):
        pop.update([1.0, 2.0])


def test_public_functions_pickle_by_reference():
    assert pickle.loads(pickle.dumps(nc.welford)) is nc.welford
    m = nc.welford(np.arange(6.0))
    assert pickle.loads(pickle.dumps(m)) == m


def test_synchronized_batch_norm_across_processes(rng):
    """Each process holds a shard of the batch; (count, mean, m2) merge into the statistics of
    the whole batch, and each shard normalized with them equals BatchNorm of the whole."""
    x = rng.standard_normal((12, 4, 5, 5)) * 3 + 1
    w, b = rng.random(4) + 0.5, rng.standard_normal(4)
    shards = np.array_split(x, [3, 3, 10])                 # uneven, one empty shard
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(functools.partial(nc.welford, axis=(0, 2, 3)), shards))
    total = functools.reduce(nc.merge_moments, parts)
    y = np.concatenate([nc.batch_norm(s, w, b, running_mean=total.mean,
                                      running_var=total.var(), training=False) for s in shards])
    assert_close(y, nc.batch_norm(x, w, b), dtype=np.float64, n=x.size // 4)
