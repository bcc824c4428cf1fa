"""The same API on vLLM (`engine.kind=vllm`): `dolly serve` run from vLLM's own environment
(`make vllm`, vLLM's CPU build here) serves the tiny export through Ray Serve LLM's LLMServer,
and the API tests our own engine passes are run against it, imported from tests/test_serve.py.
Beside them, what only a second engine can show: its greedy answers, with a frequency penalty and
min_tokens, are our engine's."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from cluster import k8s
from contract import registry
from contract.sampling import SamplingParams
from services.config import ServeConfig
from tests.conftest import free_port
from tests.test_serve import (  # noqa: F401  (collected here, against the vLLM engine)
    CONTEXT,
    COUNTED_ON_EVENTS,
    KEY,
    Served,
    dashboard_metrics,
    replica_processes,
    streamed_until_the_replicas_die,
    test_a_completion_answers_a_dolly_prompt_with_the_response_only,
    test_a_long_conversation_loses_its_oldest_turns_and_says_so,
    test_a_prompt_longer_than_the_context_gets_400_stating_the_limit,
    test_a_rating_and_a_better_answer_are_stored_with_the_version_that_answered,
    test_a_streamed_chat_adds_up_to_the_whole_one_and_reports_usage,
    test_a_streamed_completion_adds_up_to_the_whole_one,
    test_an_unknown_model_gets_404_naming_the_served_one,
    test_chat_content_may_come_as_openai_text_parts,
    test_feedback_without_a_key_or_with_a_bad_field_is_refused_with_its_reason,
    test_health_needs_no_key_and_models_lists_the_served_version,
    test_malformed_input_gets_422_naming_the_field,
    test_requests_without_a_valid_key_get_401,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
VLLM_ENV = Path(os.environ.get("DOLLY_VLLM_ENV", REPO / ".venv-vllm"))


@dataclass
class VLLMServed(Served):
    session_dir: Path  # of the Ray cluster `dolly serve` started

    def metrics(self) -> str:
        """What the cluster's Prometheus endpoints serve now: the ones Ray lists for Prometheus's
        file-based discovery (one that does not answer yet is left out of this reading)."""
        groups = json.loads((self.session_dir / "prom_metrics_service_discovery.json").read_text())
        texts = []
        for target in (t for group in groups for t in group["targets"]):
            with contextlib.suppress(httpx.HTTPError):
                texts.append(httpx.get(f"http://{target}/metrics", timeout=10).text)
        return "".join(texts)

    def total(self, metric: str) -> float:
        """The sum of `metric`'s series now."""
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.metrics().splitlines() if re.match(rf"{metric}[{{ ]", line))

    def settled(self, metric: str) -> float:
        """`metric`'s total once two readings one export apart agree (Ray's agents export every 10 s)."""
        readings = [self.total(metric)]
        while len(readings) < 2 or readings[-1] != readings[-2]:
            time.sleep(11)
            readings.append(self.total(metric))
        return readings[-1]


def _session_dir(pid: int) -> Path:
    """The session folder of the Ray cluster that process `pid` started, from its Ray processes' --log_dir."""
    for process in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            for arg in process.cmdline():
                if arg.startswith("--log_dir="):
                    return Path(arg.removeprefix("--log_dir=")).parent
    raise AssertionError(f"no Ray process under dolly serve (pid {pid})")


