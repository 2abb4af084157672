"""The README's Python examples run, and its test command is the one .ci/run runs."""
import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_examples_run():
    blocks = _python_blocks()
    assert blocks, "README has no python example"
    spaces = []
    for block in blocks:
        spaces.append({})
        exec(compile(block, "README.md", "exec"), spaces[-1])
    # the API examples end with buffer reuse: the results must be the given buffers
    namespace = spaces[0]
    assert namespace["f"].y is namespace["y_buf"]
    assert namespace["g"].dx is namespace["dx_buf"]
    assert np.isfinite(namespace["y_buf"]).all()
    # the feature examples: the fused output is a ReLU's, the residual's gradient is masked
    features = spaces[1]
    assert features["f16"].y.dtype == np.float16
    assert ((features["dz"] == 0) | (features["dz"] == features["dy"])).all()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "pip install '.[test]' && NUMBA_ENABLE_CUDASIM=1 pytest -n 2"
    assert command in readme
    assert command in ci.splitlines()
