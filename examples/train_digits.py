"""Train a deep MLP on scikit-learn's bundled digits (8x8 images, 10 classes), with and
without normalization, at a small and a large learning rate, with plain minibatch SGD.

Per epoch: mean training loss over the minibatches and eval-mode test loss / accuracy.
For the BatchNorm runs, eval mode is compared with two sources of statistics:
    EMA          the running mean / var normcore updated during training (momentum 0.1)
    population   exact per-feature mean and unbiased variance over the whole training
                 set, recomputed layer by layer in eval mode (Ioffe & Szegedy, Alg. 2)

Run on its own: ``python examples/train_digits.py [--quick]``.
"""

import time

import numpy as np

from mlp import accuracy, build_mlp, set_population_statistics, \
    softmax_cross_entropy, sgd_step

NORM_LABELS = {None: "plain", "batch": "batchnorm", "layer": "layernorm", "group": "groupnorm"}

# GroupNorm trains like LayerNorm here; add "group" to norms to see it (costs ~25% more time).
FULL = dict(hidden=(100,) * 10, epochs=15, batch_size=32, learning_rates=(0.01, 0.1, 0.5),
            norms=(None, "batch", "layer"))
QUICK = dict(hidden=(64,) * 6, epochs=4, batch_size=32, learning_rates=(0.1,),
             norms=(None, "batch", "layer"))


