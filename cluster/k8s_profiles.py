"""The overlays' hardware: one `Profile` per overlay says what its pods look like, and the settings
that differ from the defaults. Change a pod's size, GPU or model here, then `dolly k8s render`;
cluster/k8s.py derives the manifests from these."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.presets import PresetName

# NVIDIA GPU feature discovery's label of a node's GPU model (e.g. NVIDIA-A100-SXM4-40GB).
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


class PodShape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: int = Field(gt=0)
    memory_gib: int = Field(gt=0)
    gpus: int = Field(0, ge=0)

    def resources(self, disk_gib: int) -> dict:
        amounts = {"cpu": str(self.cpu), "memory": f"{self.memory_gib}Gi", "ephemeral-storage": f"{disk_gib}Gi"}
        if self.gpus:
            amounts["nvidia.com/gpu"] = str(self.gpus)
        # requests == limits: Guaranteed QoS, and KubeRay hands Ray exactly these amounts. The disk
        # too: the scheduler places a pod only where its /tmp fits, and the kubelet evicts it for
        # writing more, never its neighbours.
        return {"requests": dict(amounts), "limits": dict(amounts)}


class Profile(BaseModel):
    """An overlay: the hardware preset, the pods, and the settings that differ from the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    hardware: PresetName = Field(description="pipelines/presets.py preset the training recipe and the preflight use")
    head: PodShape = Field(description="the head: dashboard, GCS, the job's driver; runs no tasks (num-cpus 0)")
    train_pod: PodShape = Field(description="a training node: one Ray Train worker per GPU (CPU: one per pod)")
    cluster_max_train_pods: int = Field(ge=1, description="the interactive RayCluster autoscales 0..N training pods")
    serve_pod: PodShape = Field(description="a serving node: one model replica")
    gpu_product: str | None = Field(
        None,
        description=f"the {GPU_PRODUCT_LABEL} label of the nodes GPU pods go to: the preset's GPU, whose memory the "
        "plan is sized for (values: `kubectl get nodes -L nvidia.com/gpu.product`); None for CPU pods",
    )
    storage_gib: int = Field(gt=0, description="size of the shared volume: data, HF cache, checkpoints, registry")
    job_deadline_s: int = Field(gt=0, description="the RayJob's activeDeadlineSeconds")
    model_load_s: int = Field(gt=0, description="estimated start of a model replica: weights from the volume to the device")
    train: dict = Field(description="TrainConfig settings beyond the preset's recipe and the volume's paths")
    serve: dict = Field(description="ServeConfig settings beyond the model and the registry")

    @model_validator(mode="after")
    def _gpu_product_with_gpus(self) -> Profile:
        if (self.gpu_product is not None) != bool(self.train_pod.gpus or self.serve_pod.gpus):
            raise ValueError(
                f"profile {self.name}: gpu_product={self.gpu_product!r}; set it (e.g. NVIDIA-A100-SXM4-40GB) exactly when "
                "train_pod or serve_pod has GPUs"
            )
        return self

    @property
    def gpu(self) -> bool:
        return self.train_pod.gpus > 0

    @property
    def serves_on_vllm(self) -> bool:
        return self.serve.get("engine", {}).get("kind") == "vllm"


_H100 = Profile(
    name="gpu-h100",
    hardware="h100",
    head=PodShape(cpu=8, memory_gib=32),
    train_pod=PodShape(cpu=192, memory_gib=1600, gpus=8),
    cluster_max_train_pods=2,
    serve_pod=PodShape(cpu=20, memory_gib=192, gpus=1),
    gpu_product="NVIDIA-H100-80GB-HBM3",  # H100 SXM 80 GB
    storage_gib=1000,
    job_deadline_s=12 * 3600,
    model_load_s=240,
    train=dict(base_model="EleutherAI/pythia-6.9b", num_workers=8, cpus_per_worker=16),
    serve=dict(deployment=dict(min_replicas=1, max_replicas=4, num_cpus=8, num_gpus=1)),
)


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile(
            name="cpu-dev",
            hardware="cpu",
            head=PodShape(cpu=2, memory_gib=8),
            train_pod=PodShape(cpu=4, memory_gib=16),
            cluster_max_train_pods=2,
            serve_pod=PodShape(cpu=4, memory_gib=8),
            storage_gib=50,
            job_deadline_s=4 * 3600,
            model_load_s=30,
            # A small model and short rows: a pipeline check on CPUs, not a useful model.
            train=dict(
                base_model="EleutherAI/pythia-70m", num_workers=2, cpus_per_worker=2, epochs=1, prepare=dict(max_length=512)
            ),
            serve=dict(deployment=dict(min_replicas=1, max_replicas=2, num_cpus=2), engine=dict(torch_threads=2)),
        ),
        Profile(
            name="gpu-a100",
            hardware="a100",
            head=PodShape(cpu=8, memory_gib=32),
            train_pod=PodShape(cpu=88, memory_gib=560, gpus=8),
            cluster_max_train_pods=2,
            serve_pod=PodShape(cpu=10, memory_gib=64, gpus=1),
            gpu_product="NVIDIA-A100-SXM4-40GB",  # the preset's A100 40 GB: an 80 GB or a PCIe one is another label
            storage_gib=500,
            job_deadline_s=12 * 3600,
            model_load_s=120,
            train=dict(base_model="EleutherAI/pythia-2.8b", num_workers=8, cpus_per_worker=8),
            serve=dict(deployment=dict(min_replicas=1, max_replicas=4, num_cpus=4, num_gpus=1)),
        ),
        _H100,
        # gpu-h100 served on vLLM (engine.kind=vllm) from its own image (Dockerfile.vllm); the
        # training side is gpu-h100's.
        Profile.model_validate(
            _H100.model_dump()
            | dict(
                name="gpu-h100-vllm",
                model_load_s=300,  # vLLM's start: the weights, then its CUDA graphs and KV cache
                serve=dict(
                    # vLLM batches far more than our engine: its KV cache admits what fits.
                    engine=dict(kind="vllm", max_batch_size=128, vllm=dict(accelerator_type="H100")),
                    deployment=dict(min_replicas=1, max_replicas=4, num_cpus=8, num_gpus=1, max_ongoing_requests=256),
                ),
            )
        ),
    ]
}
