"""The README's promise: two commands on a fresh clone, one for the main job and one for the tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED, require_shared


def quick_start_commands() -> list[str]:
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_the_readme_gives_exactly_two_commands_and_ci_runs_the_test_one():
    assert quick_start_commands() == ["make run", "make test"]
    assert re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.M)


def fresh_clone(tmp_path: Path) -> Path:
    """The tracked files as they are in the working tree: what a clone of this commit would hold."""
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    return clone


@pytest.mark.timeout(1200)
def test_the_main_job_runs_on_a_fresh_clone_with_its_own_fresh_venv(tmp_path):
    require_shared(SHARED / "data")
    clone = fresh_clone(tmp_path)
    # A newcomer's shell: no venv, no pytest or Ray settings, and no outer make (CI runs this test
    # under `make test`, whose MAKELEVEL would change what a nested make prints).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTEST", "RAY_", "MAKE", "MFLAGS"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    result = subprocess.run(["make", "run", f"SHARED={SHARED}"], cwd=clone, env=env, capture_output=True, text=True, timeout=1100)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (clone / ".venv" / "bin" / "dolly").exists()
    assert "read 15,011 = kept" in result.stdout and "(reconciled)" in result.stdout
    assert (clone / "runs" / "data" / "manifest.json").exists()
    # The test command would install the same way, then run pytest.
    plan = subprocess.run(["make", "--no-print-directory", "-n", "test"], cwd=clone, env=env, capture_output=True,
                          text=True, check=True).stdout
    assert plan.strip().splitlines()[-1].endswith("pytest")
