"""``xpcnn info``: versions, devices and the BLAS, as a table or as JSON alone."""

import json
import sys
import types

import datasets_helpers
import ml_dtypes
import numpy as np
import pytest

import xpcnn
import xpcnn.datasets
from xpcnn.cli import main


@pytest.fixture
def small_shapes(monkeypatch):
    datasets_helpers.small_shapes(monkeypatch, 40)


def test_info_on_a_machine_without_cupy(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"xpcnn: {xpcnn.__version__}" in out
    assert f"numpy: {np.__version__}" in out
    assert "cupy: None" in out and "gpus: []" in out
    assert "auto_device: cpu" in out  # --device auto without a GPU


def test_info_json_is_the_json_alone(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)  # the whole output parses
    assert info["xpcnn"] == xpcnn.__version__
    assert info["auto_device"] == "cpu" and info["gpus"] == []
    assert "ImportError" in info["cupy_note"] or "ModuleNotFoundError" in info["cupy_note"]
    assert info["ml_dtypes"] == ml_dtypes.__version__  # (bfloat16: the test extra has it)


def test_info_names_each_gpu_with_its_compute_capability(monkeypatch, capsys):
    props = [{"name": b"NVIDIA H200", "major": 9, "minor": 0},
             {"name": b"Tesla V100", "major": 7, "minor": 0}]
    runtime = types.SimpleNamespace(runtimeGetVersion=lambda: 13020,
                                    getDeviceCount=lambda: len(props),
                                    getDeviceProperties=lambda i: props[i])
    fake = types.SimpleNamespace(__version__="14.2.0", cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setenv("CUPY_TF32", "1")
    assert main(["info", "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cupy"] == "14.2.0" and info["cuda_runtime"] == 13020
    assert info["gpus"] == ["NVIDIA H200 (compute capability 9.0)",
                            "Tesla V100 (compute capability 7.0)"]
    assert info["cupy_tf32"] == "1"
    assert info["auto_device"] == "cpu"


def test_train_with_early_stopping_and_a_csv_log(tmp_path, capsys, small_shapes):
    log = tmp_path / "log.csv"
    # (a rate at which the held-out loss soon stops falling: at the default one it fell every
    # epoch, and a run without early stopping passed too; 32 images, 8 held out, stop after
    # epoch 2, as 64 in batches of 16 stopped after epoch 3)
    args = ["train", "--limit", "32", "--val-split", "0.25", "--epochs", "6", "--batch-size",
            "8", "--lr", "0.1", "--quiet", "--json", "--early-stopping", "1", "--log", str(log)]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    history = result["history"]
    # the epochs trained, not those asked for (was: "epochs": 6), and that it stopped early
    assert result["epochs"] == len(history["loss"]) < 6
    assert (result["epochs_asked"], result["stopped_early"]) == (6, True)
    rows = log.read_text().splitlines()
    assert rows[0].split(",") == ["epoch", "accuracy", "loss", "seconds", "val_accuracy",
                                  "val_loss"]
    assert len(rows) - 1 == len(history["val_loss"]) == len(history["loss"]) < 6
    assert history["val_loss"][-1] >= min(history["val_loss"][:-1])  # patience 1 ran out
    assert [float(r.split(",")[2]) for r in rows[1:]] == history["loss"]
    assert main(["train", "--limit", "10", "--quiet", "--early-stopping", "-1"]) == 2
    assert "argument --early-stopping: expected a whole number >= 0" in capsys.readouterr().err


def test_train_with_epoch_lines_for_log_files(tmp_path, capsys, small_shapes):
    """--epoch-lines: fit's verbose=2, one line an epoch with its loss and accuracy (those the
    CSV log holds)."""
    log = tmp_path / "log.csv"
    assert main(["train", "--limit", "32", "--epochs", "2", "--batch-size", "8",
                 "--epoch-lines", "--log", str(log)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [r.split(",") for r in log.read_text().splitlines()[1:]]  # epoch,accuracy,loss,...
    for epoch, row in enumerate(rows):
        at = lines.index(f"Epoch {epoch + 1}/2")
        assert lines[at + 1].startswith("4/4 - ")
        assert lines[at + 1].endswith(f" - loss: {float(row[2]):.4f} - accuracy: "
                                      f"{float(row[1]):.4f}")


def test_the_precision_names_have_one_source_and_the_scripts_toolkit_is_theirs():
    """PRECISIONS was backend's, re-exported by xpcnn.training, and cli.py had a tuple of its own
    under that name; cli.py also held the scripts' parser and flags, which it does not use."""
    import xpcnn.training
    from xpcnn import cli
    from xpcnn.backend import PRECISIONS

    assert tuple(PRECISIONS) == cli.PRECISION_NAMES  # (argparse's choices)
    assert not hasattr(xpcnn.training, "PRECISIONS")
    assert not {"ScriptParser", "WEIGHT_DECAY", "SMOOTHING", "CEILING"} & set(vars(cli))


def test_the_held_out_split_is_seeded_and_shared_by_the_scripts():
    from xpcnn.cli import hold_out, split_indices

    train, held_out = split_indices(50, 0.25, seed=3)
    assert len(held_out) == 12 and sorted([*train, *held_out]) == list(range(50))
    again, other = split_indices(50, 0.25, seed=3), split_indices(50, 0.25, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, held_out), strict=True))
    assert not np.array_equal(other[1], held_out)
    assert len(split_indices(5, 0.01, seed=0)[1]) == 1  # at least one held out
    x, y = np.arange(50) * 10, np.arange(50)
    (x_train, y_train), (x_val, y_val) = hold_out(x, y, 0.25, 3)
    np.testing.assert_array_equal(y_train, train)
    np.testing.assert_array_equal(y_val, held_out)
    np.testing.assert_array_equal(x_val, 10 * held_out)


def test_python_dash_m_xpcnn_is_the_xpcnn_command():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "xpcnn", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert xpcnn.__version__ in done.stdout
    done = subprocess.run([sys.executable, "-m", "xpcnn", "train", "--batch-size", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--batch-size" in done.stderr


def test_importing_xpcnn_main_runs_no_command():
    import importlib

    importlib.import_module("xpcnn.__main__")  # (was SystemExit: the command ran on import)


def test_a_resumed_run_adds_to_its_log_and_a_refused_one_leaves_it(tmp_path, capsys,
                                                                  small_shapes):
    """--log with --resume holds the epochs before the interruption, then the resumed ones
    (was: the file started afresh, the epochs before the interruption lost); a resume
    refused before training (another --epochs, hence another schedule) leaves the log as it
    was (was: emptied)."""
    log, ck = tmp_path / "log.csv", tmp_path / "run.npz"
    run = ["train", "--limit", "16", "--batch-size", "8", "--quiet", "--schedule", "constant",
           "--checkpoint", str(ck), "--log", str(log)]
    assert main([*run, "--epochs", "1"]) == 0
    first = log.read_text()
    assert main([*run, "--epochs", "2", "--resume", "--json"]) == 0  # (a constant rate)
    # (the epochs of the run, resumed ones too)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["epochs"], result["epochs_asked"], result["stopped_early"]) == (2, 2, False)
    rows = log.read_text().splitlines()
    assert log.read_text().startswith(first) and [r.split(",")[0] for r in rows[1:]] == ["0", "1"]
    capsys.readouterr()
    before = log.read_bytes()
    assert main([*run, "--epochs", "3", "--resume", "--schedule", "cosine"]) == 2
    err = capsys.readouterr().err  # (the flags to keep: was the library's "compile it")
    assert "compiled otherwise" in err and log.read_bytes() == before
    assert "give the same --model, --epochs, --optimizer, --lr, --schedule and --precision" in err
    # (another --precision is refused too: fit's resume takes a file's precision, which a
    # callback may have compiled the run in, but the command line has no such callback)
    assert main([*run, "--epochs", "2", "--resume", "--precision", "mixed_float16"]) == 2
    err = capsys.readouterr().err
    assert "compiled otherwise" in err and "precision" in err and log.read_bytes() == before
    run[run.index("--batch-size") + 1] = "4"
    assert main([*run, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "they differ in batch_size" in err and "resume with the same --dataset, " \
        "--val-split, --limit, --batch-size, --seed, --early-stopping and --data-dir files, " \
        "or start afresh with no --resume" in err


def test_a_warning_is_one_line_of_the_command_naming_its_flag(tmp_path, capsys, small_shapes):
    """A warning on the command line (a resume adding --early-stopping, whose state the
    checkpoint does not hold) is one line as the command's other messages, naming the flag
    (was Python's: "/.../xpcnn/__main__.py:9: RuntimeWarning: xpcnn: ... callbacks that keep
    one are ['EarlyStopping'] ...", then the source line "sys.exit(main())")."""
    run = ["train", "--limit", "16", "--batch-size", "8", "--epochs", "1", "--quiet",
           "--checkpoint", str(tmp_path / "ck.npz")]
    assert main(run) == 0
    capsys.readouterr()
    assert main([*run, "--resume", "--early-stopping", "1"]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "warning" in line]
    assert warned == [f"xpcnn train: warning: {tmp_path / 'ck.npz'} holds the states of the "
                      "callbacks [], and this run's callbacks that keep one are "
                      "[--early-stopping]: they start afresh (the same callbacks, in the same "
                      "order, go on from the file)"], err
    assert not any("RuntimeWarning" in line or "sys.exit" in line for line in err), err


def test_paths_with_a_tilde_are_the_home_folders(tmp_path, monkeypatch, capsys,
                                                 small_shapes):
    """--save=~/m.npz (a shell leaves ~ as it is after '='): written in the home folder, where
    it was checked (was: checked there, written to a folder named '~' here)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--limit", "16", "--epochs", "1", "--quiet", "--save=~/m.npz",
                 "--log=~/log.csv"]) == 0
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["log.csv", "m.npz"]
    assert not (tmp_path / "~").exists()


def test_a_model_made_for_other_images_is_refused_naming_the_flag(tmp_path, capsys):
    """resnet20 normalises CIFAR's three channels: on MNIST, a usage error naming --model
    (was: exit 2 with the layer's message alone, which named no flag)."""
    from datasets_helpers import random_mnist, write_mnist

    write_mnist(tmp_path, random_mnist(np.random.default_rng(0)))
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--model",
                 "resnet20", "--limit", "16", "--epochs", "1", "--quiet"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("xpcnn train: error: argument --model: resnet20 does not take "
                           "mnist's 28x28x1 images: the residual networks normalise RGB images")


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> str:
    """A model `xpcnn train` saved, for the visualize tests (which only read it): trained once."""
    import contextlib
    import io

    model = tmp_path_factory.mktemp("visualize") / "m.npz"
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        datasets_helpers.small_shapes(m, 40)
        assert main(["train", "--limit", "16", "--epochs", "1", "--quiet", "--save",
                     str(model)]) == 0
    return str(model)


def _visualize_once(trained_model) -> tuple[list[str], list[str]]:
    return [trained_model], ["visualize", "--model", trained_model, "--max-maps", "2", "--dpi",
                             "20"]


def test_visualize_on_a_rank_other_than_0_writes_and_prints_nothing(tmp_path, monkeypatch,
                                                                     capsys, trained_model):
    """As `xpcnn train`: under mpiexec, rank 0 writes the figures and speaks for all (was:
    every rank wrote the same files at once, and printed)."""
    from xpcnn import distributed

    _, visualize = _visualize_once(trained_model)
    monkeypatch.setattr(distributed, "is_root", lambda: False)
    assert main([*visualize, "--out", str(tmp_path / "figs")]) == 0
    assert capsys.readouterr() == ("", "")
    assert not (tmp_path / "figs").exists() or not any((tmp_path / "figs").iterdir())


def _mpiexec() -> str | None:
    import importlib.util
    import shutil
    from pathlib import Path

    if importlib.util.find_spec("mpi4py") is None:
        return None
    beside = Path(sys.executable).parent / "mpiexec"  # where the mpich wheel puts it
    return str(beside) if beside.exists() else shutil.which("mpiexec")


@pytest.mark.skipif(_mpiexec() is None, reason='needs mpiexec and mpi4py: pip install -e ".[mpi]"')
def test_visualize_under_mpiexec_writes_and_speaks_once(tmp_path, trained_model):
    import os
    import subprocess
    from pathlib import Path

    mpiexec = _mpiexec()
    _, visualize = _visualize_once(trained_model)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OPENBLAS_NUM_THREADS": "1"}
    cli = "import sys; from xpcnn.cli import main; sys.exit(main())"
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", cli, *visualize, "--out",
                           str(tmp_path / "figs"), "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.strip().splitlines()  # rank 0's JSON alone
    written = json.loads(line)["written"]
    assert sorted(os.path.basename(p) for p in written) == sorted(
        p.name for p in (tmp_path / "figs").iterdir())
    wrote = [x for x in proc.stderr.splitlines() if x.startswith("wrote ")]
    assert wrote == [f"wrote {p}" for p in written], proc.stderr  # (was: each twice)
    assert proc.stderr.count("shapes test image 0: label") == 1


def test_a_run_stopped_between_a_log_row_and_its_checkpoint_resumes_to_the_same_log(
        tmp_path, monkeypatch, capsys, small_shapes):
    """A run stopped after an epoch's --log row but before its checkpoint (a second Ctrl-C
    during the write) and resumed: the log holds the uninterrupted run's rows, each epoch once
    (was: epochs 0, 1, 1, 2: the resumed run replayed epoch 1 and appended its row again); the
    interruption names the last step done, "epoch 2, after step 2/2" (was: "epoch 3, after
    step 0/2")."""
    import xpcnn.saving.checkpoint as ck

    run = ["train", "--limit", "16", "--batch-size", "8", "--epochs", "3", "--quiet",
           "--schedule", "constant"]
    assert main([*run, "--log", str(tmp_path / "ref.csv")]) == 0
    real, calls = ck.save_checkpoint, []

    def cut_at_the_second_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # (the end of epoch 2's write)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    log, checkpoint = tmp_path / "run.csv", tmp_path / "c.npz"
    run = [*run, "--log", str(log), "--checkpoint", str(checkpoint)]
    with monkeypatch.context() as m:
        m.setattr(ck, "save_checkpoint", cut_at_the_second_write)
        capsys.readouterr()
        assert main(run) == 130
    assert "interrupted at epoch 2, after step 2/2; " in capsys.readouterr().err
    assert main([*run, "--resume"]) == 0

    def rows(path):  # (without the seconds column, which differs)
        lines = [line.split(",") for line in path.read_text().splitlines()]
        keep = [i for i, name in enumerate(lines[0]) if name != "seconds"]
        return [[line[i] for i in keep] for line in lines]

    assert [row[0] for row in rows(log)[1:]] == ["0", "1", "2"]
    assert rows(log) == rows(tmp_path / "ref.csv")
