"""The KubeRay deployment in k8s/ as a platform team meets it: the committed files are the
generator's output, KubeRay's own CRDs accept every resource, kustomize builds every overlay, Ray
Serve accepts the serve config, `dolly train` accepts the job's config, and the pods are big
enough for the training plan the memory preflight checks."""

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
from pipelines.configs import TrainConfig
from pipelines.presets import PRESETS
from tests.conftest import REPO, SHARED, require_shared
from ui.config import PAGE_APP, PAGE_ROUTE

CRDS = SHARED / "kuberay" / "crds"
KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
PROFILES = list(k8s.PROFILES)


def overlay(profile: str) -> dict[str, dict]:
    """The overlay's resources by kind (one of each)."""
    docs = [
        yaml.safe_load(text) for name, text in k8s.render_overlay(k8s.PROFILES[profile]).items() if name != "kustomization.yaml"
    ]
    return {d["kind"]: d for d in docs}


def cluster_specs(resources: dict[str, dict]) -> dict[str, dict]:
    return {
        "RayCluster": resources["RayCluster"]["spec"],
        "RayJob": resources["RayJob"]["spec"]["rayClusterSpec"],
        "RayService": resources["RayService"]["spec"]["rayClusterConfig"],
    }


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
def test_promoting_a_version_changes_only_the_served_model():
    latest, pinned = k8s.render(["gpu-a100"]), k8s.render(["gpu-a100"], model="dolly@4")
    changed = [p for p in latest if latest[p] != pinned[p]]
    assert changed == [Path("overlays/gpu-a100/rayservice.yaml")]
    config = yaml.safe_load(yaml.safe_load(pinned[changed[0]])["spec"]["serveConfigV2"])
    assert config["applications"][0]["args"]["model"] == "dolly@4"


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
    resources["RetrainJob"] = k8s.rayjob(k8s.PROFILES[profile], "dolly-train-dolly-2", ["run_name=dolly-2"])
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
    for kind in KINDS:
        name = resources[kind]["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47, name
    for spec in cluster_specs(resources).values():
        assert spec["authOptions"]["mode"] == "token"
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert group["template"]["spec"]["containers"], "a group needs a container"
            assert "labels" not in group["rayStartParams"]
            assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(group["rayStartParams"]) and group.get("resources"))
    job = resources["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] or not job["ttlSecondsAfterFinished"]
    assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 0
    assert job["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    service = resources["RayService"]["spec"]
    assert service["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
    assert "headService" not in service["rayClusterConfig"]["headGroupSpec"]


# --- kustomize ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_overlay_builds_with_kubectl_kustomize(profile):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (apt-get install kubectl, or Google's/Kubernetes' apt repository)")
    built = subprocess.run(
        [kubectl, "kustomize", str(REPO / "k8s" / "overlays" / profile)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(built.stdout)}
    assert set(docs) == {"ConfigMap", "PersistentVolumeClaim", "Service", "RayCluster", "RayJob", "RayService"}
    assert docs["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == f"{k8s.PROFILES[profile].storage_gib}Gi"
    images = set(re.findall(r"image: (\S+)", built.stdout))
    variant = "gpu" if k8s.PROFILES[profile].gpu else "cpu"
    assert images == {f"{k8s.IMAGE_REPOSITORY}:{k8s.IMAGE_VERSION}-{variant}"}, "the overlay's images: sets every pod's"


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
    for kind in ("RayCluster", "RayJob"):
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


def parse_dolly_train(entrypoint: str, config_file: Path) -> TrainConfig:
    """The settings `dolly train` would run with, parsed by the real command (not run)."""
    from cli.train import train

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["dolly", "train"]
    command = typer.Typer()
    command.command()(train)
    args = [str(config_file) if a == f"{k8s.CONFIG_DIR}/{k8s.TRAIN_CONFIG_FILE}" else a for a in argv[2:]]
    params = typer.main.get_command(command).make_context("train", args).params
    return load_config(TrainConfig, params["config"], {}, params["overrides"] or [])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profile", PROFILES)
def test_the_rayjob_entrypoint_parses_with_dolly_train_and_the_configmap_it_mounts(profile, tmp_path):
    resources = overlay(profile)
    head = resources["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    (mounted,) = [name for name, v in volumes.items() if v.get("configMap", {}).get("name") == k8s.TRAIN_CONFIGMAP]
    assert mounts[mounted] == k8s.CONFIG_DIR, "the job's driver runs on the head: the config is mounted there"
    config_file = tmp_path / k8s.TRAIN_CONFIG_FILE
    config_file.write_text(resources["ConfigMap"]["data"][k8s.TRAIN_CONFIG_FILE])

    settings = parse_dolly_train(resources["RayJob"]["spec"]["entrypoint"], config_file)
    assert settings == k8s.train_config(k8s.PROFILES[profile])
    assert settings.preset == k8s.PROFILES[profile].hardware

    retrain = k8s.rayjob(k8s.PROFILES[profile], "dolly-train-dolly-2", ["run_name=dolly-2", "epochs=3"])
    settings = parse_dolly_train(retrain["spec"]["entrypoint"], config_file)
    assert (settings.run_name, settings.epochs) == ("dolly-2", 3)


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
    for group in [job["rayClusterSpec"]["headGroupSpec"], *job["rayClusterSpec"]["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
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
    bad_setting = runner.invoke(k8s_app, ["job", "--preset", "gpu-h100", "--run-name", "x", "epochz=3"], terminal_width=300)
    assert bad_setting.exit_code == 2 and "setting 'epochz'" in bad_setting.output
    bad_name = runner.invoke(k8s_app, ["job", "--preset", "gpu-h100", "--run-name", "Dolly_2"], terminal_width=300)
    assert bad_name.exit_code == 2 and "lowercase" in bad_name.output
    bad_preset = runner.invoke(k8s_app, ["job", "--preset", "tpu", "--run-name", "x"], terminal_width=300)
    assert bad_preset.exit_code == 2 and "unknown preset" in bad_preset.output


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


@pytest.mark.timeout(60)
def test_the_image_holds_every_package_the_project_installs():
    """A package left out of the image imports on a laptop and fails on the cluster."""
    installed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = {name.split(".")[0] for name in installed}  # a folder's COPY brings its sub-packages
    copied = set(re.findall(r"^COPY --chown=\S+ (\w+) \1$", (REPO / "Dockerfile").read_text(), re.M))
    assert packages == copied


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
