"""The README's promise: two commands on a fresh clone, one for the main job and one for the tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from bench.first_run import newcomer_env
from tests.conftest import REPO, SHARED, free_port, require_shared


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


@pytest.mark.timeout(1500)
def test_the_main_job_runs_on_a_fresh_clone_with_its_own_fresh_venv(tmp_path):
    """`make run` in smoke mode: installs itself, runs the whole loop on ../shared's corpus, and
    serves an API that answers with the printed key and a page; Ctrl-C stops it cleanly."""
    require_shared(SHARED / "data")
    clone = fresh_clone(tmp_path)
    env = newcomer_env(also_drop=("DOLLY_DATA",))
    env["COLUMNS"] = "200"  # one line per message, for the checks below
    port = free_port()
    log = tmp_path / "make-run.log"
    with open(log, "w") as out:
        run = subprocess.Popen(
            ["make", "run", f"SHARED={SHARED}", f"UP_ARGS=--smoke --no-browser --port {port}"],
            cwd=clone,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 1380
        while "dolly is up" not in log.read_text():
            assert run.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "dolly up did not finish setting up: " + log.read_text()[-4000:]
            time.sleep(3)
        output = log.read_text()
        assert (clone / ".venv" / "bin" / "dolly").exists()
        assert "from $DOLLY_DATA" in output and "read 15,011 = kept" in output and "(reconciled)" in output
        assert all(f"{n}/6" in output for n in range(1, 7)), "every stage is announced"
        assert "Failed to query Ray Train Controller" not in output, "Ray Train's cleaner can reach the State API"
        key = (clone / "runs" / "up" / "api_key").read_text().strip()
        assert key in output, "the API key is printed"
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "dolly", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8},
            timeout=120,
        )
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"], answer.text
        assert httpx.get(f"http://127.0.0.1:{port}/ui/", timeout=60).status_code == 200
        assert f"http://127.0.0.1:{port}/ui/" in output and "Ctrl-C stops it" in output
        # The screen reads cleanly: dolly's own lines, the library logs in the file it names first.
        screen = output[output.index("Library logs: ") :]
        log_file = Path(re.search(r"Library logs: (\S+)", screen).group(1))
        assert "ray.data" in log_file.read_text(), "Ray Data's log lines went to the file"
        for noise in ("Traceback", "logging_progress", "(RayTrainWorker", "(TrainController", "[WARNING]", "Loading weights"):
            assert noise not in screen, f"{noise!r} reached the screen"
        assert re.search(r"train .* 2/2 steps +loss [0-9.]+", screen), "one training bar, with the loss"
        assert re.search(r"Loading dolly@1: DollyModel 1/1, OpenAIIngress 1/1 replicas running in \d+ s", screen)
    finally:
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        try:
            run.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            raise
    stopped = log.read_text()
    assert "Stopped serving." in stopped
    assert "(raylet)" not in stopped[stopped.index("Library logs: ") :], "Ray's shutdown notices stay in the log file"
    # The test command would install the same way, then run pytest.
    plan = subprocess.run(
        ["make", "--no-print-directory", "-n", "test"], cwd=clone, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert plan.strip().splitlines()[-1].endswith("pytest")
