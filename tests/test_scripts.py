"""The benchmark helpers under scripts/ run (their figures are not checked: timings belong to the
benchmarks, not the tests)."""

import contextlib
import gzip
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cuda_emulator import needs_compiler
from test_launch_counts import PINNED

from xpcnn.backend import cuda_available

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, script: str = "compare_revisions.py",
         env: dict[str, str] | None = None, cwd: Path | None = None
         ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=cwd)


@contextlib.contextmanager
def _script_state(torch: bool = False):
    """A script's main run in this process (where the test is not about the process: no
    interpreter to start, nor PyTorch to import): sys.path, sys.argv and os.environ put back
    afterwards; with ``torch`` (a script that runs PyTorch), PyTorch on one thread inside, as
    under pytest-xdist (conftest.py's OMP_NUM_THREADS=1: on a shared machine its threads
    spin-wait for cores), unless the script sets its count, and its count put back after."""
    path, argv, environ = list(sys.path), list(sys.argv), dict(os.environ)
    module = None
    if torch and importlib.util.find_spec("torch") is not None:
        import torch as module
    threads = module.get_num_threads() if module is not None else None
    try:
        if module is not None:
            module.set_num_threads(1)
        yield
    finally:
        sys.path[:], sys.argv[:] = path, argv
        os.environ.clear()
        os.environ.update(environ)
        if module is not None and module.get_num_threads() != threads:
            module.set_num_threads(threads)


def _main(script: str, *argv: str, torch: bool = False) -> int:
    """``python scripts/<script> *argv`` in this process: the script's main(argv), the script
    imported as running it does (its folder first on sys.path)."""
    with _script_state(torch):
        sys.path.insert(0, str(ROOT / "scripts"))
        sys.argv = [str(ROOT / "scripts" / script), *argv]
        return importlib.import_module(script.removesuffix(".py")).main(list(argv))


def test_compare_revisions_times_two_checkouts():
    # the working tree against itself: one line per model:mode, each with a ratio
    out = _run("--old", str(ROOT), "--specs", "mnist:infer,notebook:train", "--rounds", "2",
               "--block", "1", "--batch-size", "4")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for spec in ("mnist:infer", "notebook:train"):
        row = next(line for line in lines if line.startswith(spec))
        assert row.split()[3].endswith("x") and "/2)," in row and row.endswith("x")


def test_compare_revisions_names_what_is_wrong(tmp_path):
    out = _run("--old", str(tmp_path))
    assert out.returncode != 0 and "no xpcnn/__init__.py" in out.stderr
    out = _run("--old", str(ROOT), "--specs", "mnist:fly")
    assert out.returncode != 0 and "'mnist:fly' is not model:mode" in out.stderr


@pytest.mark.skipif(cuda_available(), reason="a GPU is here: scripts/gpu_check.sh runs the probes")
def test_the_gpu_probes_say_so_where_there_is_no_gpu():
    """scripts/gpu_probes.py (run first by scripts/gpu_check.sh) imports everywhere; its probes
    need a GPU."""
    out = _run(script="gpu_probes.py")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "gpu_probes: no CUDA GPU here; nothing probed\n"


@pytest.mark.skipif(importlib.util.find_spec("keras") is not None,
                    reason="Keras is here: the script compares "
                           "(python scripts/keras_callbacks_check.py)")
def test_the_keras_callbacks_check_says_it_skipped_without_keras():
    """scripts/keras_callbacks_check.py compares the callbacks with Keras 3, not a dependency."""
    out = _run(script="keras_callbacks_check.py")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "skipped: Keras 3 is not importable\n"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_the_gpu_benchmark_dry_runs_on_the_cpu(layout, tmp_path, capsys):
    """scripts/bench_gpu.py as the device check runs it, on the CPU, with PyTorch in the layout
    asked for (its twin is fed NCHW by default, as in scripts/bench.py). The kernel census in
    NCHW alone: on the CPU it records no device work in either layout. (Its main in this
    process: PyTorch imported once.)"""
    pytest.importorskip("torch")
    out_json = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--models", "mnist", "--batch-sizes", "4", "--steps", "1",
            "--warmup", "0", "--precisions", "float32", "--no-standard", "--fit-batches", "2",
            "--json", str(out_json)]
    # (the kernel census, NCHW's, compiles a model with cuda_graphs=True: it warns where none
    # can be captured)
    census_warns = pytest.warns(RuntimeWarning, match="training steps run without CUDA graphs: "
                                "CUDA graphs need the CuPy backend, not numpy")
    with census_warns if layout == "nchw" else contextlib.nullcontext():
        assert _main("bench_gpu.py", *args, *(["--torch-channels-last"]
                                              if layout == "channels_last"
                                              else ["--kernels", "mnist:4:float32"]),
                     torch=True) == 0
    out = capsys.readouterr()
    report = json.loads(out_json.read_text())
    assert report["software"]["torch_memory_format"] == layout
    (row,) = report["rows"]
    assert row["xpcnn"]["train_img_s"] > 0 and row["torch"]["train_img_s"] > 0
    # through fit() on host uint8 images, its TFLOP/s, and why no CUDA graphs here
    assert row["xpcnn"]["fit_img_s"] > 0 and row["xpcnn"]["fit_tflops"] > 0
    assert row["xpcnn"]["cuda_graphs"] == "CUDA graphs need the CuPy backend, not numpy"
    assert row["xpcnn"]["peak_tflops"] is None  # no datasheet peak for a CPU
    targets = report["software"]["issue_18_targets"]  # (batch 4, no GPU memory: one check)
    assert [targets[k]["measured"] for k in targets if k != "lines"] == [1, 0, 0]
    assert "issue 18's targets:\n  fit >= 1.0x PyTorch eager: " in out.out
    if layout == "nchw":
        (census,) = report["kernels"]  # (a dry run: the CPU profile holds no device events)
        assert census["spec"] == "mnist:4:float32" and census["torch eager"]["kernels"] == 0
        assert census["xpcnn graph"]["cuda_graphs"] == row["xpcnn"]["cuda_graphs"]


