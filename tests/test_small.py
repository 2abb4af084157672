"""The small-call path (normcore._small): LayerNorm and BatchNorm calls it serves give what the
general path gives, bit for bit, and every call it must not serve reaches the general path."""
import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normcore as nc
from normcore import _outputs, _small


def _general(monkeypatch):
    """Route every call to the general path from here on."""
    monkeypatch.setattr(_small, "_prepare", lambda key: None)
    monkeypatch.setattr(_small, "_signatures", {})


def _served(mp):
    """A list that records, for each call into the small path, whether it served it."""
    served = []
    for name in [f"{norm}_norm_{op}" for norm in ("layer", "rms", "batch", "instance", "group")
                 for op in ("forward", "backward")]:
        def recording(*args, _small_call=getattr(_small, name)):
            result = _small_call(*args)
            served.append(result is not None)
            return result
        mp.setattr(_small, name, recording)
    return served


def _read_only(a):
    a.setflags(write=False)
    return a


def _same(got, want):
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert type(g) is type(w) and g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g, w, equal_nan=True)


@st.composite
def ln_calls(draw):
    """LayerNorm (or RMSNorm: the last draw) calls."""
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=4)))
    if draw(st.booleans()):     # a few long rows (B > 4096: flat), or sizes for the threads
        shape = draw(st.sampled_from([(1, 4500), (2, 4500), (2, 40000), (64, 1024),
                                      (300, 130)]))
    k = draw(st.integers(1, len(shape)))
    axis = -1 if k == 1 and draw(st.booleans()) else tuple(range(-k, 0))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    params = draw(st.sampled_from(["same", "float64", "none", "weight only"]))
    seed = draw(st.integers(0, 2**16))
    return shape, axis, np.dtype(dtype), params, seed, draw(st.booleans()), draw(st.booleans())


def _inputs(shape, axis, dtype, params, seed, outs=False):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ps = shape[-1:] if axis == -1 else shape[len(shape) - len(axis):]
    pdt = np.float64 if params == "float64" else dtype
    w = (rng.random(ps) + 0.5).astype(pdt)
    b = rng.random(ps).astype(pdt)
    if params == "none":
        w = b = None
    elif params == "weight only":
        b = None
    return x, dy, w, b


@given(ln_calls())
def test_small_layer_norm_calls_match_the_general_path(call):
    shape, axis, dtype, params, seed, outs, rms = call
    x, dy, w, b = _inputs(*call[:-1])

    def calls():
        out, dx_out = (np.empty_like(x), np.empty_like(x)) if outs else (None, None)
        if rms:
            f = nc.rms_norm_forward(x, w, axis=axis, out=out)
            g = nc.rms_norm_backward(dy, x, f.rstd, w, axis=axis, dx_out=dx_out)
        else:
            f = nc.layer_norm_forward(x, w, b, axis=axis, out=out)
            g = nc.layer_norm_backward(dy, x, f.mean, f.rstd, w, axis=axis, dx_out=dx_out)
        if outs:
            assert f.y is out and g.dx is dx_out
        return f, g

    _small._signatures.clear()
    with pytest.MonkeyPatch.context() as mp:
        served = _served(mp)
        f, g = calls()
    assert served == [True, True]       # (a test of a path that it skipped could not fail)
    with pytest.MonkeyPatch.context() as mp:
        _general(mp)
        f0, g0 = calls()
    _same(f, f0)
    _same(g, g0)


@st.composite
def channel_calls(draw):
    norm = draw(st.sampled_from(["batch", "instance", "group"]))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=2, max_size=4)))
    if draw(st.booleans()):     # long spatial runs (the row / flat kernels), or many rows
        shape = draw(st.sampled_from([(2, 4, 16, 16), (3, 2, 1100), (64, 40), (300, 8),
                                      (256, 1024), (8, 16, 32, 32), (2, 3, 40000)]))
    axis = draw(st.sampled_from([1, -1]))
    C = shape[axis]
    groups = draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]))
    dtype = np.dtype(draw(st.sampled_from([np.float16, np.float32, np.float64])))
    params = draw(st.sampled_from(["same", "float64", "none", "weight only"]))
    running = (None if norm == "group"
               else draw(st.sampled_from([None, np.float32, np.float64])))
    batch_stats = draw(st.booleans()) or running is None
    return (norm, shape, axis, groups, dtype, params, draw(st.integers(0, 2**16)),
            draw(st.booleans()), running, batch_stats)


