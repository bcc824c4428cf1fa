"""`dolly up`: the whole Dolly loop with one command.

    data -> score the base (held-out loss, and how it answers held-out instructions) -> fine-tune
    (Ray Train + DeepSpeed) -> score the tuned model alike -> export + register -> serve the API
    and the chat page -> wait for Ctrl-C

Every stage is reused when its inputs have not changed: the preparation (by its manifest), the
base model's score (cached by data and model), the training run (named after its data and
settings), and the registered version (by its training facts). A second run goes straight to
serving.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import webbrowser
from pathlib import Path

import ray
from rich.console import Console
from rich.panel import Panel

from cluster.connect import ray_session
from cluster.storage import check_shared
from contract import generation, registry
from contract.decoding import Decoding
from contract.models import SMOLLM2, resolve_base
from loop.configs import UpConfig
from loop.deploy import STOP_HINT, Deployed, serving
from pipelines.behaviour import BehaviourReport
from pipelines.configs import PrepareConfig
from pipelines.evaluate import ModelScores, show_scores
from pipelines.manifest import MANIFEST_NAME, VerifiedData
from pipelines.prepare import prepare
from pipelines.scoring import RemoteScore, resources
from pipelines.sources import BUILTIN_SAMPLE, SAMPLE_TEST_SIZE, choose_source
from pipelines.train import train_once
from services.config import ServeConfig

STAGES = 6


def up(config: UpConfig, console: Console | None = None, address: str | None = None, block: bool = True) -> dict:
    """Run the loop; with `block`, serve until Ctrl-C. Returns what a caller needs to reach the result."""
    console = console or Console()
    stages = Stages(console)
    workdir = config.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if config.base_model == SMOLLM2:
        console.print(
            f"[dim]Base model: {SMOLLM2}, a small pretrained model that runs on a laptop. Dolly's real recipe "
            "fine-tunes EleutherAI Pythia: base_model=EleutherAI/pythia-2.8b preset=a100, on a GPU cluster through `dolly submit up`.[/]"
        )
    with ray_session(address):
        # Every stage writes these on one node and reads them on another: refused now, not at a checkpoint.
        check_shared({"workdir": workdir, "registry": config.registry})
        stages.start("data", "Data")
        source, why = choose_source(config.data)
        console.print(f"Corpus: {source} ({why})")
        data_dir = workdir / "data"
        base_folder = resolve_base(config.base_model)  # a packaged model is converted once, here
        tokenizer = config.tokenizer or base_folder
        train_config = config.train_config(data_dir, test_size=SAMPLE_TEST_SIZE if source == str(BUILTIN_SAMPLE) else None)
        # Verified here, once: the stages below take the verified shards as they are.
        data = prepare(
            PrepareConfig(
                source=source, output_dir=data_dir, tokenizer=tokenizer, model=base_folder, **train_config.prepare.model_dump()
            ),
            console,
        ).data
        data_sha = hashlib.sha256((data_dir / MANIFEST_NAME).read_bytes()).hexdigest()

        stages.start("base scoring", f"Score the base model ({config.base_model}): held-out loss and answers")
        placement = resources(train_config)
        base = CachedScore(config.base_model, config.tokenizer, data, data_sha, config, placement, console)
        # With GPUs, the base is scored on one of its own while training runs on the others; on
        # one machine's CPUs both would share the same cores (bench/overlap_bench.py: 0.97x).
        if not train_config.use_gpu:
            base.result()

        stages.start("fine-tuning", f"Fine-tune with Ray Train + DeepSpeed ZeRO-{train_config.zero_stage}")
        train_config, export_dir = train_once(train_config, "up", data_sha, console, data)
        run_name = train_config.run_name

        stages.start("tuned scoring", "Score the tuned model: held-out loss and answers")
        base = base.result()
        tuned = CachedScore(str(export_dir), None, data, data_sha, config, placement, console).result()
        tuned = tuned.named(f"tuned ({run_name})")
        charts = show_scores([base, tuned], workdir, console)
        report = workdir / "report.json"
        report.write_text(
            json.dumps({"base": base.model_dump(mode="json"), "tuned": tuned.model_dump(mode="json"), "charts": charts}, indent=2)
            + "\n"
        )
        console.print(f"Charts: {', '.join(charts.values())}; scores: {report}")

        stages.start("registry", "Export and register")
        # The model carries a decoding its answers were scored with: whatever serves it (this API,
        # `dolly serve`, vLLM, transformers' generate) decodes so by default, the page's sliders included.
        served_decoding, why = serving_decoding(config, tuned.behaviour)
        served_decoding.write_to(export_dir)
        console.print(f"Decoding it carries (generation_config.json): {served_decoding.describe()}; {why}")
        name, root = config.model_name, config.registry
        version = registry.find_registered(export_dir, name, root)
        if version is None:
            version = registry.register(export_dir, name, root)
            console.print(f"Registered {name}@{version} in {root}, now {name}@latest")
        else:
            console.print(f"Already registered as {name}@{version} in {root}")
        # What is latest is served: a version promoted since (by `dolly retrain`) is not demoted by a re-run.
        model_ref = f"{name}@{registry.latest(name, root)}"
        if model_ref != f"{name}@{version}":
            console.print(f"Serving {model_ref}, the registry's latest, promoted since this run")

        stages.start("serving", "Serve the API and the chat page on Ray Serve")
        key_file = _api_key_file(workdir)
        # The API decodes as the answers were scored.
        serve_config = serving_settings(config, model_ref, key_file, gpu=train_config.use_gpu)
        retrain_file = _write_retrain_config(workdir, source, train_config, serve_config, config)
        # Quiet: request logs would scroll the URLs and the key off the screen.
        with serving(
            serve_config, config.host, config.port, ui=True, block=block, log_level="WARNING", console=console
        ) as deployed:
            urls = {
                "api": deployed.api_url,
                "page": deployed.page_url,
                "model": model_ref,
                "api_key_file": str(key_file),
                "retrain_config": str(retrain_file),
                "feedback": serve_config.feedback.url,
                "ray_address": ray.get_runtime_context().gcs_address,
            }
            console.print(_ready_panel(config, deployed, urls, key_file.read_text().strip(), stages.summary(), block))
            if config.open_browser and block:
                webbrowser.open(deployed.page_url)
        return urls


class Stages:
    """The stage headers, and how long each stage took: the final panel says, so a slow stage is
    plain to see (bench/RESULTS.md records them for a newcomer's first run)."""

    def __init__(self, console: Console):
        self._console, self._started = console, time.monotonic()
        self._current: tuple[str, float] | None = None
        self.took: dict[str, float] = {}

    def start(self, name: str, title: str) -> None:
        self._end()
        self._console.rule(f"[bold]{len(self.took) + 1}/{STAGES} {title}")
        self._current = (name, time.monotonic())

    def summary(self) -> str:
        self._end()
        stages = ", ".join(f"{name} {_duration(seconds)}" for name, seconds in self.took.items())
        return f"Up in {_duration(time.monotonic() - self._started)} ({stages})"

    def _end(self) -> None:
        if self._current is not None:
            name, started = self._current
            self.took[name] = time.monotonic() - started
            self._current = None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


class CachedScore:
    """A model's scores: read back where they were computed before, else computed on a worker
    (pipelines/scoring.py), started at once; `result()` waits for them and keeps them. Scores only
    change with the data, the model and what is scored (an export's folder is named after its
    run, which is named after its data and settings)."""

    def __init__(
        self, model: str, tokenizer: str | None, data: VerifiedData, data_sha: str, config: UpConfig, placement: dict, console
    ):
        what = f"{data_sha} {model} {config.eval_examples} {config.behaviour.model_dump_json()}"
        self._cache = config.workdir / "eval" / f"{hashlib.sha256(what.encode()).hexdigest()[:12]}.json"
        self._console, self._scores, self._remote = console, None, None
        if self._cache.exists():
            console.print(f"Reusing the score of {model} ({self._cache})")
            self._scores = ModelScores.model_validate_json(self._cache.read_text())
        else:
            self._remote = RemoteScore(
                model,
                data,
                config.behaviour,
                placement,
                max_examples=config.eval_examples,
                registry=config.registry,
                tokenizer=tokenizer,
            )

    def result(self) -> ModelScores:
        if self._scores is None:
            self._scores, _ = self._remote.result(self._console)
            self._cache.parent.mkdir(parents=True, exist_ok=True)
            self._cache.write_text(self._scores.model_dump_json(indent=2))
        return self._scores


def serving_decoding(config: UpConfig, measured: list[BehaviourReport]) -> tuple[Decoding, str]:
    """The decoding the tuned model is served with, and why: with serve_decoding=measured the one
    of its measured answers (greedy, sampled) that end the most often without looping (a small
    model's sampled answers ramble more often than its greedy ones end in a loop, or the other way
    round), else behaviour.decoding; at serving's token limit, not the scoring budget."""
    reports = measured if config.serve_decoding == "measured" else []

    def outcome(r: BehaviourReport) -> str:
        return f"{r.mode} answers end {r.overall.stop_rate:.0%}, loop {r.overall.loop_rate:.0%}"

    if reports:
        # Ties go to sampling: Dolly's way, and answers that differ from one asking to the next.
        chosen = max(reports, key=lambda r: (r.overall.stop_rate - r.overall.loop_rate, r.mode == "sampled"))
        why = f"measured on {chosen.overall.examples} held-out instructions: " + ", ".join(map(outcome, reports))
        decoding = chosen.decoding
    else:
        decoding, why = config.behaviour.decoding, "behaviour.decoding, as serve_decoding=sampled asks"
    return decoding.model_copy(update={"max_tokens": generation.MAX_NEW_TOKENS}), why


def serving_settings(config: UpConfig, model: str, key_file: Path, gpu: bool) -> ServeConfig:
    """What `dolly up` serves with (the decoding is the model's own): with `gpu` (training ran on
    GPUs) a GPU for each model replica, so no two replicas, and no later `dolly retrain`, share one."""
    return ServeConfig(
        model=model,
        registry=config.registry,
        auth={"api_keys_file": key_file.absolute()},
        feedback={"url": f"sqlite:///{(config.workdir / 'feedback.db').absolute()}"},
        deployment={"num_gpus": 1 if gpu else 0},
    )


def _write_retrain_config(workdir: Path, source: str, train_config, serve_config, config: UpConfig) -> Path:
    """What `dolly retrain` needs to redo this run on more data and swap the result in: the same
    corpus and training settings, the serving version to beat, and the running app's settings."""
    serve_file = workdir / "serve.yaml"
    # What was set, not every default: the model's own decoding stays its own (ServeConfig.defaults).
    serve_file.write_text(json.dumps(serve_config.model_dump(mode="json", exclude_unset=True), indent=2) + "\n")  # JSON is YAML
    retrain = {
        "corpus": source,
        "serving": f"{config.model_name}@latest",
        "serve_config": str(serve_file),
        "feedback": serve_config.feedback.url,  # what people approved on the page trains the next model
        "eval_examples": config.eval_examples,
        "behaviour": config.behaviour.model_dump(mode="json"),
        "workdir": str(workdir / "retrain"),
        "train": train_config.model_dump(mode="json", exclude={"run_name", "data_dir", "source"}),
    }
    path = workdir / "retrain.yaml"
    path.write_text(json.dumps(retrain, indent=2) + "\n")
    return path


def _api_key_file(workdir: Path) -> Path:
    """A key made once and kept (owner-only), so clients keep working across runs."""
    path = workdir / "api_key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(f"dolly-{secrets.token_urlsafe(24)}\n")
    return path


def _ready_panel(config: UpConfig, deployed: Deployed, urls: dict, key: str, took: str, block: bool) -> Panel:
    api = deployed.shown(urls["api"])
    lines = [
        f"[bold]Chat page[/]   {deployed.shown(urls['page'])}",
        f"[bold]OpenAI API[/]  {api}   model: [bold]{config.model_name}[/] ({urls['model']})",
        f"[bold]API key[/]     {key}   (in {urls['api_key_file']})",
        "",
        "Try it:",
        f"  curl {api}/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\",
        f'    -d \'{{"model": "{config.model_name}", "messages": [{{"role": "user", "content": "Name three primary colours."}}]}}\'',
        "",
        "Review the answers people wrote on the page, export the approved ones (or hold corrections out as a test):",
        f"  dolly feedback list --db {urls['feedback']}",
        f"  dolly feedback export NEW.jsonl --db {urls['feedback']}",
        f"  dolly feedback hold-out IDS --db {urls['feedback']} && dolly eval --feedback {urls['feedback']} ...",
        "Retrain on new records and promote only if better (from another terminal, while this runs):",
        f"  dolly retrain --config {urls['retrain_config']} --new-records NEW.jsonl --address {urls['ray_address']}",
        "",
        f"[dim]{took}[/]",
        *([f"[bold]{STOP_HINT}[/]"] if block else []),
    ]
    return Panel("\n".join(lines), title="dolly is up", border_style="green")
