"""Packaging: what `import normcore` pulls in, the normcore.kernels mapping, the public names.
Each check runs in a fresh interpreter started outside the repository, so the source tree
on sys.path cannot hide a packaging mistake."""
import json
import subprocess
import sys

PUBLIC = {
    "batch_norm", "layer_norm", "instance_norm", "group_norm",
    "batch_norm_forward", "layer_norm_forward", "instance_norm_forward", "group_norm_forward",
    "batch_norm_backward", "layer_norm_backward", "instance_norm_backward",
    "group_norm_backward", "moments",
}


def run_py(code, tmp_path):
    # check=False: the tests assert on returncode themselves, with stderr in the message
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)


def test_import_does_not_load_cuda_or_cupy(tmp_path):
    r = run_py("import sys, json, normcore\n"
               "print(json.dumps(sorted(m for m in sys.modules if m == 'cupy' "
               "or m.startswith('cupy.') or m == 'numba.cuda' or m.startswith('numba.cuda.')"
               " or m.startswith('cupy_'))))", tmp_path)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert loaded == [], f"import normcore loaded {loaded}"


def test_numpy_call_does_not_load_cuda_or_cupy(tmp_path):
    r = run_py("import sys, numpy as np, normcore as nc\n"
               "x = np.arange(12.0).reshape(3, 4)\n"
               "nc.layer_norm(x); nc.batch_norm(x); nc.group_norm(x, 2)\n"
               "print([m for m in sys.modules if m == 'cupy' or m.startswith('numba.cuda')])",
               tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_kernels_is_only_reachable_as_normcore_kernels(tmp_path):
    r = run_py("import importlib.util, sys\n"
               "try:\n"
               "    import kernels\n"
               "    print('IMPORTED', getattr(kernels, '__file__', None))\n"
               "except ModuleNotFoundError as e:\n"
               "    print('MISSING', e.name)\n"
               "import normcore.kernels\n"
               "print('OK', normcore.kernels.__name__)\n", tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "MISSING kernels", lines
    assert lines[1] == "OK normcore.kernels", lines


def test_public_names(tmp_path):
    r = run_py("import json, normcore\n"
               "print(json.dumps([list(normcore.__all__), "
               "[n for n in normcore.__all__ if not callable(getattr(normcore, n, None))]]))",
               tmp_path)
    assert r.returncode == 0, r.stderr
    names, not_callable = json.loads(r.stdout.strip().splitlines()[-1])
    assert PUBLIC <= set(names), f"missing from normcore.__all__: {sorted(PUBLIC - set(names))}"
    assert len(names) == len(set(names)), "duplicates in __all__"
    assert not (PUBLIC & set(not_callable)), f"not callable: {not_callable}"


def test_forward_tuple_types_are_exposed_consistently():
    import numpy as np

    import normcore as nc
    x = np.ones((2, 3))
    f = nc.layer_norm_forward(x)
    g = nc.layer_norm_backward(x, x, f.mean, f.rstd)
    assert type(f).__name__ == "NormForward" and type(g).__name__ == "NormBackward"
    assert isinstance(f, tuple) and isinstance(g, tuple)
