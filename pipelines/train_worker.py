"""What each Ray Train worker runs: DeepSpeed over the worker's shard of the data, with metrics,
verified checkpoints, resume, and the export at the end.

Every rank runs the same number of forward passes and collectives in the same order (ZeRO-3
gathers parameters inside each forward): the data shards are equal-sized, batches drop the last
partial one, and all decisions (when to log, evaluate, checkpoint, stop) depend on the step only.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import deepspeed
import ray.train
import torch
import torch.distributed as dist
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
from ray.data.collate_fn import NumpyBatchCollateFn
from transformers.integrations import HfDeepSpeedConfig

from contract import IGNORE_INDEX, registry
from contract.models import learns_dolly_tokens, load_model, load_tokenizer, special_token_ids
from pipelines import checkpoints, lora
from pipelines.batches import collate, example_lengths, flatten
from pipelines.configs import TrainConfig
from pipelines.deepspeed_config import deepspeed_config, lr_factor
from pipelines.export import DTYPES as EXPORT_DTYPES
from pipelines.export import export
from pipelines.flops import flops_per_token
from pipelines.metrics import LOSS_CURVE, MetricsSink, memory_gib, plot_loss_curve, read_history
from pipelines.plan import Resume, TrainPlan, TrainState

DTYPES = {**EXPORT_DTYPES, "fp32": torch.float32}


def train_loop(loop_config: dict) -> dict:
    config = TrainConfig.model_validate(loop_config["config"])
    plan = TrainPlan.model_validate(loop_config["plan"])
    total_steps, n_params = plan.total_steps, plan.n_params
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(config.seed)
    if not config.use_gpu:
        # DeepSpeed's CPU backend would JIT-compile its shared-memory all-reduce here (minutes on
        # a small machine, on first use) for its inference path alone: training's collectives
        # are gloo's. Its table of compatible ops is meant to be edited, and is read right here.
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend="nccl" if config.use_gpu else "gloo")
    tokenizer = load_tokenizer(config.tokenizer_path)
    start = _resume_point(config, plan.run_uri)
    # Another number of workers partitioned its ZeRO state otherwise: DeepSpeed's universal
    # checkpoint re-partitions it (ZeRO-0 state is whole on every rank and loads as it is).
    writers = checkpoints.writers(start) if start else config.num_workers
    universal = writers != config.num_workers and config.zero_stage > 0
    # transformers reads the ZeRO-3 setting from this object for as long as it lives (parameters
    # gathered in generate and the export, partitioned loading): it must outlive the engine.
    hf_ds_config = HfDeepSpeedConfig(deepspeed_config(config, universal=universal))
    engine, model = _engine(config, hf_ds_config, tokenizer, total_steps)

    state = TrainState()
    if start is not None:
        state = TrainState.model_validate(checkpoints.load(engine, start, universal))
        state.resumes.append(Resume(checkpoint=start.path, step=state.step, workers=writers))
    rows_per_micro_batch = config.micro_batch_size * config.num_workers  # all workers together

    log_dir = Path(config.output_dir) / config.run_name
    sink = (
        MetricsSink(
            log_dir,
            loop_config["progress"],
            state.step,
            {"run_name": config.run_name, **plan.hyperparameters},
            config.mlflow_tracking_uri if config.mlflow else None,
        )
        if rank == 0
        else None
    )
    if sink and start is not None:
        sink.say(f"resumed from verified checkpoint {start.path} at step {state.step} ({writers} workers wrote it)")
    eval_batches = _held_out(config, tokenizer)
    batches = _micro_batches(config, tokenizer, state.rows // rows_per_micro_batch, plan.micro_batches_per_epoch)
    window = _new_window()
    metrics: dict = {}
    engine.train()

    while state.step < total_steps:
        waited = time.perf_counter()
        step_batches = [next(batches) for _ in range(config.grad_accum)]
        window["data_s"] += time.perf_counter() - waited
        divisor = _loss_divisor([batch for _, batch in step_batches], config.grad_accum)
        for number, batch in step_batches:
            n_tokens = int(batch.pop("n_tokens"))
            attention_squares = float(batch.pop("attention_squares"))
            # The sum of this micro-batch's token losses over `divisor`: the step's gradient is then
            # the mean over all of its label tokens, however they fall into micro-batches and ranks.
            loss = engine(**batch, use_cache=False, num_items_in_batch=divisor).loss
            engine.backward(loss)
            engine.step()
            state.rows = (number + 1) * rows_per_micro_batch
            window["loss"] += loss.item() * divisor  # summed token losses
            window["label_tokens"] += _label_tokens(batch)
            window["tokens"] += n_tokens
            window["attention_squares"] += attention_squares
        state.step += 1
        step = state.step
        last = step == total_steps
        if rank == 0:
            sink.progress(step, window["loss"] / max(1, window["label_tokens"]))
        if not (step % config.log_every == 0 or step % config.eval_every == 0 or step % config.checkpoint_every == 0 or last):
            continue

        metrics = _window_metrics(window, engine, plan, n_params, model.config, state.rows // rows_per_micro_batch)
        state.tokens += metrics.pop("tokens")
        if step % config.eval_every == 0 or last:
            metrics["eval_loss"] = _evaluate(engine, eval_batches)
            engine.train()
        if rank == 0:
            sink.write(step, metrics)
        report = {"step": step, **metrics}
        if step % config.checkpoint_every == 0 or last:
            if rank == 0:
                # Before this save, not after the last report: it waits until Ray has committed the
                # previous checkpoint, an upload that may still run in the background right after it.
                checkpoints.sweep_untracked(plan.run_uri)
            folder = checkpoints.save(engine, step, state.model_dump(mode="json"))
            if folder is not None:
                ray.train.report(
                    report,
                    checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                    checkpoint_dir_name=checkpoints.checkpoint_dir_name(step),
                    checkpoint_upload_mode=checkpoints.upload_mode(plan.run_uri),
                    delete_local_checkpoint_after_upload=True,
                )
            else:
                state.unverified_checkpoints += 1
                ray.train.report(report)
        else:
            ray.train.report(report)
        window = _new_window()
    if rank == 0:
        checkpoints.sweep_untracked(plan.run_uri)

    facts = {
        "run_name": config.run_name,
        "config": config.model_dump(mode="json"),
        "data": plan.data.model_dump(mode="json"),
        "metrics": {"step": state.step, "tokens_seen": state.tokens, **metrics},
        "resumes": [r.model_dump(mode="json") for r in state.resumes],
    }
    merged = log_dir / "export-merged" if config.method == "lora" and config.lora.merged_export else None
    exported = export(engine, tokenizer, log_dir / "export", config.export_dtype, facts, merged)
    final = {"step": state.step, **metrics, "resumes": facts["resumes"], "unverified_checkpoints": state.unverified_checkpoints}
    if rank == 0:
        curve = plot_loss_curve(read_history(log_dir), log_dir / LOSS_CURVE, f"{config.run_name}: {config.base_model}")
        final.update(export_dir=str(exported), loss_curve=str(curve), **({"merged_dir": str(merged)} if merged else {}))
        if config.register_as:
            version = registry.register(exported, config.register_as, config.registry)
            final["registered"] = f"{config.register_as}@{version}"
        sink.close([curve, exported / "README.md"])
    return final  # the driver's Result.return_value (rank 0's)


def _engine(config: TrainConfig, hf_ds_config: HfDeepSpeedConfig, tokenizer, total_steps: int):
    """(DeepSpeed engine, the HF model inside it): AdamW, the lr schedule, ZeRO as configured.
    With `hf_ds_config` alive, transformers builds the model already partitioned under ZeRO-3 (no
    rank ever holds the whole model) and resizes the embeddings partitioned too."""
    model_kwargs = {"dtype": DTYPES[config.precision], "attn_implementation": config.attn_implementation}
    model_kwargs |= {"gguf_file": config.gguf_file} if config.gguf_file else {}
    quantized = config.method == "lora" and config.lora.quantize == "4bit"
    if quantized:  # bitsandbytes quantizes the weights as they are placed on the worker's device
        device = torch.device("cuda", torch.cuda.current_device()) if config.use_gpu else torch.device("cpu")
        model_kwargs |= {"quantization_config": lora.quantization(DTYPES[config.precision]), "device_map": {"": device}}
    model = load_model(config.base_model, tokenizer, **model_kwargs)
    model.config.use_cache = False  # required for packed rows; useless in training anyway
    if quantized:
        from peft import prepare_model_for_kbit_training

        # Norms and the output layer in fp32, input gradients on: what a 4-bit base needs to train through.
        model = prepare_model_for_kbit_training(
            model, config.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.method == "lora":
        # Dolly's token rows train with the adapter only where they are new; on a tuned base the
        # adapter is LoRA alone, which vLLM can serve.
        new_tokens = learns_dolly_tokens(config.base_model, model_kwargs.get("gguf_file"))
        model = lora.adapt(
            model, config.lora, sorted(special_token_ids(tokenizer).values()) if new_tokens else [], config.base_model
        )
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=hf_ds_config.config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_factor, config=config, total_steps=total_steps)
        ),
    )
    return engine, model


def _resume_point(config: TrainConfig, run_uri: str) -> checkpoints.Stored | None:
    """The checkpoint to start from: `resume_from` if given (it must verify), else this run's
    newest verified checkpoint, else none (a fresh start)."""
    if config.resume_from:
        fs, path = checkpoints.storage(config.resume_from)
        explicit = checkpoints.Stored(path, fs, step=-1)
        if checkpoints.latest_verified([explicit]) is None:
            raise RuntimeError(
                f"resume_from={config.resume_from!r} is not a complete, verified checkpoint (see the warning above)"
            )
        return explicit
    return checkpoints.latest_verified(checkpoints.candidates(run_uri))


def _micro_batches(config: TrainConfig, tokenizer, done: int, per_epoch: int):
    """(number, batch) of this worker's micro-batches, epoch after epoch, numbered from the start
    of the run; after a resume, the `done` ones already trained on are passed over."""
    shard = ray.train.get_dataset_shard("train")
    collate = Collate(tokenizer.pad_token_id, config.padding_free)
    epoch = done // per_epoch
    while True:
        batches = shard.iter_torch_batches(batch_size=config.micro_batch_size, collate_fn=collate, drop_last=True)
        for index, batch in enumerate(batches):
            number = epoch * per_epoch + index
            if number >= done:
                yield number, batch
        epoch += 1


def _held_out(config: TrainConfig, tokenizer) -> list[dict]:
    """This worker's held-out batches, read once: every evaluation scores the same examples, so
    the held-out curve moves only when the model does."""
    collate = Collate(tokenizer.pad_token_id, flat=False)  # held-out rows are single examples: nothing to flatten
    batches = []
    for batch in ray.train.get_dataset_shard("test").iter_torch_batches(
        batch_size=config.micro_batch_size, collate_fn=collate, drop_last=False
    ):
        batches.append(batch)
    # Ranks may differ by one batch (equal rows, but a final partial batch): all score the same count.
    count = torch.tensor([len(batches)], device=checkpoints.collective_device())
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    return batches[: min(int(count.item()), config.eval_batches or len(batches))]


@torch.no_grad()
def _evaluate(engine, batches: list[dict]) -> float:
    """Mean loss per response token over every rank's held-out batches."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for batch in batches:
        labels = batch["labels"]
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the model predicts each label from the token before it
        loss = engine(input_ids=batch["input_ids"], labels=labels, position_ids=batch["position_ids"], use_cache=False).loss
        totals += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64, device=engine.device)
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] else float("nan")


