"""A user's mistakes on the command line: each one said in one line, with its exit code, and
nothing left on disk. Every mistake goes through ``au-detect``'s entry point in an empty folder;
one per command module also from a shell, as a subprocess."""

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
    (["serve", "--model", "runs:/x/model", "--workers", "0"], 1, "--workers 0: must be positive"),
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


def _said(argv, code, text, tmp_path, request, run) -> None:
    """One mistake in an empty folder, run by ``run(argv, work, env) -> (exit code, stderr)``: what
    was said, and nothing left behind."""
    work = tmp_path / "work"
    work.mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    store = request.getfixturevalue("empty_store") if any("{store}" in a for a in argv) else None
    argv = [a.format(bad_yaml=bad, store=store) for a in argv]
    before = _files(store) if store else set()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    returncode, stderr = run(argv, work, env)
    lines = stderr.strip().splitlines()
    assert returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) <= 2, stderr
    assert text in lines[0] and "error:" in lines[0], stderr
    assert _files(work) == set(), f"left behind: {_files(work)}"
    if store:
        assert _files(store) == before


@pytest.mark.parametrize("argv,code,text", [pytest.param(*m, id=" ".join(m[0])[:60]) for m in MISTAKES])
def test_a_mistake_is_one_line_and_leaves_nothing(argv, code, text, tmp_path, request, monkeypatch, capfd):
    """Each mistake through ``au-detect``'s entry point as the shell calls it (``sys.argv``), in this
    process: the commands' modules are imported once for all the cases."""
    from experiments import cli

    def run(argv, work, env):
        monkeypatch.chdir(work)
        for name in set(os.environ) - set(env):  # the shell's environment: no MLFLOW_ settings
            monkeypatch.delenv(name)
        monkeypatch.setattr(sys, "argv", ["au-detect", *argv])
        capfd.readouterr()
        with pytest.raises(SystemExit) as ended:
            cli.main()
        return ended.value.code, capfd.readouterr().err

    _said(argv, code, text, tmp_path, request, run)


# From a shell, a new interpreter each (seconds of imports): a mistake per command module, so that
# whatever its imports print is seen too; one in the quick tier.
FROM_SHELL = {2: "slow", 6: "slow", 7: "quick", 9: "slow", 13: "slow", 15: "slow"}


@pytest.mark.parametrize("argv,code,text", [
    pytest.param(*MISTAKES[i], id=" ".join(MISTAKES[i][0])[:60], marks=() if tier == "quick" else pytest.mark.slow)
    for i, tier in FROM_SHELL.items()])
def test_a_mistake_from_the_shell_is_one_line_and_leaves_nothing(argv, code, text, tmp_path, request):
    def run(argv, work, env):
        done = subprocess.run([str(AU_DETECT), *argv], cwd=work, env=env, capture_output=True, text=True,
                              timeout=120)
        return done.returncode, done.stderr

    _said(argv, code, text, tmp_path, request, run)


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


def test_a_function_command_says_each_option_once(capsys):
    """The docstring's summary is the description; each argument's text is only its option's help."""
    from experiments import cli

    with pytest.raises(SystemExit) as ended:
        cli.main(["export", "--help"])
    out = capsys.readouterr().out
    assert ended.value.code == 0
    assert "Export the trained AU network" in out and "Args:" not in out
    assert out.count("the ONNX opset written") == 1
