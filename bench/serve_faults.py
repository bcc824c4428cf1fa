"""What losing a replica or a node costs the clients (issue 16), on loopback.

One local cluster (cluster/local.py) of a head and one worker node, on this machine. The Serve
application of a random-weight Pythia shape, exported like a trained one, runs a model replica and
an ingress replica on each node (max_replicas_per_node=1), behind the head's proxy. Each scenario
sends --requests chat requests at --concurrency through the official openai client, half of
them streamed, and a quarter of the way in loses:

  model    one model replica, SIGKILLed;
  ingress  the ingress replica on the head (the one the head's proxy prefers), SIGKILLed;
  node     the worker node: every one of its processes SIGKILLed, raylet included, as a
           preempted spot node goes; a new worker node is started --down-s later.

The client runs with --client-retries (default 0: every failure the server gives is counted; at
its own default of 2, the openai client sends a request that got a 5xx again, and hides some).
With --resume, the openai client runs on the chat page's HTTP client (ui/resume.py), which asks
for the rest of a stream that was cut, twice at most, a second apart.
Reported per scenario: requests, answered, failures by cause (HTTP status, an error event in a
stream, a cut connection), how often ui/resume.py asked for the rest of a cut answer, and two
times, from the loss (node: from the lost node's return, its raylet joined): until Serve has
placed a replacement of every lost replica (a live process, still starting), and until two
replicas of each deployment run again, in Serve's eyes and as live processes.

    .venv/bin/python bench/serve_faults.py --tokenizer ../shared/tokenizer/pythia

About 6 minutes on 2 cores. Prints a table, then a Markdown block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script, without relying on the editable install
# `ray start` turns token auth on (it makes ~/.ray/auth_token if there is none), and this driver
# joins that cluster: Ray reads the mode once, when it is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import openai  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from serve_bench import export_random_model  # noqa: E402

from cluster import local  # noqa: E402
from cluster.connect import free_port  # noqa: E402
from services.app import build_app  # noqa: E402
from services.config import ServeConfig  # noqa: E402
from ui.resume import resuming_http_client  # noqa: E402

KEY = "bench-key"
SCENARIOS = ("model", "ingress", "node")
DEPLOYMENTS = ("DollyModel", "OpenAIIngress")


def replica_processes(deployment: str) -> list[psutil.Process]:
    return [
        p for p in psutil.process_iter(["cmdline"]) if f"ServeReplica:dolly:{deployment}" in " ".join(p.info["cmdline"] or [])
    ]


def replaced(lost: set[int]) -> bool:
    """Two live replica processes of each deployment, none of them lost: Serve has placed the
    replacements, which may still be starting."""
    for deployment in DEPLOYMENTS:
        pids = {p.pid for p in replica_processes(deployment)}
        if len(pids) != 2 or pids & lost:
            return False
    return True


def restored(lost: set[int]) -> bool:
    """replaced, and two replicas of each deployment RUNNING in Serve's eyes."""
    states = serve.status().applications["dolly"].deployments
    return replaced(lost) and all(states[d].replica_states.get("RUNNING", 0) == 2 for d in DEPLOYMENTS)


def wait(condition, timeout_s: float, what: str) -> None:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.2)


def on_head(deployment: str, worker_session: int) -> psutil.Process:
    return next(p for p in replica_processes(deployment) if os.getsid(p.pid) != worker_session)


async def load(url: str, args, lost: asyncio.Event) -> collections.Counter:
    resuming = {"http_client": resuming_http_client(retries=2, retry_wait_s=1)} if args.resume else {}
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=args.client_retries, timeout=120, **resuming)
    requests, max_tokens = args.requests, args.max_tokens
    outcomes, sent = collections.Counter(), iter(range(requests))

    async def one(i: int) -> str:
        messages = [{"role": "user", "content": f"Question {i}: what is Ray?"}]
        try:
            if i % 2:
                stream = await client.chat.completions.create(
                    model="dolly", messages=messages, max_tokens=max_tokens, stream=True
                )
                async for _ in stream:
                    pass
            else:
                await client.chat.completions.create(model="dolly", messages=messages, max_tokens=max_tokens)
            return "answered"
        except openai.APIStatusError as e:
            return f"HTTP {e.status_code}"
        except openai.APIConnectionError:
            return f"connection cut ({'a stream' if i % 2 else 'not streamed'})"
        except openai.APIError:
            return "error event mid-stream"

    async def worker():
        for i in sent:
            outcomes[await one(i)] += 1
            if sum(outcomes.values()) == requests // 4:
                lost.set()

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return outcomes