def test_the_gpu_benchmark_holds_each_row_to_issue_18s_targets():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_gpu import issue_18_targets
    finally:
        sys.path.pop(0)

    def row(model, batch, fit, torch, mib, torch_mib):
        return {"model": model, "batch": batch, "precision": "float32",
                "xpcnn": {"fit_img_s": fit, "peak_mib": mib},
                "torch": {"train_img_s": torch, "peak_mib": torch_mib}}

    verdict = issue_18_targets([row("mnist", 128, 90.0, 45.0, 300.0, 250.0),   # 2.0x, 1.2x
                                row("cifar", 128, 60.0, 40.0, 500.0, 300.0),   # 1.5x, 1.67x
                                row("cifar", 512, 80.0, 100.0, None, 900.0)])  # 0.8x, -
    assert verdict["fit >= 1.0x PyTorch eager"] == {"measured": 3,
                                                     "missed": ["cifar b512 float32 0.80x"]}
    assert verdict["fit >= 2.0x PyTorch eager at batch 128"] == {
        "measured": 2, "missed": ["cifar b128 float32 1.50x"]}
    assert verdict["peak memory <= 1.5x PyTorch's"] == {"measured": 2,
                                                        "missed": ["cifar b128 float32 1.67x"]}
    assert verdict["lines"][0] == ("fit >= 1.0x PyTorch eager: 2 of 3 rows met; missed: "
                                   "cifar b512 float32 0.80x")


def test_the_gpu_benchmarks_kernel_census_counts_per_step():
    """bench_gpu.py --kernels: the profile's device events of 2 steps, sorted into kernels,
    copies and memsets per step, the kernels' time, and the costliest kernels first."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_gpu import census
    finally:
        sys.path.pop(0)
    events = [("xpcnn_bias_relu", 3.0), ("Memset (Device)", 1.0), ("sm90_xmma_fprop", 20.0),
              ("xpcnn_bias_relu", 5.0), ("Memcpy HtoD (Pageable -> Device)", 2.0),
              ("sm90_xmma_fprop", 22.0), ("xpcnn_update", 4.0)]
    got = census(events, steps=2, top=2)
    assert (got["kernels"], got["memcpy"], got["memset"]) == (2.5, 0.5, 0.5)
    assert got["kernel_us"] == 27.0  # (3 + 20 + 5 + 22 + 4) / 2: copies and memsets apart
    assert got["top"] == [{"kernel": "sm90_xmma_fprop", "per_step": 1.0, "us": 21.0},
                          {"kernel": "xpcnn_bias_relu", "per_step": 1.0, "us": 4.0}]


def test_the_per_layer_tables_dry_run(tmp_path, monkeypatch, capsys):
    """scripts/bench.py --layers (each layer as written, its own ReLU included, as its PyTorch
    twin) and bench_gpu.py --profile (the layers a training step runs, on the CPU here). (Each
    script's main in this process, as running it calls it: PyTorch imported once.)"""
    out_json = tmp_path / "layers.json"
    # (both models in one run)
    bench = _bench_module(monkeypatch, "--layers", "--models", "notebook,configs",
                          "--batch-size", "2", "--steps", "1", "--warmup", "0", "--threads", "1",
                          "--json", str(out_json))
    with _script_state(torch=True):
        bench.main()
    rows = json.loads(out_json.read_text())["layers"]
    notebook = [r for r in rows if r["model"] == "notebook"]
    assert [r["layer"] for r in notebook][:3] == ["conv2d", "relu", "conv2d_1"]
    assert all(r["xpcnn"]["forward_ms"] > 0 for r in rows)
    rows = rows[len(notebook):]  # (each after a layer with weights)
    assert [r["layer"] for r in rows][:2] == ["conv3x3/2 same", "conv1x1/2"]
    assert all(r["input_grad"] and r["model"] == "configs" for r in rows)
    assert ("torch" in rows[0]) == (importlib.util.find_spec("torch") is not None)
    for precision in ("mixed_float16", "mixed_bfloat16"):  # (PyTorch under CPU autocast)
        monkeypatch.setattr(bench, "ARGS", bench.parse_args([
            "--layers", "--models", "mnist", "--batch-size", "2", "--steps", "1", "--warmup",
            "0", "--threads", "1", "--precision", precision, "--json", str(out_json)]))
        capsys.readouterr()
        with _script_state(torch=True):
            bench.main()
        got = json.loads(out_json.read_text())
        assert got["precision"] == precision and len(got["layers"]) >= 4
        assert f"Precision: {precision}" in capsys.readouterr().out
    assert _main("bench_gpu.py", "--device", "cpu", "--models", "notebook", "--batch-sizes",
                 "4", "--steps", "1", "--warmup", "0", "--precisions", "float32",
                 "--no-standard", "--profile", "notebook:4:float32", torch=True) == 0
    out = capsys.readouterr().out
    profile = out[out.index("per layer, notebook"):]
    assert "conv2d_1" in profile and "relu_1" not in profile  # ReLU() fused, as in training


def test_training_from_a_folder_of_png_files(tmp_path, capsys):
    """scripts/train_from_folder.py: a demo folder of PNG files, then a run that reads it a batch
    at a time, with early stopping and a CSV log. (Its main in this process; its usage errors
    as a process's, exit status included, are test_the_scripts_refuse_what_cannot_work_...'s.)"""
    pytest.importorskip("PIL")
    folder, log = tmp_path / "images", tmp_path / "log.csv"
    assert _main("train_from_folder.py", str(folder), "--make-demo", "--count", "60") == 0
    assert len(list(folder.rglob("*.png"))) == 60
    capsys.readouterr()
    assert _main("train_from_folder.py", str(folder), "--epochs", "2", "--batch-size", "16",
                 "--val-split", "0.2", "--early-stopping", "1", "--log", str(log),
                 "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["train_images"], result["held_out_images"]) == (48, 12)
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["history"]["val_loss"]) >= 1
    assert log.read_text().splitlines()[0].startswith("epoch,")
    with pytest.raises(SystemExit) as exit_:
        _main("train_from_folder.py", str(tmp_path / "missing"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument FOLDER: the folder" in err
    assert "missing' does not exist" in err


def _folder_script():
    """scripts/train_from_folder.py as a module."""
    spec = importlib.util.spec_from_file_location("train_from_folder",
                                                  ROOT / "scripts" / "train_from_folder.py")
    script = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "scripts"))  # (as running it does: it imports _common)
    try:
        spec.loader.exec_module(script)
    finally:
        sys.path.pop(0)
    return script


def test_an_image_folder_given_its_files_reads_their_size(tmp_path):
    """ImageFolder(root, files) without a size refused every image ("where the first image is
    "): the size is read from the files' headers."""
    pytest.importorskip("PIL")
    script = _folder_script()
    script.make_demo(tmp_path, 6)
    whole = script.ImageFolder(tmp_path)
    some = script.ImageFolder(tmp_path, whole.files[1:4])
    assert some.size == whole.size == (32, 32) and len(some) == 3
    image, label = some[0]
    assert image.shape == (32, 32, 3) and label == whole.files[1][1]


def test_an_image_folder_reads_as_keras_does_hidden_nested_and_gif(tmp_path):
    """As Keras' image_dataset_from_directory: a hidden folder (Jupyter's .ipynb_checkpoints)
    was class 0, shifting every label; images in a class's nested folders and .gif files were
    silently left out. Dot-folders and dot-files are skipped, nested folders walked in sorted
    order, a GIF read as its first frame."""
    image_module = pytest.importorskip("PIL.Image")
    script = _folder_script()
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (4, 3), dtype=np.uint8)  # (a GIF's palette keeps them)
    written = {}

    def save(relative, fmt=None):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = colours[rng.integers(0, 4, (8, 8))]
        image_module.fromarray(pixels).save(path, format=fmt)
        written[relative] = pixels

    for name in ["cat/1.png", "cat/0.png", "cat/y.gif", "dog/b/x.png", "dog/a.png",
                 "dog/a/z.png", ".ipynb_checkpoints/c.png", "dog/.hidden/h.png"]:
        save(name)
    save("cat/._0.png", "PNG")  # (macOS' AppleDouble companion file)
    (tmp_path / "notes.txt").write_text("not a class")
    folder = script.ImageFolder(tmp_path)
    assert folder.classes == ["cat", "dog"]
    got = [str(f.relative_to(tmp_path)) for f, _ in folder.files]
    assert got == ["cat/0.png", "cat/1.png", "cat/y.gif", "dog/a.png", "dog/a/z.png",
                   "dog/b/x.png"]
    assert [label for _, label in folder.files] == [0, 0, 0, 1, 1, 1]
    for i, name in enumerate(got):
        image, label = folder[i]
        np.testing.assert_array_equal(image, written[name])
        assert label == folder.files[i][1]


