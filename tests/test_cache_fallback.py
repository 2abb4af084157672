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