def scenario(name: str, cluster: local.LocalCluster, url: str, args) -> dict:
    lost = asyncio.Event()
    worker = cluster.sessions[1]
    back = {}

    async def lose():
        await lost.wait()
        if name == "node":
            gone = {p.pid for d in DEPLOYMENTS for p in replica_processes(d) if os.getsid(p.pid) == worker}
            local.lose_node(cluster, worker)
            await asyncio.sleep(args.down_s)
            await asyncio.to_thread(local.add_worker, cluster, args.cpus_per_node)
            started = time.monotonic()  # the node is back: its raylet has joined
        else:
            victim = on_head("DollyModel" if name == "model" else "OpenAIIngress", worker)
            gone, started = {victim.pid}, time.monotonic()
            victim.kill()
        await asyncio.to_thread(wait, lambda: replaced(gone), 180, "the lost replicas placed again")
        back["placed"] = time.monotonic() - started
        await asyncio.to_thread(wait, lambda: restored(gone), 180, "the lost replicas running again")
        back["running"] = time.monotonic() - started

    async def run():
        killer = asyncio.create_task(lose())
        outcomes = await load(url, args, lost)
        await killer
        return outcomes

    asked = _Counted()  # ui/resume.py logs each time it asks for the rest of a cut answer
    logging.getLogger("ui.resume").addHandler(asked)
    logging.getLogger("ui.resume").setLevel(logging.INFO)
    try:
        outcomes = asyncio.run(run())
    finally:
        logging.getLogger("ui.resume").removeHandler(asked)
    failed = args.requests - outcomes["answered"]
    return {
        "scenario": name,
        "requests": args.requests,
        "answered": outcomes["answered"],
        "failed %": 100 * failed / args.requests,
        "failures": ", ".join(f"{cause}: {n}" for cause, n in outcomes.items() if cause != "answered") or "none",
        "rest asked for": asked.records,
        "placed again s": back["placed"],
        "restored s": back["running"],
    }


class _Counted(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared/tokenizer/pythia"))
    parser.add_argument("--shape", default="pythia-14m-random", help="random Pythia shape to serve")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="from: " + ", ".join(SCENARIOS))
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--client-retries", type=int, default=0, help="the openai client's max_retries (its default: 2)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="the openai client on ui/resume.py's HTTP client, which asks for the rest of a cut stream",
    )
    parser.add_argument("--down-s", type=float, default=10, help="node: seconds before a new worker node starts")
    parser.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs of each node")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_random_model(args.shape, args.tokenizer, Path(tmp) / "model")
        (Path(tmp) / "keys").write_text(KEY)
        cluster = local.up(workers=1, cpus_per_node=args.cpus_per_node, port=free_port(), dashboard_port=free_port())
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            port = free_port()
            # Nodes of one machine cannot all bind the port: the head's proxy serves, as a load
            # balancer in front of a cluster would send to one node.
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            config = ServeConfig(
                model=str(folder),
                served_model_name="dolly",
                auth={"api_keys_file": str(Path(tmp) / "keys")},
                engine={"max_batch_size": 16},
                deployment={
                    "min_replicas": 2,
                    "max_replicas": 2,
                    "max_replicas_per_node": 1,
                    "num_cpus": 1,
                    "health_check_period_s": 2,
                    "max_ongoing_requests": 32,
                },
                ingress={"num_replicas": 2, "max_replicas_per_node": 1},
            )
            for name in args.scenarios.split(","):
                serve.run(build_app(config), name="dolly", route_prefix="/")
                wait(lambda: restored(set()), 180, "every replica running")
                results.append(scenario(name, cluster, f"http://127.0.0.1:{port}", args))
                print(results[-1], flush=True)
        finally:
            ray.shutdown()
            local.down()

    columns = list(results[0])
    print(f"\n## Losing a replica or a node (bench/serve_faults.py, {platform.node()})\n")
    print(f"{args.requests} chat requests at concurrency {args.concurrency}, {args.max_tokens} tokens, half streamed;")
    resumed = ", on ui/resume.py's HTTP client" if args.resume else ""
    print(f"openai client with max_retries={args.client_retries}{resumed}. Lost a quarter of the way in.\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in results:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
