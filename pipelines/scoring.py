"""Scoring on a Ray worker, never in the driver: `dolly up` and `dolly retrain` score the base, the
candidate and the serving model in an actor placed like a training worker, with a GPU of its own
where training's workers have one.

On KubeRay the driver runs on the head pod: no GPU, no CPUs for tasks (num-cpus 0), and too little
memory for a 6.9b model in fp32 (~28 GB), so scoring there would be OOM-killed, and the serving
beside it; on a laptop the embedded Ray places the actor on the laptop, with the cores a training
worker would have had. The actor goes away as soon as its model is scored, so its GPU is free for
training or the next model.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import ray
from rich.console import Console

from contract.devices import default_device, ray_gpu_ids
from contract.errors import UserError
from contract.registry import DEFAULT_ROOT
from pipelines.behaviour import BehaviourConfig
from pipelines.configs import TrainConfig
from pipelines.evaluate import ModelScores, score_model
from pipelines.manifest import VerifiedData


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a model process ran."""

    host: str
    pid: int
    gpu_ids: list[str]  # the GPUs Ray gave it: the only ones it uses
    device: str

    def describe(self) -> str:
        gpus = f", GPU {','.join(self.gpu_ids)}" if self.gpu_ids else ""
        return f"{self.host} (pid {self.pid}{gpus}, {self.device})"


def resources(config: TrainConfig) -> dict:
    """What one model process claims: a GPU where each training worker has one, and a training
    worker's CPUs (its torch threads: Ray gives a process as many as it claims)."""
    return {"num_gpus": 1 if config.use_gpu else 0, "num_cpus": config.cpus_per_worker}


@ray.remote
class _Scorer:
    def score(self, model: str, data: VerifiedData, behaviour: BehaviourConfig, **kwargs) -> tuple[ModelScores, Placement]:
        scores, _ = score_model(model, data, behaviour, **kwargs)
        here = Placement(socket.gethostname(), os.getpid(), ray_gpu_ids() or [], str(default_device()))
        return scores, here


class RemoteScore:
    """One model being scored on a worker; started at once, `result()` waits for it."""

    def __init__(
        self,
        model: str,
        data: VerifiedData,
        behaviour: BehaviourConfig,
        placement: dict,
        *,
        max_examples: int | None = None,
        registry: Path = DEFAULT_ROOT,
        tokenizer: str | None = None,
    ):
        self.model = model
        # Absolute: the worker runs in a working directory of its own, maybe on another node.
        data = dataclasses.replace(data, dir=Path(data.dir).absolute())
        model, tokenizer = _absolute(model), _absolute(tokenizer)
        self._actor = _Scorer.options(**placement).remote()
        self._started = time.monotonic()
        self._result = self._actor.score.remote(
            model, data, behaviour, max_examples=max_examples, registry=Path(registry).absolute(), tokenizer=tokenizer
        )

    def result(self, console: Console) -> tuple[ModelScores, Placement]:
        """The scores, and where they were computed; a live line while it waits."""
        try:
            with console.status(f"Scoring {self.model} on a worker") as status:
                while not ray.wait([self._result], timeout=1)[0]:
                    status.update(f"Scoring {self.model} on a worker ({time.monotonic() - self._started:.0f} s)")
            scores, where = ray.get(self._result)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise e.cause from None  # a bad model or data: the message, not the worker's traceback
            raise
        finally:
            ray.kill(self._actor)  # its GPU goes back now, not when the driver's handle is collected
        console.print(f"Scored {self.model} on {where.describe()} in {time.monotonic() - self._started:.0f} s")
        return scores, where


def _absolute(name: str | None) -> str | None:
    """A local folder as an absolute path; a Hub id, a registry NAME@N or a random shape as it is."""
    return str(Path(name).absolute()) if name and Path(name).is_dir() else name
