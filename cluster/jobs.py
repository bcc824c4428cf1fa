"""Ray Jobs: run a `dolly` command on a cluster through its dashboard address, stream its logs,
and hand back its exit status.

Clusters here run with Ray's token authentication (on once `~/.ray/auth_token` exists): every
request to the dashboard carries the token as a bearer header, read from where Ray's own tools
read it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from cluster import connect
from contract.errors import UserError

# Never uploaded with the working dir: environments, outputs, caches, history.
EXCLUDES = [".venv", "runs", ".cache", ".git", "**/__pycache__", "*.egg-info"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def auth_headers() -> dict[str, str]:
    """The bearer header for Ray token auth, from $RAY_AUTH_TOKEN, the file at
    $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token; none where there is no token (auth off)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", connect.AUTH_TOKEN))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def submit(address: str, entrypoint: str, working_dir: Path, *, follow: bool = True) -> int:
    """Submit `entrypoint` as a Ray job with `working_dir` as its code; with `follow`, stream its
    logs to stdout until it ends and return its exit status (0 when it succeeded)."""
    from ray.job_submission import JobSubmissionClient

    if connect.resolve_address(address).kind != "dashboard":
        raise UserError(f"Ray jobs go to a cluster's dashboard, and {address!r} is not one: pass --address http://HEAD:8265")
    try:
        client = JobSubmissionClient(address, headers=auth_headers())
    except (ConnectionError, RuntimeError) as e:
        raise UserError(f"cannot reach the Ray dashboard at {address} ({e}): pass --address http://HEAD:8265") from None
    job_id = _submit_when_ready(
        client, entrypoint=entrypoint, runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES}
    )
    print(f"submitted {job_id} to {address}: {entrypoint}", flush=True)
    if not follow:
        return 0
    asyncio.run(_stream_logs(client, job_id))
    while (status := str(client.get_job_status(job_id))) not in TERMINAL:  # logs end a moment before the status
        time.sleep(0.5)
    info = client.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    print(f"job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""), flush=True)
    return 0 if status == "SUCCEEDED" else (code or 1)


def _submit_when_ready(client, timeout_s: float = 90, **job) -> str:
    """A cluster that has just started answers before its job agent is up ("No available agent
    to submit job"): wait for it, as a person would, rather than fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


async def _stream_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()
