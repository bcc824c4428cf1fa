"""`dolly retrain`: the closed loop. Train on the corpus plus new records, score the candidate and
the serving version on the same held-out split, and promote the candidate (registry `latest`, and
the running app, in place) only when it passes the gate. Otherwise keep serving what serves, and
say why.

The held-out split is the new preparation's. It is fair to both models: the split takes the
records with the smallest seeded content hashes, so adding records can only push old held-out
records into training, never pull the serving model's training records into the held-out split.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel
from ray import serve
from rich.console import Console

from cluster.connect import ray_session
from cluster.storage import check_shared
from contract import feedback, registry
from contract.decoding import Decoding
from contract.errors import UserError
from contract.feedback import FeedbackStore
from contract.settings import load_config
from loop.configs import RetrainConfig
from loop.deploy import switch_model
from loop.gate import Decision, gate
from pipelines.behaviour import BehaviourReport
from pipelines.evaluate import show_scores
from pipelines.loss import LossReport
from pipelines.manifest import verified
from pipelines.scoring import RemoteScore, resources
from pipelines.sources import resolve_source
from pipelines.train import train_once
from services.config import ServeConfig


def combine_sources(corpus: str, new_records: list[Path], folder: Path) -> Path:
    """One folder holding the corpus's files and the new records, as a source for `prepare`.
    Files keep their names (prefixed by where they came from), so rejects still name them."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    source = resolve_source(corpus)
    for path in source.files:
        with source.filesystem.open_input_stream(path) as stream, open(folder / f"corpus-{Path(path).name}", "wb") as out:
            shutil.copyfileobj(stream, out)
    for i, path in enumerate(new_records):
        if not Path(path).is_file():
            raise UserError(f"new records file {path} does not exist")
        shutil.copy(path, folder / f"new-{i}-{Path(path).name}")
    return folder


class RetrainReport(BaseModel):
    """What a retraining decided and why; written to WORKDIR/report.json."""

    serving: str  # NAME@N that was serving
    candidate: str  # NAME@N registered for this run
    promoted: bool
    swapped: bool  # the running app now serves the candidate
    decision: Decision
    chart: str  # the loss comparison
    behaviour_chart: str | None
    run_name: str
    feedback_records: int  # approved answers from the chat page given to preparation
    scores: dict[str, LossReport]  # "serving", "candidate"
    behaviour: dict[str, list[BehaviourReport]]


def retrain(config: RetrainConfig, console: Console | None = None, address: str | None = None) -> RetrainReport:
    console = console or Console()
    name, root, workdir = config.model_name, config.train.registry, config.workdir
    serving_folder, serving_name = registry.resolve(config.serving, root)  # fail before any work
    new_records, feedback_records = list(config.new_records), 0
    if config.feedback_url:  # approved answers from the chat page, straight from their database
        exported = workdir / "feedback" / "approved.jsonl"
        store = FeedbackStore(config.feedback_url)
        feedback_records = store.export(exported)
        new_records += [exported] if feedback_records else []
        console.print(f"{feedback_records} approved feedback record(s) from {feedback.shown(config.feedback_url)}")
    source = combine_sources(config.corpus, new_records, workdir / "source")
    fingerprint = resolve_source(str(source)).fingerprint
    train_config = config.train.model_copy(update={"source": str(source), "data_dir": workdir / "data", "register_as": None})
    with ray_session(address):
        # Written on one node and read on another: refused now, not at the first checkpoint.
        runs = {"output_dir": train_config.output_dir, "storage_path": train_config.storage_path}
        check_shared({"workdir": workdir, "registry": root, **runs})
        console.rule(f"[bold]Retrain {name} on the corpus plus {len(new_records)} file(s) of new records")
        train_config, export_dir = train_once(train_config, "retrain", fingerprint, console)
        run_name = train_config.run_name
        # A candidate that replaces the serving version decodes as it does (its generation_config.json).
        Decoding.of_model(serving_folder).write_to(export_dir)
        version = registry.register_once(export_dir, name, root, promote=False)
        candidate_name = f"{name}@{version}"
        console.print(f"Registered the candidate as {candidate_name} (not promoted yet)")

        console.rule(f"[bold]Evaluate {candidate_name} against the serving {serving_name}")
        data = verified(train_config.data_dir)  # once for both models (a reused run did not verify it)
        # The gate judges greedy answers: they are made even when the report asks only for sampled ones.
        modes = list(dict.fromkeys([*config.behaviour.modes, *(["greedy"] if config.gate.behaviour else [])]))
        behaviour = config.behaviour.model_copy(update={"modes": modes})
        # On workers, each with a GPU of its own where training had them (side by side there), one
        # after the other on CPUs, which they would share.
        placement = resources(train_config)

        def score(folder: Path) -> RemoteScore:
            return RemoteScore(str(folder), data, behaviour, placement, max_examples=config.eval_examples, registry=root)

        if train_config.use_gpu:
            scoring = [score(serving_folder), score(export_dir)]
            (serving, _), (candidate, _) = (s.result(console) for s in scoring)
        else:
            (serving, _), (candidate, _) = (score(folder).result(console) for folder in (serving_folder, export_dir))
        serving, candidate = serving.named(serving_name), candidate.named(candidate_name)
        charts_dir = workdir / f"{serving_name}-vs-{candidate_name}".replace("@", "-")
        charts_dir.mkdir(parents=True, exist_ok=True)
        charts = show_scores([serving, candidate], charts_dir, console, ("serving", "candidate"))

        decision = gate(config.gate, serving.loss, candidate.loss, serving.mode("greedy"), candidate.mode("greedy"))
        swapped = False
        if decision.promote:
            registry.set_latest(name, version, root)
            console.print(f"[bold green]Promoted[/] {candidate_name} to {name}@latest: {decision.reason}")
            if config.serve_config:
                swapped = _swap(config.serve_config, candidate_name, console)
        else:
            console.print(f"[bold yellow]Kept[/] {serving_name} (decided by {decision.decided_by}): {decision.reason}")
    report = RetrainReport(
        serving=serving_name,
        candidate=candidate_name,
        promoted=decision.promote,
        swapped=swapped,
        decision=decision,
        chart=charts["loss_plot"],
        behaviour_chart=charts.get("behaviour_plot"),
        run_name=run_name,
        feedback_records=feedback_records,
        scores={"serving": serving.loss, "candidate": candidate.loss},
        behaviour={"serving": serving.behaviour, "candidate": candidate.behaviour},
    )
    (workdir / "report.json").write_text(report.model_dump_json(indent=2) + "\n")
    console.print(f"Report: {workdir / 'report.json'}")
    return report


def _swap(serve_config: Path, model: str, console: Console) -> bool:
    """Deploy `model` into the running app described by `serve_config`; False (said) if none runs."""
    settings = load_config(ServeConfig, serve_config, {}, [])
    if settings.app_name not in serve.status().applications:
        console.print(
            f"No running Serve app {settings.app_name!r} on this cluster: nothing to swap; "
            f"`dolly serve --model {settings.model.partition('@')[0]}@latest` serves the promoted version"
        )
        return False
    switch_model(settings, model)
    console.print(f"[bold green]Swapped[/] the running app {settings.app_name!r} to {model}, in place")
    return True
