"""The bench harness's own logic (bench/run.py, bench/report.py), without timing anything
that matters: --cold's sweep and case selection, measure's per-call hook, and the README
tables (the cold section, bench/first_call.py's), built from made-up results."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import cases as cs  # noqa: E402
import first_call  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402


@pytest.mark.parametrize("text, expected", [
    ("491520K", 491520 << 10), ("32M", 32 << 20), ("1G", 1 << 30), ("1048576", 1 << 20),
    (None, None), ("", None), ("lots", None)])
def test_l3_bytes_parses_sysfs_sizes(monkeypatch, text, expected):
    monkeypatch.setattr(run, "l3_size", lambda: text)
    assert run.l3_bytes() == expected


def test_cold_sweep_reads_twice_the_l3_and_never_less_than_its_minimum():
    assert run.CacheSweep.size(480 << 20) == 960 << 20
    assert run.CacheSweep.size(32 << 20) == run.COLD_SWEEP_MIN
    assert run.CacheSweep.size(None) == run.COLD_SWEEP_MIN


def test_the_commit_is_dirty_for_source_changes_not_for_results_or_the_readme(tmp_path):
    """A regeneration runs bench/run.py three times, and each run rewrites bench/results/: the
    later runs measure the same source and must not call it dirty; a change anywhere else
    (kernels/ too, outside bench/, where run.py asks from) does."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "kernels").mkdir()
    files = [tmp_path / "README.md", tmp_path / "bench" / "results" / "latest.json",
             tmp_path / "kernels" / "cpu.py"]
    for f in files:
        f.write_text("0")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    clean = run.source_commit(tmp_path)
    assert clean and not clean.endswith("-dirty")
    files[0].write_text("1")
    files[1].write_text("1")
    (tmp_path / "untracked.txt").write_text("1")
    bench = tmp_path / "bench"      # where bench/run.py asks from
    assert run.source_commit(tmp_path) == run.source_commit(bench) == clean
    files[2].write_text("1")
    assert run.source_commit(tmp_path) == run.source_commit(bench) == clean + "-dirty"
    assert run.source_commit(tmp_path.parent / "nowhere") == ""


def test_cold_leaves_out_the_cases_under_its_size_in_the_narrowest_dtype():
    kept, small = run.cold_cases(cs.CASES, ["float32"])
    assert {"ln_tiny", "bn_2d_small", "bn_nchw_7x7", "gn32_nchw_7x7", "in_nchw_7x7"} == set(small)
    assert {c.name for c in kept} == {c.name for c in cs.CASES} - set(small)
    # ln_bert's x is 32 MiB in float32, 16 MiB in float16: kept either way
    assert "ln_bert" in {c.name for c in run.cold_cases(cs.CASES, ["float16", "float64"])[0]}


def test_cold_args_have_their_own_results_file_and_time_budget():
    a = run.parse_args(["--cold"])
    assert a.cold and a.json.name == "cold.json" and a.max_seconds > 2.0
    assert run.parse_args([]).json.name == "latest.json"


def test_measure_runs_the_hook_once_before_every_timed_call_and_times_single_calls():
    log = []
    thunks = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    # no round dropped for other processes' load (rounds of microseconds read one tick of
    # another process's CPU time as a load far above 1): the log then holds 4 rounds exactly
    samples, numbers, _, _ = run.measure(thunks, repeats=4, max_seconds=10.0,
                                         busy=float("inf"), before=lambda: log.append("sweep"))
    assert numbers == {"a": 1, "b": 1}
    assert len(samples["a"]) == len(samples["b"]) == 4
    timed = log[4:]     # two warm-up calls per thunk come first, without the hook
    assert log[:4] == ["a", "a", "b", "b"]
    assert timed == [x for pair in zip(["sweep"] * 8, timed[1::2]) for x in pair]
    assert sorted(timed[1::2]) == ["a"] * 4 + ["b"] * 4


