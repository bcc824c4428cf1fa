"""A model's answers to held-out instructions (or to records), generated as serving generates them:
Dolly's prompt, serving's batch decoder and sampling (`contract.decode`, `contract.sampling`), and
its stop rule (`contract.models.stop_token_ids`), so a stop rate measured here is the one served.

- `heldout_behaviour` / `behaviour_on`: answers greedy or sampled, scored for stop rate,
  repetition, ROUGE-L and length by `pipelines.behaviour`.
- `sample_generations`: a few answers per category with Dolly's sampling defaults, for reading.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from rich.progress import track

from contract import (
    IGNORE_INDEX,
    INPUT_KEY,
    INSTRUCTION_KEY,
    RESPONSE_KEY_NL,
    extract_response,
    render_generation_prompt,
)
from contract.decode import BatchDecoder, finish_reason
from contract.decoding import Decoding
from contract.errors import UserError
from contract.models import max_length_for, stop_token_ids
from contract.registry import DEFAULT_ROOT
from contract.sampling import SamplingParams
from pipelines.behaviour import BehaviourConfig, BehaviourReport, Mode, Sample, ordered, summarize
from pipelines.heldout import LoadedModel, check_data, loaded_model, read_heldout
from pipelines.manifest import VerifiedData


def sample_generations(
    model: str | LoadedModel,
    source: Path | Sequence[dict],
    *,
    registry: Path = DEFAULT_ROOT,
    tokenizer: str | None = None,
    gguf_file: str | None = None,
    per_category: int = 1,
    decoding: Decoding = Decoding(),
    seed: int = 42,
    batch_size: int = 8,
) -> list[Sample]:
    """Answers to the first `per_category` prompts of each category, from a prepared data folder
    (its test split) or from records (dicts with instruction, context, response, category).

    Dolly's generation: its prompt, and `decoding` (Dolly's sampling by default; temperature 0: greedy),
    stopping at `### End`; the text is `extract_response` of the generation. Each prompt has its
    own seeded generator (seed + its index), so a seed gives the same answers on every run and
    in any batch."""
    lm = loaded_model(model, registry, tokenizer, gguf_file)
    if isinstance(source, (str, Path, VerifiedData)):
        data = check_data(source, lm)
        prompts = [_heldout_prompt(row, lm.tokenizer) for row in _first_per_category(read_heldout(data.dir), per_category)]
    else:
        prompts = [record_prompt(record, lm.tokenizer) for record in _first_per_category(source, per_category)]
    return answer(lm, prompts, decoding.params(), seed, batch_size)


def heldout_behaviour(
    model: str | LoadedModel,
    data_dir: Path | VerifiedData,
    config: BehaviourConfig,
    mode: Mode,
    *,
    registry: Path = DEFAULT_ROOT,
    tokenizer: str | None = None,
    gguf_file: str | None = None,
) -> tuple[BehaviourReport, list[Sample]]:
    """Answers to `config.examples` held-out instructions, greedy or with Dolly's sampling, scored
    by `pipelines.behaviour`."""
    lm = loaded_model(model, registry, tokenizer, gguf_file)
    return behaviour_on(lm, heldout_prompts(lm, data_dir, config.examples), config, mode)


def behaviour_on(
    lm: LoadedModel, prompts: list[dict], config: BehaviourConfig, mode: Mode
) -> tuple[BehaviourReport, list[Sample]]:
    """`lm`'s answers to `prompts` in one mode, and their scores."""
    decoding = config.decoding_for(mode)
    samples = answer(lm, prompts, decoding.params(), config.seed, config.batch_size, progress=f"{mode} answers of {lm.name}")
    return summarize(samples, mode, decoding), samples


def heldout_prompts(lm: LoadedModel, data_dir: Path | VerifiedData, examples: int | None) -> list[dict]:
    """The prompts of `examples` held-out rows (the same round-robin subset as `heldout_loss`),
    from shards checked against the model's tokenizer."""
    data = check_data(data_dir, lm)
    prompts = [_heldout_prompt(row, lm.tokenizer) for row in read_heldout(data.dir, examples)]
    if not prompts:
        raise UserError(f"{data.dir}/test holds no examples: prepare the data with test_size > 0")
    return prompts


