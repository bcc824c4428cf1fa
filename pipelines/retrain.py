"""`dolly retrain`: the closed loop. Train on the corpus plus new records, score the candidate and
the serving version on the same held-out split, and promote the candidate (registry `latest`, and
the running app, in place) only when it passes the gate. Otherwise keep serving what serves, and
say why.

The held-out split is the new preparation's. It is fair to both models: the split takes the
records with the smallest seeded content hashes, so adding records can only push old held-out
records into training, never pull the serving model's training records into the held-out split.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from cluster.connect import ray_session
from contract.errors import UserError
from pipelines import registry
from pipelines.configs import GateConfig, RetrainConfig
from pipelines.sources import resolve_source


@dataclass
class Decision:
    promote: bool
    metric: str  # what was compared, e.g. "loss (closed_qa)"
    serving: float
    candidate: float
    required: float  # the candidate had to be below this
    reason: str


def gate(config: GateConfig, serving, candidate) -> Decision:
    """Compare two LossReports on the gate's metric: lower is better, by more than the margin."""
    def value(report) -> float:
        scores = report.overall if config.category is None else report.by_category.get(config.category)
        if scores is None:
            raise UserError(f"gate.category {config.category!r} has no held-out examples; categories scored: "
                            f"{', '.join(report.by_category)}")
        return getattr(scores, config.metric)

    old, new = value(serving), value(candidate)
    margin = config.min_improvement * old if config.relative else config.min_improvement
    required = old - margin
    metric = config.metric + (f" ({config.category})" if config.category else "")
    promote = new < required
    verdict = "better" if promote else "not better"
    reason = (f"{metric}: candidate {new:.4f} vs serving {old:.4f}; it had to be below {required:.4f} "
              f"(margin {config.min_improvement:g}{' relative' if config.relative else ''}): {verdict}")
    return Decision(promote, metric, old, new, required, reason)


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


def retrain(config: RetrainConfig, console: Console | None = None, address: str | None = None) -> dict:
    console = console or Console()
    from pipelines.evaluate import compare, heldout_loss, plot_comparison
    from pipelines.train import train_once

    name, root, workdir = config.model_name, config.train.registry, config.workdir
    serving_folder, serving_name = registry.resolve(config.serving, root)  # fail before any work
    source = combine_sources(config.corpus, config.new_records, workdir / "source")
    fingerprint = resolve_source(str(source)).fingerprint
    train_config = config.train.model_copy(update={"source": str(source), "data_dir": workdir / "data", "register_as": None})
    with ray_session(address):
        console.rule(f"[bold]Retrain {name} on the corpus plus {len(config.new_records)} file(s) of new records")
        train_config, export_dir = train_once(train_config, "retrain", fingerprint, console, address)
        run_name = train_config.run_name
        version = registry.register_once(export_dir, name, root, promote=False)
        candidate_name = f"{name}@{version}"
        console.print(f"Registered the candidate as {candidate_name} (not promoted yet)")

        console.rule(f"[bold]Evaluate {candidate_name} against the serving {serving_name}")
        data_dir = train_config.data_dir
        serving = heldout_loss(str(serving_folder), data_dir, max_examples=config.eval_examples)
        candidate = heldout_loss(str(export_dir), data_dir, max_examples=config.eval_examples)
        serving, candidate = (serving.model_copy(update={"model": serving_name}),
                              candidate.model_copy(update={"model": candidate_name}))
        console.print(compare(serving, candidate))
        chart = plot_comparison([serving, candidate], workdir / f"{serving_name}-vs-{candidate_name}.png".replace("@", "-"))

        decision = gate(config.gate, serving, candidate)
        swapped = False
        if decision.promote:
            registry.set_latest(name, version, root)
            console.print(f"[bold green]Promoted[/] {candidate_name} to {name}@latest: {decision.reason}")
            if config.serve_config:
                swapped = _swap(config.serve_config, candidate_name, console)
        else:
            console.print(f"[bold yellow]Kept[/] {serving_name}: {decision.reason}")
    report = {"serving": serving_name, "candidate": candidate_name, "promoted": decision.promote, "swapped": swapped,
              "decision": asdict(decision), "chart": str(chart), "run_name": run_name,
              "scores": {"serving": serving.model_dump(mode="json"), "candidate": candidate.model_dump(mode="json")}}
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"Report: {workdir / 'report.json'}")
    return report


def _swap(serve_config: Path, model: str, console: Console) -> bool:
    """Deploy `model` into the running app described by `serve_config`; False (said) if none runs."""
    from ray import serve

    from cli.configs import load_config
    from services.config import ServeConfig
    from services.deploy import switch_model

    settings = load_config(ServeConfig, serve_config, {}, [])
    if settings.app_name not in serve.status().applications:
        console.print(f"No running Serve app {settings.app_name!r} on this cluster: nothing to swap; "
                      f"`dolly serve --model {settings.model.partition('@')[0]}@latest` serves the promoted version")
        return False
    switch_model(settings, model)
    console.print(f"[bold green]Swapped[/] the running app {settings.app_name!r} to {model}, in place")
    return True
