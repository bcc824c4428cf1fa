"""One typed config for the serving application. It compiles into the Ray Serve deployment
options of the two deployments (the OpenAI ingress and the model replicas) and the engine options
of the model replicas, so a YAML file, `key=value` overrides, `serve run` args and a KubeRay
`serveConfigV2` all say the same thing in the same words."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from contract import generation, registry
from contract.decoding import GENERATION_CONFIG, Decoding
from contract.environment import API_KEYS_ENV, FEEDBACK_URL_ENV
from contract.errors import UserError
from contract.feedback import DEFAULT_URL, absolute_url
from contract.registry import DEFAULT_ROOT

# Sampling settings that transformers' continuous batching cannot apply per request, and why.
CONTINUOUS_LACKS = {
    "frequency_penalty": "no per-request penalties",
    "presence_penalty": "no per-request penalties",
    "min_tokens": "no way to hold a request's stop tokens back",
}


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingDefaults(Decoding):
    """What a request gets for the parameters it leaves out: the decoding (Dolly's
    InstructionTextGenerationPipeline unless set), and when an answer may stop."""

    min_tokens: int | None = Field(
        None,
        ge=0,
        description=f"vLLM's: an answer cannot stop before it has this many tokens, so no one is answered with nothing "
        f"(default: {generation.MIN_TOKENS} with engine.batching=dynamic; 0 with continuous, which cannot hold a stop back)",
    )


class EngineConfig(_Settings):
    """How a model replica turns prompts into tokens."""

    kind: Literal["dolly", "vllm"] = Field(
        "dolly",
        description="dolly: our own engine on transformers (the faster on a laptop CPU); vllm: vLLM through Ray Serve "
        "LLM's LLMServer (paged KV cache with admission control, continuous batching, prefix caching, tensor "
        "parallelism), run from vLLM's own environment (`make vllm`, services/README.md)",
    )
    vllm: dict = Field(
        {},
        description="with kind=vllm: Ray Serve LLM's LLMConfig settings, over those derived from this config "
        "(model, context, dtype, replicas, GPUs), e.g. engine.vllm.engine_kwargs.gpu_memory_utilization=0.85, "
        "engine.vllm.accelerator_type=A100, engine.vllm.runtime_env.env_vars.VLLM_CPU_KVCACHE_SPACE=2",
    )
    batching: Literal["dynamic", "continuous"] = Field(
        "dynamic",
        description="kind=dolly: dynamic: @serve.batch groups arriving requests, which join the running decode between "
        "steps (the faster on CPU, see bench/RESULTS.md); continuous: transformers' continuous-batching manager (paged KV cache)",
    )
    max_batch_size: int = Field(32, ge=1, description="requests decoded together at most")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="dynamic: how long @serve.batch waits for more arrivals to prefill together"
    )
    continuous_top_k: bool = Field(
        False,
        description="continuous: let requests ask for top_k; transformers' top-k then sorts the whole vocabulary "
        "per row per token for every request (dynamic batching has top-k at no such cost)",
    )
    stream_interval_s: float = Field(
        0.05, ge=0, description="streamed text leaves a replica at most this often (each send is a Ray round trip)"
    )
    max_context: int | None = Field(
        None, ge=16, description="prompt + answer tokens at most (default: the model config's max_position_embeddings)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: bfloat16 on GPUs that compute it (Ampere and newer), float16 on older ones (V100), float32 on CPU",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when Ray gave the replica a GPU (deployment.num_gpus), else cpu"
    )
    torch_threads: int | None = Field(None, ge=1, description="CPU threads per replica (default: torch's)")

    @property
    def has_top_k(self) -> bool:
        return self.kind == "vllm" or self.batching == "dynamic" or self.continuous_top_k

    @model_validator(mode="after")
    def _vllm_batches_itself(self) -> EngineConfig:
        if self.kind == "vllm" and self.batching == "continuous":
            raise ValueError(
                "engine.batching is our engine's: vLLM always batches continuously (its own settings: "
                "engine.vllm.engine_kwargs.max_num_seqs=...); leave engine.batching out with engine.kind=vllm"
            )
        if self.vllm and self.kind != "vllm":
            raise ValueError("engine.vllm holds vLLM's settings: set engine.kind=vllm as well, or leave engine.vllm out")
        return self


class ModelDeploymentConfig(_Settings):
    """The Serve options of the model replicas."""

    min_replicas: int = Field(1, ge=0, description="never fewer replicas (>= 1 keeps the chat page clear of cold starts)")
    max_replicas: int = Field(2, ge=1, description="never more replicas")
    target_ongoing_requests: float = Field(16, gt=0, description="autoscaling aims at this many requests in flight per replica")
    upscale_delay_s: float = Field(10, ge=0, description="load must stay high this long before a replica is added")
    downscale_delay_s: float = Field(300, ge=0, description="load must stay low this long before a replica is removed")
    metrics_interval_s: float = Field(2, gt=0, description="how often replicas report load to the autoscaler")
    look_back_period_s: float = Field(10, gt=0, description="window the autoscaler averages load over")
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica works on at once (>= engine.max_batch_size)")
    max_queued_requests: int = Field(
        128, ge=-1, description="requests waiting for a replica before new ones get 503 (-1: unbounded)"
    )
    retry_after_s: int = Field(2, ge=0, description="the Retry-After header of a 503 (overflow, or a replica lost)")
    lost_replica_retries: int = Field(
        2, ge=0, description="times a request is sent again when its replica is lost before any of its answer has left"
    )
    max_adapters_per_replica: int = Field(
        4, ge=1, description="with adapters: LoRA adapters one replica holds at once; the least recently used makes room"
    )
    health_check_period_s: float = Field(
        10, gt=0, description="how often Serve checks a replica, model or ingress: a lost one is replaced within it"
    )
    health_check_timeout_s: float = Field(
        30, gt=0, description="a replica (model or ingress) that does not answer its check this fast is replaced"
    )
    graceful_shutdown_wait_loop_s: float = Field(
        2, gt=0, description="a stopping replica checks this often whether its requests are done"
    )
    graceful_shutdown_timeout_s: float = Field(60, ge=0, description="a stopping replica gets this long to finish its requests")
    num_cpus: float = Field(1, ge=0, description="logical CPUs each replica claims (fractional is fine)")
    num_gpus: float = Field(
        0,
        ge=0,
        description="GPUs each replica claims, and the only ones it uses: 1 gives each replica a GPU of its own that Ray "
        "hands nothing else (a fraction shares one knowingly); 0 serves on CPU (`dolly up` sets it from its preset)",
    )
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="at most this many replicas on one node (1 spreads them: a lost node takes one)"
    )


class IngressConfig(_Settings):
    """The Serve options of the HTTP ingress, which validates, authenticates and streams."""

    num_replicas: int = Field(1, ge=1, description="ingress replicas")
    num_cpus: float = Field(0.25, ge=0, description="logical CPUs each ingress replica claims")
    max_ongoing_requests: int = Field(512, ge=1, description="HTTP requests one ingress replica holds at once")
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="at most this many ingress replicas on one node (1 spreads them across nodes)"
    )


class FeedbackConfig(_Settings):
    """Where the chat page's ratings and written answers are kept (contract/feedback.py)."""

    url: str = Field(
        DEFAULT_URL, validate_default=True, description="a SQLAlchemy database URL: SQLite on one machine, Postgres on a cluster"
    )
    url_env: str = Field(
        FEEDBACK_URL_ENV,
        description="environment variable that, set where the ingress runs, replaces url: a URL with a password "
        "(from a k8s Secret) stays out of the Serve config",
    )

    @field_validator("url")
    @classmethod
    def _absolute(cls, url: str) -> str:
        # Here, in the process that read the setting: Ray workers have a working directory of their own.
        return absolute_url(url)

    def database_url(self) -> str:
        """The URL to open, read where the store opens (an ingress replica's environment)."""
        return os.environ.get(self.url_env) or self.url


