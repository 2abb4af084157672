"""A small NumPy multilayer perceptron with hand-written backpropagation.

The normalization layers call normcore's ``*_forward`` / ``*_backward`` pairs, the way a
framework author wires them into an autograd engine: the forward returns ``y`` and the
statistics it used (``mean``, ``rstd``), the layer saves them with its input, and the
backward takes them back and returns ``dx, dweight, dbias``. Copy what you need.

Notation: one minibatch of N rows, ``dy`` = dloss/dy. All layers work on (N, C) arrays.

    Linear      y = x W + b                  dx = dy W^T    dW = x^T dy    db = sum_n dy
    ReLU        y = max(x, 0)                dx = dy * [x > 0]
    norm        xhat = (x - mean) * rstd,    rstd = 1 / sqrt(var + eps)   (var biased)
                y = weight * xhat + bias
                dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),   g = dy * weight
                (mean, var and the means in dx over the norm's reduction set, below)
                dweight = sum_n dy * xhat    dbias = sum_n dy   (per feature)
        BatchNorm1d: mean, var per feature c over the N rows of the batch (training mode);
                     in eval mode the running statistics are constants: dx = g * rstd.
        LayerNorm:   mean, var per row over its C features.
        GroupNorm:   mean, var per (row, group) over the C/G consecutive features of the group.
    softmax cross-entropy   p = softmax(z)   loss = -(1/N) sum_n log p[n, label_n]
                            dz = (p - onehot(label)) / N
    SGD         theta <- theta - lr * dtheta
"""

import numpy as np

import normcore as nc

__all__ = [
    "Layer", "Linear", "ReLU", "BatchNorm1d", "LayerNorm", "GroupNorm", "MLP",
    "build_mlp", "softmax_cross_entropy", "sgd_step", "accuracy", "set_population_statistics",
]


class Layer:
    """forward(x) -> y saves what backward(dy) -> dx needs; backward fills ``grads``.

    ``params`` and ``grads`` are dicts with the same keys; the optimizer updates
    ``params`` in place. ``training`` switches BatchNorm between batch and running stats.
    """

    training = True

    def __init__(self):
        self.params = {}
        self.grads = {}

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError


class Linear(Layer):
    """y = x W + b, W of shape (in_features, out_features).

    ``init_std=None`` draws W from N(0, 2 / in_features) (He init, suited to ReLU).
    """

    def __init__(self, in_features, out_features, *, rng, init_std=None, bias=True,
                 dtype=np.float32):
        super().__init__()
        std = np.sqrt(2.0 / in_features) if init_std is None else init_std
        weight = std * rng.standard_normal((in_features, out_features))
        self.params["weight"] = weight.astype(dtype)
        if bias:
            self.params["bias"] = np.zeros(out_features, dtype)

    def forward(self, x):
        self.x = x
        y = x @ self.params["weight"]
        if "bias" in self.params:
            y += self.params["bias"]
        return y

    def backward(self, dy):
        self.grads["weight"] = self.x.T @ dy
        if "bias" in self.params:
            self.grads["bias"] = dy.sum(axis=0)
        return dy @ self.params["weight"].T


class ReLU(Layer):
    """y = max(x, 0); the gradient at exactly 0 is taken as 0."""

    def forward(self, x):
        self.active = x > 0
        return x * self.active

    def backward(self, dy):
        return dy * self.active