def test_the_loop_overhead_benchmark_dry_runs():
    out = _run("--model", "mnist", "--batch-size", "4", "--samples", "64", "--repeat", "1",
               "--optimizer", "adam", script="bench_loop.py")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.endswith(("ms per step",
                                                                        "us per step"))]
    assert [r.split("  ")[1].strip() for r in rows] == [
        "host batch -> device", "batch gathered on device", "step bookkeeping",
        "fit loop, eager steps", "fit loop, replayed steps"]
    assert "not replayed" not in out.stdout  # (the stand-in capture's replays)


def test_the_model_table_dry_runs(tmp_path):
    """scripts/bench.py's default table (xpcnn alone here), with its FLOP count against one by
    hand for the notebook's network on 32x32x3 images: two 3x3 convolutions (32 filters, valid),
    then Dense 6272 -> 128 -> 10."""
    out_json = tmp_path / "models.json"
    out = _run("--models", "notebook", "--batch-size", "4", "--steps", "1", "--blocks", "1",
               "--warmup", "0", "--no-torch", "--no-memory", "--peak-size", "64", "--json",
               str(out_json), script="bench.py")
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out_json.read_text())["models"]
    per_image = 2 * (30 * 30 * 32 * 27 + 28 * 28 * 32 * 288 + 6272 * 128 + 128 * 10)
    assert row["forward_gflop"] == pytest.approx(4 * per_image / 1e9, rel=1e-12)
    assert row["xpcnn"]["train_img_s"] > 0 and row["xpcnn"]["infer_img_s"] > 0


@pytest.mark.parametrize("script, flag, value", [
    ("mnist_recipe.py", "--epochs", "0"), ("mnist_recipe.py", "--weight-decay", "-1"),
    ("cifar_recipe.py", "--val-split", "1"), ("cifar_recipe.py", "--label-smoothing", "nan"),
    ("train_from_folder.py", "--batch-size", "-3"), ("train_from_folder.py", "--lr", "0"),
])
def test_the_recipe_scripts_refuse_bad_flags_as_the_cli_does(tmp_path, script, flag, value):
    """Exit status 2 and an error line naming the flag and the value, before any data is
    read (the data folder here is empty)."""
    out = _run(*(["--data-dir", str(tmp_path)] if "recipe" in script else [str(tmp_path)]),
               flag, value, script=script)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"error: argument {flag}: expected " in last and last.endswith(f"got '{value}'")


def _no_cuda() -> bool:
    from xpcnn.backend import cuda_available

    return not cuda_available()


