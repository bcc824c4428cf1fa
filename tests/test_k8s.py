"""The KubeRay deployment in k8s/ as a platform team meets it: the committed files are the
generator's output, KubeRay's own CRDs accept every resource, kustomize builds every overlay, Ray
Serve accepts the serve config, `dolly train` and `dolly retrain` accept their jobs' configs, and
the pods are big enough for the training plan the memory preflight checks, on the GPU it assumes,
with local disk for the model state that passes through it."""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import typer
import yaml
from typer.testing import CliRunner

from cli.configs import load_config
from cli.k8s import app as k8s_app
from cluster import k8s
from contract.errors import UserError
from loop.configs import RetrainConfig
from pipelines.configs import TrainConfig
from pipelines.presets import PRESETS
from tests.conftest import REPO, SHARED, require_shared
from ui.config import PAGE_APP, PAGE_ROUTE

CRDS = SHARED / "kuberay" / "crds"
KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
PROFILES = list(k8s.PROFILES)


def overlay(profile: str) -> dict[str, dict]:
    """The overlay's resources by kind (one of each), its ConfigMaps by name, and the retraining
    job of its retrain/ kustomization as RetrainJob."""
    resources = {}
    for name, text in k8s.render_overlay(k8s.PROFILES[profile]).items():
        if not name.endswith("kustomization.yaml"):
            doc = yaml.safe_load(text)
            key = (
                "RetrainJob"
                if name.startswith("retrain/")
                else doc["metadata"]["name"]
                if doc["kind"] == "ConfigMap"
                else doc["kind"]
            )
            resources[key] = doc
    return resources


def cluster_specs(resources: dict[str, dict]) -> dict[str, dict]:
    return {
        "RayCluster": resources["RayCluster"]["spec"],
        "RayJob": resources["RayJob"]["spec"]["rayClusterSpec"],
        "RetrainJob": resources["RetrainJob"]["spec"]["rayClusterSpec"],
        "RayService": resources["RayService"]["spec"]["rayClusterConfig"],
    }


def pods(spec: dict) -> list[dict]:
    """The pod specs of a cluster spec: its head's, then its worker groups'."""
    return [group["template"]["spec"] for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


def gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Gi|Mi|Ti)", quantity).groups()
    return float(number) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[unit]


# --- the files ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_committed_manifests_are_exactly_the_generators_output():
    stale = k8s.drift(REPO / "k8s", k8s.render())
    assert not stale, f"k8s/ differs from cluster/k8s.py in {[str(p) for p in stale]}: run `dolly k8s render` to update"


@pytest.mark.timeout(60)
def test_render_check_names_the_drift_and_the_command_that_fixes_it(tmp_path):
    runner = CliRunner()
    assert runner.invoke(k8s_app, ["render", "--out", str(tmp_path)]).exit_code == 0
    assert runner.invoke(k8s_app, ["render", "--out", str(tmp_path), "--check"]).exit_code == 0
    edited = tmp_path / "overlays" / "gpu-a100" / "rayservice.yaml"
    edited.write_text(edited.read_text().replace("dolly@latest", "dolly@3"))
    (tmp_path / "base" / "leftover.yaml").write_text("kind: ConfigMap\n")
    result = runner.invoke(k8s_app, ["render", "--out", str(tmp_path), "--check"], terminal_width=300)
    assert result.exit_code == 1
    assert "overlays/gpu-a100/rayservice.yaml" in result.output and "base/leftover.yaml" in result.output
    assert "dolly k8s render" in result.output


@pytest.mark.timeout(60)
def test_promoting_a_version_changes_only_the_served_model_and_the_one_retraining_must_beat():
    latest, pinned = k8s.render(["gpu-a100"]), k8s.render(["gpu-a100"], model="dolly@4")
    service, retrain = Path("overlays/gpu-a100/rayservice.yaml"), Path("overlays/gpu-a100/retrain-config.yaml")
    assert {p for p in latest if latest[p] != pinned[p]} == {service, retrain}
    config = yaml.safe_load(yaml.safe_load(pinned[service])["spec"]["serveConfigV2"])
    assert config["applications"][0]["args"]["model"] == "dolly@4"
    assert yaml.safe_load(yaml.safe_load(pinned[retrain])["data"][k8s.RETRAIN_CONFIG_FILE])["serving"] == "dolly@4"


# --- KubeRay's CRDs -----------------------------------------------------------------------------