def _channel_norm_calls(norm, groups, x, dy, w, b, axis, stats, batch_stats, outs):
    """A forward and a backward, on copies of the running statistics."""
    rm, rv = (None, None) if stats is None else (stats[0].copy(), stats[1].copy())
    out, dx_out = (np.empty_like(x), np.empty_like(x)) if outs else (None, None)
    kw = dict(axis=axis)
    if norm == "group":
        f = nc.group_norm_forward(x, groups, w, b, out=out, **kw)
        g = nc.group_norm_backward(dy, x, f.mean, f.rstd, groups, w, dx_out=dx_out, **kw)
    else:
        flag = {"batch": "training", "instance": "use_input_stats"}[norm]
        kw[flag] = batch_stats
        f = getattr(nc, f"{norm}_norm_forward")(x, w, b, running_mean=rm, running_var=rv,
                                                 out=out, **kw)
        g = getattr(nc, f"{norm}_norm_backward")(dy, x, f.mean, f.rstd, w, dx_out=dx_out, **kw)
        f = f._replace(running_mean=rm, running_var=rv)
    if outs:
        assert f.y is out and g.dx is dx_out
    return f, g


@given(channel_calls())
def test_small_channel_norm_calls_match_the_general_path(call):
    norm, shape, axis, groups, dtype, params, seed, outs, running, batch_stats = call
    x, dy, _, _ = _inputs(shape, -1, dtype, params, seed)
    C = shape[axis]
    rng = np.random.default_rng(seed)
    w, b = rng.random(C) + 0.5, rng.random(C)
    if params != "float64":
        w, b = w.astype(dtype), b.astype(dtype)
    if params == "none":
        w = b = None
    elif params == "weight only":
        b = None
    stats = None if running is None else (rng.random(C).astype(running),
                                          (rng.random(C) + 0.5).astype(running))
    n = x.size // {"batch": C, "instance": C * shape[0], "group": groups * shape[0]}[norm]
    args = (norm, groups, x, dy, w, b, axis, stats, batch_stats, outs)
    if batch_stats and n <= 1 and norm != "group":     # (a GroupNorm of one value is b)
        with pytest.raises(ValueError, match="more than 1"):
            _channel_norm_calls(*args)
        return
    _small._signatures.clear()
    with pytest.MonkeyPatch.context() as mp:
        served = _served(mp)
        f, g = _channel_norm_calls(*args)
    assert served == [True, True]       # (a test of a path that it skipped could not fail)
    with pytest.MonkeyPatch.context() as mp:
        _general(mp)
        f0, g0 = _channel_norm_calls(*args)
    _same(f, f0)
    _same(g, g0)