def _row(case, op, impl, median, speedup=None):
    row = {"case": case, "op": op, "dtype": "float32", "impl": impl, "device": "cpu",
           "shape": [8192, 1024], "median_s": median, "gbps": 20.0, "frac_copy": 0.5,
           "other_load": 0.0, "valid": True}
    if speedup is not None:
        row["speedup"] = speedup
    return row


def _run_record(argv, results, sweep=0):
    machine = {"cpu": "Test CPU", "cache": None, "l3": "491520K", "usable_cpus": 2,
               "threads": {"numba": 2}, "openmp_runtimes": [], "commit": "abc1234",
               "date": "2026-12-04T00:00:00+00:00",
               "versions": {"numpy": "2", "numba": "0.68", "normcore": "0.1.0"}}
    return {"machine": machine, "argv": argv, "copy_gbps": {"cpu": 40.0},
            "results": results, "cold_sweep_bytes": sweep, "other_load": 0.0}


def test_report_puts_the_cold_run_in_a_table_of_its_own_with_its_geomean():
    warm = _run_record([], [_row("ln_bert", "fwd", "normcore", 2e-3, {"torch": 3.0}),
                            _row("ln_bert", "fwd", "torch", 6e-3)])
    cold = _run_record(["--cold"], [_row("ln_bert", "fwd", "normcore", 2.5e-3, {"torch": 1.2}),
                                    _row("ln_bert", "fwd", "torch", 3e-3)], sweep=960 << 20)
    text = report.markdown(warm, cold=cold)
    head, _, tail = text.partition("**Memory-bound: caches swept before every call**")
    assert tail, "no cold section"
    assert "3.00×" in head and "3.00×" not in tail
    assert "1.20×" in tail and "reads 960 MiB" in tail and "`python bench/run.py --cold`" in tail
    assert "Caches swept: ×torch float32: geomean 1.20, 1 of 1 below 1.5×." in tail
    assert "Caches swept" not in head
    assert "Memory-bound" not in report.markdown(warm)


def test_shortfalls_name_the_cases_below_the_target_with_the_bandwidth_it_needs():
    def pair(case, op, ratio, torch_frac, ours_frac):
        ours = {**_row(case, op, "normcore", 1e-3, {"torch": ratio}), "frac_copy": ours_frac}
        return [ours, {**_row(case, op, "torch", ratio * 1e-3), "frac_copy": torch_frac}]
    results = (pair("bn_2d_large", "fwd", 0.9, 0.6, 0.5) + pair("ln_bert", "bwd", 1.6, 0.2, 0.4)
               + pair("bn_nchw_7x7", "fwd", 1.1, 0.5, 0.6))     # not a named case
    results[0]["dtype"] = results[1]["dtype"] = "float64"
    assert report.shortfalls(results, "Run:") == []
    results[0]["dtype"] = results[1]["dtype"] = "float32"
    (line,) = report.shortfalls(results, "Run:")
    assert line.startswith("Run: below 1.5×torch (float32;")
    assert line.endswith(": bn_2d_large forward 0.90× (needs 90%, at 50%)")
    text = report.markdown(_run_record([], results))
    assert "With glibc's defaults: below 1.5×torch" in text
    tiny = [{**r, "case": "ln_tiny", "bytes": 2048} for r in pair("ln_tiny", "fwd", 1.2, 0, 0)]
    assert report.shortfalls(tiny, "Run:")[0].endswith(": ln_tiny forward 1.20× (per-call cost)")


def test_roofline_cuts_the_leading_axis_until_x_fits_in_cache():
    import roofline
    case = cs.Case("ln", "layer", (8192, 1024), axis=-1)
    assert roofline.in_cache(case, 4).shape == (1024, 1024)
    assert roofline.in_cache(case, 8).shape == (512, 1024)
    small = cs.Case("ln", "layer", (64, 1024), axis=-1)
    assert roofline.in_cache(small, 4).shape == (64, 1024)
    nhwc = cs.Case("bn", "batch", (32, 56, 56, 64), axis=-1)
    cut = roofline.in_cache(nhwc, 4)
    assert cut.shape[1:] == (56, 56, 64) and cut.axis == -1
    assert 4 * 56 * 56 * 64 * cut.shape[0] <= roofline.IN_CACHE


