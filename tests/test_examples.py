"""Tests for examples/: the MLP's hand-written backprop and the demo's findings (--quick)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def examples(monkeypatch_module):
    """The example modules, imported the way `python examples/demo.py` imports them."""
    monkeypatch_module.syspath_prepend(str(EXAMPLES))
    import deep_networks
    import mlp
    return mlp, deep_networks


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# -- gradients: manual backprop vs central differences, float64 -------------------------

def loss_of(mlp, model, x, labels):
    loss, _ = mlp.softmax_cross_entropy(model.forward(x), labels)
    return loss


def numerical_gradient(f, a, h=1e-6):
    """Central differences of the scalar f() with respect to every element of a, in place."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("norm", [None, "batch", "layer", "group"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mlp_gradients_match_central_differences(examples, norm, mode):
    mlp, _ = examples
    rng = np.random.default_rng(1)
    model = mlp.build_mlp([5, 8, 8, 3], norm, rng=rng, num_groups=2, dtype=np.float64)
    x = rng.standard_normal((6, 5))
    labels = rng.integers(0, 3, 6)
    # Non-trivial affine parameters and running statistics, so that a swapped or
    # forgotten term shows up.
    for layer, name in model.parameters():
        if not isinstance(layer, mlp.Linear):
            layer.params[name] += 0.3 * rng.standard_normal(layer.params[name].shape)
    for layer in model.layers:
        if isinstance(layer, mlp.BatchNorm1d):
            layer.running_mean[...] = 0.2 * rng.standard_normal(layer.running_mean.shape)
            layer.running_var[...] = rng.uniform(0.5, 2.0, layer.running_var.shape)
            layer.momentum = 0.0  # training-mode forwards then leave the running stats alone
    getattr(model, mode)()

    _, dlogits = mlp.softmax_cross_entropy(model.forward(x), labels)
    dx = model.backward(dlogits)

    def f():
        return loss_of(mlp, model, x, labels)

    for layer, name in model.parameters():
        expected = numerical_gradient(f, layer.params[name])
        np.testing.assert_allclose(layer.grads[name], expected, rtol=1e-5, atol=1e-8,
                                   err_msg=f"{type(layer).__name__}.{name}")
    np.testing.assert_allclose(dx, numerical_gradient(f, x), rtol=1e-5, atol=1e-8, err_msg="dx")


def test_batchnorm_layer_updates_running_stats_only_in_training(examples):
    mlp, _ = examples
    rng = np.random.default_rng(2)
    bn = mlp.BatchNorm1d(4, momentum=0.5, dtype=np.float64)
    x = 3.0 + 2.0 * rng.standard_normal((50, 4))
    bn.forward(x)
    np.testing.assert_allclose(bn.running_mean, 0.5 * x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, 0.5 + 0.5 * x.var(axis=0, ddof=1), rtol=1e-12)
    bn.training = False
    before = bn.running_mean.copy(), bn.running_var.copy()
    y = bn.forward(x)
    np.testing.assert_array_equal(bn.running_mean, before[0])
    np.testing.assert_array_equal(bn.running_var, before[1])
    np.testing.assert_allclose(y, (x - before[0]) / np.sqrt(before[1] + bn.eps), rtol=1e-12)


def test_population_statistics_are_exact_moments_layer_by_layer(examples):
    mlp, _ = examples
    rng = np.random.default_rng(3)
    model = mlp.build_mlp([6, 7, 5, 2], "batch", rng=rng, dtype=np.float64)
    x = rng.standard_normal((40, 6))
    mlp.set_population_statistics(model, x)
    assert all(not layer.training for layer in model.layers)
    h = x
    for layer in model.layers:
        if isinstance(layer, mlp.BatchNorm1d):
            np.testing.assert_allclose(layer.running_mean, h.mean(axis=0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(layer.running_var, h.var(axis=0, ddof=1), rtol=1e-10)
        h = layer.forward(h)
    # In eval mode with population stats, the first BN's output over x is standardized.
    first_bn = next(i for i, l in enumerate(model.layers) if isinstance(l, mlp.BatchNorm1d))
    h = x
    for layer in model.layers[:first_bn + 1]:
        h = layer.forward(h)
    np.testing.assert_allclose(h.mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(h.std(axis=0, ddof=1), 1, rtol=1e-4)


# -- the vanishing-activation experiment, in-process -------------------------------------

def test_deep_network_activations_vanish_without_batchnorm_only(examples):
    _, deep_networks = examples
    results = deep_networks.run(seed=0, log=lambda *_: None)
    plain, bn = results["plain"], results["batchnorm"]
    assert len(plain["act_std"]) == len(bn["act_std"]) == 20
    # 0.01 * sqrt(100) / sqrt(2) ~ 0.07 per layer: ~20 orders of magnitude over 19 layers.
    assert plain["act_std"][-1] < 1e-15 * plain["act_std"][0]
    assert np.all(np.diff(np.log(plain["act_std"])) < 0)
    # With BN every layer's activations look like ReLU(N(0, 1)): std ~0.58, half zeros.
    assert 0.4 < min(bn["act_std"]) and max(bn["act_std"]) < 0.8
    assert all(0.4 < z < 0.6 for z in bn["zeros"])
    assert max(plain["grad_norm"]) < 1e-15 < 1e-3 < min(bn["grad_norm"])


# -- the whole demo, --quick, as CI runs it -----------------------------------------------

@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "demo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout, json.loads((out / "summary.json").read_text())


def test_quick_demo_writes_summary_and_plots(quick_demo):
    out, stdout, summary = quick_demo
    assert (out / "summary.md").read_text().strip()
    assert "epoch" in stdout and str(out) in stdout
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in stdout and not summary["plots"]
    else:
        assert summary["plots"] == ["deep_network.png", "digits_training.png"]
        for name in summary["plots"]:
            assert (out / name).stat().st_size > 10_000


def test_quick_demo_deep_network_findings(quick_demo):
    _, _, summary = quick_demo
    deep = summary["deep_network"]["findings"]
    assert deep["plain"]["act_std_last_over_first"] < 1e-10
    assert deep["batchnorm"]["act_std_last_over_first"] > 0.1


def test_quick_demo_batchnorm_training_loss_decreases(quick_demo):
    _, _, summary = quick_demo
    runs = {(r["norm"], r["lr"]): r for r in summary["digits"]["runs"]}
    for (norm, lr), r in runs.items():
        if norm == "batchnorm":
            loss = r["train_loss"]
            assert loss[-1] < 0.5 * loss[0], (lr, loss)
            assert r["test_acc"][-1] > 0.8, (lr, r["test_acc"])
            assert r["population_test_acc"] > 0.8 and r["ema_test_acc"] > 0.8