def strict(schema: dict) -> dict:
    """The schema as the API server applies it with kubectl's default strict field validation:
    an object with declared properties rejects any other field (a typo is an error, not a no-op)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(s) for s in schema]
    return schema


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft7Validator]:
    result = {}
    for kind, plural in KINDS.items():
        # libyaml: the CRDs are 60,000 lines, which the pure-Python loader reads in 20 s.
        crd = yaml.load((require_shared(CRDS) / f"ray.io_{plural}.yaml").read_text(), Loader=yaml.CSafeLoader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        result[kind] = jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))
    return result


def problems(validator: jsonschema.Draft7Validator, manifest: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_kuberay_resource_validates_against_its_crd(profile, validators):
    resources = overlay(profile)
    resources["TrainJobOfTheCLI"] = k8s.rayjob(k8s.PROFILES[profile], "dolly-train-dolly-2", ["run_name=dolly-2"])
    for key, manifest in resources.items():
        if manifest["kind"] in validators:
            assert problems(validators[manifest["kind"]], manifest) == [], f"{profile} {key}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("kind", "path", "value", "error"),
    [
        ("RayCluster", ["spec", "enableInTreeAutoscale"], True, "Additional properties are not allowed"),
        ("RayCluster", ["spec", "authOptions", "mode"], "tokens", "is not one of ['disabled', 'token']"),
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "minReplicas"], "1", "is not of type 'integer'"),
        ("RayJob", ["spec", "backoffLimit"], "2", "is not of type 'integer'"),
        ("RayService", ["spec", "upgradeStrategy", "typ"], "NewCluster", "Additional properties are not allowed"),
    ],
)
def test_a_broken_manifest_fails_crd_validation(validators, kind, path, value, error):
    """The negative control: the validation above can fail."""
    manifest = overlay("gpu-a100")[kind]
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(error in p for p in problems(validators[kind], manifest))
    del node[path[-1]]
    if kind == "RayCluster":
        del manifest["spec"]["workerGroupSpecs"][0]["groupName"]
        assert any("'groupName' is a required property" in p for p in problems(validators[kind], manifest))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profile", PROFILES)
def test_resources_pass_the_checks_kuberay_makes_beyond_its_schema(profile):
    """ray-operator/controllers/ray/utils/validation.go: names, token auth's Ray version, RayJob and
    RayService rules."""
    resources = overlay(profile)
    for kind in [*KINDS, "RetrainJob"]:
        name = resources[kind]["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47, name
    for spec in cluster_specs(resources).values():
        assert spec["authOptions"]["mode"] == "token"
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert group["template"]["spec"]["containers"], "a group needs a container"
            assert "labels" not in group["rayStartParams"]
            assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(group["rayStartParams"]) and group.get("resources"))
    for job in (resources["RayJob"]["spec"], resources["RetrainJob"]["spec"]):
        assert job["shutdownAfterJobFinishes"] or not job["ttlSecondsAfterFinished"]
        assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 0
        assert job["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    service = resources["RayService"]["spec"]
    assert service["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
    assert "headService" not in service["rayClusterConfig"]["headGroupSpec"]


# --- kustomize ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_overlay_and_its_retraining_build_with_kubectl_kustomize(profile):
    def build(folder: Path) -> tuple[list[dict], set[str]]:
        built = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert built.returncode == 0, built.stderr
        return list(yaml.safe_load_all(built.stdout)), set(re.findall(r"image: (\S+)", built.stdout))

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (apt-get install kubectl, or Google's/Kubernetes' apt repository)")
    folder = REPO / "k8s" / "overlays" / profile
    docs, images = build(folder)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("ConfigMap", k8s.RETRAIN_CONFIGMAP),
        ("ConfigMap", k8s.TRAIN_CONFIGMAP),
        ("PersistentVolumeClaim", k8s.VOLUME),
        ("RayCluster", k8s.CLUSTER),
        ("RayJob", k8s.JOB),
        ("RayService", k8s.SERVICE),
        ("Service", k8s.UI_SERVICE),
    ], "the deployment holds no retraining job: it would start one, before there is a model to beat"
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["resources"]["requests"]["storage"] == f"{k8s.PROFILES[profile].storage_gib}Gi"
    served = k8s.PROFILES[profile]
    assert images == {k8s.image(served), k8s.serving_image(served)}, "the overlay's images: sets every pod's"

    docs, images = build(folder / "retrain")
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("RayJob", k8s.RETRAIN_JOB)]
    assert images == {k8s.image(k8s.PROFILES[profile])}, "the retraining runs the deployment's image"


# --- what runs inside -----------------------------------------------------------------------------


def serve_applications(profile: str) -> list:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(overlay(profile)["RayService"]["spec"]["serveConfigV2"])
    return ServeDeploySchema.model_validate(config).applications


def build(application, **args):
    """The Application Serve builds from a serveConfigV2 entry: import_path imported, `args` validated
    into the builder's annotated config and the builder called, by Serve's own code."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    module, _, name = application.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    return call_user_app_builder_with_args_if_necessary(builder, {**application.args, **args})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profile", PROFILES)