class BatchNorm1d(Layer):
    """BatchNorm over the batch axis of (N, C) activations, like ``torch.nn.BatchNorm1d``.

    Training mode normalizes with the batch statistics and normcore updates the running
    statistics in place: ``running = (1 - momentum) * running + momentum * batch`` (batch
    variance unbiased). Eval mode normalizes with the running statistics.
    """

    def __init__(self, num_features, *, momentum=0.1, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.params["weight"] = np.ones(num_features, dtype)
        self.params["bias"] = np.zeros(num_features, dtype)
        self.running_mean = np.zeros(num_features, dtype)
        self.running_var = np.ones(num_features, dtype)

    def forward(self, x):
        f = nc.batch_norm_forward(
            x, self.params["weight"], self.params["bias"],
            running_mean=self.running_mean, running_var=self.running_var,
            training=self.training, momentum=self.momentum, eps=self.eps, axis=1)
        # Save the mode too: backward must treat eval-mode statistics as constants.
        self.saved = (x, f.mean, f.rstd, self.training)
        return f.y

    def backward(self, dy):
        x, mean, rstd, training = self.saved
        dx, self.grads["weight"], self.grads["bias"] = nc.batch_norm_backward(
            dy, x, mean, rstd, self.params["weight"], training=training, axis=1)
        return dx


class LayerNorm(Layer):
    """LayerNorm over the features of each row (no batch dependence, no running stats)."""

    def __init__(self, num_features, *, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.eps = eps
        self.params["weight"] = np.ones(num_features, dtype)
        self.params["bias"] = np.zeros(num_features, dtype)

    def forward(self, x):
        f = nc.layer_norm_forward(x, self.params["weight"], self.params["bias"],
                                  axis=-1, eps=self.eps)
        self.saved = (x, f.mean, f.rstd)
        return f.y

    def backward(self, dy):
        x, mean, rstd = self.saved
        dx, self.grads["weight"], self.grads["bias"] = nc.layer_norm_backward(
            dy, x, mean, rstd, self.params["weight"], axis=-1)
        return dx


class GroupNorm(Layer):
    """GroupNorm of (N, C) activations: C features in ``num_groups`` groups of C/G.

    ``num_groups=1`` is LayerNorm; ``num_groups=C`` normalizes every feature of every
    row on its own (all zeros for (N, C) input: a useless extreme).
    """

    def __init__(self, num_groups, num_features, *, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.params["weight"] = np.ones(num_features, dtype)
        self.params["bias"] = np.zeros(num_features, dtype)

    def forward(self, x):
        f = nc.group_norm_forward(x, self.num_groups, self.params["weight"],
                                  self.params["bias"], eps=self.eps, axis=1)
        self.saved = (x, f.mean, f.rstd)
        return f.y

    def backward(self, dy):
        x, mean, rstd = self.saved
        dx, self.grads["weight"], self.grads["bias"] = nc.group_norm_backward(
            dy, x, mean, rstd, self.num_groups, self.params["weight"], axis=1)
        return dx


class MLP:
    """A stack of layers: forward in order, backward in reverse."""

    def __init__(self, layers):
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def parameters(self):
        """Yield (layer, name) for every parameter; ``layer.params[name]`` is the array."""
        for layer in self.layers:
            for name in layer.params:
                yield layer, name

    def train(self):
        for layer in self.layers:
            layer.training = True
        return self

    def eval(self):
        for layer in self.layers:
            layer.training = False
        return self


def build_mlp(sizes, norm=None, *, rng, init_std=None, num_groups=4, dtype=np.float32):
    """[Linear -> norm -> ReLU] for each hidden size, then a final Linear to the logits.

    sizes: (in_features, hidden_1, ..., hidden_k, num_classes).
    norm: None, "batch", "layer" or "group" (GroupNorm with ``num_groups`` groups).
    """
    make_norm = {
        None: None,
        "batch": lambda c: BatchNorm1d(c, dtype=dtype),
        "layer": lambda c: LayerNorm(c, dtype=dtype),
        "group": lambda c: GroupNorm(num_groups, c, dtype=dtype),
    }[norm]
    layers = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
        # BN subtracts the per-feature batch mean, which cancels a Linear bias exactly;
        # its own bias (beta) takes that role.
        layers.append(Linear(fan_in, fan_out, rng=rng, init_std=init_std,
                             bias=norm != "batch", dtype=dtype))
        if make_norm is not None:
            layers.append(make_norm(fan_out))
        layers.append(ReLU())
    layers.append(Linear(sizes[-2], sizes[-1], rng=rng, init_std=init_std, dtype=dtype))
    return MLP(layers)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels -> (loss, dlogits)."""
    n = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)  # shift for exp's range; p is unchanged
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -log_p[np.arange(n), labels].mean()
    dlogits = np.exp(log_p)
    dlogits[np.arange(n), labels] -= 1
    dlogits /= n
    return float(loss), dlogits.astype(logits.dtype, copy=False)


def sgd_step(model, lr):
    """Plain SGD, in place: theta <- theta - lr * dtheta."""
    for layer, name in model.parameters():
        layer.params[name] -= lr * layer.grads[name]


def accuracy(logits, labels):
    return float((logits.argmax(axis=1) == labels).mean())


def set_population_statistics(model, x):
    """Replace BN running stats by exact population statistics of x (Ioffe & Szegedy, Alg. 2).

    Runs x through the network in eval mode, layer by layer: each BatchNorm1d gets the
    per-feature mean and unbiased variance of its input over all of x, computed after the
    BN layers below it already use theirs, i.e. the statistics the eval-mode network sees.
    (Algorithm 2 averages minibatch statistics, E[x] = E_B[mean_B], Var[x] =
    m/(m-1) E_B[var_B]; with the whole set in memory the exact moments are simpler.)
    Leaves the model in eval mode.
    """
    model.eval()
    h = x
    for layer in model.layers:
        if isinstance(layer, BatchNorm1d):
            mean, var = nc.moments(h, axis=0, correction=1)
            layer.running_mean[...] = mean
            layer.running_var[...] = var
        h = layer.forward(h)
    return model
