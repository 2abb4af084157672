"""normcore demo: BatchNorm, LayerNorm and GroupNorm in a hand-written NumPy MLP.

    python examples/demo.py [--out DIR] [--quick] [--seed N]

1. Vanishing activations: a 20-layer ReLU MLP with small init, with and without BatchNorm
   (examples/deep_networks.py).
2. Training a deep MLP on scikit-learn's digits with plain SGD, with and without
   normalization, at several learning rates; BatchNorm's eval mode with running (EMA) vs
   population statistics (examples/train_digits.py).

Prints the tables, writes PNG plots (if matplotlib is installed), summary.json and
summary.md to --out (default: examples/output/). --quick is the reduced run for CI.
The MLP itself, with normcore's forward/backward pairs, is in examples/mlp.py.
"""

import time

START = time.perf_counter()

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import normcore as nc  # noqa: E402

import deep_networks  # noqa: E402
import train_digits  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "output"


def warm_up():
    """Call every normcore function the demo uses once, so JIT compilation is timed apart."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    w, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    f = nc.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, training=True)
    nc.batch_norm_backward(x, x, f.mean, f.rstd, w, training=True)
    nc.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, training=False)
    f = nc.layer_norm_forward(x, w, b)
    nc.layer_norm_backward(x, x, f.mean, f.rstd, w)
    nc.moments(x, axis=0, correction=1)


def deep_findings(deep):
    p, b = deep["findings"]["plain"], deep["findings"]["batchnorm"]
    depth = deep["config"]["depth"]
    return [
        f"Without BatchNorm the std of the ReLU activations falls from {p['act_std_first']:.3g} "
        f"(layer 1) to {p['act_std_last']:.3g} (layer {depth}), a factor "
        f"{p['act_std_last_over_first']:.1e}; with BatchNorm it is {b['act_std_first']:.3g} and "
        f"{b['act_std_last']:.3g} (ratio {b['act_std_last_over_first']:.2f}).",
        f"The fraction of exact zeros is {p['zeros_min']:.0%}-{p['zeros_max']:.0%} without and "
        f"{b['zeros_min']:.0%}-{b['zeros_max']:.0%} with BatchNorm: ReLU zeroes about half of "
        "a symmetric input at any scale, so the signal vanishes in scale, not in sparsity.",
        f"Weight-gradient norms without BatchNorm are {p['grad_norm_min']:.1e}-"
        f"{p['grad_norm_max']:.1e} at every layer (dW_l = h_(l-1)^T dz_l: the forward and "
        f"backward shrink factors multiply to the same tiny product at every depth); with "
        f"BatchNorm they are {b['grad_norm_min']:.2g}-{b['grad_norm_max']:.2g}, growing toward "
        f"the input by a factor {b['grad_norm_max'] / b['grad_norm_min']:.0f}.",
    ]


def digits_findings(digits, target=0.9):
    runs = digits["runs"]
    lines = []
    for lr in digits["config"]["learning_rates"]:
        parts = []
        for h in (h for h in runs if h["lr"] == lr):
            if h["diverged_epoch"]:
                parts.append(f"{h['norm']} diverged at epoch {h['diverged_epoch']} "
                             f"(best {max(h['test_acc']):.1%})")
                continue
            reach = train_digits.epochs_to_reach(h, target)
            parts.append(f"{h['norm']} {h['test_acc'][0]:.0%} after epoch 1, "
                         f"{h['test_acc'][-1]:.1%} at the end, "
                         + (f"{target:.0%} at epoch {reach}" if reach else f"never {target:.0%}"))
        lines.append(f"lr {lr:g}, test accuracy: " + "; ".join(parts) + ".")

    def reach(norm, lr):
        h = next((h for h in runs if h["norm"] == norm and h["lr"] == lr), None)
        return None if h is None or h["diverged_epoch"] else train_digits.epochs_to_reach(h, target)

    norms = digits["config"]["norms"]
    rates = digits["config"]["learning_rates"]
    if "plain" in norms and "batchnorm" in norms:
        lines.append(
            f"Epochs to {target:.0%} test accuracy, batchnorm vs plain: "
            + ", ".join(f"lr {lr:g} {reach('batchnorm', lr) or 'never'} vs "
                        f"{reach('plain', lr) or 'never'}" for lr in rates) + ".")
    best_rate = {n: max((lr for lr in rates if reach(n, lr) is not None), default=None)
                 for n in norms}
    lines.append(f"Largest learning rate tried at which the network reaches {target:.0%}: "
                 + ", ".join(f"{n} {'none' if lr is None else format(lr, 'g')}"
                             for n, lr in best_rate.items()) + ".")
    for h in runs:
        b = next((b for b in runs if b["norm"] == "batchnorm" and b["lr"] == h["lr"]), None)
        if h["norm"] == "plain" and h["diverged_epoch"] is None and b and \
                "final_train_loss_eval" in b:
            lines.append(
                f"lr {h['lr']:g}, final loss on the whole training set (eval mode): plain "
                f"{h['final_train_loss_eval']:.4f}, batchnorm {b['final_train_loss_eval']:.4f}; "
                f"the epoch-mean train-mode loss, with batch-statistics noise, is "
                f"{h['train_loss'][-1]:.4f} vs {b['train_loss'][-1]:.4f}.")
    bn = [h for h in runs if "ema_test_acc" in h]
    if bn:
        one_image = 1 / digits["num_test"]
        lines.append(
            "BatchNorm in eval mode, test accuracy with running (EMA) vs population statistics: "
            + "; ".join(f"lr {h['lr']:g} {h['ema_test_acc']:.1%} vs "
                        f"{h['population_test_acc']:.1%} (loss {h['ema_test_loss']:.4f} vs "
                        f"{h['population_test_loss']:.4f})" for h in bn)
            + f". One test image is {one_image:.2%}.")
    return lines


def write_summary(out, summary, deep_table, digits_table):
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = ["# normcore demo: summary", "",
          f"Mode: {'quick' if summary['quick'] else 'full'}, seed {summary['seed']}, "
          f"{summary['seconds']['total']:.1f} s in total "
          f"(normcore JIT warm-up {summary['seconds']['warm_up']:.1f} s).", "",
          "## 1. Vanishing activations in a deep ReLU network", ""]
    md += [f"- {line}" for line in summary["findings"]["deep_network"]]
    md += ["", "```", deep_table, "```", "", "## 2. Deep MLP on digits, plain SGD", ""]
    md += [f"- {line}" for line in summary["findings"]["digits"]]
    md += ["", "```", digits_table, "```", ""]
    if summary["plots"]:
        md += ["## Plots", ""] + [f"![{name}]({name})" for name in summary["plots"]] + [""]
    (out / "summary.md").write_text("\n".join(md))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where plots and summaries go (default: {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help="reduced training run for CI (fewer, smaller runs and epochs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    t = time.perf_counter()
    warm_up()
    seconds["warm_up"] = time.perf_counter() - t
    print(f"normcore {getattr(nc, '__version__', '')} warm-up (JIT compile or cache load): "
          f"{seconds['warm_up']:.1f} s")

    print("\n== 1. Vanishing activations: 20-layer ReLU MLP, with and without BatchNorm ==\n")
    t = time.perf_counter()
    deep = deep_networks.run(seed=args.seed)
    deep_table = deep_networks.format_table(deep)
    seconds["deep_network"] = time.perf_counter() - t
    print()
    for line in deep_findings(deep):
        print(f"* {line}")

    print("\n== 2. Deep MLP on scikit-learn digits, plain minibatch SGD ==\n")
    t = time.perf_counter()
    digits = train_digits.run(quick=args.quick, seed=args.seed)
    digits_table = train_digits.format_table(digits)
    seconds["digits"] = time.perf_counter() - t
    print()
    for line in digits_findings(digits):
        print(f"* {line}")

    plots = []
    if importlib.util.find_spec("matplotlib") is None:
        print("\nmatplotlib is not installed: skipping the plots "
              "(pip install matplotlib to get them).")
    else:
        deep_networks.plot(deep, out / "deep_network.png")
        train_digits.plot(digits, out / "digits_training.png")
        plots = ["deep_network.png", "digits_training.png"]

    seconds["total"] = time.perf_counter() - START
    summary = dict(
        quick=args.quick, seed=args.seed, seconds=seconds, plots=plots,
        findings=dict(deep_network=deep_findings(deep), digits=digits_findings(digits)),
        deep_network=deep, digits=digits)
    write_summary(out, summary, deep_table, digits_table)
    print(f"\nWrote {', '.join(plots + ['summary.json', 'summary.md'])} to {out}")
    print(f"Total time {seconds['total']:.1f} s (normcore warm-up {seconds['warm_up']:.1f} s, "
          f"deep network {seconds['deep_network']:.1f} s, digits {seconds['digits']:.1f} s)")


if __name__ == "__main__":
    main()