def answer(
    lm: LoadedModel, prompts: list[dict], params: SamplingParams, seed: int, batch_size: int, progress: str | None = None
) -> list[Sample]:
    """`lm`'s answers to prompts (from `_heldout_prompt` / `record_prompt`), each with its own
    seed (seed + its index) and a budget that fits the model's context; prompts that leave no
    room for an answer are passed over."""
    limit = max_length_for(lm.ref, lm.tokenizer)[0]
    prompts = [p for p in prompts if len(p["ids"]) < limit]
    per_prompt = [
        replace(params, seed=seed + i, max_tokens=min(params.max_tokens, limit - len(p["ids"]))) for i, p in enumerate(prompts)
    ]
    generations = _generate(
        lm, [p["ids"] for p in prompts], per_prompt, stop_token_ids(Path(lm.ref), lm.tokenizer), batch_size, progress
    )
    return [
        Sample(
            model=lm.name,
            category=p["category"],
            instruction=p["instruction"],
            context=p["context"],
            reference=p["reference"],
            finish=finish,
            generated=extract_response(lm.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)),
        )
        for p, (ids, finish) in zip(prompts, generations)
    ]


def _generate(
    lm: LoadedModel,
    prompts: list[list[int]],
    params: list[SamplingParams],
    stop_ids: set[int],
    batch_size: int,
    progress: str | None = None,
) -> list[tuple[list[int], str]]:
    """(generated ids, finish reason) per prompt, decoded with serving's batch decoder and ended by
    serving's rule (`finish_reason`)."""
    decoder = BatchDecoder(lm.model, lm.tokenizer.pad_token_id, stop_ids)
    results = []
    starts = range(0, len(prompts), batch_size)
    for start in track(starts, description=progress or "", disable=progress is None):
        rows, tokens = decoder.add(prompts[start : start + batch_size], params[start : start + batch_size])
        budget = dict(zip(rows, (p.max_tokens for p in params[start : start + batch_size])))
        generated: dict[int, list[int]] = {row: [] for row in rows}
        finish: dict[int, str] = {}
        while decoder.rows:
            for row, token in zip(decoder.rows, tokens):
                reason = finish_reason(token, len(generated[row]), stop_ids, budget[row])
                if reason != "stop":
                    generated[row].append(token)
                if reason:
                    finish[row] = reason
            decoder.keep([row for row in decoder.rows if row not in finish])
            if decoder.rows:
                tokens = decoder.step()
        results += [(generated[row], finish[row]) for row in rows]
    return results


def _first_per_category(items: Iterable[dict], n: int) -> list[dict]:
    """The first n items of each category, categories in Dolly's order."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        if len(by_category[item["category"]]) < n:
            by_category[item["category"]].append(item)
    return [item for category in ordered(by_category) for item in by_category[category]]


def _heldout_prompt(row: dict, tokenizer) -> dict:
    """A test-split row's prompt tokens, exactly as trained on; instruction, context and
    reference decoded back for the report."""
    n_prompt = row["labels"].count(IGNORE_INDEX)
    text = tokenizer.decode(row["input_ids"][:n_prompt], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    # The prompt is intro, "### Instruction:\n" instruction, ["\n\nInput:\n" context], "\n\n### Response:\n".
    body = text.split(f"{INSTRUCTION_KEY}\n", 1)[1].removesuffix(f"\n\n{RESPONSE_KEY_NL}")
    instruction, _, context = body.partition(f"\n\n{INPUT_KEY}\n")
    reference = tokenizer.decode(row["input_ids"][n_prompt:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return {
        "category": row["category"],
        "instruction": instruction,
        "context": context,
        "reference": extract_response(reference),
        "ids": row["input_ids"][:n_prompt],
    }


def record_prompt(record: dict, tokenizer) -> dict:
    """A record's generation prompt tokens, as serving renders it; the record's response is the reference."""
    context = record.get("context", "")
    ids = tokenizer(render_generation_prompt(record["instruction"], context), add_special_tokens=False)["input_ids"]
    return {
        "category": record["category"],
        "instruction": record["instruction"],
        "context": context,
        "reference": record["response"],
        "ids": ids,
    }


def write_samples(samples: Sequence[Sample], path: Path) -> Path:
    """JSON lines at `path`, and the same as markdown beside it, for reading side by side."""
    path.write_text("".join(s.model_dump_json() + "\n" for s in samples))
    blocks = []
    for s in samples:
        context = f"**Context:** {s.context}\n\n" if s.context else ""
        blocks.append(
            f"## {s.category} — {s.model}\n\n**Instruction:** {s.instruction}\n\n{context}"
            f"**Reference:** {s.reference}\n\n**Generated** ({s.finish}): {s.generated}\n"
        )
    path.with_suffix(".md").write_text("\n".join(blocks))
    return path
