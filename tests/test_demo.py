"""gpuce demo: a shortened run learns, the command line works, --plot writes a PNG."""
import pytest

pytest.importorskip("sklearn")

from gpuce import cli, demo  # noqa: E402


def test_short_training_learns():
    hist = demo.train(epochs=3, seed=1)
    assert len(hist["test_acc"]) == 3
    assert hist["test_acc"][-1] > 0.8          # chance is 0.1
    assert hist["train_acc"][-1] > 0.8
    assert hist["train_loss"][-1] < 0.5 * hist["train_loss"][0]
    assert hist["test_loss"][-1] < hist["test_loss"][0]
    # the story: gpuce's gradient is (softmax(z) - onehot(y)) / B
    assert hist["grad_check"] < 1e-6


def test_default_training_reaches_95_percent():
    # the default run, as `gpuce demo` does it (the timing is reported by the command itself)
    hist = demo.train()
    assert hist["test_acc"][-1] >= 0.95


def test_main_prints_progress_and_result(capsys):
    assert demo.main(["--epochs", "2", "--hidden", "32", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert "epoch  1/2" in err and "test_acc=" in err and "loss=" in err
    assert "max |difference|" in out
    assert "test accuracy" in out and " s\n" in out


def test_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "curves.png"
    assert cli.main(["demo", "--epochs", "2", "--quiet", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("test accuracy")


def test_bad_arguments_exit():
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0"])
    with pytest.raises(SystemExit):
        demo.main(["--device", "tpu"])