def test_first_call_table_has_a_row_per_case_and_names_the_machine_and_commit():
    times = {"import_s": 0.5, "forward_s": 12.34, "backward_s": 5.0}
    loaded = {"import_s": 0.5, "forward_s": 0.012, "backward_s": 0.3}
    result = {"machine": {"cpu": "Some CPU", "logical_cpus": 2, "commit": "abc1234",
                          "versions": {"python": "3.11.7", "numba": "0.68.1"}},
              "dtype": "float32",
              "results": [{"case": first_call.CASES[name][2], "name": name, "cold": times,
                           "warm": loaded} for name in ("layer", "group")]}
    lines = first_call.markdown(result).splitlines()
    assert lines[0].startswith("| first call (float32) | forward, compiling | backward, compiling "
                               "(after the forward) |")
    assert lines[2] == "| layer_norm (256, 1024) | 12.3 s | 5.0 s | 0.01 s | 0.30 s |"
    assert lines[3].startswith("| group_norm (32, 64, 28, 28), 32 groups | 12.3 s |")
    assert "Some CPU, 2 cores" in lines[-1] and "at abc1234" in lines[-1]
    assert set(first_call.CASES) >= {"layer", "layer_tiny", "batch_nchw", "batch_nhwc", "group",
                                     "instance"}


def test_validate_passes_normcore_and_numpy_and_fails_a_peer_with_wrong_outputs(capsys):
    """--validate (and every timed case's first call) checks each peer against the NumPy
    peer in float64: normcore and NumPy in float32 pass on ln_tiny (kernels the other tests
    compile too), and a peer whose y and dx are off by 1e-3 of their scale (10x the float32
    tolerance) fails."""
    import peers as pr
    todo = [(c, "float32", op) for c in cs.CASES if c.name == "ln_tiny" for op in ("fwd", "bwd")]
    good = [p for p in (pr.NUMPY, *pr.PEERS[:2]) if p.unavailable() is None]
    assert [p.name for p in good] == ["numpy", "normcore", "normcore[out]"]
    assert run.validate_only(good, todo) == 0
    assert capsys.readouterr().out.count(" ok ") == 3 * len(todo)

    class Off(pr.ApiPeer):
        def prepare(self, case, op, inputs):
            call, outputs = super().prepare(case, op, inputs)

            def off(result):
                got = outputs(result)
                for k in {"y", "dx"} & set(got):
                    got[k] = got[k] + 1e-3 * max(1.0, float(abs(got[k]).max()))
                return got
            return call, off

    off = Off("off", pr._numpy_peer)
    assert off.unavailable() is None
    assert run.validate_only([off], todo) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == len(todo) and "> 1e-04" in out, out


def test_the_machine_line_tells_cpus_of_one_model_name_apart():
    """"AMD EPYC" named Zen 1, 3 and 4 VMs: the run records family / model, the widest vector
    extension and the per-core caches, and the README's header prints what was recorded."""
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
            "model name\t: AMD EPYC\nflags\t\t: fpu avx avx2 avx512f avx512bw\n\n"
            "processor\t: 1\ncpu family\t: 99\n")
    cpu = run.cpuinfo(text)
    assert cpu["cpu family"] == "25" and cpu["model name"] == "AMD EPYC"
    details = run.cpu_details(cpu)
    assert (details["family"], details["model"], details["vector"]) == ("25", "17", "AVX-512")
    assert run.cpu_details(run.cpuinfo("flags\t: sse avx avx2\n"))["vector"] == "AVX2"
    m = {"cpu": "AMD EPYC", "cpu_details": {**details, "l1d": "32K", "l2": "1024K"}}
    assert report.cpu_text(m) == "family 25 model 17, AVX-512, L1d 32K and L2 1024K per core; "
    assert report.cpu_text({**m, "cpu_details": {**details, "l1d": None, "l2": None}}) == \
        "family 25 model 17, AVX-512; "
    assert report.cpu_text({"cpu": "AMD EPYC"}) == ""      # results of older runs
