"""Every CUDA kernel in the registry (kernels/cuda.py KERNELS) compiles to PTX for every input
dtype (float16, float32, float64) that uses it, without a GPU: numba.cuda.compile_ptx with
NVRTC (numba-cuda[cu12]). The simulator cannot compile, so this runs in a subprocess with
NUMBA_ENABLE_CUDASIM removed. Also checks the dtype policy in the generated code: float16 and
float32 kernels do no float64 arithmetic, and the block reductions use warp shuffles.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")

# compile_ptx needs no device, but kernels that call device functions ask the current device
# for its compute capability while compiling them; a stand-in answers for the target.
SCRIPT = textwrap.dedent("""
    import json, re, sys, types
    try:
        import numba.cuda.dispatcher as dispatcher
        from numba import cuda
        CC = (7, 0)

        def probe(a):
            a[0] = 1.0
        cuda.compile_ptx(probe, "void(float32[::1])", cc=CC)   # the toolchain, not our kernels
    except Exception as exc:
        print(json.dumps({"skip": f"numba-cuda with NVRTC is not usable: {exc}"[:500]}))
        sys.exit(0)
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)
    from normcore.kernels import cuda as K
    assert not K.SIM
    F64_MATH = re.compile(r"\\b(?:add|sub|mul|div|fma|sqrt|rcp)\\.[a-z.]*f64")
    results = {}
    for acc, table in K.KERNELS.items():
        dtypes = [d.name for d, a in K.ACCUMULATOR.items() if a.__name__ == acc]
        for name, kernel in table.items():
            for dtype in dtypes:
                key = f"{name}[{dtype}]"
                try:
                    ptx, _ = cuda.compile_ptx(kernel.py_func, K.signature(name, dtype), cc=CC)
                except Exception as exc:
                    results[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                    continue
                results[key] = {"f64_math": len(F64_MATH.findall(ptx)), "shfl": "shfl" in ptx}
    print(json.dumps({"results": results}))
""")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    # the installed package, not the source tree (whose normcore/ has no kernels subpackage)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=tmp_path_factory.mktemp("ptx"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    return out["results"]


def test_every_kernel_compiles_to_ptx(compiled):
    failed = {k: v["error"] for k, v in compiled.items() if "error" in v}
    assert not failed, json.dumps(failed, indent=1)


def test_registry_is_covered_for_every_dtype(compiled):
    names = {k.split("[")[0] for k in compiled}
    assert "rows_forward" in names and "merge_moments" in names
    for dtype in ("float16", "float32", "float64"):
        for name in names - {"merge_moments"}:
            assert f"{name}[{dtype}]" in compiled, f"{name} not compiled for {dtype}"


def test_half_and_single_kernels_do_no_float64_math(compiled):
    """float32 accumulation for float16 / float32 input: float64 units are slow on most GPUs."""
    heavy = {k: v["f64_math"] for k, v in compiled.items()
             if not k.endswith("[float64]") and v.get("f64_math")}
    assert not heavy, heavy


def test_block_reductions_use_warp_shuffles(compiled):
    for name in ("rows_forward", "rows_backward", "runs_moments", "merge_moments"):
        key = next(k for k in compiled if k.startswith(name + "["))
        assert compiled[key].get("shfl"), f"{key}: no warp shuffle in its PTX"
