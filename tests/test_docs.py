"""The documentation: the site builds without a warning, every module has its reference page,
the README stays a front page, and the version the command prints is the changelog's newest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.cli import main, version

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "lightning_modules", "callbacks", "experiments")
NOT_DOCUMENTED = {"lightning_modules.serving.pyfunc_model"}  # runs MLflow's set_model when imported


def test_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: a broken link, a missing page or a docstring griffe cannot
    read fails the build."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "serving" / "index.html").is_file()


def test_every_module_has_a_reference_page():
    documented = set(re.findall(r"^::: ([\w.]+)", "\n".join(
        p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md")), flags=re.M))
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts)
               for package in PACKAGES for p in (ROOT / package).rglob("*.py") if p.stem != "__init__"}
    assert sorted(modules - documented - NOT_DOCUMENTED) == []


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    # every link into the docs points at a page that exists
    targets = re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines))
    assert targets and [t for t in targets if not (ROOT / t).exists()] == []


def test_version_is_the_changelogs_newest(capsys):
    for flag in ("--version", "-V"):
        main([flag])
        assert capsys.readouterr().out.strip() == f"au-detect {version()}"
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases and releases[0] == version()
    pyproject = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert pyproject == version(), "reinstall (pip install -e .) after changing the version"


@pytest.mark.slow
def test_version_from_the_shell():
    done = subprocess.run([str(Path(sys.executable).with_name("au-detect")), "--version"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"au-detect {version()}"