# (script, its arguments: DATA is an empty folder, DEMO a folder of PNG images, SPOT a folder
# for outputs; the flag the error names; what it says)
SCRIPT_USAGE_ERRORS = [
    ("mnist_recipe.py", ["--json", "SPOT"], "--json", "is a folder; give a file path such as"),
    ("cifar_recipe.py", ["--json", "SPOT"], "--json", "is a folder; give a file path such as"),
    ("mnist_recipe.py", ["--json", "SPOT/missing/r.json"], "--json", "does not exist"),
    ("mnist_recipe.py", ["--precision", "float64"], "--precision", "invalid choice: 'float64'"),
    ("mnist_recipe.py", ["--device", "tpu"], "--device", "unknown device 'tpu'"),
    pytest.param("mnist_recipe.py", ["--device", "cuda"], "--device", "device 'cuda:0'",
                 marks=pytest.mark.skipif(not _no_cuda(), reason="a GPU is here")),
    pytest.param("cifar_recipe.py", ["--device", "cuda"], "--device", "device 'cuda:0'",
                 marks=pytest.mark.skipif(not _no_cuda(), reason="a GPU is here")),
    ("mnist_recipe.py", ["--jso", "SPOT/r.json"], "", "unrecognized arguments: --jso"),
    ("train_from_folder.py", ["DEMO", "--save", "SPOT"], "--save", "is a folder"),
    ("train_from_folder.py", ["DEMO", "--log", "SPOT"], "--log", "is a folder"),
    ("train_from_folder.py", ["DEMO", "--save", "SPOT/m", "--log", "SPOT/m"], "--save",
     "the same file as --log"),
    ("tour.py", ["--epochs", "-3"], "--epochs", "expected a whole number >= 0, got '-3'"),
    ("tour.py", ["--epochs", "1", "--limit", "-100"], "--limit", "expected a whole number >= 1"),
    ("tour.py", ["--epochs", "1", "--limit", "0"], "--limit", "expected a whole number >= 1"),
    ("tour.py", ["--ceiling", "0"], "--ceiling", "expected a ReLU ceiling > 0"),
    ("tour.py", ["--data-dir", "DATA/missing"], "--data-dir", "does not exist"),
    ("tour.py", ["--out", "SPOT/x/tour"], "--out", "does not exist"),
    ("mnist_recipe.py", ["--json", ""], "--json", "an empty path; give a file path such as"),
    ("train_from_folder.py", ["DATA/nothere"], "FOLDER", "the folder"),
    # (was: "" taken as the current folder, to train on or write the demo's class folders in;
    # --make-demo over or under a file, or where no file can be made, a traceback)
    ("train_from_folder.py", [""], "FOLDER", "an empty path; give a folder"),
    ("train_from_folder.py", ["--make-demo", "", "--count", "3"], "FOLDER",
     "an empty path; give a folder"),
    ("train_from_folder.py", ["--make-demo", "DEMO/a/0.png", "--count", "3"], "FOLDER",
     "0.png' exists and is not a folder"),
    ("train_from_folder.py", ["--make-demo", "DEMO/a/0.png/sub", "--count", "3"], "FOLDER",
     "0.png/sub': 'DEMO/a/0.png' exists and is not a folder"),
    ("train_from_folder.py", ["--make-demo", "SPOT/" + "x" * 300, "--count", "3"], "FOLDER",
     "cannot write (File name too long)"),
    # (was "x is an empty dataset (len() is 0)", naming neither the flag nor the images)
    ("train_from_folder.py", ["DEMO", "--val-split", "0.95"], "--val-split",
     "0.95 of the 8 training images holds out 8 and leaves none to train on; choose a smaller "
     "fraction"),
    # (a download refused: one line naming --data-dir, as xpcnn train's; was a traceback)
    ("mnist_recipe.py", [], "", "Could not download MNIST"),
    ("cifar_recipe.py", [], "", "Could not download CIFAR-10"),
]