def test_the_small_path_serves_only_what_it_prepared(monkeypatch):
    """Calls outside the common case (a strided out=, an epilogue, strided x or dy, saved
    statistics in another dtype, overlapping running statistics, flags given as ints, fresh
    outputs from the output cache) go to the general path: the small path is not consulted or
    declines, and the general path gives what it gives without the small path."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 32)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b = rng.random(32).astype(np.float32), rng.random(32).astype(np.float32)
    f = nc.layer_norm_forward(x, w, b)
    fb = nc.batch_norm_forward(x, w, b)
    stats = np.stack([np.zeros(32), np.ones(32)]).astype(np.float32)

    def running(kind):
        s = stats.copy()
        return {"views": (s[0], s[1]), "same": (s[0], s[0]),
                "float16": tuple(s.astype(np.float16))}[kind]

    calls = [lambda: nc.layer_norm_forward(x, w, b, out=np.empty((32, 6), np.float32).T),
             lambda: nc.layer_norm_forward(x, w, b, activation="relu"),
             lambda: nc.layer_norm_forward(x, w, b, residual=x),
             lambda: nc.layer_norm_forward(np.asfortranarray(x), w, b),
             lambda: nc.layer_norm_forward(x[:, ::2], w[::2], b[::2]),
             lambda: nc.layer_norm_forward(x, w[::-1], b),
             lambda: nc.layer_norm_forward(x, w, b, eps=1),
             lambda: nc.layer_norm_forward(x[:0], w, b),
             lambda: nc.layer_norm_backward(dy, x, f.mean.astype(np.float64), f.rstd, w),
             lambda: nc.layer_norm_backward(np.asfortranarray(dy), x, f.mean, f.rstd, w),
             lambda: nc.batch_norm_forward(x, w, b, training=1),
             lambda: nc.batch_norm_forward(x, w, b, momentum=0),
             lambda: nc.batch_norm_forward(x, w, b, activation="relu"),
             lambda: nc.batch_norm_forward(x, w, b, *(), **dict(zip(
                 ("running_mean", "running_var"), running("same")))),
             lambda: nc.batch_norm_forward(x, w, b, training=False, **dict(zip(
                 ("running_mean", "running_var"), running("float16")))),
             lambda: nc.batch_norm_backward(dy, x, fb.mean, fb.rstd.astype(np.float64), w),
             lambda: nc.batch_norm_backward(dy, x, fb.mean, fb.rstd, w, training=0)]
    with pytest.MonkeyPatch.context() as mp:
        served = _served(mp)
        got = [call() for call in calls]
        assert not any(served)
        nc.batch_norm_forward(x, w, b, *(), **dict(zip(("running_mean", "running_var"),
                                                        running("views"))))
        assert served[-1] and not any(served[:-1])
        # fresh outputs the output cache serves (from POOL_MIN bytes, lowered here): served
        # too, each output from the cache
        mp.setattr(_outputs, "POOL_MIN", x.nbytes)
        got += [nc.layer_norm_forward(x, w, b), nc.batch_norm_forward(x, w, b),
                nc.layer_norm_backward(dy, x, f.mean, f.rstd, w),
                nc.batch_norm_backward(dy, x, fb.mean, fb.rstd, w)]
        assert all(served[-4:])
        assert all(type(g[0].base) is _outputs._Lease for g in got[-4:])
    calls += [lambda: nc.layer_norm_forward(x, w, b), lambda: nc.batch_norm_forward(x, w, b),
              lambda: nc.layer_norm_backward(dy, x, f.mean, f.rstd, w),
              lambda: nc.batch_norm_backward(dy, x, fb.mean, fb.rstd, w)]
    _general(monkeypatch)
    for g, call in zip(got, calls):
        _same(g, call())


@pytest.mark.parametrize("call", [
    lambda x, w: nc.layer_norm_forward(x, w[:-1]),
    lambda x, w: nc.layer_norm_forward(x, w.astype(np.int32)),
    lambda x, w: nc.layer_norm_forward(x, w, eps=0.0),
    lambda x, w: nc.layer_norm_forward(x, w, out=np.empty_like(x, dtype=np.float64)),
    lambda x, w: nc.layer_norm_backward(x, x, np.zeros(4, np.float32), np.ones(4, np.float32),
                                        w, dx_out=np.empty((4, 8), np.float32)[:, ::-1]
                                        .copy()[::2]),
    lambda x, w: nc.layer_norm_forward(x, w, axis=2),
    lambda x, w: nc.layer_norm_forward(x, w, axis=[-1]),
    lambda x, w: nc.layer_norm_backward(x[:, :-1], x, np.zeros(4, np.float32),
                                        np.ones(4, np.float32), w),
    lambda x, w: nc.layer_norm_backward(x, x, np.zeros(3, np.float32), np.ones(4, np.float32),
                                        w),
    lambda x, w: nc.layer_norm_backward(x.astype(np.float64), x, np.zeros(4, np.float32),
                                        np.ones(4, np.float32), w),
    lambda x, w: nc.batch_norm_forward(x, w, training=False),
    lambda x, w: nc.batch_norm_forward(x, w, running_mean=np.zeros(8, np.float32),
                                       running_var=np.ones(8, np.float32), momentum=2.0),
    lambda x, w: nc.batch_norm_forward(x, w, running_mean=np.zeros(8, np.float32),
                                       running_var=_read_only(np.ones(8, np.float32)),
                                       axis=-1),
    lambda x, w: nc.batch_norm_forward(x[:1], w),
    lambda x, w: nc.batch_norm_forward(x, w, axis=2),
    lambda x, w: nc.batch_norm_backward(x, x, np.zeros(8, np.float32), np.ones(8), w[:-1],
                                        axis=-1),
    lambda x, w: nc.group_norm_forward(x[:, :, None], 3, w, axis=1),
    lambda x, w: nc.group_norm_forward(x[:, :, None], True, w, axis=1),
    lambda x, w: nc.instance_norm_forward(x[:, :, None], w, use_input_stats=False),
    lambda x, w: nc.instance_norm_forward(x[:, :, None], w),
    lambda x, w: nc.rms_norm_forward(x, w, eps=-1.0),
    lambda x, w: nc.rms_norm_backward(x, x, np.ones(3, np.float32), w),
], ids=["weight shape", "weight dtype", "eps", "out dtype", "dx_out shape", "axis",
        "axis list", "dy shape", "mean shape", "dy dtype", "bn eval without running stats",
        "bn momentum", "bn read-only running stats", "bn one value per channel",
        "bn channel axis", "bn weight shape", "gn groups", "gn groups bool",
        "in eval without running stats", "in one value per channel", "rms eps", "rms rstd shape"])
def test_bad_small_calls_raise_what_the_general_path_raises(call, monkeypatch):
    x = np.ones((4, 8), np.float32)
    w = np.ones(8, np.float32)
    with pytest.raises(Exception) as small:
        call(x, w)
    _general(monkeypatch)
    with pytest.raises(Exception) as general:
        call(x, w)
    assert type(small.value) is type(general.value) and str(small.value) == str(general.value)


def test_signatures_stay_bounded(monkeypatch):
    monkeypatch.setattr(_small, "_signatures", {})
    monkeypatch.setattr(_small, "MAX_SIGNATURES", 4)
    for n in range(1, 11):
        x = np.ones((2, n), np.float32)
        nc.layer_norm_forward(x)
        assert 1 <= len(_small._signatures) <= 4


@pytest.mark.parametrize("call", [
    lambda x, v: nc.group_norm_forward(x, v, axis=1),
    lambda x, v: nc.batch_norm_forward(x[:, :, 0], axis=v),
    lambda x, v: nc.layer_norm_forward(x[0], axis=v),
], ids=["num_groups", "bn axis", "ln axis"])
@pytest.mark.parametrize("value", [True, 1.0, np.int64(1)], ids=["bool", "float", "int64"])
def test_values_equal_to_a_served_int_are_still_refused(call, value):
    """After a call with 1, a call with True, 1.0 or np.int64(1) (equal keys: 1 == True) raises
    as it does on its own; neither the small path's signatures nor the plans' caches let it
    through."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    call(x, 1)
    with pytest.raises(TypeError, match="expected an int"):
        call(x, value)


