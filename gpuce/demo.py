"""gpuce demo: train a small multilayer perceptron on scikit-learn's digits with gpuce.

The digits data (1797 images of 8x8 pixels, 10 classes) ship with scikit-learn, so nothing is
downloaded. The network runs in numpy on the CPU (``--device cpu``) or CuPy on a GPU
(``--device cuda``); the same code serves both through ``xp``. The whole story, per batch
of B images x with labels y:

    forward    h = relu(x W1 + b1),   z = h W2 + b2          z: (B, 10) logits, class axis last
    softmax    y_hat = softmax(z)                             inside gpuce's fused kernel
    loss       L = (1/B) sum_i -log y_hat[i, y_i]
    gradient   dL/dz = (y_hat - onehot(y)) / B                gpuce.cross_entropy_with_grad
    backprop   dW2 = h^T dz,  db2 = sum_i dz,  dh = (dz W2^T) * [h > 0],
               dW1 = x^T dh,  db1 = sum_i dh                  plain matrix products
    update     SGD with momentum

``gpuce.cross_entropy_with_grad`` returns L and dL/dz together from one pass over the logits;
nothing else in the network needs the softmax. Run ``gpuce demo --help`` for the options.
"""
import argparse
import sys
import time

import numpy as np

import gpuce

N_CLASSES = 10


def _xp(device):
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - needs a GPU machine
            raise SystemExit("gpuce demo --device cuda needs CuPy (pip install gpuce[cupy13] "
                             "or gpuce[cupy12]) and an NVIDIA GPU") from e
        return cupy
    raise ValueError(f"device: {device!r} is not 'cpu' or 'cuda'")


def load_digits_split(test_fraction=0.25, split_seed=0):
    """(x_train, y_train, x_test, y_test) as float32 features in [0, 1] and int64 labels.

    The split is fixed (it does not depend on the training seed), so runs with different
    seeds are scored on the same held-out images.
    """
    from sklearn.datasets import load_digits
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(split_seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0) + 0.1  # constant border pixels stay finite
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def softmax_rows(xp, z):
    """Plain softmax, used only to show what gpuce's gradient is made of."""
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class MLP:
    """64 -> hidden -> 10 with ReLU; parameters and momentum buffers live on ``xp``."""

    def __init__(self, xp, n_in, hidden, n_out, seed):
        rng = np.random.default_rng(seed)
        self.xp = xp
        self.params = {
            "W1": rng.standard_normal((n_in, hidden)) * np.sqrt(2.0 / n_in),
            "b1": np.zeros(hidden),
            "W2": rng.standard_normal((hidden, n_out)) * np.sqrt(1.0 / hidden),
            "b2": np.zeros(n_out),
        }
        self.params = {k: xp.asarray(v, dtype=xp.float32) for k, v in self.params.items()}
        self.velocity = {k: xp.zeros_like(v) for k, v in self.params.items()}

    def forward(self, x):
        p = self.params
        h = self.xp.maximum(x @ p["W1"] + p["b1"], 0)
        return h, h @ p["W2"] + p["b2"]

    def backward(self, x, h, dz):
        """Gradients of the loss with respect to every parameter, given dL/dz."""
        p = self.params
        dh = (dz @ p["W2"].T) * (h > 0)
        return {"W2": h.T @ dz, "b2": dz.sum(axis=0), "W1": x.T @ dh, "b1": dh.sum(axis=0)}

    def sgd_step(self, grads, lr, momentum, weight_decay):
        for k, g in grads.items():
            if k.startswith("W"):
                g = g + weight_decay * self.params[k]
            v = self.velocity[k]
            v *= momentum
            v -= lr * g
            self.params[k] += v


def train(epochs=20, hidden=128, lr=0.05, batch_size=32, seed=0, device="cpu",
          momentum=0.9, weight_decay=1e-4, quiet=True):
    """Train the MLP; return its history.

    Returns a dict with lists ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc`` (one
    entry per epoch), ``grad_check`` (max |gpuce's gradient - (softmax - onehot)/B| on the
    first batch), ``first_call_seconds`` (the first gpuce call, which compiles its kernel),
    ``seconds`` (wall time, data loading and kernel compilation included) and ``n_test``.
    """
    t0 = time.perf_counter()
    xp = _xp(device)
    x_tr, y_tr, x_te, y_te = load_digits_split()
    n_train, n_features = x_tr.shape
    x_tr, y_tr, x_te, y_te = (xp.asarray(a) for a in (x_tr, y_tr, x_te, y_te))
    model = MLP(xp, n_features, hidden, N_CLASSES, seed)
    rng = np.random.default_rng(seed + 1)
    grad_buf = xp.empty((batch_size, N_CLASSES), dtype=xp.float32)  # reused: out=
    hist = {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []}
    # the first call compiles gpuce's kernel for float32 (numba, on the CPU); time it apart
    t1 = time.perf_counter()
    _, z = model.forward(x_tr[:2])
    gpuce.cross_entropy_with_grad(z, y_tr[:2], out=grad_buf[:2])
    hist["first_call_seconds"] = time.perf_counter() - t1
    if not quiet:
        print(f"first gpuce call (compiles the kernel): {hist['first_call_seconds']:.1f} s")
    _train_epochs(hist, model, x_tr, y_tr, x_te, y_te, epochs, lr, batch_size, momentum,
                  weight_decay, rng, grad_buf, quiet, xp)
    hist["n_test"] = int(y_te.shape[0])
    hist["seconds"] = time.perf_counter() - t0
    return hist