def test_serve_config_v2_is_valid_for_ray_serve(profile):
    applications = serve_applications(profile)
    assert [(a.name, a.route_prefix) for a in applications] == [("dolly", "/"), (PAGE_APP, PAGE_ROUTE)]
    assert applications[0].args["model"] == k8s.DEFAULT_MODEL


@pytest.mark.timeout(120)
@pytest.mark.parametrize("profile", PROFILES)
def test_the_api_application_builds_from_its_args(profile, tiny_model, tmp_path):
    from contract.registry import register
    from services.config import ServeConfig

    register(tiny_model, "dolly", tmp_path)  # the registry the training job fills, on the volume
    if k8s.PROFILES[profile].serves_on_vllm:  # it builds in vLLM's image (tests/test_serve_vllm.py); here it says so
        with pytest.raises(UserError, match="make vllm"):
            build(serve_applications(profile)[0], registry=str(tmp_path))
        return
    api = build(serve_applications(profile)[0], registry=str(tmp_path))
    [config] = [arg for arg in api._bound_deployment.init_args if isinstance(arg, ServeConfig)]
    assert config == k8s.serve_config(k8s.PROFILES[profile]).model_copy(update={"registry": tmp_path})


@pytest.mark.timeout(120)
def test_the_chat_page_application_builds_from_its_args():
    from ui.config import UIConfig

    page = build(serve_applications("gpu-a100")[1])
    assert isinstance(page._bound_deployment.init_args[0], UIConfig)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profile", PROFILES)
def test_the_api_key_comes_from_the_secret_into_every_serving_pod_and_never_into_the_config(profile):
    resources = overlay(profile)
    spec = resources["RayService"]["spec"]
    serve = k8s.serve_config(k8s.PROFILES[profile])
    for group in [spec["rayClusterConfig"]["headGroupSpec"], *spec["rayClusterConfig"]["workerGroupSpecs"]]:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env[serve.auth.api_keys_env]["valueFrom"]["secretKeyRef"] == {"name": k8s.API_KEYS_SECRET, "key": k8s.API_KEYS_KEY}
    assert "auth" not in yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]
    for kind in ("RayCluster", "RayJob", "RetrainJob"):
        # Retraining scores both versions from the registry on its own workers, not through the API.
        assert k8s.API_KEYS_SECRET not in yaml.safe_dump(resources[kind]), "training pods have no business with API keys"


@pytest.mark.timeout(60)
def test_every_cluster_uses_the_one_token_secret_we_own():
    for profile in PROFILES:
        for spec in cluster_specs(overlay(profile)).values():
            assert spec["authOptions"] == {"mode": "token", "secretName": k8s.TOKEN_SECRET}