def _label_tokens(batch: dict) -> int:
    """Tokens the loss is taken on: the model predicts each label from the token before it."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _loss_divisor(step_batches: list[dict], grad_accum: int) -> float:
    """What each micro-batch's summed loss is divided by, so that one optimizer step's gradient is
    the mean over every label token of the step on every rank (transformers' num_items_in_batch):
    a micro-batch of one short answer no longer weighs as much as one of many long ones.
    DeepSpeed divides each loss by grad_accum and averages gradients over ranks; the divisor
    undoes both."""
    tokens = torch.tensor(
        [sum(_label_tokens(b) for b in step_batches)], dtype=torch.float64, device=checkpoints.collective_device()
    )
    dist.all_reduce(tokens)
    return max(1.0, tokens.item()) / (grad_accum * dist.get_world_size())


def _new_window() -> dict:
    return {
        "loss": 0.0,
        "label_tokens": 0,
        "tokens": 0,
        "attention_squares": 0.0,
        "data_s": 0.0,
        "started": time.perf_counter(),
    }


def _window_metrics(window: dict, engine, plan: TrainPlan, n_params: int, model_config, micro_batches: int) -> dict:
    """Metrics of the steps since the last report, reduced over ranks."""
    elapsed = time.perf_counter() - window["started"]
    sums = torch.tensor(
        [window["loss"], window["label_tokens"], window["tokens"], window["attention_squares"], window["data_s"]],
        dtype=torch.float64,
        device=engine.device,
    )
    dist.all_reduce(sums)
    loss, label_tokens, tokens, attention_squares, data_s = sums.tolist()
    tokens_per_s = tokens / elapsed
    metrics = {
        "train_loss": loss / max(1.0, label_tokens),  # per label token, as the held-out loss is
        "grad_norm": float(engine.get_global_grad_norm() or 0.0),  # of the last step, before clipping
        "lr": engine.get_lr()[0],
        "tokens_per_s": tokens_per_s,
        "epoch": micro_batches / plan.micro_batches_per_epoch,
        "data_wait": data_s / dist.get_world_size() / elapsed,  # share of the time spent waiting for data
        "memory_gib": memory_gib(),
        "tokens": int(tokens),
    }
    if plan.peak_flops:
        # Padded positions are computed but are not useful work: MFU counts non-pad tokens only, and
        # attention over each example's own span.
        flops = tokens_per_s * flops_per_token(
            layers=model_config.num_hidden_layers,
            hidden=model_config.hidden_size,
            vocab=model_config.vocab_size,
            n_params=n_params,
            seq_len=attention_squares / max(1.0, tokens),  # = attention_length over the window's examples
            trainable=plan.trainable_params,
        )
        metrics["mfu"] = flops / (plan.peak_flops * dist.get_world_size())
    return metrics


class Collate(NumpyBatchCollateFn):
    """Shard rows -> padded rows (`collate`) or one flattened row (`flatten`), for
    `iter_torch_batches`, which then moves the tensors to the worker's device."""

    def __init__(self, pad_token_id: int, flat: bool):
        self.pad_token_id, self.flat = pad_token_id, flat

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        tensors = flatten(batch) if self.flat else collate(batch, self.pad_token_id)
        # sum(n²) over the examples: MFU's attention FLOPs (`attention_length` of the window's examples).
        tensors["attention_squares"] = torch.tensor(sum(n * n for n in example_lengths(batch)), dtype=torch.float64)
        return tensors
