"""A GPU cluster's decisions, on a machine without a GPU: local multi-node Ray clusters whose
worker nodes declare GPUs they do not have, where Ray places work, accounts for it and sets
CUDA_VISIBLE_DEVICES as on real ones. Every model process asks for the GPU it uses and gets one
of its own; scoring runs on a worker, never in the driver; storage some node cannot see is
refused before any work.

The drivers run in processes of their own: this one may hold the test session's embedded Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster import local
from cluster.connect import client_auth_env
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(600)

GPUS = 3


def driver(address: str, code: str, timeout_s: float = 300) -> dict:
    """Run `code` as a driver of the cluster at `address`; the JSON its last line prints."""
    program = f"import json, ray\nray.init(address={address!r}, logging_level='ERROR')\n{textwrap.dedent(code)}"
    env = {**os.environ, **client_auth_env()}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=timeout_s, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """A head with no GPU (as KubeRay's) and one worker node declaring three."""
    state = tmp_path_factory.mktemp("state") / "cluster.json"
    saved, local.STATE_FILE = local.STATE_FILE, state
    cluster = local.up(workers=1, cpus_per_node=4, port=free_port(), dashboard_port=free_port(), gpus_per_node=GPUS)
    try:
        yield cluster
    finally:
        local.down()
        local.STATE_FILE = saved


def test_a_replica_uses_cuda_only_when_ray_gave_it_a_gpu(gpu_cluster):
    # As on a GPU node: torch sees GPUs whether or not Ray gave the process one.
    seen = driver(
        gpu_cluster.address,
        """
        import os
        @ray.remote(max_calls=1)  # the worker process goes with its patched torch
        def device():
            import torch
            from contract.devices import default_device, ray_gpu_ids
            torch.cuda.is_available = lambda: True
            return [str(default_device()), ray_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")]
        with_gpu = device.options(num_gpus=1, num_cpus=0.1).remote()
        without = device.options(num_gpus=0, num_cpus=0.1).remote()
        print(json.dumps({"with": ray.get(with_gpu), "without": ray.get(without)}))
        """,
    )
    device, ids, visible = seen["with"]
    assert device == "cuda" and len(ids) == 1 and visible == ids[0], "the GPU Ray gave it, and only that one"
    assert seen["without"][:2] == ["cpu", []], "a process that asked for no GPU never takes one behind Ray's back"


def test_serving_replicas_and_a_retrains_scorer_each_get_a_gpu_of_their_own(gpu_cluster, tiny_model, train_data):
    seen = driver(
        gpu_cluster.address,
        f"""
        from ray import serve
        from rich.console import Console
        from loop.deploy import deploy
        from contract.decoding import Decoding
        from pipelines.behaviour import BehaviourConfig
        from pipelines.manifest import verified
        from pipelines.scoring import RemoteScore
        from services.config import ServeConfig

        settings = ServeConfig(
            model={str(tiny_model)!r},
            auth={{"insecure_no_auth": True}},
            deployment={{"num_gpus": 1, "num_cpus": 0.5, "min_replicas": 2, "max_replicas": 2}},
        )
        deploy(settings, port={free_port()})
        handle = serve.get_deployment_handle("DollyModel", settings.app_name)
        replicas = {{}}
        while len(replicas) < 2:  # Serve picks a replica per call
            stats = handle.stats.remote().result(timeout_s=60)
            replicas[stats["replica"]] = stats["gpu_ids"]
        # A retrain beside serving: its scorer asks for a GPU like a training worker.
        behaviour = BehaviourConfig(modes=["greedy"], examples=1, decoding=Decoding(max_tokens=2))
        scoring = RemoteScore({str(tiny_model)!r}, verified({str(train_data)!r}), behaviour, {{"num_gpus": 1, "num_cpus": 0.5}})
        scores, placement = scoring.result(Console(stderr=True))

        @ray.remote(num_gpus=1, num_cpus=0.1)
        def fourth():
            return ray.get_gpu_ids()

        @ray.remote(num_gpus=1, num_cpus=0.1)
        class Holder:
            def ready(self):
                return True

        # The scorer's GPU went back as it finished; taken again, a fourth process waits: it never shares one.
        holder = Holder.remote()
        ray.get(holder.ready.remote())
        waiting = fourth.remote()
        ready, _ = ray.wait([waiting], timeout=4)
        ray.kill(holder)
        serve.shutdown()
        print(json.dumps({{
            "replicas": list(replicas.values()),
            "scorer": placement.gpu_ids,
            "scorer_pid": placement.pid,
            "driver_pid": __import__("os").getpid(),
            "fourth_waited": not ready,
            "fourth_got": ray.get(waiting, timeout=60),
            "examples": scores.loss.overall.examples,
        }}))
        """,
    )
    held = [*seen["replicas"], seen["scorer"]]
    assert all(len(ids) == 1 for ids in held), held
    assert len({ids[0] for ids in held}) == GPUS, f"no two model processes share a GPU: {held}"
    assert seen["scorer_pid"] != seen["driver_pid"] and seen["examples"] >= 1, "scored on a worker, not in the driver"
    assert seen["fourth_waited"] and len(seen["fourth_got"]) == 1, "with every GPU held, the next one waits for one"


def test_up_places_its_scoring_on_a_worker_and_gives_each_serving_replica_a_gpu_on_a_gpu_preset(tmp_path):
    from loop.configs import UpConfig
    from loop.up import serving_settings
    from pipelines.scoring import resources

    gpu = UpConfig(preset="a100", base_model="EleutherAI/pythia-2.8b", workdir=tmp_path)
    train = gpu.train_config(tmp_path / "data")
    assert resources(train) == {"num_gpus": 1, "num_cpus": train.cpus_per_worker}
    assert serving_settings(gpu, "dolly@1", tmp_path / "key", gpu=train.use_gpu).deployment.num_gpus == 1
    cpu = UpConfig(workdir=tmp_path)
    assert resources(cpu.train_config(tmp_path / "data"))["num_gpus"] == 0
    assert serving_settings(cpu, "dolly@1", tmp_path / "key", gpu=False).deployment.num_gpus == 0


def test_a_replica_told_to_use_cuda_without_a_gpu_from_ray_is_refused_with_the_setting_that_fixes_it():
    from services.config import ServeConfig

    with pytest.raises(ValueError, match="deployment.num_gpus=1"):
        ServeConfig(model="m", engine={"device": "cuda"})


@pytest.fixture
def split_cluster(tmp_path, monkeypatch):
    """A head, and a worker node that does not share `tmp_path/private` (as a node of another machine)."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("a node with folders of its own needs root and mount namespaces (unshare --mount)")
    monkeypatch.setattr(local, "STATE_FILE", tmp_path / "cluster.json")
    private = tmp_path / "private"
    private.mkdir()
    cluster = local.up(workers=0, cpus_per_node=2, port=free_port(), dashboard_port=free_port())
    try:
        local.add_worker(cluster, cpus_per_node=2, private=[private])
        yield cluster, private
    finally:
        local.down()


def test_dolly_up_refuses_a_workdir_that_a_node_cannot_see_in_seconds_and_names_the_fix(split_cluster, tmp_path):
    cluster, private = split_cluster
    dolly = Path(sys.executable).with_name("dolly")
    started = time.monotonic()
    up = subprocess.run(
        [dolly, "up", "--address", cluster.address, "--no-browser", f"workdir={private / 'up'}", f"registry={tmp_path / 'reg'}"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **client_auth_env(), "COLUMNS": "400"},
    )
    took = time.monotonic() - started
    said = " ".join((up.stdout + up.stderr).split())
    assert up.returncode != 0 and f"workdir={private / 'up'} is not shared storage" in said, said[-3000:]
    assert "every node mounts at the same path" in said and "s3://" in said, "the fix is named"
    assert not (private / "up" / "data").exists(), "refused before the first stage"
    assert took < 120, f"refused in {took:.0f} s"

    shared = driver(
        cluster.address,
        f"""
        from cluster.storage import check_shared
        check_shared({{"workdir": {str(tmp_path / "shared")!r}, "storage_path": "s3://bucket/runs"}})
        print(json.dumps({{"ok": True}}))
        """,
    )
    assert shared == {"ok": True}, "a folder every node sees passes, and a URI is not checked"
