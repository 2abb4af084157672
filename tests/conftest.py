"""pytest setup: the hypothesis profile (no deadline: the first call of each kernel pays
Numba's compile time) and small shared fixtures. Helpers live in helpers.py, the float64
reference in oracle.py."""
import os
import zlib

import compile_share
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "normcore", deadline=None, max_examples=40, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", parent=settings.get_profile("normcore"),
                          max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "normcore"))


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session", autouse=True)
def _share_compilation(request):
    """See compile_share: under xdist, the workers take turns compiling a kernel, and the
    second starts on the backward kernels when the run holds the backward tests."""
    if (compile_share.install() and os.environ.get("PYTEST_XDIST_WORKER") == "gw1"
            and any(item.path.name == "test_backward.py" for item in request.session.items)):
        compile_share.warm_up()
