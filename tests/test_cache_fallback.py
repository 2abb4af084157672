"""With no writable cache directory, `cache=True` raises in numba at decoration time; the
kernels must fall back to uncached compilation instead of failing at import. With one, a
kernel loaded from it computes what the freshly compiled kernel did, bit for bit."""
import os
import subprocess
import sys
import textwrap


def test_kernels_import_and_run_without_a_cache_locator(tmp_path):
    script = textwrap.dedent("""
        import numba.core.caching as caching
        # every locator refuses, as when no cache directory is writable
        caching.CacheImpl._locator_classes = []
        import normcore
        from normcore.kernels import cpu
        # every kernel went through the same fallback at import; a small one compiles and
        # runs uncached (a norm's kernels took a minute to compile on a slow CI machine)
        assert cpu.chan_merge(2.0, 1.0, 0.5, 2.0, 3.0, 0.5) == (4.0, 2.0, 5.0)
        for kernel in (cpu.rows_forward, cpu.chan_merge):
            assert not kernel._cache.__class__.__name__.endswith("FunctionCache")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_cache_is_used_when_a_directory_is_writable(tmp_path):
    script = textwrap.dedent("""
        from normcore.kernels import cpu
        print(type(cpu.rows_forward._cache).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"NUMBA_CACHE_DIR": str(tmp_path),
                                                        "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "FunctionCache"


_SAME_SCRIPT = textwrap.dedent("""
    import hashlib
    import numba
    import numpy as np
    import normcore as nc
    from normcore.kernels import cpu
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 100)) * 3 + 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(100)).astype(np.float32)
    f = nc.layer_norm_forward(x, w, w)
    digest = hashlib.sha256()
    for a in f[:3] + nc.layer_norm_backward(dy, x, f.mean, f.rstd, w)[:3]:
        digest.update(np.ascontiguousarray(a).tobytes())
    kernels = [k for k in vars(cpu).values() if isinstance(k, numba.core.registry.CPUDispatcher)]
    kernels += [k.serial for k in kernels if hasattr(k, "serial")]
    print(digest.hexdigest(), sum(sum(k.stats.cache_hits.values()) for k in kernels))
""")


def test_outputs_are_the_same_compiled_or_loaded_from_the_cache(tmp_path):
    """Numba optimizes a helper's code once on its own and again inside each kernel that
    calls it; the process that compiled a kernel runs the helper's own copy, a process that
    loads the kernel from the cache the kernel's. Sums that LLVM could reassociate came out
    of the two in different orders (before the ordered sums, 11% of this LayerNorm's dx
    differed in the last bits); the first run here compiles and saves, the second loads."""
    env = {k: v for k, v in os.environ.items() if k != "NORMCORE_DISABLE_CACHE"}
    env["NUMBA_CACHE_DIR"] = str(tmp_path)
    runs = [subprocess.run([sys.executable, "-c", _SAME_SCRIPT], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, env=env)
            for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr
    (compiled, hits_first), (loaded, hits_second) = (r.stdout.split() for r in runs)
    assert hits_first == "0" and int(hits_second) > 0, "the second run loads the kernels"
    assert compiled == loaded