# Eager: torch.compile costs minutes per start on 2 cores; 1 GiB of KV cache is plenty here.
VLLM_SETTINGS = {"engine_kwargs": {"enforce_eager": True}, "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}}


@contextlib.contextmanager
def vllm_serving(config: ServeConfig, root: Path) -> Iterator[VLLMServed]:
    """`dolly serve` of `config` run from vLLM's environment, in a Ray cluster of its own (vLLM's
    environment is not the one these tests run in), until Ctrl-C; its files in `root`."""
    dolly = VLLM_ENV / "bin" / "dolly"
    if not dolly.exists():
        pytest.skip(f"{dolly} is absent: `make vllm` builds vLLM's environment (or set DOLLY_VLLM_ENV)")
    (root / "serve.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    port = free_port()
    log = (root / "serve.log").open("w")
    server = subprocess.Popen(
        [str(dolly), "serve", "--config", str(root / "serve.yaml"), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while not _up(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dolly serve engine.kind=vllm did not come up: {(root / 'serve.log').read_text()[-3000:]}")
            time.sleep(2)
        yield VLLMServed(url, config, config.registry, _session_dir(server.pid))
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: the quiet shutdown a person gets
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-vllm")
    registry.register(tiny_model, "dolly", root / "registry")
    (root / "api-keys").write_text(f"{KEY}\n")
    config = ServeConfig(
        model="dolly@latest",
        registry=root / "registry",
        auth={"api_keys_file": str(root / "api-keys")},
        engine={"kind": "vllm", "max_context": CONTEXT, "max_batch_size": 4, "stream_interval_s": 0, "vllm": VLLM_SETTINGS},
        # The replica (0.5) and its engine's bundle (1), the ingress (0.25): within 2 cores.
        deployment={"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 8, "num_cpus": 0.5},
        ingress={"num_cpus": 0.25},
        feedback={"url": f"sqlite:///{root / 'feedback.db'}"},
    )
    with vllm_serving(config, root) as served:
        yield served


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_greedy_answers_with_a_penalty_and_min_tokens_are_our_engines(served, tiny_model):
    from pipelines.answers import answer, record_prompt
    from pipelines.heldout import LoadedModel

    lm = LoadedModel(str(tiny_model), device="cpu")
    instructions = ["Name a city.", "Why is the sky blue?", "Count to three."]
    answers = {}
    for settings in ({}, {"frequency_penalty": 1.5}, {"min_tokens": 20, "presence_penalty": 0.5}):
        params = SamplingParams(temperature=0, max_tokens=24, **({"min_tokens": served.config.min_tokens} | settings))
        ours = answer(
            lm,
            [record_prompt({"instruction": i, "category": "open_qa", "response": ""}, lm.tokenizer) for i in instructions],
            params,
            0,
            4,
        )
        theirs = [
            served.openai().completions.create(model="dolly", prompt=i, max_tokens=24, temperature=0, extra_body=settings)
            for i in instructions
        ]
        assert [r.choices[0].text for r in theirs] == [s.generated for s in ours], settings
        assert [r.choices[0].finish_reason for r in theirs] == [s.finish for s in ours], settings
        answers[str(settings)] = [r.choices[0].text for r in theirs]
    assert answers["{}"] != answers[str({"frequency_penalty": 1.5})], "the penalty took effect"


def test_a_stop_string_ends_the_answer_before_it(served):
    client = served.openai()
    whole = client.completions.create(model="dolly", prompt="Tell a story.", max_tokens=24, temperature=0).choices[0].text
    word = whole.split()[len(whole.split()) // 2]
    stopped = client.completions.create(model="dolly", prompt="Tell a story.", max_tokens=24, temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == whole[: whole.index(word)].strip()


def test_a_client_that_disconnects_stops_its_generation_in_vllm(served):
    """The ingress cancels the model replica's call, whose stream closing makes vLLM abort the
    request. vLLM counts no aborts, so: the engine stops generating, and never finishes it."""
    cancelled = served.total("ray_dolly_cancelled_requests_total")
    finished, generated = served.settled("ray_vllm_request_success_total"), served.settled("ray_vllm_generation_tokens_total")
    body = {"model": "dolly", "prompt": "Write at length.", "max_tokens": 400, "min_tokens": 400, "stream": True}
    with httpx.stream(
        "POST", f"{served.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    ) as response:
        events = list(itertools.islice((line for line in response.iter_lines() if line), 3))
    assert len(events) == 3
    wait_until(
        lambda: served.total("ray_dolly_cancelled_requests_total") == cancelled + 1, 60, "the replica counting the cancel", 2
    )
    assert served.settled("ray_vllm_generation_tokens_total") - generated < 400, "the engine stopped before the 400 tokens"
    assert served.total("ray_vllm_request_success_total") == finished


def test_every_metric_of_the_dashboards_vllm_row_reaches_prometheus(served):
    wanted = dashboard_metrics() - COUNTED_ON_EVENTS
    wanted -= {"ray_vllm_num_preemptions_total"}  # counted once the KV cache is too small for the load
    wanted -= {"ray_dolly_cancelled_requests_total"}  # once a client leaves: the test above checks it
    # Our engine's batcher's; vLLM's scheduler has its own (the vLLM row).
    wanted -= {"ray_dolly_queue_length", "ray_dolly_running_requests", "ray_dolly_batch_size_bucket"}
    assert {"ray_vllm_num_requests_running", "ray_vllm_kv_cache_usage_perc", "ray_vllm_prefix_cache_hits_total"} <= wanted
    # Over one of vLLM's 128-token KV blocks, so that asking it again hits the prefix cache.
    prompt = "Summarize this: " + "the river runs down to the sea, " * 24
    done, seen = threading.Event(), set()

    def ask_until_done():  # vLLM sets its gauges while its engine steps, so they are read while it answers
        while not done.is_set():
            served.openai().completions.create(model="dolly", prompt=prompt, max_tokens=64, extra_body={"min_tokens": 64})

    asking = threading.Thread(target=ask_until_done)
    asking.start()
    try:
        deadline = time.monotonic() + 120
        while (absent := wanted - seen) and time.monotonic() < deadline:
            text = served.metrics()
            seen |= {w for w in absent if w in text}
            time.sleep(1)
    finally:
        done.set()
        asking.join(timeout=120)
    assert not absent, f"not on the serving cluster's Prometheus endpoints: {sorted(absent)}"


PLACEMENT = """
import json, sys
from pathlib import Path
import ray
from cluster import k8s
from services.vllm_model import VLLMModel, llm_config

folder, gpus = Path(sys.argv[1]), int(sys.argv[2])
# A cluster that declares GPUs it does not have: Ray accounts and places them as real ones.
ray.init(address="local", num_cpus=32, num_gpus=8, resources={"accelerator_type:H100": 8}, include_dashboard=False)
config = k8s.serve_config(k8s.PROFILES["gpu-h100-vllm"])
config = config.model_copy(update={"deployment": config.deployment.model_copy(update={"num_gpus": gpus})})
options = VLLMModel.get_deployment_options(llm_config(config, folder, 2048))
print(json.dumps({k: options.get(k) for k in ("placement_group_bundles", "placement_group_strategy", "ray_actor_options")}, default=str))
"""


@pytest.mark.parametrize("gpus", [1, 2])
def test_the_gpu_profile_gives_each_replica_engine_gpus_of_its_own(tiny_model, gpus):
    """k8s's vLLM profile on a Ray that declares H100s: a replica's engine asks for `num_gpus` whole
    H100s, one per tensor-parallel rank, in one placement group with the replica's CPUs."""
    python = VLLM_ENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{python} is absent: `make vllm` builds vLLM's environment (or set DOLLY_VLLM_ENV)")
    result = subprocess.run(
        [str(python), "-c", PLACEMENT, str(tiny_model), str(gpus)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    placed = json.loads(result.stdout.strip().splitlines()[-1])
    replica_cpus = k8s.serve_config(k8s.PROFILES["gpu-h100-vllm"]).deployment.num_cpus
    engine = [{"GPU": 1.0, "accelerator_type:H100": 0.001}] * gpus
    bundles = placed["placement_group_bundles"]
    assert bundles[0] == {"CPU": replica_cpus, **engine[0]} and bundles[1:] == engine[1:]
    assert placed["placement_group_strategy"] == "PACK"
    assert placed["ray_actor_options"]["num_cpus"] == replica_cpus and not placed["ray_actor_options"].get("num_gpus")


def test_a_stream_cut_by_a_lost_vllm_replica_goes_on_where_it_stopped(served):
    """Part of a streamed answer had left when its vLLM replica (engine and all) was killed: the
    ingress sends the prompt and that text to the replacement Serve starts, and the stream goes on
    to its end, the client none the wiser. Last in the module: the replacement takes a minute."""
    assert len(replica_processes("VLLMModel")) == 1
    body = {"model": "dolly", "prompt": "Tell a long story.", "max_tokens": 300, "min_tokens": 300, "stream": True}
    _, after = streamed_until_the_replicas_die(served, body, "VLLMModel", timeout=300)
    assert not any("error" in e for e in after), after[-1]
    assert after[-1]["choices"][0]["finish_reason"] == "length"
    resumed = re.compile(r'ray_dolly_retried_requests_total\{[^}]*cause="replica_lost_mid_answer"')
    wait_until(lambda: resumed.search(served.metrics()), 60, "the resumption counted", 2)