def test_dtypes_equal_to_a_served_one_keep_their_identity():
    """A float32 dtype with metadata (equal to float32, so an equal key) gets outputs of its own
    dtype from the general path, as it would without the small path; and the other way."""
    tagged = np.dtype(np.float32, metadata={"unit": "m"})
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    for first, second in ((x.astype(tagged), x), (x, x.astype(tagged))):
        _small._signatures.clear()
        for a in (first, second):
            y = nc.layer_norm_forward(a).y
            assert y.dtype.metadata == a.dtype.metadata


def test_signatures_allocate_nothing_before_a_call_is_served():
    """A broadcast view of 2**43 elements with a bad eps raises the eps error (the signature
    made for it allocated nothing: its shared parameter arrays come with the first call that
    needs them)."""
    x = np.broadcast_to(np.zeros((1, 1, 1), np.float32), (2**40, 4, 2))
    with pytest.raises(ValueError, match="eps"):
        nc.instance_norm_forward(x, eps=-1.0)


def _unaligned(a):
    """A copy of `a` whose data lies one byte past an element's alignment."""
    buf = np.zeros(a.nbytes + 8, np.uint8)
    u = buf[1:1 + a.nbytes].view(a.dtype).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned
    return u


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_later_calls_take_the_compiled_function_and_refuse_what_it_was_not_compiled_for(
        dtype, monkeypatch):
    """After a signature's first direct call, its LayerNorm calls run the row kernels' compiled
    function without Numba's dispatcher (_entry_point), and give the first call's results; an
    unaligned x, dy or out= (typed apart by Numba) goes to the general path instead, and a
    read-only x runs through a writable alias: the same values every time."""
    rng = np.random.default_rng(5)
    shape = (5, 48)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = rng.random(48).astype(dtype) + 0.5, rng.random(48).astype(dtype)
    _small._signatures.clear()
    first = nc.layer_norm_forward(x, w, b)
    grads = nc.layer_norm_backward(dy, x, first.mean, first.rstd, w)
    sig = _small._signature("layer", x, -1)
    assert sig.direct and sig.direct_backward
    # the compiled functions, in place of the first call's stand-ins and of the dispatchers
    for entry, dispatcher in ((sig.forward_entry, sig.rows_forward),
                              (sig.backward_entry, sig.rows_backward)):
        assert entry is not dispatcher and not inspect.isfunction(entry)
    served = _served(monkeypatch)
    out = _unaligned(np.zeros(shape, dtype))
    forwards = [nc.layer_norm_forward(x.copy(), w, b),
                nc.layer_norm_forward(_unaligned(x), w, b),
                nc.layer_norm_forward(x, w, b, out=out),
                nc.layer_norm_forward(_read_only(x.copy()), w, b)]
    assert served == [True, False, False, True]
    for f in forwards:
        _same(f[:3], first[:3])
    backwards = [nc.layer_norm_backward(dy.copy(), x, first.mean, first.rstd, w),
                 nc.layer_norm_backward(_unaligned(dy), x, first.mean, first.rstd, w)]
    assert served[4:] == [True, False]
    for g in backwards:
        _same(g, grads)