# Runs each case given on stdin (its arguments, its current folder) as `python <script> ...`
# would, in one interpreter: its __main__ afresh, warnings as in a fresh process; prints each
# one's [exit status, stdout, stderr] (a traceback as the interpreter prints it).
_RUN_CASES = r"""
import contextlib, io, json, os, runpy, sys, traceback, warnings
script = sys.argv[1]
sys.path[0] = os.path.dirname(script)  # (as `python <script>` puts its folder first)
results = []
for args, cwd in json.load(sys.stdin):
    os.chdir(cwd)
    sys.argv = [script, *args]
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings():
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
            status = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            status = 1
    results.append([status, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def _refusal_case(root: Path, script: str, args: list[str]
                  ) -> tuple[list[str], Path, Callable[[str], str]]:
    """The case's folders under ``root`` (DATA empty, DEMO 8 PNG images in two classes, SPOT
    empty), its arguments placed in them, SPOT and the function that places a message."""
    from PIL import Image

    data, demo, spot = root / "data", root / "demo", root / "spot"
    for folder in (data, spot, demo / "a", demo / "b"):
        folder.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 30 * i, np.uint8)).save(
            demo / "ab"[i % 2] / f"{i}.png")
    def placed(text: str) -> str:
        return text.replace("DATA", str(data)).replace("DEMO", str(demo)).replace("SPOT",
                                                                                  str(spot))

    args = [placed(a) for a in args]
    if script != "train_from_folder.py" and "--data-dir" not in args:
        args += ["--data-dir", str(data)]
    if script == "tour.py" and "--out" not in args:
        args += ["--out", str(spot / "tour")]
    if "--epochs" not in args:  # (short runs where the old scripts went on to train)
        args += ["--epochs", "0" if script == "tour.py" else "1"]
    return args, spot, placed


_REFUSED_ENV = {"XPCNN_MNIST_URL": "http://127.0.0.1:9/",  # (nothing listens: a download
                "XPCNN_CIFAR10_URL": "http://127.0.0.1:9/"}  # fails at once)


@pytest.fixture(scope="module")
def refusal(tmp_path_factory):
    """``refusal(script, args)``: the script's run on the case's arguments, its SPOT folder
    (its current folder) and the function that places a message. The last case of each script
    in SCRIPT_USAGE_ERRORS runs as `python scripts/<script> ...` itself (the exit status the
    interpreter's); the script's others all in one interpreter, as _RUN_CASES runs them
    (one start a script instead of one a case)."""
    pytest.importorskip("PIL")
    runs: dict[tuple[str, tuple[str, ...]], tuple] = {}  # (the script's cases run together)

    def run(script: str, args: list[str]) -> tuple:
        if (script, tuple(args)) in runs:
            return runs[script, tuple(args)]
        *together, alone = [case[1] for case in
                            (getattr(c, "values", c) for c in SCRIPT_USAGE_ERRORS)
                            if case[0] == script]
        if args == alone:
            placed_args, spot, placed = _refusal_case(tmp_path_factory.mktemp("refusal"),
                                                      script, args)
            return (_run(*placed_args, script=script, cwd=spot, env=_REFUSED_ENV), spot,
                    placed)
        cases = [_refusal_case(tmp_path_factory.mktemp("refusal"), script, a)
                 for a in together]
        out = subprocess.run([sys.executable, "-c", _RUN_CASES, str(ROOT / "scripts" / script)],
                             input=json.dumps([[a, str(spot)] for a, spot, _ in cases]),
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, **_REFUSED_ENV}, cwd=cases[0][1])
        assert out.returncode == 0, out.stderr
        for a, (placed_args, spot, placed), (status, stdout, stderr) in zip(
                together, cases, json.loads(out.stdout), strict=True):
            runs[script, tuple(a)] = (subprocess.CompletedProcess(
                [script, *placed_args], status, stdout, stderr), spot, placed)
        return runs[script, tuple(args)]

    return run


@pytest.mark.parametrize("script, args, flag, says", SCRIPT_USAGE_ERRORS)
def test_the_scripts_refuse_what_cannot_work_before_any_work(refusal, script, args, flag,
                                                             says):
    """One line (no traceback), exit status 2, before the data is loaded (a download would
    fail at once here) or anything trained or drawn; was: a path to write checked only after
    training (IsADirectoryError, an InputError's traceback), negative --epochs and --limit
    taken (an untrained network, images sliced from the end), tracebacks for the others."""
    out, spot, placed = refusal(script, args)
    says = placed(says)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"{script}: error: {f'argument {flag}: ' if flag else ''}"), line
    assert says in line
    assert not list(spot.iterdir()) and out.stdout == ""


def test_the_tour_refuses_a_corrupt_data_file_in_one_line(tmp_path):
    """A truncated CIFAR-10 download in --data-dir: one line, exit status 2 (was a traceback:
    only a missing file was caught, to fall back on the shapes)."""
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(gzip.compress(b"x" * 20_000)[:300])
    out = _run("--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--epochs", "0",
               script="tour.py")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("tour.py: error: ") and "corrupt or truncated archive" in line
    assert not (tmp_path / "out").exists()


def _image_folder(root: Path, odd: str) -> Path:
    """Two class folders of 32x32 PNGs, and ``b/odd.png``: not an image, 40x40, a PNG cut short
    after its header, or a TIFF (named .png) of float or 32-bit integer pixels."""
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    odd_file = root / "b" / "odd.png"
    if odd == "unreadable":
        odd_file.write_text("not an image")
    elif odd == "other size":
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(odd_file)
    elif odd == "cut short":
        noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(noise).save(odd_file)
        whole = odd_file.read_bytes()
        odd_file.write_bytes(whole[:len(whole) // 2])  # (its header whole, its pixels not)
    else:
        dtype = {"float pixels": np.float32, "32-bit pixels": np.int32}[odd]
        Image.fromarray(np.full((32, 32), 70_000, dtype)).save(odd_file, format="TIFF")
    return root


@pytest.mark.parametrize("odd, says", [
    ("unreadable", "b/odd.png: cannot read the image (cannot identify image file"),
    ("other size", "b/odd.png: 40x40 pixels, where {root}/a/0.png is 32x32: the images of a "
                   "folder are all of one size"),
    ("float pixels", "b/odd.png: a TIFF image of Pillow mode 'F', which is not read"),
    ("32-bit pixels", "b/odd.png: a TIFF image of Pillow mode 'I', which is not read"),
])
def test_training_from_a_folder_names_a_bad_image_before_training(tmp_path, odd, says):
    """Was a traceback from inside training, naming neither file nor sizes for one of another
    size (the batch's stacking failed); float and 32-bit pixels were clipped at 255
    (convert("RGB")) and trained on silently."""
    pytest.importorskip("PIL")
    root = _image_folder(tmp_path / "images", odd)
    log = tmp_path / "log.csv"
    out = _run(str(root), "--epochs", "1", "--quiet", "--batch-size", "4", "--log", str(log),
               script="train_from_folder.py")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"train_from_folder.py: error: {root}/")
    assert says.format(root=root) in line
    assert not log.exists()  # (refused before the training began)


def test_training_from_a_folder_decodes_every_image_before_training(tmp_path, monkeypatch):
    """A held-out image cut short (read only after the first epoch: it was found after a whole
    epoch had trained) is found before the model is built: no epoch's progress bar starts."""
    pytest.importorskip("PIL")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # (the bars shown, as a user sees them)
    root = _image_folder(tmp_path / "images", "cut short")
    # (seed 10 holds out b/odd.png, the last of the 13 files, among 3)
    out = _run(str(root), "--epochs", "1", "--val-split", "0.2", "--seed", "10",
               "--batch-size", "4", script="train_from_folder.py")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines() == [f"train_from_folder.py: error: {root}/b/odd.png: "
                                       "cannot decode the image (image file is truncated)"]


def _sixteen_bit_ramp() -> np.ndarray:
    """A 16-bit black-to-white ramp with every high byte and low byte."""
    ramp = np.linspace(0, 65535, 24 * 24).round().astype(np.uint16).reshape(24, 24)
    ramp[0, :8] = [0, 255, 256, 511, 32767, 32768, 65280, 65535]  # (each side of a step)
    return ramp


@pytest.mark.parametrize("older_pillow", [False, True])
def test_a_16_bit_greyscale_png_is_scaled_to_8_bits_as_keras_reads_it(tmp_path, monkeypatch,
                                                                        older_pillow):
    """Pillow opens a 16-bit greyscale PNG as "I;16" (older versions: "I"), which
    convert("RGB") clipped at 255: 97% of a ramp came out white. Keras'
    image_dataset_from_directory (TensorFlow's decode_png to uint8, libpng's png_set_strip_16)
    keeps each value's high byte, v >> 8, the grey in all 3 channels; so does the folder, and
    the same picture saved with 8 bits reads the same."""
    image_module = pytest.importorskip("PIL.Image")
    png_plugin = pytest.importorskip("PIL.PngImagePlugin")
    if older_pillow:  # (how Pillow before "I;16" opened them: 32-bit integer pixels)
        monkeypatch.setitem(png_plugin._MODES, (16, 0), ("I", "I;16B"))
    script = _folder_script()
    ramp = _sixteen_bit_ramp()
    for c in ("deep", "flat"):
        (tmp_path / c).mkdir()
    image_module.fromarray(ramp).save(tmp_path / "deep" / "ramp.png")
    high_bytes = (ramp // 256).astype(np.uint8)  # (the reference: v >> 8 by division)
    image_module.fromarray(high_bytes).save(tmp_path / "flat" / "ramp.png")
    folder = script.ImageFolder(tmp_path)
    with image_module.open(folder.files[0][0]) as opened:
        assert opened.mode == ("I" if older_pillow else "I;16")
    deep, flat = folder[0][0], folder[1][0]
    assert deep.dtype == np.uint8 and deep.shape == (24, 24, 3)
    for channel in range(3):
        np.testing.assert_array_equal(deep[:, :, channel], high_bytes)
    np.testing.assert_array_equal(deep[0, :8, 0], [0, 0, 1, 1, 127, 128, 255, 255])
    np.testing.assert_array_equal(deep, flat)


def test_training_from_a_folder_without_pillow_is_refused_at_once(tmp_path):
    pytest.importorskip("PIL")
    root = _image_folder(tmp_path / "images", "other size")
    script = ROOT / "scripts" / "train_from_folder.py"
    code = ("import runpy, sys; sys.modules['PIL'] = None; "  # (as if it were not installed)
            f"sys.path.insert(0, {str(script.parent)!r}); "  # (as running the script does)
            f"sys.argv = [{str(script)!r}, {str(root)!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr == ("train_from_folder.py: error: argument FOLDER: its images are read "
                          "(and --make-demo's written) with Pillow, which is not installed: "
                          'pip install "xpcnn[viz]"\n')


def test_parity_refuses_a_missing_data_folder_in_one_line(tmp_path, capsys):
    # (its main in this process: the usage error's exit, status 2, a traceback none)
    pytest.importorskip("torch")
    with pytest.raises(SystemExit) as exit_:
        _main("parity_torch.py", "--data-dir", str(tmp_path / "missing"), torch=True)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert err == (f"parity_torch.py: error: argument --data-dir: the folder "
                   f"'{tmp_path / 'missing'}' does not exist\n")


def test_parity_checks_no_more_steps_than_a_short_training_set_holds(capsys):
    """--limit below --check-steps batches: the float64 check stops after one epoch's batches
    (it ran on into empty batches, a traceback). (Its main in this process; 10 images in
    batches of 4: 3 batches, the last one short, as 100 in batches of 32 had it.)"""
    pytest.importorskip("torch")
    assert _main("parity_torch.py", "--dataset", "shapes", "--limit", "10", "--batch-size",
                 "4", "--check-steps", "20", "--epochs", "1", "--threads", "1", torch=True) == 0
    assert "first 3 steps in float64" in capsys.readouterr().out


def test_counting_a_step_records_device_operations():
    """scripts/count_record_ops.py: one count per optimiser case, each a positive number."""
    out = _run("--model", "notebook", script="count_record_ops.py")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["SGD", "Adam", "SGD,"]
    assert all(int(r.split()[-1]) > 0 for r in rows)


# The files whose code runs only where a GPU is lent (scripts/gpu_check.sh runs them once;
# tests/test_gpu.py in part on the CUDA emulator too, not its captured cases): a name they
# import from xpcnn, or read from an xpcnn module, that no longer exists would only show there.
GPU_ONLY = ["scripts/gpu_probes.py", "scripts/bench_gpu.py", "tests/test_gpu.py"]


def _module_file(module: str) -> Path | None:
    path = ROOT / module.replace(".", "/")
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _top_level_names(path: Path) -> set[str]:
    """What a module defines at its top level (read from its source: the CuPy modules do not
    import without CuPy)."""
    import ast

    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


@pytest.mark.parametrize("name", GPU_ONLY)
def test_the_gpu_only_code_names_what_xpcnn_has(name):
    """Every name such a file imports from xpcnn (at its top or inside a function), and every
    attribute it reads of an xpcnn module it imported, is defined there."""
    import ast

    tree = ast.parse((ROOT / name).read_text())
    modules: dict[str, Path] = {}  # local name -> the xpcnn module's file
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xpcnn"):
            source = _module_file(node.module)
            assert source is not None, f"{name}: no module {node.module}"
            for alias in node.names:
                submodule = _module_file(f"{node.module}.{alias.name}")
                if submodule is not None:
                    modules[alias.asname or alias.name] = submodule
                elif alias.name not in _top_level_names(source):
                    missing.append(f"{node.module}.{alias.name} (line {node.lineno})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in modules and \
                node.attr not in _top_level_names(modules[node.value.id]):
            missing.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    assert not missing, f"{name} names what xpcnn does not have: {missing}"


@needs_compiler
def test_the_host_step_profile_dry_runs(capsys):
    """scripts/bench_host_step.py: xpcnn's own time and calls in one eager step on the
    emulated CuPy path, its launches as tests/test_launch_counts.py pins them, and its top
    functions xpcnn's own. (Its main in this process, at batch 8: a step's launches do not
    depend on the batch, as tests/test_launch_counts.py's warm-up at 8 has it.)"""
    assert _main("bench_host_step.py", "--models", "mnist", "--precisions", "float32",
                 "--batch", "8", "--warmup", "1", "--repeat", "1", "--top", "3") == 0
    lines = capsys.readouterr().out.splitlines()
    name, precision, us, calls, launches = next(r for r in lines if r.startswith("mnist")).split()
    assert (name, precision) == ("mnist", "float32") and float(us) > 0 and int(calls) > 0
    assert int(launches) == PINNED["mnist", "float32"]
    top = [r for r in lines if r.startswith("    ")]
    assert len(top) == 3 and all(" xpcnn/" in r for r in top)


def test_the_openblas_threading_table_runs(capsys):
    """scripts/openblas_threads.py on a small product: both states, each with its four rows.
    (Its main in this process: each state is measured in a fresh process of its own all the
    same; the thread server left idle 0 s, not 1.5, in the second.)"""
    assert _main("openblas_threads.py", "--shape", "16,64,8", "--repeat", "2",
                 "--idle", "0") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("float32 (16, 64) @ (64, 8)")
    states = [i for i, line in enumerate(lines) if not line.startswith(" ")][1:]
    assert [lines[i].split(" (")[0] for i in states] == [
        "before OpenBLAS's thread server ever ran", "after OpenBLAS's thread server ran once"]
    rows = [line for line in lines if line.startswith("  ")]
    assert len(rows) == 8 and all(float(row.split()[-1]) >= 0 for row in rows)


@needs_compiler
def test_the_column_sum_accuracy_script_runs(capsys):
    assert _main("column_sum_accuracy.py", "--rows", "300") == 0  # (in this process)
    assert [line.split()[:3] for line in capsys.readouterr().out.splitlines()] == [
        ["300", "rows,", "float32"], ["300", "rows,", "float16"]]


@needs_compiler
def test_the_memory_comparison_with_pytorch_dry_runs(tmp_path, capsys):
    """scripts/memory_vs_torch.py at a tiny batch: a row of peaks whose ratio is the two
    printed, each side's peak above what it holds between steps (PyTorch: parameters, last
    gradients and momentum; xpcnn: parameters and momentum), the per-layer breakdown, and
    PyTorch's peak read from a bench_gpu.py report beside it."""
    pytest.importorskip("torch")
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"rows": [{"model": "mnist", "batch": 4, "precision": "float32",
                                         "torch": {"peak_mib": 20.0}}]}))
    assert _main("memory_vs_torch.py", "--models", "mnist", "--batch", "4", "--precisions",
                 "float32", "--details", "--gpu-json", str(gpu), torch=True) == 0
    out = capsys.readouterr().out  # (its main in this process: PyTorch imported once)
    row = next(line for line in out.splitlines() if line.startswith("mnist "))
    xpcnn, as_bench, torch, with_scratch, ratio, saved, on_gpu, gpu_ratio = row.split()[2:]
    params_mib = 1_199_882 * 4 / 2**20  # (mnist's parameters, float32)
    assert 2 * params_mib < float(xpcnn) <= float(as_bench)  # (3 bytes an input: 0.01 MiB)
    assert 3 * params_mib < float(torch) <= float(with_scratch)
    assert ratio == f"{float(as_bench) / float(torch):.2f}x" and float(saved) > 0
    assert on_gpu == "20.00" and gpu_ratio == f"{float(as_bench) / 20:.2f}x"
    assert "xpcnn at the step's start: parameters 4.58, optimiser slots 4.58" in out
    assert "torch at the step's start: parameters 4.58, gradients (last step's) 4.58" in out


def test_the_memory_comparisons_peak_follows_the_allocations():
    """memory_vs_torch.allocation_peak: the high-water mark inside the step's window of what
    was allocated since the start, with or without the operations' scratch, and what held it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from memory_vs_torch import Allocation, allocation_peak
    finally:
        sys.path.pop(0)

    def alloc(t, ptr, nbytes, label="conv forward", scratch=False):
        return Allocation(t, ptr, nbytes, label, 0, scratch)

    events = [alloc(0, 1, 1024, "parameters"), alloc(1, 2, 4096, "last step"),
              alloc(2, 2, -4096),  # freed before the window opens
              alloc(10, 3, 2048), alloc(11, 4, 8192, "conv backward", scratch=True),
              alloc(12, 4, -8192, scratch=True), alloc(13, 5, 1536, "conv backward"),
              alloc(14, 3, -2048), alloc(30, 6, 100_000, "after the step")]
    assert allocation_peak(events, (10, 20), scratch=True) == (
        1024 + 2048 + 8192, {"before": 1024, "conv forward": 2048, "conv backward": 8192})
    assert allocation_peak(events, (10, 20), scratch=False) == (
        1024 + 2048 + 1536, {"before": 1024, "conv forward": 2048, "conv backward": 1536})


@needs_compiler
def test_the_loss_kernel_comparison_runs_on_the_emulated_kernels():
    """bench_gpu.compare_loss_kernels (--loss-kernels) on the CUDA emulator, timed as on the
    CPU: a row per class count, naming the kernel xpcnn chose, with the standard version's
    and PyTorch's times beside xpcnn's."""
    import argparse

    from cuda_emulator import load_emulated_fast_cupy, restore

    path = list(sys.path)  # (bench_gpu puts scripts/ first too)
    sys.path.insert(0, str(ROOT / "scripts"))
    _, saved = load_emulated_fast_cupy()
    try:
        import bench_gpu

        rows = bench_gpu.compare_loss_kernels(
            64, argparse.Namespace(device="cpu", steps=1, warmup=0))
    finally:
        restore(saved)
        sys.path[:] = path
    assert [(r["classes"], r["kernel"]) for r in rows] == [
        (10, "xpcnn_softmax_cross_entropy"), (100, "xpcnn_softmax_cross_entropy_rows"),
        (1000, "xpcnn_softmax_cross_entropy_rows")]
    want = {"xpcnn", "standard"} | ({"torch"} if importlib.util.find_spec("torch") else set())
    assert all(set(r["ms"]) == want and min(r["ms"].values()) > 0 for r in rows)


def test_the_memory_comparison_names_the_models_it_has_no_twin_for(capsys):
    # (its main in this process: argparse's exit, status 2, before anything is measured)
    with pytest.raises(SystemExit) as exit_:
        _main("memory_vs_torch.py", "--models", "mnist,resnet20")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no twin for 'resnet20' here; expected some of" in err


@needs_compiler
def test_the_kernel_traffic_table_dry_runs(capsys):
    """scripts/kernel_traffic.py: a row per kernel of one emulated eager step, traced, and a
    total whose launches with those not traced (cuDNN, cuBLAS) are the step's launches as
    tests/test_launch_counts.py pins them. (mnist-bn: more kinds of kernel than mnist, and a
    tenth of its parameters, whose update is most of a traced step's records. Its main in this
    process.)"""
    assert _main("kernel_traffic.py", "--models", "mnist-bn", "--precisions", "float32",
                 "--batch", "2", "--warmup", "1") == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {r.split()[0]: r.split()[1:] for r in lines if r.startswith("  xpcnn_")}
    assert {"xpcnn_sgd", "xpcnn_max_pool", "xpcnn_softmax_cross_entropy",
            "xpcnn_batch_norm_apply", "xpcnn_batch_norm_dx"} <= set(rows)
    total = next(r for r in lines if r.startswith("  total")).split()
    others = next(r for r in lines if "not traced:" in r).split("not traced: ")[1]
    untraced = sum(int(part.split()[-1]) for part in others.split(", "))
    assert int(total[1]) + untraced == PINNED["mnist-bn", "float32"]
    assert all(float(r[-1]) >= 1.0 for r in rows.values())  # (x min: never below the minimum)


def test_gpu_check_runs_every_stage_targets_first_into_files_the_device_tool_returns(tmp_path):
    """scripts/gpu_check.sh, with stand-ins for python3 and nvidia-smi (each stage "runs" at
    once and writes what it is asked to): every stage runs, the benchmark's grid (issue 18's
    speed and memory targets) and the MNIST recipe (its accuracy target) before the rest of the
    tests, and OUTDIR holds at most the 8 files the device tool brings back (it held 9, and one
    would have been lost)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_ / "python3"
    fake.write_text(f"""#!{sys.executable}
import sys
args = sys.argv[1:]
with open({str(calls)!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
if "--json" in args:
    open(args[args.index("--json") + 1], "w").write("{{}}")
""")
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200, 580.159.03, 143771 MiB'\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    repo = tmp_path / "repo"
    (repo / ".gpudata").mkdir(parents=True)  # (MNIST staged: the recipe's stage runs)
    (repo / "scripts").symlink_to(ROOT / "scripts")
    out = tmp_path / "OUT"
    run = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=repo, timeout=120,
                         capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}",
                              "PYTHON": str(fake)})
    assert run.returncode == 0, run.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"gpu.json", "gpu_extra.json", "mnist.json"} <= set(files)
    stages = calls.read_text().splitlines()

    def at(text: str) -> int:
        return next(k for k, line in enumerate(stages) if text in line)

    grid = at("bench_gpu.py --json")
    assert at("gpu_probes.py") < at("cudnn or captured") < grid < at("mnist_recipe.py") \
        < at("not (cudnn or captured") < at("'train'") < at("gpu_extra.json")
    extras = stages[at("gpu_extra.json")]
    assert "--models" in extras and "--conv-layers" in extras and "--conv-layers" not in \
        stages[grid]


