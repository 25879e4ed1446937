"""A user's mistakes on the command line: each one said in one line, with its exit code, and
nothing left on disk. ``au-detect`` runs as a subprocess in an empty folder, as from a shell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AU_DETECT = Path(sys.executable).with_name("au-detect")
BAD_YAML = "trainer:\n  max_epochs: [1\n  limit_train_batches: 2\n"

# (argv, exit code, text the error line holds); "{store}" is a folder with an empty MLflow store
MISTAKES = [
    (["fitt"], 2, "unknown command 'fitt'; did you mean fit?"),
    (["fit", "--trainer.max_epochz", "2"], 2, "unknown option --trainer.max_epochz; did you mean --trainer.max_epochs?"),
    (["fit", "--trainer.max_epoch", "2"], 2, "unknown option --trainer.max_epoch; did you mean --trainer.max_epochs?"),
    (["fit", "--config", "missing.yaml"], 2, "missing.yaml"),
    (["fit", "--config", "{bad_yaml}"], 2, "bad.yaml: line 3, column 22"),
    (["fit", "--trainer.max_epochs", "two"], 2, "--trainer.max_epochs: expected int or None, got 'two'"),
    (["pretrain-face", "fit", "--export.pth", "b.pt"], 2, "did you mean --export.path?"),
    (["predict", "--model", "missing.ckpt", "--input", "x.jpg"], 1, "model 'missing.ckpt'"),
    (["predict", "--model", "models:/au-detector@champion", "--input", "x.jpg"], 1,
     "no MLflow store at sqlite:///mlflow.db"),
    (["predict", "--model", "runs:/0123456789abcdef/model", "--input", "x.jpg", "--mlflow", "{store}/mlflow.yaml"],
     1, "runs:/0123456789abcdef/model"),
    (["predict", "--model", "missing.ckpt"], 2, "--input"),
    (["predict", "--model", "missing.ckpt", "--input", "x.jpg", "--every", "often"], 2, "--every"),
    (["export", "--model", "missing.ckpt", "--out", "export"], 1, "model 'missing.ckpt'"),
    (["export", "--model", "missing.ckpt", "--out", "export", "--int8"], 1, "--int8 needs --calibration"),
    (["predict", "--model", "missing.ckpt", "--input", "x.jpg", "--detect_every", "0"], 1,
     "--detect_every must be at least 1"),
]


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A folder with ``mlflow.yaml`` and the empty SQLite store it names."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("store")
    (folder / "mlflow.yaml").write_text(f"tracking_uri: sqlite:///{folder / 'mlflow.db'}\n")
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder


# Each case starts an interpreter that imports torch (several seconds): two stay in the quick tier.
QUICK = {2, 7}
CASES = [pytest.param(*m, id=" ".join(m[0])[:60], marks=() if i in QUICK else pytest.mark.slow)
         for i, m in enumerate(MISTAKES)]


@pytest.mark.parametrize("argv,code,text", CASES)
def test_a_mistake_is_one_line_and_leaves_nothing(argv, code, text, tmp_path, request):
    work = tmp_path / "work"
    work.mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    store = request.getfixturevalue("empty_store") if any("{store}" in a for a in argv) else None
    argv = [a.format(bad_yaml=bad, store=store) for a in argv]
    before = _files(store) if store else set()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([str(AU_DETECT), *argv], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) <= 2, done.stderr
    assert text in lines[0] and "error:" in lines[0], done.stderr
    assert _files(work) == set(), f"left behind: {_files(work)}"
    if store:
        assert _files(store) == before


def test_listing_the_commands_imports_no_framework():
    """``au-detect``, ``--help``, ``--version`` and an unknown command answer without torch,
    Lightning or MLflow: each command imports its own module when it runs."""
    code = ("import sys, experiments.cli as cli\n"
            "for args in ([], ['--help'], ['--version'], ['fitt']):\n"
            "    try:\n"
            "        cli.main(args)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "predict  " in done.stdout and "au-detect " in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_function_command_says_each_option_once():
    """The docstring's summary is the description; each argument's text is only its option's help."""
    done = subprocess.run([str(AU_DETECT), "export", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "Export the trained AU network" in done.stdout and "Args:" not in done.stdout
    assert done.stdout.count("the ONNX opset written") == 1
