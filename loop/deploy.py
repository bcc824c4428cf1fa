"""Put the API, and optionally the chat page beside it, on the Ray cluster this process is
connected to; deploy again with another model to switch the served version in place.

Used by `dolly serve`, `dolly up` and `dolly retrain`, so the three deploy the same way; `serving`
is the whole lifecycle of the first two (deploy, serve until Ctrl-C, shut down quietly).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ray import serve
from rich.console import Console

from contract import logs
from services.app import build_app
from services.config import ServeConfig
from ui.config import PAGE_APP, PAGE_ROUTE, UIConfig
from ui.deployment import build_page_app

STOP_HINT = "Ctrl-C stops it."  # what `serving` waits for, for its callers' announcements
# Hosts a client on this machine reaches the server at as 127.0.0.1 (0.0.0.0: every interface).
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0")


@dataclass
class Deployed:
    api_url: str  # the OpenAI base URL, for clients on this machine
    page_url: str | None
    host: str  # the address the HTTP proxy listens on

    def shown(self, url: str) -> str:
        """`url` as printed for the people who use it: at the host it listens on, unless that is
        this machine anyway."""
        return url if self.host in _LOCAL_HOSTS else url.replace("127.0.0.1", self.host, 1)


def deploy(
    settings: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    ui: bool = False,
    log_level: str = "INFO",
    console: Console | None = None,
) -> Deployed:
    """Start Serve's HTTP proxy (if it is not running yet) and deploy; returns once replicas answer.
    `log_level` is what reaches this console (Serve's log files keep everything); with `console`,
    a live line says how many replicas are up while the model loads."""
    logging_config = {"log_level": log_level}
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    with replicas_shown(console, settings.app_name, f"Loading {settings.model or ', '.join(settings.adapters)}"):
        serve.run(build_app(settings), name=settings.app_name, route_prefix=settings.route_prefix, logging_config=logging_config)
    logs.reroute()  # Serve's own loggers, now configured
    api_url = f"http://127.0.0.1:{port}{settings.route_prefix.rstrip('/')}/v1"
    page_url = None
    if ui:
        page = UIConfig(api_url=api_url, api_key_file=settings.auth.api_keys_file)
        serve.run(build_page_app(page), name=PAGE_APP, route_prefix=PAGE_ROUTE, logging_config=logging_config)
        page_url = f"http://127.0.0.1:{port}{PAGE_ROUTE}/"
    return Deployed(api_url, page_url, host)


@contextmanager
def replicas_shown(console: Console | None, app: str, what: str, every_s: float = 1.0):
    """While the block deploys `app`, a live line of its replicas running, per deployment, and the
    time so far; then one line with the time it took (the only line off a terminal, where rich
    draws no live status). Loading a model's weights is most of a deployment's wait."""
    if console is None:
        yield
        return
    started, done = time.monotonic(), threading.Event()
    with console.status(f"{what}: deploying") as status:

        def watch() -> None:
            while not done.wait(every_s):
                status.update(f"{what}: {_replicas(app)} ({time.monotonic() - started:.0f} s)")

        watcher = threading.Thread(target=watch, name="replicas-shown", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()
    console.print(f"{what}: {_replicas(app)} in {time.monotonic() - started:.0f} s")


def _replicas(app: str) -> str:
    """E.g. "DollyModel 0/1, OpenAIIngress 1/1 replicas running"."""
    application = serve.status().applications.get(app)
    if application is None or not application.deployments:
        return "deploying"
    counts = []
    for name, deployment in application.deployments.items():
        states = deployment.replica_states  # ReplicaState is a str enum: "RUNNING" finds it
        counts.append(f"{name} {states.get('RUNNING', 0)}/{sum(states.values())}")
    return ", ".join(counts) + " replicas running"


@contextmanager
def serving(
    settings: ServeConfig,
    host: str,
    port: int,
    *,
    ui: bool,
    block: bool,
    console: Console,
    log_level: str = "INFO",
) -> Iterator[Deployed]:
    """Deploy (`deploy`), hand the caller what it deployed to announce (with STOP_HINT when it
    blocks), then with `block` serve until Ctrl-C or SIGTERM and shut Serve down without its
    shutdown logs scrolling the announcement away. Without `block` the apps stay up on the
    cluster (a detached deploy, or a test's caller)."""
    try:
        yield deploy(settings, host, port, ui=ui, log_level=log_level, console=console)
        if block:
            wait_forever()
    finally:
        if block:
            with logs.off_screen():
                serve.shutdown()
            console.print("Stopped serving.")


def switch_model(settings: ServeConfig, model: str) -> None:
    """Serve `model` (NAME@N or a folder) under the running application: Serve brings up replicas
    of the new version and moves traffic to them; requests in flight finish on the old ones."""
    new = settings.model_copy(update={"model": model})
    serve.run(build_app(new), name=new.app_name, route_prefix=new.route_prefix)


def wait_forever() -> None:
    """Block until Ctrl-C or SIGTERM (`docker stop`, a pod's termination). Only the first signal
    is ours: it lets the caller shut down cleanly; a second one interrupts that, as usual."""
    stop = threading.Event()

    def handle(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    stop.wait()
