"""Driving normcore._cuda's backend functions the way the front end does, for the simulator
tests: flat contiguous x, float64 parameter cells and statistics, a Plan per call.

CASES covers every norm, both layouts and every GPU path (rows / runs / columns, and the three
ways of reducing dweight / dbias) at the tiny launch sizes of SIM_CONFIG.
"""
import numpy as np

from normcore import _plan

# Launch sizes for the simulator (about 3 ms per simulated thread and syncthreads): tiny
# blocks, and splits small enough that the tiny shapes below still take several chunks.
SIM_CONFIG = dict(THREADS=4, COLUMN_THREADS=(4, 2), MAX_BLOCKS=6, TARGET_BLOCKS=6,
                  MIN_CHUNK=4, MIN_COLUMN_ROWS=2, RUN_MIN=4, FEW_ROWS=4, ROW_SPLIT=16)

# (id, norm, shape, keywords, expected (path, cells) under SIM_CONFIG)
CASES = [
    ("bn-first", "batch", (3, 2, 5), dict(axis=1), ("runs", "runs")),
    ("bn-last", "batch", (3, 5, 2), dict(axis=-1), ("columns", "columns")),
    ("bn-2d", "batch", (7, 3), dict(axis=1), ("columns", "columns")),
    ("in-first", "instance", (2, 3, 9), dict(axis=1), ("rows", "rows")),
    ("in-first-few-long", "instance", (1, 2, 40), dict(axis=1), ("runs", "runs")),
    ("in-last", "instance", (2, 9, 3), dict(axis=-1), ("columns", "columns")),
    ("gn-first", "group", (2, 4, 5), dict(axis=1, num_groups=2), ("rows", "rows")),
    ("gn-first-short", "group", (2, 4, 3), dict(axis=1, num_groups=2), ("rows", "columns")),
    ("gn-last", "group", (2, 5, 4), dict(axis=-1, num_groups=2), ("columns", "columns")),
    ("gn-last-wide", "group", (2, 3, 8), dict(axis=-1, num_groups=1), ("runs", "columns")),
    ("ln", "layer", (3, 7), dict(axis=-1), ("rows", "columns")),
    ("ln-2axes", "layer", (2, 3, 5), dict(axis=(-2, -1)), ("rows", "columns")),
]


def plan_for(norm, shape, kw):
    if norm == "batch":
        return _plan.plan_batch_norm(shape, kw["axis"], 1)
    if norm == "instance":
        return _plan.plan_instance_norm(shape, kw["axis"], 1)
    if norm == "group":
        return _plan.plan_group_norm(shape, kw["num_groups"], kw["axis"], 1)
    return _plan.plan_layer_norm(shape, kw["axis"], 1)


def stats_dtype(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def forward_train(backend, plan, x, weight, bias, eps=1e-5, want_var=False):
    """(y, mean, rstd, var) from backend.forward_train, shaped like x / the statistics."""
    y = np.empty(x.size, x.dtype)
    mean, rstd, var = backend.forward_train(
        plan, np.ascontiguousarray(x).reshape(-1), y, weight.reshape(-1).astype(np.float64),
        bias.reshape(-1).astype(np.float64), eps, stats_dtype(x.dtype), want_var)
    return y.reshape(x.shape), mean.reshape(plan.stats_shape), rstd.reshape(plan.stats_shape), var


def normalize(backend, plan, x, mean, rstd, weight, bias):
    y = np.empty(x.size, x.dtype)
    backend.normalize(plan, np.ascontiguousarray(x).reshape(-1), y,
                      np.asarray(mean, np.float64).reshape(-1),
                      np.asarray(rstd, np.float64).reshape(-1),
                      weight.reshape(-1).astype(np.float64), bias.reshape(-1).astype(np.float64))
    return y.reshape(x.shape)


def backward(backend, plan, dy, x, mean, rstd, weight, frozen):
    """(dx, dweight, dbias) from backend.backward, dweight / dbias shaped like weight."""
    dx = np.empty(x.size, x.dtype)
    dweight, dbias = backend.backward(
        plan, np.ascontiguousarray(dy).reshape(-1), np.ascontiguousarray(x).reshape(-1), dx,
        np.asarray(mean, np.float64).reshape(-1), np.asarray(rstd, np.float64).reshape(-1),
        weight.reshape(-1).astype(np.float64), frozen)
    return dx.reshape(x.shape), dweight.reshape(weight.shape), dbias.reshape(weight.shape)