def _train_epochs(hist, model, x_tr, y_tr, x_te, y_te, epochs, lr, batch_size, momentum,
                  weight_decay, rng, grad_buf, quiet, xp):
    from tqdm.auto import tqdm

    n_train = x_tr.shape[0]
    n_batches = -(-n_train // batch_size)
    for epoch in range(1, epochs + 1):
        order = xp.asarray(rng.permutation(n_train))
        loss_sum = xp.zeros((), dtype=xp.float64)  # accumulated on the device: one sync/epoch
        correct = xp.zeros((), dtype=xp.int64)
        bar = tqdm(total=n_batches, desc=f"epoch {epoch:>2}/{epochs}", unit="batch",
                   disable=quiet, leave=True, file=sys.stderr, dynamic_ncols=True)
        for start in range(0, n_train, batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            h, z = model.forward(xb)                                   # forward
            loss, dz = gpuce.cross_entropy_with_grad(z, yb, out=grad_buf[:len(idx)])
            if "grad_check" not in hist:                               # the story, once
                y_hat = softmax_rows(xp, z.astype(xp.float64))
                onehot = xp.eye(N_CLASSES)[yb]
                hist["grad_check"] = float(xp.abs(dz - (y_hat - onehot) / len(idx)).max())
                if not quiet:
                    bar.write(f"check: gpuce's gradient == (softmax(z) - onehot(y)) / B on the "
                              f"first batch, max |difference| = {hist['grad_check']:.1e}",
                              file=sys.stdout)
            model.sgd_step(model.backward(xb, h, dz), lr, momentum, weight_decay)
            loss_sum += loss * len(idx)
            correct += (z.argmax(axis=1) == yb).sum()
            bar.update(1)
        _, z_te = model.forward(x_te)
        test_loss = float(gpuce.cross_entropy(z_te, y_te))
        test_acc = float((z_te.argmax(axis=1) == y_te).mean())
        hist["train_loss"].append(float(loss_sum) / n_train)
        hist["train_acc"].append(int(correct) / n_train)
        hist["test_loss"].append(test_loss)
        hist["test_acc"].append(test_acc)
        bar.set_postfix(loss=f"{hist['train_loss'][-1]:.4f}", acc=f"{hist['train_acc'][-1]:.3f}",
                        test_acc=f"{test_acc:.3f}", refresh=False)
        bar.close()


def save_plot(hist, path):
    """Loss and accuracy curves, train and test, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(hist["train_loss"]) + 1)
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    ax_l.plot(epochs, hist["train_loss"], "o-", label="train (running, during the epoch)")
    ax_l.plot(epochs, hist["test_loss"], "s-", label="test")
    ax_l.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss", yscale="log")
    ax_a.plot(epochs, np.array(hist["train_acc"]) * 100, "o-", label="train (running)")
    ax_a.plot(epochs, np.array(hist["test_acc"]) * 100, "s-", label="test")
    ax_a.axhline(95, color="gray", ls=":", lw=1, label="95%")
    ax_a.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_l, ax_a):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("gpuce demo: MLP on scikit-learn digits, gpuce.cross_entropy_with_grad")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    t0 = time.perf_counter()
    parser = argparse.ArgumentParser(
        prog="gpuce demo",
        description="Train a small MLP on scikit-learn's digits (8x8 images, 10 classes) with "
                    "gpuce.cross_entropy_with_grad for the loss and its gradient.")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=128, help="hidden units")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="weights and batch order")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: numpy arrays; cuda: CuPy arrays on the current GPU")
    parser.add_argument("--plot", metavar="PATH", help="save loss and accuracy curves as PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.hidden < 1 or args.batch_size < 1:
        parser.error("--epochs, --hidden and --batch-size must be >= 1")

    if not args.quiet:
        print(f"gpuce {gpuce.__version__} demo: MLP 64-{args.hidden}-10 on scikit-learn "
              f"digits, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
              f"device {args.device}")
    hist = train(epochs=args.epochs, hidden=args.hidden, lr=args.lr,
                 batch_size=args.batch_size, seed=args.seed, device=args.device,
                 quiet=args.quiet)
    if args.plot:
        save_plot(hist, args.plot)
        if not args.quiet:
            print(f"saved the loss and accuracy curves to {args.plot}")
    acc = hist["test_acc"][-1]
    elapsed = time.perf_counter() - t0
    print(f"test accuracy {acc * 100:.2f}% ({round(acc * hist['n_test'])}/{hist['n_test']}), "
          f"test loss {hist['test_loss'][-1]:.4f}, in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
