"""Vanishing activations in a deep ReLU network, with and without BatchNorm.

A 20-layer ReLU MLP, 100 units per layer, small Gaussian init (std 0.01), fed 1000-dim
standard Gaussian inputs (batch 500) with random labels of 10 classes. One forward and
one backward pass in training mode; per hidden layer we record

    act std   std of the ReLU output h_l
    zeros     fraction of exact zeros in h_l
    |dW|      Frobenius norm of dloss/dW_l of the Linear layer that feeds layer l

Without BN, each Linear scales the activations by about std * sqrt(fan_in) and each ReLU
by about 1/sqrt(2): 0.01 * sqrt(100) / sqrt(2) ~ 0.07 per layer, so h_20 is ~1e-22 of h_1.
The backward pass shrinks by the same factor per layer in the other direction, so
dW_l = h_{l-1}^T dz_l is tiny at every depth. With BN before each ReLU, every
pre-activation is standardized per feature, whatever the scale of W.

Run on its own: ``python examples/deep_networks.py``.
"""

import numpy as np

from mlp import BatchNorm1d, Linear, ReLU, build_mlp, softmax_cross_entropy

DEFAULTS = dict(depth=20, width=100, in_features=1000, batch=500, num_classes=10, init_std=0.01)


def measure(norm, *, depth, width, in_features, batch, num_classes, init_std, seed,
            dtype=np.float32):
    """One forward/backward pass of a fresh network; per-layer statistics as lists."""
    # The same seed gives both networks the same weights and data: BN is the only difference.
    rng = np.random.default_rng(seed)
    model = build_mlp([in_features] + [width] * depth + [num_classes], norm,
                      rng=rng, init_std=init_std, dtype=dtype)
    x = rng.standard_normal((batch, in_features)).astype(dtype)
    labels = rng.integers(0, num_classes, batch)

    h = x
    act_std, zeros = [], []
    for layer in model.layers:
        h = layer.forward(h)
        if isinstance(layer, ReLU):
            act_std.append(float(h.std(dtype=np.float64)))
            zeros.append(float(np.mean(h == 0)))
    loss, dlogits = softmax_cross_entropy(h, labels)
    model.backward(dlogits)
    hidden_linears = [l for l in model.layers if isinstance(l, Linear)][:-1]
    grad_norm = [float(np.linalg.norm(l.grads["weight"].astype(np.float64)))
                 for l in hidden_linears]
    return dict(act_std=act_std, zeros=zeros, grad_norm=grad_norm, loss=loss,
                num_bn=sum(isinstance(l, BatchNorm1d) for l in model.layers))


def run(*, seed=0, log=print, **config):
    config = {**DEFAULTS, **config}
    results = {"config": {**config, "seed": seed}}
    for key, norm in (("plain", None), ("batchnorm", "batch")):
        results[key] = measure(norm, seed=seed, **config)
    results["findings"] = findings(results)
    log(format_table(results))
    return results


def findings(results):
    out = {}
    for key in ("plain", "batchnorm"):
        r = results[key]
        out[key] = dict(
            act_std_first=r["act_std"][0], act_std_last=r["act_std"][-1],
            act_std_last_over_first=r["act_std"][-1] / r["act_std"][0],
            zeros_min=min(r["zeros"]), zeros_max=max(r["zeros"]),
            grad_norm_min=min(r["grad_norm"]), grad_norm_max=max(r["grad_norm"]),
        )
    return out


def format_table(results):
    p, b = results["plain"], results["batchnorm"]
    c = results["config"]
    lines = [
        f"Deep ReLU network: {c['depth']} layers x {c['width']} units, init std {c['init_std']}, "
        f"input {c['batch']} x {c['in_features']} N(0, 1)",
        f"{'':>5} | {'--- without BatchNorm ---':^33} | {'--- with BatchNorm ---':^33}",
        f"{'layer':>5} | {'act std':>10} {'zeros':>7} {'|dW|':>12} "
        f"| {'act std':>10} {'zeros':>7} {'|dW|':>12}",
    ]
    for i in range(len(p["act_std"])):
        cells = [f"{r['act_std'][i]:>10.3e} {r['zeros'][i]:>7.1%} {r['grad_norm'][i]:>12.3e}"
                 for r in (p, b)]
        lines.append(f"{i + 1:>5} | {cells[0]} | {cells[1]}")
    return "\n".join(lines)


def plot(results, path):
    """Three panels against depth: activation std, fraction of zeros, |dW| (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(1, len(results["plain"]["act_std"]) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    panels = [("act_std", "std of ReLU activations", True),
              ("zeros", "fraction of exact zeros", False),
              ("grad_norm", "‖dloss/dW‖ (Frobenius)", True)]
    for ax, (key, title, log_scale) in zip(axes, panels):
        for run_key, label, style in (("plain", "no normalization", "o-"),
                                      ("batchnorm", "BatchNorm", "s-")):
            ax.plot(layers, results[run_key][key], style, label=label, markersize=4)
        if log_scale:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_xticks(layers[::2] if len(layers) > 10 else layers)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    c = results["config"]
    fig.suptitle(f"{c['depth']}-layer ReLU MLP, {c['width']} units, init N(0, {c['init_std']}²)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run()
