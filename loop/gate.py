"""The gate between a retrained candidate and the serving model: every rule it was judged by, and
the one that decided. A lower loss alone is not a better model: one that no longer ends its
answers, or loops, reads worse; so the greedy answers are judged too."""

from __future__ import annotations

from pydantic import BaseModel

from contract.errors import UserError
from loop.configs import GateConfig
from pipelines.behaviour import BehaviourReport


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


def gate(
    config: GateConfig,
    serving,
    candidate,
    serving_behaviour: BehaviourReport | None = None,
    candidate_behaviour: BehaviourReport | None = None,
) -> Decision:
    """Judge a candidate against the serving model: its loss (LossReport) must be lower by more
    than the margin and, with `config.behaviour`, its greedy answers (BehaviourReport) must not end
    less often, repeat more or match the references less than the margins allow."""

    def scores(report):
        found = report.overall if config.category is None else report.by_category.get(config.category)
        if found is None:
            raise UserError(
                f"gate.category {config.category!r} has no held-out examples; categories scored: {', '.join(report.by_category)}"
            )
        return found

    where = f" ({config.category})" if config.category else ""
    old, new = getattr(scores(serving), config.metric), getattr(scores(candidate), config.metric)
    margin = config.min_improvement * old if config.relative else config.min_improvement
    required = old - margin
    passed = new < required
    rules = [
        Rule(
            name=config.metric + where,
            serving=old,
            candidate=new,
            bound=required,
            lower_is_better=True,
            passed=passed,
            reason=f"{config.metric}{where}: candidate {new:.4f} vs serving {old:.4f}; it had to be below {required:.4f} "
            f"(margin {config.min_improvement:g}{' relative' if config.relative else ''}): "
            f"{'better' if passed else 'not better'}",
        )
    ]
    if config.behaviour:
        if serving_behaviour is None or candidate_behaviour is None:
            raise ValueError("gate.behaviour is on: pass both models' greedy BehaviourReports")
        before, after = scores(serving_behaviour), scores(candidate_behaviour)
        for name, attribute, margin, lower_is_better in (
            ("stop rate", "stop_rate", config.max_stop_rate_drop, False),
            ("repetition", "repetition", config.max_repetition_rise, True),
            ("ROUGE-L", "rouge_l", config.max_rouge_l_drop, False),
        ):
            old, new = getattr(before, attribute), getattr(after, attribute)
            bound = old + margin if lower_is_better else old - margin
            passed = new <= bound if lower_is_better else new >= bound
            rules.append(
                Rule(
                    name=name + where,
                    serving=old,
                    candidate=new,
                    bound=bound,
                    lower_is_better=lower_is_better,
                    passed=passed,
                    reason=f"{name}{where} of greedy answers: candidate {new:.3f} vs serving {old:.3f}; it had to be "
                    f"{'at most' if lower_is_better else 'at least'} {bound:.3f} (margin {margin:g}): "
                    f"{'no regression' if passed else 'regressed'}",
                )
            )
    refused = [rule for rule in rules if not rule.passed]
    loss = rules[0]
    return Decision(
        promote=not refused,
        decided_by=refused[0].name if refused else "every rule",
        reason="; ".join(rule.reason for rule in refused or rules),
        metric=loss.name,
        serving=loss.serving,
        candidate=loss.candidate,
        required=loss.bound,
        rules=rules,
    )
