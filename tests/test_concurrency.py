"""Calls from several Python threads at once neither crash nor corrupt: the results equal the
single-threaded ones bit for bit (the kernels are deterministic). Numba's workqueue layer is
not thread-safe, so normcore serializes calls on it; that case runs in a subprocess, where an
abort would not take pytest down."""
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import normcore as nc

SCRIPT = textwrap.dedent("""
    import sys
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    import numba
    import normcore as nc

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((64, 16, 400), dtype=np.float32) for _ in range(8)]

    def work(x):
        f = nc.batch_norm_forward(x)
        g = nc.batch_norm_backward(x, x, f.mean, f.rstd)
        return f.y, g.dx

    expected = [work(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(work, xs))
            for (y, dx), (y0, dx0) in zip(got, expected):
                assert np.array_equal(y, y0) and np.array_equal(dx, dx0)
    print(numba.threading_layer())
""")


def _work(x):
    f = nc.layer_norm_forward(x)
    g = nc.layer_norm_backward(x, x, f.mean, f.rstd)
    return f.y, f.rstd, g.dx, g.dweight


def test_threads_get_the_single_threaded_results():
    rng = np.random.default_rng(0)
    # parallel kernels (large) and serial twins (small) at the same time
    xs = [rng.standard_normal((1024, 512) if i % 2 else (8, 32)) for i in range(12)]
    expected = [_work(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(_work, xs), expected):
                for a, b in zip(got, want):
                    assert np.array_equal(a, b)


def test_workqueue_layer_calls_are_serialized(tmp_path):
    env = {"NUMBA_THREADING_LAYER": "workqueue", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "workqueue"


WAIT_SCRIPT = textwrap.dedent("""
    import os
    import numpy as np
    import normcore as nc
    from normcore import _plan
    nc.batch_norm(np.ones((1024, 3, 96), np.float32))    # large: a parallel launch
    print(os.environ.get("OMP_WAIT_POLICY"), _plan.SERIAL_MAX)
""")


def test_thread_wait_policy_is_the_callers(tmp_path):
    """libgomp reads OMP_WAIT_POLICY once, and PyTorch shares it: normcore must not set it
    (a passive pool made torch's small ops ~12x slower), only size its serial cut-off to it."""
    cutoffs = {}
    for policy in (None, "PASSIVE"):
        env = {"PATH": ""} if policy is None else {"PATH": "", "OMP_WAIT_POLICY": policy}
        done = subprocess.run([sys.executable, "-c", WAIT_SCRIPT], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        seen, cutoffs[policy] = done.stdout.split()
        assert seen == str(policy)
    assert int(cutoffs["PASSIVE"]) > int(cutoffs[None])
