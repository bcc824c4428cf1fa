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
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console

from cluster.connect import ray_session
from contract.errors import UserError
from pipelines import registry
from pipelines.behaviour import BehaviourReport
from pipelines.configs import GateConfig, RetrainConfig
from pipelines.sources import resolve_source


class Rule(BaseModel):
    name: str  # what was compared, e.g. "loss (closed_qa)", "stop rate"
    serving: float
    candidate: float
    bound: float  # the candidate's value had to be below it (lower is better) or at least it
    lower_is_better: bool
    passed: bool
    reason: str


class Decision(BaseModel):
    promote: bool
    decided_by: str  # the first rule that refused the candidate, or "every rule" when it was promoted
    reason: str
    # The loss rule, as the gate has always reported it.
    metric: str
    serving: float
    candidate: float
    required: float  # the candidate had to be below this
    rules: list[Rule]


def gate(config: GateConfig, serving, candidate, serving_behaviour: BehaviourReport | None = None,
         candidate_behaviour: BehaviourReport | None = None) -> Decision:
    """Judge a candidate against the serving model: its loss (LossReport) must be lower by more
    than the margin and, with `config.behaviour`, its greedy answers (BehaviourReport) must not end
    less often, repeat more or match the references less than the margins allow."""
    def scores(report):
        found = report.overall if config.category is None else report.by_category.get(config.category)
        if found is None:
            raise UserError(f"gate.category {config.category!r} has no held-out examples; categories scored: "
                            f"{', '.join(report.by_category)}")
        return found

    where = f" ({config.category})" if config.category else ""
    old, new = getattr(scores(serving), config.metric), getattr(scores(candidate), config.metric)
    margin = config.min_improvement * old if config.relative else config.min_improvement
    required = old - margin
    passed = new < required
    rules = [Rule(name=config.metric + where, serving=old, candidate=new, bound=required, lower_is_better=True, passed=passed,
                  reason=f"{config.metric}{where}: candidate {new:.4f} vs serving {old:.4f}; it had to be below {required:.4f} "
                         f"(margin {config.min_improvement:g}{' relative' if config.relative else ''}): "
                         f"{'better' if passed else 'not better'}")]
    if config.behaviour:
        if serving_behaviour is None or candidate_behaviour is None:
            raise ValueError("gate.behaviour is on: pass both models' greedy BehaviourReports")
        before, after = scores(serving_behaviour), scores(candidate_behaviour)
        for name, attribute, margin, lower_is_better in (("stop rate", "stop_rate", config.max_stop_rate_drop, False),
                                                         ("repetition", "repetition", config.max_repetition_rise, True),
                                                         ("ROUGE-L", "rouge_l", config.max_rouge_l_drop, False)):
            old, new = getattr(before, attribute), getattr(after, attribute)
            bound = old + margin if lower_is_better else old - margin
            passed = new <= bound if lower_is_better else new >= bound
            rules.append(Rule(name=name + where, serving=old, candidate=new, bound=bound, lower_is_better=lower_is_better,
                              passed=passed,
                              reason=f"{name}{where} of greedy answers: candidate {new:.3f} vs serving {old:.3f}; it had to be "
                                     f"{'at most' if lower_is_better else 'at least'} {bound:.3f} (margin {margin:g}): "
                                     f"{'no regression' if passed else 'regressed'}"))
    refused = [rule for rule in rules if not rule.passed]
    loss = rules[0]
    return Decision(promote=not refused, decided_by=refused[0].name if refused else "every rule",
                    reason="; ".join(rule.reason for rule in refused or rules),
                    metric=loss.name, serving=loss.serving, candidate=loss.candidate, required=loss.bound, rules=rules)


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
    from pipelines.evaluate import score_model, show_scores
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
        # The gate judges greedy answers: they are made even when the report asks only for sampled ones.
        modes = list(dict.fromkeys([*config.behaviour.modes, *(["greedy"] if config.gate.behaviour else [])]))
        behaviour = config.behaviour.model_copy(update={"modes": modes})
        serving, _ = score_model(str(serving_folder), data_dir, behaviour, max_examples=config.eval_examples)
        candidate, _ = score_model(str(export_dir), data_dir, behaviour, max_examples=config.eval_examples)
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
    report = {"serving": serving_name, "candidate": candidate_name, "promoted": decision.promote, "swapped": swapped,
              "decision": decision.model_dump(mode="json"), "chart": charts["loss_plot"],
              "behaviour_chart": charts.get("behaviour_plot"), "run_name": run_name,
              "scores": {"serving": serving.loss.model_dump(mode="json"), "candidate": candidate.loss.model_dump(mode="json")},
              "behaviour": {"serving": [r.model_dump(mode="json") for r in serving.behaviour],
                            "candidate": [r.model_dump(mode="json") for r in candidate.behaviour]}}
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