@pytest.mark.timeout(60)
def test_the_api_and_page_services_reach_the_serving_cluster():
    service = overlay("gpu-a100")["RayService"]["spec"]
    assert service["serveService"]["metadata"]["name"] == k8s.API_SERVICE
    assert service["serveService"]["spec"]["ports"][0]["name"] == "serve"  # KubeRay keeps only the port named serve
    head_labels = service["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    selector = k8s.ui_service()["spec"]["selector"]
    # ray.io/serve is set by KubeRay on a head whose Serve proxy is healthy.
    assert selector == {**head_labels, "ray.io/serve": "true"}
    page = yaml.safe_load(service["serveConfigV2"])["applications"][1]
    assert page["args"]["api_url"] == f"http://{k8s.API_SERVICE}:{k8s.SERVE_PORT}/v1"


def parse_dolly(entrypoint: str, config_file: Path) -> TrainConfig | RetrainConfig:
    """The settings `dolly train` or `dolly retrain` would run with, parsed by the real command (not
    run), with `config_file` for the ConfigMap's file the entrypoint names."""
    from cli.retrain import retrain
    from cli.train import train

    commands = {
        "train": (train, TrainConfig, k8s.TRAIN_CONFIG_FILE),
        "retrain": (retrain, RetrainConfig, k8s.RETRAIN_CONFIG_FILE),
    }
    dolly, name, *argv = shlex.split(entrypoint)
    function, config_class, file = commands[name]
    command = typer.Typer()
    command.command()(function)
    args = [str(config_file) if a == f"{k8s.CONFIG_DIR}/{file}" else a for a in argv]
    params = typer.main.get_command(command).make_context(name, args).params
    assert dolly == "dolly" and not params.get("new_records") and not params.get("feedback"), "settings come from the config"
    return load_config(config_class, params["config"], {}, params["overrides"] or [])


def mounted_config(resources: dict[str, dict], job: str, configmap: str, folder: Path) -> Path:
    """The ConfigMap's file that the job's head mounts at CONFIG_DIR, written into `folder`."""
    head = resources[job]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    (mounted,) = [v["name"] for v in head["volumes"] if v.get("configMap", {}).get("name") == configmap]
    assert mounts[mounted] == k8s.CONFIG_DIR, "the job's driver runs on the head: the config is mounted there"
    ((file, text),) = resources[configmap]["data"].items()
    (folder / file).write_text(text)
    return folder / file


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profile", PROFILES)
def test_the_rayjob_entrypoint_parses_with_dolly_train_and_the_configmap_it_mounts(profile, tmp_path):
    resources = overlay(profile)
    config_file = mounted_config(resources, "RayJob", k8s.TRAIN_CONFIGMAP, tmp_path)

    settings = parse_dolly(resources["RayJob"]["spec"]["entrypoint"], config_file)
    assert settings == k8s.train_config(k8s.PROFILES[profile])
    assert settings.preset == k8s.PROFILES[profile].hardware

    retrain = k8s.rayjob(k8s.PROFILES[profile], "dolly-train-dolly-2", ["run_name=dolly-2", "epochs=3"])
    settings = parse_dolly(retrain["spec"]["entrypoint"], config_file)
    assert (settings.run_name, settings.epochs) == ("dolly-2", 3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profile", PROFILES)
def test_the_retraining_rayjob_runs_dolly_retrain_against_what_serves_on_the_shared_volume(profile, tmp_path):
    resources = overlay(profile)
    config_file = mounted_config(resources, "RetrainJob", k8s.RETRAIN_CONFIGMAP, tmp_path)
    settings = parse_dolly(resources["RetrainJob"]["spec"]["entrypoint"], config_file)
    assert settings == RetrainConfig.model_validate(k8s.retrain_settings(k8s.PROFILES[profile]))

    # The training job's recipe, on the corpus it trained on plus the chat page's approved answers...
    trained, serve = k8s.train_config(k8s.PROFILES[profile]), k8s.serve_config(k8s.PROFILES[profile])
    placed_by_retrain = {"source", "data_dir", "run_name"}
    assert settings.train.model_dump(exclude=placed_by_retrain) == trained.model_dump(exclude=placed_by_retrain)
    assert settings.corpus == trained.source and settings.feedback == serve.feedback.url
    # ...scored against the version the RayService serves, in the registry it serves from.
    assert settings.serving == serve.model and settings.train.registry == serve.registry
    # Promotion moves NAME@latest; the RayService changes by its manifest only (k8s/README.md).
    assert settings.serve_config is None
    for path in (settings.workdir, settings.train.registry, settings.train.output_dir, settings.train.storage_path):
        assert str(path).startswith(k8s.MOUNT + "/"), "written on one node and read on others"
    assert resources["RetrainJob"]["spec"]["backoffLimit"] > 0, "a retry resumes the run retrain names from its inputs"

    job = k8s.retrain_rayjob(k8s.PROFILES[profile], ["new_records=[/mnt/dolly/incoming/june.jsonl]", "gate.min_improvement=0.05"])
    settings = parse_dolly(job["spec"]["entrypoint"], config_file)
    assert (settings.new_records, settings.gate.min_improvement) == ([Path("/mnt/dolly/incoming/june.jsonl")], 0.05)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profile", PROFILES)
def test_a_retried_job_resumes_the_same_run_from_the_shared_volume(profile):
    resources = overlay(profile)
    job = resources["RayJob"]["spec"]
    config = k8s.train_config(k8s.PROFILES[profile])
    assert job["backoffLimit"] > 0 and job["shutdownAfterJobFinishes"]
    # Ray Train resumes a run by name + storage path; both are fixed, and every output is on the volume.
    assert config.run_name == "dolly"
    for path in (config.storage_path, config.output_dir, config.registry, config.data_dir):
        assert str(path).startswith(k8s.MOUNT + "/")
    for spec in cluster_specs(resources).values():
        for pod in pods(spec):
            assert {"name": "data", "mountPath": k8s.MOUNT} in pod["containers"][0]["volumeMounts"]
            assert {"name": "data", "persistentVolumeClaim": {"claimName": k8s.VOLUME}} in pod["volumes"]
    assert k8s.volume_claim()["spec"]["accessModes"] == ["ReadWriteMany"]
    assert k8s.serve_config(k8s.PROFILES[profile]).registry == config.registry, "serving reads what training registers"


@pytest.mark.timeout(60)
def test_dolly_k8s_job_prints_a_retraining_rayjob_and_refuses_bad_input():
    runner = CliRunner()
    result = runner.invoke(k8s_app, ["job", "--preset", "gpu-h100", "--run-name", "dolly-2", "lr=1e-5"])
    assert result.exit_code == 0, result.output
    job = yaml.safe_load(result.output)
    assert job["metadata"]["name"] == "dolly-train-dolly-2"
    assert job["spec"]["entrypoint"] == "dolly train --config /config/train.yaml run_name=dolly-2 lr=1e-5"
    assert set(re.findall(r"image: (\S+)", result.output)) == {k8s.image(k8s.PROFILES["gpu-h100"])}, "the overlay's image"
    bad_setting = runner.invoke(k8s_app, ["job", "--preset", "gpu-h100", "--run-name", "x", "epochz=3"], terminal_width=300)
    assert bad_setting.exit_code == 2 and "setting 'epochz'" in bad_setting.output
    bad_name = runner.invoke(k8s_app, ["job", "--preset", "gpu-h100", "--run-name", "Dolly_2"], terminal_width=300)
    assert bad_name.exit_code == 2 and "lowercase" in bad_name.output
    bad_preset = runner.invoke(k8s_app, ["job", "--preset", "tpu", "--run-name", "x"], terminal_width=300)
    assert bad_preset.exit_code == 2 and "unknown preset" in bad_preset.output


@pytest.mark.timeout(60)
def test_dolly_k8s_retrain_prints_the_retraining_rayjob_with_your_settings_and_image():
    runner = CliRunner()
    assert runner.invoke(k8s_app, ["retrain", "--preset", "gpu-a100"]).output == k8s.render_overlay(k8s.PROFILES["gpu-a100"])[
        "retrain/rayjob.yaml"
    ].replace(f"image: {k8s.IMAGE}\n", f"image: {k8s.image(k8s.PROFILES['gpu-a100'])}\n")
    image = "ghcr.io/acme/dolly-ray:0.1.0-gpu"
    result = runner.invoke(k8s_app, ["retrain", "--preset", "gpu-a100", "--image", image, "new_records=[/mnt/dolly/new.jsonl]"])
    assert result.exit_code == 0, result.output
    job = yaml.safe_load(result.output)
    assert job["metadata"]["name"] == k8s.RETRAIN_JOB
    assert job["spec"]["entrypoint"] == "dolly retrain --config /config/retrain.yaml 'new_records=[/mnt/dolly/new.jsonl]'"
    assert {c["image"] for pod in pods(job["spec"]["rayClusterSpec"]) for c in pod["containers"]} == {image}
    bad = runner.invoke(k8s_app, ["retrain", "--preset", "gpu-a100", "gate.metrc=loss"], terminal_width=300)
    assert bad.exit_code == 2 and "setting 'gate.metrc'" in bad.output


# --- resources agree with the plan ---------------------------------------------------------------


def same_shape(base_model: str) -> str:
    """A random Pythia of the base model's shape: its size, without the Hub (see ../shared/README.md)."""
    return f"pythia-{base_model.removeprefix('EleutherAI/pythia-')}-random"


def pod_shape(group: dict) -> tuple[int, float, int]:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return int(limits["cpu"]), gib(limits["memory"]), int(limits.get("nvidia.com/gpu", 0))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("profile", PROFILES)
def test_the_training_pods_hold_the_plan_the_memory_preflight_accepts(profile):
    from pipelines import preflight

    resources = overlay(profile)
    config = k8s.train_config(k8s.PROFILES[profile])
    preset = PRESETS[config.preset]
    (workers,) = resources["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    cpus, memory_gib, gpus = pod_shape(workers)
    if config.use_gpu:
        assert gpus == preset.devices_per_node, "a training pod is a whole node of the preset"
        assert config.num_workers <= gpus * workers["minReplicas"], "every worker has a GPU from the start"
    else:
        assert gpus == 0 and config.num_workers <= workers["minReplicas"]
    workers_per_pod = gpus or 1
    assert config.cpus_per_worker * workers_per_pod < cpus, "CPUs are left for Ray Data to feed the workers"
    assert config.host_memory_gib == memory_gib, "the preflight checks host memory against the pod's"
    shape = preflight.ModelShape.of(same_shape(config.base_model))
    plan = preflight.check(config, shape, seq_len=config.prepare.max_length or 2048)  # PlanDoesNotFit otherwise
    assert plan.host_gib <= memory_gib
    if config.use_gpu:
        assert plan.device_budget_gib == preset.device_memory_gib
    (cluster_workers,) = resources["RayCluster"]["spec"]["workerGroupSpecs"]
    assert pod_shape(cluster_workers) == (cpus, memory_gib, gpus), "the interactive cluster can run the same plan"
    assert cluster_workers["maxReplicas"] >= workers["minReplicas"]
    (retrain_workers,) = resources["RetrainJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert pod_shape(retrain_workers) == (cpus, memory_gib, gpus), "retraining trains the same plan"
    assert retrain_workers["minReplicas"] == workers["minReplicas"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profile", PROFILES)
def test_gpu_pods_go_to_nodes_of_the_presets_gpu_and_cpu_pods_anywhere(profile):
    chosen = k8s.PROFILES[profile].gpu_product
    for spec in cluster_specs(overlay(profile)).values():
        for pod in pods(spec):
            gpus = int(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            assert pod.get("nodeSelector") == ({k8s.GPU_PRODUCT_LABEL: chosen} if gpus else None)
    if PRESETS[k8s.PROFILES[profile].hardware].device_memory_gib is not None:
        # GPU feature discovery's names carry the memory: NVIDIA-A100-SXM4-40GB, NVIDIA-H100-80GB-HBM3.
        assert f"-{PRESETS[k8s.PROFILES[profile].hardware].device_memory_gib:g}GB" in chosen, "the GPU the plan is sized for"


@pytest.mark.timeout(60)
def test_a_gpu_profile_without_its_gpu_product_is_refused_and_names_the_setting():
    settings = k8s.PROFILES["gpu-a100"].model_dump() | {"gpu_product": None}
    with pytest.raises(ValueError, match="gpu-a100: gpu_product=None; set it"):
        k8s.Profile.model_validate(settings)
    with pytest.raises(ValueError, match="exactly when train_pod or serve_pod has GPUs"):
        k8s.Profile.model_validate(k8s.PROFILES["cpu-dev"].model_dump() | {"gpu_product": "NVIDIA-A100-SXM4-40GB"})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_pod_asks_for_the_local_disk_its_tmp_holds(profile):
    """/tmp is an emptyDir, within the pod's ephemeral-storage: a training pod's holds a checkpoint
    downloaded from object storage and its conversion to DeepSpeed's universal format (16 + 24
    bytes a parameter), beside Ray's session folder, as every pod's does."""
    from pipelines import preflight

    resources = overlay(profile)
    params = preflight.ModelShape.of(same_shape(k8s.train_config(k8s.PROFILES[profile]).base_model)).n_params
    for kind, spec in cluster_specs(resources).items():
        for pod in pods(spec):
            (container,) = pod["containers"]
            disk = container["resources"]["requests"]["ephemeral-storage"]
            assert container["resources"]["limits"]["ephemeral-storage"] == disk, "the kubelet evicts past the request"
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
            assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
            trains = container["name"] == "ray-worker" and kind != "RayService"
            needed = k8s.RAY_LOCAL_GIB * 2**30 + (40 * params if trains else 0)
            assert needed <= gib(disk) * 2**30 < needed + 2**30, f"{kind} {container['name']}: {disk}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profile", PROFILES)
def test_the_serving_pods_hold_the_replicas_serve_autoscales(profile):
    spec = overlay(profile)["RayService"]["spec"]
    serve = k8s.serve_config(k8s.PROFILES[profile])
    (workers,) = spec["rayClusterConfig"]["workerGroupSpecs"]
    cpus, _, gpus = pod_shape(workers)
    replica = serve.deployment
    assert gpus >= replica.num_gpus and (gpus > 0) == (replica.num_gpus > 0)
    # A pod holds a model replica plus the ingress and the page's share (the head runs no replicas).
    assert replica.num_cpus + serve.ingress.num_cpus + 0.25 <= cpus
    assert (workers["minReplicas"], workers["maxReplicas"]) == (replica.min_replicas, replica.max_replicas)
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"]
    deployment_s, service_s = spec["deploymentUnhealthySecondThreshold"], spec["serviceUnhealthySecondThreshold"]
    assert deployment_s >= 3 * k8s.PROFILES[profile].model_load_s and service_s >= deployment_s


@pytest.mark.timeout(60)
def test_the_image_runs_the_ray_and_torch_the_project_pins():
    dockerfile = (REPO / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    (ray_image,) = re.findall(r"^ARG RAY_IMAGE=rayproject/ray:([0-9.]+)-py311$", dockerfile, re.M)
    assert ray_image == k8s.RAY_VERSION == re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', pyproject)[1]
    torch = re.search(r'"torch==([0-9.]+)"', pyproject)[1]
    assert set(re.findall(r"torch==([0-9.]+)", dockerfile)) == {torch}
    # The vLLM serving image: the same Ray, with the torch its vLLM pins.
    vllm = (REPO / "Dockerfile.vllm").read_text()
    assert (
        re.findall(r"rayproject/ray:([0-9.]+)-py311-gpu", vllm)
        == re.findall(r"ray\[serve,llm\]==([0-9.]+)", vllm)
        == [k8s.RAY_VERSION]
    )


@pytest.mark.timeout(60)
def test_the_image_holds_every_package_the_project_installs():
    """A package left out of the image imports on a laptop and fails on the cluster."""
    installed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = {name.split(".")[0] for name in installed}  # a folder's COPY brings its sub-packages
    for dockerfile in ("Dockerfile", "Dockerfile.vllm"):
        copied = set(re.findall(r"^COPY --chown=\S+ (\w+) \1$", (REPO / dockerfile).read_text(), re.M))
        assert packages == copied, dockerfile


@pytest.mark.timeout(60)
def test_a_feedback_database_secret_if_there_is_one_replaces_sqlite_on_the_network_volume(monkeypatch):
    spec = overlay("gpu-a100")["RayService"]["spec"]
    serve = k8s.serve_config(k8s.PROFILES["gpu-a100"])
    assert serve.feedback.url == "sqlite:////mnt/dolly/feedback/feedback.db"
    for group in [spec["rayClusterConfig"]["headGroupSpec"], *spec["rayClusterConfig"]["workerGroupSpecs"]]:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        ref = env[serve.feedback.url_env]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": k8s.FEEDBACK_SECRET, "key": k8s.FEEDBACK_KEY, "optional": True}  # pods start without it
    monkeypatch.delenv(serve.feedback.url_env, raising=False)
    assert serve.feedback.database_url() == serve.feedback.url
    monkeypatch.setenv(serve.feedback.url_env, "postgresql+psycopg://dolly:secret@postgres:5432/dolly")
    assert serve.feedback.database_url() == "postgresql+psycopg://dolly:secret@postgres:5432/dolly"
    # A retraining reads the feedback where the ingress wrote it: the same Secret, the same variable.
    from loop.configs import RetrainConfig

    retrain = yaml.safe_load(Path(REPO / "k8s/overlays/gpu-a100/retrain/rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    env = {e["name"]: e for e in retrain["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[serve.feedback.url_env]["valueFrom"]["secretKeyRef"] == ref
    settings = RetrainConfig.model_validate(k8s.retrain_settings(k8s.PROFILES["gpu-a100"]))
    assert settings.feedback_url == "postgresql+psycopg://dolly:secret@postgres:5432/dolly"
    monkeypatch.delenv(serve.feedback.url_env)
    assert settings.feedback_url == serve.feedback.url
