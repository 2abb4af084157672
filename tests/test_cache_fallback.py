"""With no writable cache directory, `cache=True` raises in numba at decoration time; the
kernels must fall back to uncached compilation instead of failing at import."""
import subprocess
import sys
import textwrap


def test_kernels_import_and_run_without_a_cache_locator(tmp_path):
    script = textwrap.dedent("""
        import numba.core.caching as caching
        # every locator refuses, as when no cache directory is writable
        caching.CacheImpl._locator_classes = []
        import numpy as np
        import normcore as nc
        from normcore.kernels import cpu
        x = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
        y = nc.layer_norm(x)
        assert np.allclose(y.mean(-1), 0) and np.allclose(y.std(-1), 1, atol=1e-5)
        assert not cpu.rows_forward._cache.__class__.__name__.endswith("FunctionCache")
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