def _bench_module(monkeypatch: pytest.MonkeyPatch, *argv: str):
    """scripts/bench.py imported (it parses sys.argv at import), its ARGS parsed from argv."""
    monkeypatch.setattr(sys, "argv", ["bench.py"])
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench

    monkeypatch.setattr(bench, "ARGS", bench.parse_args(list(argv)))
    # (--threads as the script reads it at import)
    monkeypatch.setattr(bench, "THREADS", bench.ARGS.threads or os.cpu_count() or 1)
    return bench


def test_the_model_table_runs_its_children_and_labels_its_rows_in_its_precision(monkeypatch,
                                                                                capsys):
    """bench.py --precision reaches the child processes (peak memory, --torch-own-process
    timing: were float32 under a mixed label), and the table says the precision, and that
    PyTorch's float16 runs without a GradScaler while xpcnn scales its loss."""
    import types

    bench = _bench_module(monkeypatch, "--models", "mnist", "--precision", "mixed_float16")
    seen = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: (
        seen.append(cmd), types.SimpleNamespace(returncode=1, stderr="", stdout=""))[1])
    assert bench.measure_memory("torch", "mnist") is None
    (cmd,) = seen
    assert cmd[cmd.index("--precision") + 1] == "mixed_float16"
    row = {"model": "mnist", "load_average": [0.0, 0.0], "torch_error": "no float16 here",
           "xpcnn": {"train_img_s": 1.0, "train_gflop_s": 1.0, "train_peak_share": 0.1,
                     "infer_img_s": 1.0, "infer_gflop_s": 1.0, "infer_peak_share": 0.1}}
    bench.print_table({"machine": {"cpu": "cpu", "cores": 2, "matmul_peak_gflop_s": 10.0,
                                   "blas": "blas"}, "threads": 2, "models": [row],
                       "steps": 1, "warmup": 0, "blocks": 1, "timing": "one process",
                       "memory_method": "skipped", "precision": "mixed_float16"})
    out = capsys.readouterr().out
    assert "Precision: mixed_float16" in out and "without a GradScaler" in out
    assert "PyTorch could not run some models (xpcnn alone): no float16 here" in out


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs PyTorch")
def test_the_model_table_times_xpcnn_alone_where_pytorch_refuses_the_precision(monkeypatch):
    """A RuntimeError from PyTorch's steps (a half dtype its CPU autocast lacks) leaves the
    row to xpcnn, with the error, as --layers does (was: the traceback ended the run)."""
    bench = _bench_module(monkeypatch, "--models", "mnist", "--batch-size", "2", "--steps", "1",
                          "--blocks", "1", "--warmup", "0", "--no-memory",
                          "--torch-own-process")

    def refused() -> None:
        raise RuntimeError("\"addmm\" not implemented for 'Half'\nmore")

    monkeypatch.setattr(bench, "torch_steps", lambda *args: (refused, refused))
    monkeypatch.setattr(bench, "_child", lambda *args: pytest.fail("PyTorch timed anyway"))
    row = bench.bench_model("mnist", 10.0)
    assert row["torch_error"] == "\"addmm\" not implemented for 'Half'"
    assert "torch" not in row and "train_ratio" not in row and row["xpcnn"]["train_img_s"] > 0


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs PyTorch")
def test_an_autocast_that_turns_itself_off_is_a_refusal_not_a_float32_row(monkeypatch):
    """A PyTorch whose CPU autocast lacks the half dtype warns and turns itself off: timed,
    its float32 would stand under a half-float label (review RC). bench.torch_autocast raises
    it as the refusal that prints xpcnn alone."""
    import torch

    bench = _bench_module(monkeypatch, "--models", "mnist", "--precision", "mixed_float16")
    assert bench.torch_autocast()._enabled  # (this PyTorch takes float16 on the CPU)
    real = torch.autocast

    def lacking(device_type, dtype=None, **kwargs):
        warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling "
                      "autocast.", stacklevel=2)
        return real(device_type, dtype=dtype, enabled=False)

    monkeypatch.setattr(torch, "autocast", lacking)
    with pytest.raises(RuntimeError, match="does not take torch.float16: In CPU autocast, but"):
        bench.torch_autocast()