class AuthConfig(_Settings):
    api_keys_env: str = Field(API_KEYS_ENV, description="environment variable with comma-separated API keys")
    api_keys_file: Path | None = Field(None, description="file with one API key per line (e.g. a mounted k8s Secret)")
    insecure_no_auth: bool = Field(False, description="accept requests without a key: local demos only")


class ServeConfig(_Settings):
    """`dolly serve`: a model behind an OpenAI-compatible API on Ray Serve."""

    model: str | None = Field(
        None,
        description="exported model: a folder, or NAME@latest / NAME@N from the registry; with adapters, their base "
        "(default: the base they name)",
    )
    adapters: list[str] = Field(
        [],
        description="LoRA adapters in the registry (names) served side by side on one base: a request's `model` picks "
        "one as NAME, NAME@latest or NAME@N, loaded on demand; a newly promoted version answers without a restart",
    )
    registry: Path = Field(DEFAULT_ROOT, description="model registry root that NAME@version resolves in")
    served_model_name: str | None = Field(
        None, description="the id clients send as `model` (default: the registry name or folder name)"
    )
    app_name: str = Field("dolly", description="Serve application name")
    route_prefix: str = Field("/", description="HTTP path the API is mounted at")
    log_content: bool = Field(False, description="log prompts and answers (off: only sizes and timings are logged)")
    defaults: SamplingDefaults = Field(
        default_factory=SamplingDefaults,
        description="sampling parameters a request leaves out; those not set here are the served model's own (its "
        "generation_config.json, where `dolly up` writes the decoding its answers were scored with), else Dolly's",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="batching, context, dtype and device of a replica")
    deployment: ModelDeploymentConfig = Field(
        default_factory=ModelDeploymentConfig, description="replicas, autoscaling, queues, health, shutdown"
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="the HTTP ingress deployment")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig, description="the store of ratings and written answers")

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        d = self.deployment
        if self.model is None and not self.adapters:
            raise ValueError("model is required: a folder, or NAME@latest / NAME@N from the registry (or adapters=[...])")
        if self.engine.device == "cuda" and not d.num_gpus:
            raise ValueError(
                "engine.device=cuda needs deployment.num_gpus above 0: a replica uses only the GPU Ray gives it "
                "(one that asked for none would take a GPU another process owns); set deployment.num_gpus=1"
            )
        if self.engine.kind == "vllm" and d.num_gpus and d.num_gpus != int(d.num_gpus):
            raise ValueError(
                f"deployment.num_gpus={d.num_gpus:g}: with engine.kind=vllm it is the GPUs a replica's engine "
                "spans (its tensor parallelism), a whole number; vLLM shares a GPU through "
                "engine.vllm.engine_kwargs.gpu_memory_utilization instead"
            )
        if self.adapters and self.engine.batching == "continuous":
            raise ValueError(
                "adapters need engine.batching=dynamic: transformers' continuous batching runs one model for every row, "
                "while dynamic batching runs each row on its own adapter"
            )
        if d.min_replicas > d.max_replicas:
            raise ValueError(f"deployment.min_replicas ({d.min_replicas}) is above deployment.max_replicas ({d.max_replicas})")
        if d.max_ongoing_requests < self.engine.max_batch_size:
            raise ValueError(
                f"deployment.max_ongoing_requests ({d.max_ongoing_requests}) is below engine.max_batch_size "
                f"({self.engine.max_batch_size}): a replica would never see a full batch; raise the first or lower the second"
            )
        if problem := self._engine_lacks(self.defaults):
            raise ValueError(problem)
        return self

    def _engine_lacks(self, defaults: SamplingDefaults) -> str | None:
        """What of `defaults` this engine cannot apply, and the fix; None: it can apply them all."""
        for setting, lacking in CONTINUOUS_LACKS.items():
            if getattr(defaults, setting) and self.engine.batching == "continuous":
                return (
                    f"defaults.{setting} needs engine.batching=dynamic (transformers' continuous batching has "
                    f"{lacking}): set engine.batching=dynamic or defaults.{setting}=0"
                )
        if defaults.top_k and not self.engine.has_top_k:
            return (
                "defaults.top_k needs engine.continuous_top_k=true with engine.batching=continuous (top-k is opt-in there: "
                "it sorts the whole vocabulary for every request): set engine.continuous_top_k=true, "
                "engine.batching=dynamic or defaults.top_k=0"
            )
        return None

    def defaults_for(self, folder: Path) -> SamplingDefaults:
        """What a request to the model in `folder` gets for the parameters it leaves out: the
        decoding the model carries (contract.decoding), under the defaults set here."""
        carried = Decoding.of_model(folder)
        defaults = SamplingDefaults.model_validate(carried.model_dump() | self.defaults.model_dump(exclude_unset=True))
        if problem := self._engine_lacks(defaults):
            raise UserError(f"{folder}/{GENERATION_CONFIG} decodes with {carried.describe()}, and {problem}")
        return defaults

    @property
    def min_tokens(self) -> int:
        """defaults.min_tokens, or where it is left out, what the engine can hold back."""
        if self.defaults.min_tokens is not None:
            return self.defaults.min_tokens
        return generation.MIN_TOKENS if self.engine.batching == "dynamic" else 0

    def model_deployment_options(self) -> dict:
        d = self.deployment
        return dict(
            autoscaling_config=dict(
                min_replicas=d.min_replicas,
                initial_replicas=max(d.min_replicas, 1),
                max_replicas=d.max_replicas,
                target_ongoing_requests=d.target_ongoing_requests,
                upscale_delay_s=d.upscale_delay_s,
                downscale_delay_s=d.downscale_delay_s,
                metrics_interval_s=d.metrics_interval_s,
                look_back_period_s=d.look_back_period_s,
            ),
            max_ongoing_requests=d.max_ongoing_requests,
            max_queued_requests=d.max_queued_requests,
            health_check_period_s=d.health_check_period_s,
            health_check_timeout_s=d.health_check_timeout_s,
            graceful_shutdown_wait_loop_s=d.graceful_shutdown_wait_loop_s,
            graceful_shutdown_timeout_s=d.graceful_shutdown_timeout_s,
            ray_actor_options=dict(num_cpus=d.num_cpus, num_gpus=d.num_gpus),
            **_per_node(d.max_replicas_per_node),
        )

    def ingress_deployment_options(self) -> dict:
        i = self.ingress
        return dict(
            num_replicas=i.num_replicas,
            max_ongoing_requests=i.max_ongoing_requests,
            # The ingress never queues much: overflow is decided at the model replicas' queue.
            max_queued_requests=i.max_ongoing_requests,
            backpressure_config=dict(status_code=503, retry_after_s=self.deployment.retry_after_s),
            # In-flight streams finish before an old ingress goes away in a version switch.
            graceful_shutdown_timeout_s=self.deployment.graceful_shutdown_timeout_s,
            # Serve learns of a lost replica from its health check: a lost ingress as soon as a model replica.
            health_check_period_s=self.deployment.health_check_period_s,
            health_check_timeout_s=self.deployment.health_check_timeout_s,
            ray_actor_options=dict(num_cpus=i.num_cpus),
            **_per_node(i.max_replicas_per_node),
        )


