"""The command line under bad input and Ctrl-C.

Every bad value of every flag ends with exit status 2 and one line on stderr naming the flag,
before any data is loaded or any training done (the loaders and fit are replaced by traps);
with --json, stdout holds exactly one JSON object saying what went wrong. Ctrl-C during training
ends with one line saying where the run stopped, after writing a checkpoint there when
--checkpoint was given.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import ckpt_train
import datasets_helpers
import numpy as np
import pytest
from datasets_helpers import http_server

import xpcnn
import xpcnn.datasets
import xpcnn.viz
from xpcnn.cli import main
from xpcnn.errors import DownloadError
from xpcnn.saving import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
UNWRITABLE = Path("/sys")  # even root cannot create files there


@pytest.fixture
def traps(monkeypatch):
    """Loading data, training or drawing fails the test: checks must come first."""
    def trap(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(xpcnn.datasets, "load_dataset", trap)
    monkeypatch.setattr(xpcnn.Sequential, "fit", trap)
    monkeypatch.setattr(xpcnn.viz, "visualize_command", trap)


def bad_cases(tmp: Path) -> list[tuple[list[str], str]]:
    """(arguments, the flag the one-line message must name)."""
    folder, model = tmp / "folder", tmp / "model.npz"
    a_file, missing = tmp / "a-file", tmp / "no" / "such"
    cases: list[tuple[list[str], str]] = []
    numbers = {
        "--epochs": ["0", "-1", "abc", "1.5", ""],
        "--batch-size": ["0", "-3", "x", "1e3"],
        "--lr": ["0", "-1", "nan", "inf", "1e999", "abc"],
        "--seed": ["-1", "abc"],
        "--val-split": ["0", "1", "1.5", "-0.1", "nan", "abc"],
        "--limit": ["0", "-5", "abc"],
        "--early-stopping": ["-1", "abc", "2.5"],
    }
    for flag, values in numbers.items():
        cases += [(["train", flag, v], flag) for v in values]
    ck = ["--checkpoint", str(tmp / "ck.npz")]
    cases += [(["train", *ck, "--checkpoint-every", v], "--checkpoint-every")
              for v in ("0", "-2", "abc")]
    for flag in ("--dataset", "--model", "--optimizer", "--schedule", "--precision"):
        cases.append((["train", flag, "bogus"], flag))
    cases += [(["train", "--device", d], "--device") for d in ("tpu", "cuda:x", "")]
    # ("": the loaders' error about their data_dir argument, after checks that let it through)
    cases += [(["train", "--data-dir", str(p)], "--data-dir") for p in (missing, a_file, "")]
    for flag in ("--save", "--checkpoint", "--log"):
        cases += [(["train", flag, str(p)], flag) for p in
                  (folder, missing / "m.npz", UNWRITABLE / "m.npz", a_file / "m.npz",
                   "/dev/null", "")]
    # ("": `--plots "$OUT"` with OUT unset trained, exit 0, with no figures and no evaluation
    # each epoch)
    cases += [(["train", "--plots", str(p)], "--plots") for p in
              (a_file, missing / "plots", UNWRITABLE / "plots", "")]
    cases += [
        (["train", "--resume"], "--resume"),
        (["train", "--checkpoint-every", "5"], "--checkpoint-every"),
        (["train", "--save", str(tmp / "x.npz"), "--checkpoint", str(tmp / "x.npz")], "--save"),
        (["train", "--checkpoint", str(tmp / "x.npz"), "--log", str(tmp / "x.npz")],
         "--checkpoint"),
        # (the same file through a link to its folder, and through ~: were written both)
        (["train", "--save", str(tmp / "link" / "x.csv"), "--log", str(tmp / "x.csv")],
         "--save"),
        (["train", "--save", "~/x.npz", "--checkpoint", str(Path.home() / "x.npz")], "--save"),
        (["train", "--unknown-flag"], "--unknown-flag"),
        # (--plots DIR's figures are outputs too: they overwrote these after training, or the
        # figures failed after it)
        (["train", "--save", str(tmp / "history.png"), "--plots", str(tmp)], "--save"),
        (["train", "--checkpoint", str(tmp / "confusion.png"), "--plots", str(tmp)],
         "--checkpoint"),
        (["train", "--save", str(tmp / "out"), "--plots", str(tmp / "out")], "--plots"),
        (["train", "--plots", str(tmp / "plots")], "--plots"),  # (its history.png: a folder)
        # (known from the flags: was refused after loading the dataset)
        (["train", "--dataset", "mnist", "--model", "resnet20"], "--model"),
        (["train", "--dataset", "fashion-mnist", "--model", "fast-resnet"], "--model"),
        # (abbreviations: argparse took --jso for --json, main() printed no JSON then)
        (["train", "--jso"], "--jso"), (["train", "--epoch", "1"], "--epoch"),
        (["visualize", "--model", str(model), "--max-map", "4"], "--max-map"),
        (["visualize"], "--model"),
        # (a trailing "/" names a folder: it trained, then failed at the save)
        (["train", "--save", str(tmp / "nosuchdir") + "/"], "--save"),
    ]
    vis = ["visualize", "--model", str(model)]
    cases += [(["visualize", "--model", str(p)], "--model") for p in (missing, folder)]
    cases += [([*vis, "--index", v], "--index") for v in ("-1", "abc")]
    cases += [([*vis, "--max-maps", v], "--max-maps") for v in ("0", "33", "abc")]
    cases += [([*vis, "--dpi", v], "--dpi") for v in ("0", "5", "1000", "nan", "abc")]
    cases += [([*vis, "--out", str(p)], "--out") for p in
              (a_file, missing / "figs", UNWRITABLE / "figs", "")]  # ("": the working folder)
    cases += [([*vis, "--data-dir", str(missing)], "--data-dir"),
              ([*vis, "--data-dir", ""], "--data-dir"),
              ([*vis, "--device", "tpu"], "--device"),
              (["info", "--device", "tpu"], "--device")]
    return cases


def _files(tmp: Path) -> None:
    (tmp / "folder").mkdir(exist_ok=True)
    (tmp / "a-file").write_text("not a folder")
    (tmp / "model.npz").write_bytes(b"")  # (visualize checks it exists before reading it)
    if not (tmp / "link").exists():
        (tmp / "link").symlink_to(tmp)
    (tmp / "plots" / "history.png").mkdir(parents=True, exist_ok=True)


def test_every_bad_flag_value_is_one_line_naming_the_flag(tmp_path, traps, capsys):
    _files(tmp_path)
    cases = bad_cases(tmp_path)
    assert len(cases) > 85
    for argv, flag in cases:
        for as_json in (False, True):
            status = main([*argv, "--json"] if as_json else argv)
            out, err = capsys.readouterr()
            lines = err.splitlines()
            assert status == 2, (argv, err)
            assert len(lines) == 1 and flag in lines[0], (argv, err)
            assert "Traceback" not in out + err
            if as_json:
                (obj,) = [json.loads(line) for line in out.splitlines()]
                assert obj == {"error": lines[0], "exit_status": 2}
    assert not list((tmp_path / "folder").iterdir())  # nothing written anywhere


def test_messages_speak_of_flags_not_internals(tmp_path, traps, capsys):
    for argv, expected in [
        (["train", "--lr", "-1"], "argument --lr: expected a learning rate > 0, such as 3e-3, "
                                  "got '-1'"),
        (["train", "--checkpoint", str(tmp_path / "c.npz"), "--checkpoint-every", "0"],
         "argument --checkpoint-every: expected a whole number >= 1, got '0'"),
        (["train", "--batch-size", "0"], "argument --batch-size: expected a whole number >= 1"),
        (["train", "--save", str(tmp_path)], f"argument --save: '{tmp_path}' is a folder"),
        (["train", "--save", str(UNWRITABLE / "m.npz")], "cannot write in '/sys'"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("xpcnn train: error: ") and expected in err, err
        assert "CosineDecay" not in err and "checkpoint_every" not in err


@pytest.mark.parametrize("give_folder", [True, False], ids=["data-dir", "cache"])
def test_a_failed_download_tells_how_to_give_a_folder_on_the_command_line(
        tmp_path, monkeypatch, capsys, give_folder):
    """``xpcnn train --dataset mnist`` without the files, and the download fails: the one line
    names the flag (was: "pass data_dir=...", the loaders' Python argument); the loaders
    still name their argument to a Python caller, after the command as before it."""
    monkeypatch.delenv("XPCNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "data"
    folder.mkdir()
    with http_server({}) as srv:  # (every file: HTTP 404)
        monkeypatch.setenv("XPCNN_MNIST_URL", srv.url)
        argv = ["train", "--dataset", "mnist", "--quiet"]
        assert main([*argv, "--data-dir", str(folder)] if give_folder else argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("xpcnn train: error: Could not download MNIST: ")
        assert len(err.splitlines()) == 1 and "HTTP 404" in err
        assert ("To read them from another folder, pass --data-dir DIR or set the environment "
                "variable XPCNN_DATA_DIR.") in err and "data_dir" not in err
        with pytest.raises(DownloadError, match=r"pass data_dir=\.\.\. or set the environment"):
            xpcnn.datasets.load_mnist(folder)


@pytest.fixture
def small_shapes(monkeypatch):
    datasets_helpers.small_shapes(monkeypatch, 40)


@pytest.fixture
def shapes_64(monkeypatch):
    """The shapes dataset of 64 training images (TRAIN's --limit) and 20 test ones: generating
    the default sizes and evaluating on the test set cost most of a short in-process run."""
    datasets_helpers.small_shapes(monkeypatch, 64)


def test_the_plots_and_other_outputs_are_refused_on_one_file(tmp_path, traps, capsys):
    """--save DIR/history.png --plots DIR: the figure overwrote the saved model (exit 0);
    --save X --plots X: the model saved to X, then the figures failed (exit 2, after training)."""
    for argv, says in [
        (["--save", str(tmp_path / "history.png"), "--plots", str(tmp_path)],
         "argument --save: the same file as --plots (history.png); each output needs a file "
         "of its own"),
        (["--save", str(tmp_path / "out"), "--plots", str(tmp_path / "out")],
         f"argument --plots: '{tmp_path / 'out'}' is also the path of --save; give --plots a "
         "folder of its own"),
    ]:
        assert main(["train", *argv]) == 2
        assert capsys.readouterr().err == f"xpcnn train: error: {says}\n"
    assert not list(tmp_path.iterdir())


def test_a_precision_the_device_lacks_is_refused_before_the_data(traps, monkeypatch, capsys):
    """--precision mixed_bfloat16 without ml_dtypes: refused after loading the dataset."""
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # (as if it were not installed)
    assert main(["train", "--precision", "mixed_bfloat16"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("xpcnn train: error: argument --precision: mixed_bfloat16 on cpu: ")
    assert "needs ml_dtypes (pip install ml_dtypes" in line


def test_a_missing_optional_package_is_named_before_any_work(traps, monkeypatch, tmp_path,
                                                            capsys):
    """Without onnx, --export said only 'argument --export: pip install ...'; without
    matplotlib, visualize said 'argument visualize: ...', though it is the command."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (
        "onnx", "matplotlib") else find_spec(name, *a))
    assert main(["train", "--export", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == ('xpcnn train: error: argument --export: needs onnx, which '
                                       'is not installed: pip install "xpcnn[onnx]" (or: pip '
                                       'install onnx)\n')
    model = tmp_path / "model.npz"
    xpcnn.Sequential([xpcnn.layers.Flatten(), xpcnn.layers.Dense(2)], input_shape=(4, 4, 3)
                     ).save(model)
    assert main(["visualize", "--model", str(model), "--out", str(tmp_path / "figures")]) == 2
    assert re.fullmatch(r"xpcnn visualize: error: needs matplotlib, which is not installed: "
                        r"pip install .*\n", capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


def test_json_given_a_value_still_answers_in_json(capsys):
    """--json=1 is a usage error (a flag takes no value), answered as --json asks: one JSON
    object on stdout (was: nothing there)."""
    assert main(["info", "--json=yes"]) == 2
    out, err = capsys.readouterr()
    message = "argument --json: ignored explicit argument 'yes'"
    assert message in json.loads(out)["error"] and err == f"xpcnn info: error: {message}\n"


def test_a_val_split_that_leaves_nothing_to_train_on(small_shapes, capsys):
    assert main(["train", "--val-split", "0.999", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "argument --val-split: 0.999 of the 40 training images holds out 40 and leaves " \
           "none to train on" in err


def test_a_val_split_is_reported_as_it_was_asked(small_shapes, capsys):
    assert main(["train", "--val-split", "0.95", "--epochs", "1", "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["evaluated_on"] == "held-out 95% of the training set"
    assert (result["train_samples"], result["test_samples"]) == (2, 38)


def test_json_success_and_failure_are_one_object(small_shapes, capsys, tmp_path):
    assert main(["train", "--epochs", "1", "--limit", "8", "--quiet", "--json"]) == 0
    (result,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (result["epochs"], result["epochs_asked"], result["stopped_early"]) == (1, 1, False)
    assert main(["train", "--data-dir", str(tmp_path / "typo"), "--json"]) == 2
    out, err = capsys.readouterr()
    (failure,) = [json.loads(line) for line in out.splitlines()]
    assert failure["exit_status"] == 2 and "--data-dir" in failure["error"]
    assert failure["error"] == err.strip()


def test_output_paths_are_checked_before_training(small_shapes, tmp_path, capsys):
    """The issue's case: --save to a folder used to fail after training, losing the model."""
    calls = []
    fit = xpcnn.Sequential.fit

    def counting_fit(self, *a, **kw):
        calls.append(1)
        return fit(self, *a, **kw)

    xpcnn.Sequential.fit = counting_fit
    too_long = str(tmp_path / ("m" * 300 + ".npz"))  # (was a bare "[Errno 36] File name too
    # long" from the folder check)
    try:
        assert main(["train", "--epochs", "1", "--quiet", "--save", str(tmp_path)]) == 2
        assert main(["train", "--epochs", "1", "--quiet", "--checkpoint", str(tmp_path)]) == 2
        assert "is a folder" in capsys.readouterr().err
        assert main(["train", "--epochs", "1", "--quiet", "--save", too_long]) == 2
        err = capsys.readouterr().err
        assert "argument --save" in err and "the file name is 304 bytes long" in err
    finally:
        xpcnn.Sequential.fit = fit
    assert calls == []


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "xpcnn.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def test_no_traceback_from_the_real_entry_point(tmp_path):
    for argv in (["train", "--batch-size", "0"], ["train", "--limit", "-5", "--json"],
                 ["train", "--save", str(tmp_path)]):
        run = subprocess.run(_cli(*argv), capture_output=True, text=True, env=_env(),
                             timeout=120)
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stdout + run.stderr
        assert run.stdout == "" or json.loads(run.stdout)["exit_status"] == 2


TRAIN = ["train", "--limit", "64", "--batch-size", "8", "--schedule", "constant", "--quiet"]


def _sigint_as_at_a_terminal() -> None:
    """SIGINT's default action in the child, as a shell gives a command it runs in the
    foreground (Python then turns it into KeyboardInterrupt): a suite run in the background,
    or by a runner that ignores SIGINT, would otherwise hand its children that ignoring."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler (KeyboardInterrupt) in this process for the test, as at a
    terminal, whatever the runner left there (SIG_IGN in a background job); put back after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _ctrl_c(*args: str, wait) -> str:
    """Run ``xpcnn *args``, press Ctrl-C once training has started and ``wait(proc)`` returned;
    check that it ends with status 130 and one line on stderr, no traceback; that line."""
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), preexec_fn=_sigint_as_at_a_terminal)
    try:
        assert proc.stdout.readline().startswith("training shapes")
        wait(proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in out + err and len(err.splitlines()) == 1, err
    return err.strip()


def test_ctrl_c_writes_a_checkpoint_at_the_step_and_resume_continues(tmp_path):
    ck = tmp_path / "ck.npz"

    def until_the_first_checkpoint(proc):
        # Training has run a while: the first end-of-epoch checkpoint is there.
        deadline = time.monotonic() + 120
        while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)

    err = _ctrl_c(*TRAIN, "--epochs", "1000", "--checkpoint", str(ck),
                  wait=until_the_first_checkpoint)
    m = re.fullmatch(rf"xpcnn train: interrupted at epoch (\d+), step (\d+)/8; the checkpoint "
                     rf"{re.escape(str(ck))} holds the training state there: run the same "
                     r"command with --resume to continue", err)
    assert m, err
    epoch, step = int(m[1]), int(m[2])
    ckpt = load_checkpoint(ck)
    assert ckpt.model.optimizer.iterations == (epoch - 1) * 8 + step
    # The same command with --resume continues from there (here: to the end of the next epoch).
    assert main([*TRAIN, "--epochs", str(epoch + 1), "--checkpoint", str(ck), "--resume"]) == 0
    assert load_checkpoint(ck).model.optimizer.iterations == (epoch + 1) * 8


def test_ctrl_c_without_a_checkpoint_says_where_it_stopped(tmp_path):
    log = tmp_path / "log.csv"

    def until_an_epoch_is_logged(proc):
        # Training has run a while: the first epoch's --log row is there (was a fixed 1.5 s).
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and (
                not log.exists() or len(log.read_text().splitlines()) < 2):
            time.sleep(0.05)

    err = _ctrl_c(*TRAIN, "--epochs", "1000", "--log", str(log), wait=until_an_epoch_is_logged)
    assert re.fullmatch(r"xpcnn train: interrupted at epoch \d+, after step \d/8; nothing was "
                        r"kept \(--checkpoint PATH keeps the training state, and --resume "
                        r"continues from it\)", err), err


class _Dropped:
    """An object whose weak reference's callback gets the Ctrl-C: Python raises its
    KeyboardInterrupt in the callback, where it is reported as "Exception ignored" and dropped."""


def _dropped_ctrl_c(raised: bool = True) -> None:
    """A Ctrl-C whose KeyboardInterrupt Python raises inside a weakref callback, and drops
    (``raised`` False: under BackupAndRestore's handler, which raises none)."""
    seen = []
    gone = _Dropped()
    ref = weakref.ref(gone, lambda r: (signal.raise_signal(signal.SIGINT), seen.append("on")))
    del gone  # (the callback runs here; the KeyboardInterrupt is raised inside it)
    assert ref() is None and seen == ([] if raised else ["on"])  # (raised there: dropped)


@pytest.mark.parametrize("where", ["step 3", "the last epoch's end", "caught on purpose",
                                   "step 3, with a checkpoint"])
def test_a_ctrl_c_python_drops_still_stops_fit(tmp_path, ctrl_c_raises, monkeypatch, where):
    """A Ctrl-C whose KeyboardInterrupt is raised in a weakref callback (or a __del__) stops
    fit after that step, or on leaving where it came after the last step, with no "Exception
    ignored" report of it (was: lost, and fit trained on; the CLI's Ctrl-C test timed out
    waiting for it now and then). One a step catches on purpose is not dropped: fit goes on.
    Other errors a callback drops are still reported."""
    reported = []

    def report(unraisable):
        reported.append(type(unraisable.exc_value))

    monkeypatch.setattr(sys, "unraisablehook", report)
    model = ckpt_train.make_model()
    step, count = model.train_step, [0]

    def step_then_dropped_ctrl_c(xb, yb):
        out = step(xb, yb)
        count[0] += 1
        if count[0] == 2:  # (an error of the user's a callback drops: reported, as always)
            gone = _Dropped()
            ref = weakref.ref(gone, lambda r: 1 / 0)  # noqa: F841
            del gone
        if count[0] == 3 and where.startswith("step 3"):
            _dropped_ctrl_c(raised="checkpoint" not in where)
        if count[0] == 3 and where == "caught on purpose":
            with contextlib.suppress(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        return out

    model.train_step = step_then_dropped_ctrl_c
    last = xpcnn.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: (
        _dropped_ctrl_c() if epoch == ckpt_train.EPOCHS - 1 else None))
    path = tmp_path / "c.npz"
    train = functools.partial(ckpt_train.train, str(path) if "checkpoint" in where else None,
                              model=model, callbacks=[last])
    steps = ckpt_train.EPOCHS * 8
    if where == "caught on purpose":
        train(callbacks=[])
        assert count[0] == steps
    else:
        with pytest.raises(KeyboardInterrupt):
            train()
        assert count[0] == model.optimizer.iterations == (3 if "step" in where else steps)
    assert reported == [ZeroDivisionError]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    assert sys.unraisablehook is report  # (put back too)
    if "checkpoint" in where:  # (BackupAndRestore's first Ctrl-C waits for the step)
        assert load_checkpoint(path).model.optimizer.iterations == 3


@pytest.mark.parametrize("call, batch", [("evaluate", 1), ("evaluate", 3), ("predict", 1),
                                         ("predict", 3)])
def test_a_ctrl_c_python_drops_stops_evaluate_and_predict(ctrl_c_raises, monkeypatch, call,
                                                          batch):
    """evaluate and predict called on their own: a Ctrl-C whose KeyboardInterrupt Python
    drops (raised in a weakref callback) stops them after that batch, or on leaving after the
    last one (batch 3 of 3), as in fit (was: lost, and they ran on to the end)."""
    reported = []
    report = reported.append
    monkeypatch.setattr(sys, "unraisablehook", report)
    model = ckpt_train.make_model()
    x, y = (a[:24] for a in ckpt_train.data())
    seen = []

    def batch_end(b, logs):
        seen.append(b)
        if b == batch - 1:
            _dropped_ctrl_c()

    hook = "on_test_batch_end" if call == "evaluate" else "on_predict_batch_end"
    cb = xpcnn.callbacks.LambdaCallback(**{hook: batch_end})
    run = (functools.partial(model.evaluate, x, y) if call == "evaluate" else
           functools.partial(model.predict, x))
    with pytest.raises(KeyboardInterrupt):
        run(batch_size=8, callbacks=[cb])
    assert seen == list(range(batch)) and reported == []
    assert sys.unraisablehook is report  # (put back)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    run(batch_size=8)  # (no Ctrl-C left over: the next call runs to its end)


@pytest.mark.parametrize("stop, where", [(11, "epoch 2, step 3/8"), (16, "epoch 2, step 8/8")])
def test_fit_interrupted_then_resumed_ends_with_the_same_weights(tmp_path, ctrl_c_raises, stop,
                                                                 where):
    """Ctrl-C inside fit(checkpoint=...): the step in progress finishes, the checkpoint is
    written there, and resuming gives the uninterrupted run's weights, bit for bit; at an
    epoch's last step too, whose checkpoint is the epoch's end (was: one at step 8/8 of the
    epoch, which resumed into "the training data gave no batches")."""
    reference, _ = ckpt_train.train()
    model = ckpt_train.make_model()
    step = model.train_step
    count = [0]

    def step_then_ctrl_c(xb, yb):
        out = step(xb, yb)
        count[0] += 1
        if count[0] == stop:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the step's bookkeeping runs
        return out

    model.train_step = step_then_ctrl_c
    path = tmp_path / "c.npz"
    with pytest.raises(xpcnn.errors.TrainingInterrupted, match=where):
        ckpt_train.train(path, model=model)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    assert load_checkpoint(path).model.optimizer.iterations == stop
    steps_run = []  # (only those after the checkpoint: not a run that started afresh)
    resumed, _ = ckpt_train.train(path, resume=True, steps_run=steps_run)
    assert len(steps_run) == ckpt_train.EPOCHS * 8 - stop
    for a, b in zip(reference.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("error, status, text", [
    (OSError(28, "No space left on device"), 1, "error: [Errno 28] No space left on device"),
    (MemoryError(), 1, "error: out of memory (a smaller --batch-size needs less)"),
])
def test_failures_of_the_machine_are_one_line_too(small_shapes, tmp_path, monkeypatch, capsys,
                                                  error, status, text):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(xpcnn.Sequential, "fit", fail)
    assert main(["train", "--quiet", "--json"]) == status
    out, err = capsys.readouterr()
    assert err.splitlines()[-1] == f"xpcnn train: {text}" and "Traceback" not in err
    assert json.loads(out) == {"error": err.splitlines()[-1], "exit_status": status}


def test_flag_values_at_and_beyond_their_bounds():
    from xpcnn import cli

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:  # (the recipe scripts' flags, in scripts/_common.py)
        from _common import SMOOTHING, WEIGHT_DECAY
    finally:
        sys.path.pop(0)
    assert (cli.POSITIVE("1"), cli.NON_NEGATIVE("0"), cli.MAX_MAPS("32")) == (1, 0, 32)
    assert (cli.DPI("10"), cli.DPI("300"), WEIGHT_DECAY("0"), SMOOTHING("0")) == (
        10.0, 300.0, 0.0, 0.0)
    assert cli.NON_NEGATIVE("9" * 400) == int("9" * 400)  # whole numbers beyond a float's range
    for parse, text, want in [
        (cli.MAX_MAPS, "33", "a whole number from 1 to 32"),
        (cli.MAX_MAPS, "9" * 400, "a whole number from 1 to 32"),
        (cli.DPI, "300.5", "a resolution from 10 to 300 pixels per inch"),
        (SMOOTHING, "1", "a label smoothing from 0 to 1 (1 excluded), such as 0.1"),
        (cli.FRACTION, "1e-400", "a fraction between 0 and 1 (both excluded), such as 0.1"),
        (WEIGHT_DECAY, "-inf", "a weight decay >= 0, such as 5e-4"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError) as e:
            parse(text)
        assert str(e.value) == f"expected {want}, got {text!r}"


def test_an_output_written_in_place_may_be_a_pipe_one_written_by_a_rename_may_not(tmp_path):
    """The recipes write --json with a plain open(): a FIFO (or /dev/stdout) is taken there
    (was refused, "not a regular file", where the scripts used to write it); a file written by
    a rename (atomically, as model files) is refused such a name."""
    from xpcnn.cli import UsageError, output_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    output_file("--json", str(fifo), False)
    with pytest.raises(UsageError, match="exists and is not a regular file"):
        output_file("--save", str(fifo))


_RECIPE_JSON = """
import json, sys
sys.path.insert(0, sys.argv[1])
from _common import ScriptParser
from xpcnn.cli import output_file
p = ScriptParser()
p.check(output_file, "--json", "/dev/stdout", replaced=False)  # (as the recipes check it)
print("the recipe's lines", flush=True)
with open("/dev/stdout", "w") as f:  # (as the recipes write it)
    json.dump({"test_accuracy": 0.5}, f)
"""


def test_dev_stdout_as_an_output_whatever_stdout_is(tmp_path):
    """An output naming /dev/stdout, in a subprocess. Where stdout is a pipe, a file written
    in place (the recipes' --json) goes into it (was refused: "cannot write in
    '/proc/<pid>/fd'", as realpath made it '/proc/<pid>/fd/pipe:[n]'); one written anew and
    renamed (--log) is refused as a pipe. Where stdout is a file (`> out.txt`), both are
    refused before any work (the rename replaced the shell's file, so the --json result
    went to a file no longer there; a plain write overwrote the lines printed)."""
    scripts = str(ROOT / "scripts")
    # (the xpcnn under test, which may not be ROOT's)
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(Path(xpcnn.__file__).parents[1]),
                                                    str(ROOT)])}
    piped = subprocess.run([sys.executable, "-c", _RECIPE_JSON, scripts], capture_output=True,
                           text=True, env=env, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == "the recipe's lines\n" + '{"test_accuracy": 0.5}'
    train = _cli("train", "--limit", "16", "--epochs", "1", "--quiet", "--json", "--log",
                 "/dev/stdout")
    piped = subprocess.run(train, capture_output=True, text=True, env=env, timeout=120)
    assert piped.returncode == 2 and piped.stderr == (
        "xpcnn train: error: argument --log: '/dev/stdout' exists and is not a regular file (a "
        "device or a pipe), where the file is written anew and renamed over the old one; give "
        "a file path such as 'log.csv'\n")
    out = tmp_path / "out.txt"
    redirected = "is this command's standard output, redirected to the file " \
        f"{str(out)!r}: written by name, it would overwrite what is printed there, or be " \
        "overwritten by it; give a file of its own"
    # (a pipe is advised where the file is written in place, the recipe's --json, alone: was
    # advised for --log too, whose pipe is then refused as "not a regular file" above)
    pipe = ", or pipe the output (| cat > file), which is then written in place\n"
    for argv in ([sys.executable, "-c", _RECIPE_JSON, scripts], train):
        with open(out, "w") as f:
            done = subprocess.run(argv, stdout=f, stderr=subprocess.PIPE, text=True, env=env,
                                  timeout=120)
        assert done.returncode == 2 and redirected in done.stderr, done.stderr
        assert done.stderr.endswith(redirected + ("\n" if argv is train else pipe)), done.stderr
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
        if argv is train:  # (--json: the file holds the one JSON object, the error)
            assert json.loads(out.read_text())["error"] == done.stderr.strip()
        else:
            assert out.read_text() == ""


def test_output_flags_check_a_path_as_the_writers_do(tmp_path):
    """The flags' check is the writers' (checks.output_file_problem), worded for the flag: a
    link's target is checked, where the file goes (the flag checked the link's own folder, and
    the save after training failed in the target's); only a missing folder is the flag's own
    refusal (the writers would make it)."""
    from xpcnn import checks
    from xpcnn.cli import UsageError, output_file
    from xpcnn.errors import InputError

    link = tmp_path / "m.npz"
    link.symlink_to(UNWRITABLE / "m.npz")
    with pytest.raises(InputError, match=r"cannot write the model file .* in '/sys': "):
        checks.output_file(str(link), "the model file")
    with pytest.raises(UsageError, match=r"^argument --save: '.*m\.npz': cannot write in "
                                         r"'/sys' \("):
        output_file("--save", str(link))
    new = tmp_path / "new" / "m.npz"
    assert checks.output_file(str(new), "the model file") == str(new)
    with pytest.raises(UsageError, match=r"the folder '.*new' does not exist$"):
        output_file("--save", str(new))
    kind, folder, error = checks.output_file_problem(str(new), new_folders=False)
    assert (kind, folder, type(error)) == ("no folder", str(tmp_path / "new"),
                                           FileNotFoundError)


def test_json_to_a_reader_that_has_gone_ends_quietly():
    """`xpcnn train --json | head -c 20`: a reader that closed the pipe before the JSON was
    printed ends the command with status 141, as Unix tools end, and no traceback (was: a
    BrokenPipeError traceback, and Python's "Exception ignored" on exit)."""
    read, write = os.pipe()
    os.close(read)  # (no reader: the print meets a broken pipe)
    try:
        run = subprocess.run(_cli("train", "--limit", "16", "--epochs", "1", "--json"),
                             stdout=write, stderr=subprocess.PIPE, text=True, env=_env(),
                             timeout=300)
    finally:
        os.close(write)
    assert run.returncode == 141, run.stderr
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr


def _double_ctrl_c_at_save(monkeypatch, at: int) -> None:
    """The checkpoint write number ``at`` (1-based) meets a second Ctrl-C before it writes
    anything (a big model on a slow disk): one Ctrl-C asks for the checkpoint at the step, the
    next one does not wait for it (KeyboardInterrupt); the writes before it are done."""
    import xpcnn.saving.checkpoint as ck

    real, calls = ck.save_checkpoint, []

    def slow_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            for _ in range(2):  # (each handled before the next: Python merges pending ones)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            raise AssertionError("the second Ctrl-C did not interrupt")
        return real(*args, **kwargs)

    monkeypatch.setattr(ck, "save_checkpoint", slow_save)


@pytest.mark.parametrize("at, kept", [
    (2, "the last complete checkpoint stays in {ck} (epoch 1, step 3/8): run the same command "
        "with --resume to continue from it"),
    (4, "the last complete checkpoint stays in {ck} (the end of epoch 1): run the same command "
        "with --resume to continue from it"),
    (1, "nothing was kept (no checkpoint had been written to {ck} yet)"),
])
def test_a_second_ctrl_c_says_what_the_checkpoint_file_holds(tmp_path, ctrl_c_raises,
                                                             monkeypatch, capsys, at, kept,
                                                             shapes_64):
    """Ctrl-C twice with --checkpoint: the last checkpoint written stays, and the message says
    so and how to resume (was: "nothing was kept (--checkpoint PATH keeps the training
    state...)" though the file was there and resumed); "nothing was kept" only where no
    checkpoint had been written."""
    ck = tmp_path / "ck.npz"
    run = [*TRAIN, "--epochs", "3", "--checkpoint", str(ck), "--checkpoint-every", "3"]
    with monkeypatch.context() as m:
        _double_ctrl_c_at_save(m, at)  # (writes at steps 3, 6, the end of epoch 1, 11, ...)
        assert main(run) == 130
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"xpcnn train: interrupted at epoch \d, after step \d/8; "
                        + re.escape(kept.format(ck=ck)), err), err
    if at > 1:  # what it says holds: the same command with --resume continues from there
        assert load_checkpoint(ck).model.optimizer.iterations == {2: 3, 4: 8}[at]
        assert main([*run, "--resume"]) == 0
        assert load_checkpoint(ck).model.optimizer.iterations == 24
    else:
        assert not ck.exists()


def test_a_second_ctrl_c_before_this_run_wrote_its_checkpoint(tmp_path, ctrl_c_raises,
                                                              monkeypatch, capsys, shapes_64):
    """(no --resume: the file an earlier run left, which this run would have replaced, is not
    this run's work)"""
    ck = tmp_path / "ck.npz"
    run = [*TRAIN, "--epochs", "1", "--checkpoint", str(ck)]
    assert main(run) == 0
    with monkeypatch.context() as m:
        _double_ctrl_c_at_save(m, 1)
        assert main([*run[:-3], "2", *run[-2:]]) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"nothing of this run was kept ({ck} holds an earlier run's "
                        "checkpoint, as it was before this run)"), err


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
@pytest.mark.parametrize("unbuffered", [True, False])
def test_a_reader_that_has_gone_loses_no_work(tmp_path, stream, unbuffered):
    """`xpcnn train --save m.npz --epoch-lines | head -1`: once the reader has gone, what is
    printed goes nowhere, quietly, and training, saving and the log go on to the end; status
    141, as --json's (was: "error: [Errno 32] Broken pipe", status 1, the model never saved,
    training cut off). The same for stderr (progress bars, and --json's messages)."""
    model, log = tmp_path / "m.npz", tmp_path / "log.csv"
    read, write = os.pipe()
    os.close(read)  # (no reader: the first write meets a broken pipe)
    env = _env()
    if not unbuffered:  # (block-buffered into a pipe: the broken pipe is met at the end)
        del env["PYTHONUNBUFFERED"]
    argv = ["train", "--limit", "16", "--batch-size", "8", "--epochs", "3", "--save",
            str(model), "--log", str(log), *(["--epoch-lines"] if stream == "stdout" else
                                             ["--json"])]
    pipes = {"stdout": write, "stderr": subprocess.PIPE} if stream == "stdout" else \
        {"stdout": subprocess.PIPE, "stderr": write}
    try:
        run = subprocess.run(_cli(*argv), **pipes, text=True, env=env, timeout=300)
    finally:
        os.close(write)
    other = run.stderr if stream == "stdout" else run.stdout
    assert run.returncode == 141, other
    xpcnn.load_model(model)  # (written, whole)
    assert len(log.read_text().splitlines()) == 4  # (a header and the 3 epochs)
    if stream == "stdout":
        assert "Traceback" not in other and "BrokenPipe" not in other and \
            "Exception ignored" not in other, other
    else:  # (--json: stdout holds the results as ever)
        assert json.loads(other)["epochs"] == 3