def load_digits_split(seed, test_fraction=0.2, dtype=np.float32):
    """Stratified train/test split of sklearn's digits, standardized with training stats."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # pixels that are always 0 in the training set
    x_train, x_test = ((a - mean) / std for a in (x_train, x_test))
    return x_train.astype(dtype), y_train, x_test.astype(dtype), y_test


def evaluate(model, x, y):
    model.eval()
    logits = model.forward(x)
    model.train()
    loss, _ = softmax_cross_entropy(logits, y)
    return loss, accuracy(logits, y)


def train(norm, lr, data, *, hidden, epochs, batch_size, seed, log=print):
    """Train one network; returns its per-epoch history (and EMA vs population results)."""
    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(seed)
    # Same seed, same sizes: every run starts from the same Linear weights.
    model = build_mlp([x_train.shape[1], *hidden, 10], norm, rng=rng)
    name = f"{NORM_LABELS[norm]} lr={lr:g}"
    history = dict(norm=NORM_LABELS[norm], lr=lr, train_loss=[], test_loss=[], test_acc=[],
                   diverged_epoch=None)
    n = len(x_train)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = rng.permutation(n)
        losses = []
        with np.errstate(all="ignore"):  # a diverging plain network overflows; we report it
            # Drop the last partial batch: training BN needs > 1 row, and equal batches
            # keep the per-step noise comparable.
            for i in range(0, n - batch_size + 1, batch_size):
                idx = order[i:i + batch_size]
                loss, dlogits = softmax_cross_entropy(model.forward(x_train[idx]), y_train[idx])
                model.backward(dlogits)
                sgd_step(model, lr)
                losses.append(loss)
            test_loss, test_acc = evaluate(model, x_test, y_test)
        train_loss = float(np.mean(losses))
        history["train_loss"].append(train_loss)
        history["test_loss"].append(test_loss)
        history["test_acc"].append(test_acc)
        log(f"  [{name:>16}] epoch {epoch:2d}/{epochs}  train loss {train_loss:8.4f}  "
            f"test loss {test_loss:8.4f}  test acc {test_acc:6.1%}  "
            f"({time.perf_counter() - start:.2f} s)")
        if not np.isfinite(train_loss):
            history["diverged_epoch"] = epoch
            log(f"  [{name:>16}] diverged (non-finite loss); stopping this run")
            break
    if history["diverged_epoch"] is not None:
        return history
    # The epoch's mean training loss mixes 45 models and, with BN, batch-statistics noise:
    # also report the final model's loss on the whole training set, in eval mode.
    history["final_train_loss_eval"], history["final_train_acc_eval"] = \
        evaluate(model, x_train, y_train)
    if norm == "batch":
        history["ema_test_loss"], history["ema_test_acc"] = evaluate(model, x_test, y_test)
        set_population_statistics(model, x_train)
        history["population_test_loss"], history["population_test_acc"] = \
            evaluate(model, x_test, y_test)
    return history


def run(*, quick=False, seed=0, log=print, **overrides):
    config = {**(QUICK if quick else FULL), **overrides}
    data = load_digits_split(seed)
    log(f"digits: {len(data[0])} train / {len(data[2])} test images of 64 pixels; "
        f"MLP 64 -> {describe_hidden(config['hidden'])} -> 10; "
        f"SGD, batch {config['batch_size']}, {config['epochs']} epochs")
    runs = []
    for lr in config["learning_rates"]:
        for norm in config["norms"]:
            runs.append(train(norm, lr, data, hidden=config["hidden"], epochs=config["epochs"],
                              batch_size=config["batch_size"], seed=seed, log=log))
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    config["norms"] = [NORM_LABELS[n] for n in config["norms"]]
    results = dict(num_train=len(data[0]), num_test=len(data[2]), config={**config, "seed": seed},
                   runs=runs)
    log("")
    log(format_table(results))
    return results


def describe_hidden(hidden):
    if len(set(hidden)) == 1:
        return f"{len(hidden)} x {hidden[0]}"
    return " -> ".join(map(str, hidden))


def epochs_to_reach(history, accuracy_target):
    for epoch, acc in enumerate(history["test_acc"], 1):
        if acc >= accuracy_target:
            return epoch
    return None


def format_table(results, target=0.9):
    """One row per run: training loss, test accuracy, epochs to reach ``target``."""
    head = (f"{'run':>20} | {'train loss: ep 1':>16} {'last ep':>8} {'final eval':>10} | "
            f"{'test acc: ep 1':>14} {'last':>6} {'best':>6} | {f'ep to {target:.0%}':>9}")
    lines = [head, "-" * len(head)]
    for h in results["runs"]:
        reach = epochs_to_reach(h, target)
        final = h.get("final_train_loss_eval")
        lines.append(
            f"{h['norm'] + ' lr=' + format(h['lr'], 'g'):>20} | {h['train_loss'][0]:16.4f} "
            f"{h['train_loss'][-1]:8.4f} {'-' if final is None else format(final, '.4f'):>10} | "
            f"{h['test_acc'][0]:14.1%} {h['test_acc'][-1]:6.1%} {max(h['test_acc']):6.1%} | "
            f"{'never' if reach is None else reach:>9}"
            + (f"  (diverged at epoch {h['diverged_epoch']})" if h["diverged_epoch"] else ""))
    bn_runs = [h for h in results["runs"] if "ema_test_acc" in h]
    if bn_runs:
        lines += ["", "BatchNorm eval mode, test set: running (EMA) vs population statistics",
                  f"{'run':>20} | {'EMA acc':>8} {'pop acc':>8} | {'EMA loss':>8} {'pop loss':>8}"]
        for h in bn_runs:
            lines.append(
                f"{h['norm'] + ' lr=' + format(h['lr'], 'g'):>20} | {h['ema_test_acc']:8.1%} "
                f"{h['population_test_acc']:8.1%} | {h['ema_test_loss']:8.4f} "
                f"{h['population_test_loss']:8.4f}")
    return "\n".join(lines)


def plot(results, path):
    """Training loss and test accuracy per epoch, one column per learning rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rates = results["config"]["learning_rates"]
    fig, axes = plt.subplots(2, len(rates), figsize=(6 * len(rates), 7.5), squeeze=False,
                             constrained_layout=True)
    for col, lr in enumerate(rates):
        for h in (h for h in results["runs"] if h["lr"] == lr):
            epochs = np.arange(1, len(h["train_loss"]) + 1)
            label = h["norm"] + (f" (diverged, epoch {h['diverged_epoch']})"
                                 if h["diverged_epoch"] else "")
            axes[0, col].plot(epochs, h["train_loss"], "o-", markersize=3, label=label)
            axes[1, col].plot(epochs, h["test_acc"], "o-", markersize=3, label=label)
        axes[0, col].set_title(f"learning rate {lr:g}")
        axes[0, col].set_ylabel("training loss (mean over epoch)")
        axes[0, col].set_yscale("log")
        axes[1, col].set_ylabel("test accuracy (eval mode)")
        axes[1, col].set_ylim(0, 1)
        for ax in axes[:, col]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
            ax.legend()
    c = results["config"]
    fig.suptitle(f"digits: MLP 64 -> {describe_hidden(c['hidden'])} -> 10, "
                 f"plain SGD, batch {c['batch_size']}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(quick=parser.parse_args().quick)