def _per_node(limit: int | None) -> dict:
    # Left out unless set: Serve's deployment schema (serve build, serveConfigV2) refuses null.
    return {} if limit is None else {"max_replicas_per_node": limit}


@dataclass(frozen=True)
class Served:
    folder: Path  # the model's, or the first adapter's: tokenizer, generation config, and what loads first
    version: str  # what answers for the served name: dolly@3, or with adapters their base's name
    adapter: str | None = None  # with adapters: the first one's version (NAME@N), loaded with the base
    base: str | None = None  # with adapters: the base that every one of them was trained on


def what_to_serve(config: ServeConfig) -> Served:
    """The config's model, or its adapters and their common base; a version that cannot be
    served is refused here, before any replica starts."""
    if not config.adapters:
        folder, version = registry.resolve(config.model, config.registry)
        registry.check_servable(folder)
        return Served(folder.resolve(), version)  # absolute: replicas run in other working directories
    adapters = [registry.resolve(f"{name}@latest", config.registry) for name in config.adapters]
    base = config.model
    if base is None:
        base = registry.adapter_base(adapters[0][0]) or adapters[0][1]  # not an adapter: check_base says so
    elif "@" in base or Path(base).is_dir():
        base = str(registry.resolve(base, config.registry)[0].resolve())
    for folder, version in adapters:
        registry.check_base(folder, version, base)
        registry.check_servable(folder)
        if config.engine.kind == "vllm":
            check_lora_only(folder, version)
    (folder, version), name = adapters[0], Path(base).name
    return Served(folder.resolve(), name, version, base)


def check_lora_only(folder: Path, version: str) -> None:
    """Refuse adapter `version` for vLLM, whose LoRA loads LoRA weights alone, if it carries rows
    of Dolly's tokens (trained with it because they were new to its base: pipelines/lora.py)."""
    if registry.carries_token_rows(folder):
        raise UserError(
            f"{version} carries its own rows of Dolly's tokens (they were new to the base it was trained on), which "
            "vLLM's LoRA cannot load: serve it with engine.kind=dolly, or train it on a base tuned in Dolly's format "
            "(dolly train method=lora base_model=dolly@latest: the adapter is then LoRA alone)"
        )
