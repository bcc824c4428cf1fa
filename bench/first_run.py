"""A newcomer's first run (issue 14): from a fresh clone to a chat answer, install included.

A clone of this checkout's HEAD in a temp folder, `../shared` beside it as a symlink, a shell
with no venv, no Ray or pytest settings, and cold caches: pip's off (PIP_NO_CACHE_DIR), and a
fresh DOLLY_CACHE (the SmolLM2 conversion), HF_HOME and TORCH_EXTENSIONS_DIR (the clone's own,
empty .cache). Then the README's `make run`, timed from its start:

  install   `make run` starts -> dolly's first line ("Library logs: ...")
  up        the stages, as dolly up's final panel reports them
  answer    "dolly is up" -> the first chat answer through the printed API key

and Ctrl-C, timed until the process group is gone.

    .venv/bin/python bench/first_run.py            # --smoke for dolly up's quick check

About 10 minutes on 2 cores (the smoke check: 3). Prints a Markdown block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script, without relying on the editable install

from cluster.connect import free_port  # noqa: E402


def newcomer_env(also_drop: tuple[str, ...] = ()) -> dict[str, str]:
    """A newcomer's shell: no venv, no pytest or Ray settings, and no outer make (a nested make
    under `make test` would print otherwise, by its MAKELEVEL); variables starting with
    `also_drop` go too."""
    drop = ("VIRTUAL_ENV", "PYTEST", "RAY_", "MAKE", "MFLAGS", *also_drop)
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the reference data folder")
    parser.add_argument("--smoke", action="store_true", help="dolly up --smoke: 2 training steps, 8 examples scored")
    parser.add_argument("--timeout-s", type=int, default=3600)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dolly-first-run-") as tmp:
        root = Path(tmp)
        clone = root / "dolly-ray"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        (root / "shared").symlink_to(args.shared.resolve())
        env = newcomer_env(also_drop=("DOLLY_", "TORCH_EXTENSIONS", "HF_"))  # and cold caches:
        env.update(PIP_NO_CACHE_DIR="1", DOLLY_CACHE=str(root / "dolly-cache"), HF_HOME=str(root / "hf"), COLUMNS="200")
        port = free_port()
        up_args = f"--no-browser --port {port}" + (" --smoke" if args.smoke else "")
        log = root / "make-run.log"
        started = time.monotonic()
        marks: dict[str, float] = {}
        with open(log, "w") as out:
            run = subprocess.Popen(
                ["make", "run", f"UP_ARGS={up_args}"],
                cwd=clone,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            while "dolly is up" not in (text := log.read_text()):
                if "Library logs:" in text and "install" not in marks:
                    marks["install"] = time.monotonic() - started
                if run.poll() is not None or time.monotonic() - started > args.timeout_s:
                    sys.exit(f"make run stopped before dolly was up:\n{text[-4000:]}")
                time.sleep(1)
            marks["up"] = time.monotonic() - started
            key = (clone / "runs" / "up" / "api_key").read_text().strip()
            answer = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "dolly", "messages": [{"role": "user", "content": "Name three primary colours."}]},
                timeout=300,
            )
            answer.raise_for_status()
            marks["answer"] = time.monotonic() - started
        finally:
            stopping = time.monotonic()
            os.killpg(run.pid, signal.SIGINT)
            run.wait(300)
            marks["stop"] = time.monotonic() - stopping
        text = log.read_text()

    stages = re.search(r"Up in [^\n│]*\)", text)
    reply = answer.json()["choices"][0]["message"]["content"]
    minutes = marks["answer"] / 60
    print(f"\n### A newcomer's first run{' (--smoke)' if args.smoke else ''}: fresh clone to a chat answer\n")
    print(f"- Machine: {platform.node()}, {os.cpu_count()} cores, {platform.python_version()}; {time.strftime('%Y-%m-%d')}")
    print(
        f"- Command: `.venv/bin/python bench/first_run.py{' --smoke' if args.smoke else ''}` (fresh clone, fresh venv, cold caches)"
    )
    print(f"- **Fresh clone to the first chat answer: {minutes:.1f} min** (make run start -> answer)")
    print(f"- Install (make run start -> dolly's first line): {marks['install']:.0f} s")
    print(f"- dolly up: {stages.group(0) if stages else 'no stage summary found'}")
    print(f"- First answer after 'dolly is up': {marks['answer'] - marks['up']:.1f} s: {reply[:80]!r}")
    print(f"- Ctrl-C to every process gone: {marks['stop']:.0f} s")


if __name__ == "__main__":
    main()
