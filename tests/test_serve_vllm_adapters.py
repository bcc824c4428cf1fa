"""LoRA adapters on vLLM (`engine.kind=vllm` with `adapters`): one vLLM replica holds the base and
loads the adapters that requests name through Serve's multiplexing, from our registry, as our own
engine does (tests/test_serve_adapters.py). vLLM's LoRA loads LoRA weights alone: an adapter that
carries rows of Dolly's tokens (trained on a base new to them) is refused, naming the fix."""

from __future__ import annotations

import openai
import pytest

from contract import registry
from contract.errors import UserError
from services.config import ServeConfig, what_to_serve
from tests.test_serve_adapters import ask, train_adapter
from tests.test_serve_vllm import VLLM_SETTINGS, vllm_serving

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """dolly-alpha and dolly-beta, LoRA alone on the tiny export (which knows Dolly's tokens), and
    dolly-rows, which carries them too."""
    root = tmp_path_factory.mktemp("vllm-adapters")
    for name, answer, rows in (("dolly-alpha", "Alpha.", False), ("dolly-beta", "Beta.", False), ("dolly-rows", "Rows.", True)):
        registry.register(train_adapter(tiny_model, answer, root / name, token_rows=rows), name, root / "registry")
    return root / "registry"


def vllm_config(registry_root, adapters: list[str], **settings) -> ServeConfig:
    return ServeConfig(
        adapters=adapters,
        served_model_name="base",
        registry=registry_root,
        auth={"insecure_no_auth": True},
        engine={"kind": "vllm", "max_context": 512, "max_batch_size": 4, "stream_interval_s": 0, "vllm": VLLM_SETTINGS},
        deployment={"min_replicas": 1, "max_replicas": 1, "max_adapters_per_replica": 2, "num_cpus": 0.5},
        ingress={"num_cpus": 0.25},
        **settings,
    )


@pytest.fixture(scope="module")
def served(adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-vllm-adapters")
    config = vllm_config(adapters, ["dolly-alpha", "dolly-beta"], feedback={"url": f"sqlite:///{root / 'feedback.db'}"})
    with vllm_serving(config, root) as served:
        yield openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_each_adapter_answers_its_own_beside_the_base_on_one_vllm_replica(served):
    assert ask(served, "dolly-alpha") == ("Alpha.", "dolly-alpha@1")
    assert ask(served, "dolly-beta@1", stream=True) == ("Beta.", "dolly-beta@1")
    assert ask(served, "dolly-alpha@latest") == ("Alpha.", "dolly-alpha@1")
    assert ask(served, "base")[0] not in ("Alpha.", "Beta.")


def test_a_promoted_adapter_version_answers_without_a_restart(served, adapters, tiny_model, tmp_path):
    version = registry.register(
        train_adapter(tiny_model, "Gamma.", tmp_path / "gamma", token_rows=False), "dolly-alpha", adapters
    )
    assert ask(served, "dolly-alpha") == ("Gamma.", f"dolly-alpha@{version}")
    assert ask(served, "dolly-alpha@1") == ("Alpha.", "dolly-alpha@1")


def test_an_adapter_with_its_own_token_rows_is_refused_naming_the_fix(served, adapters, tiny_model, tmp_path):
    """At start-up, before any replica; and a version registered later, when it is asked for."""
    with pytest.raises(UserError, match=r"dolly-rows@1 carries its own rows of Dolly's tokens.*engine.kind=dolly"):
        what_to_serve(vllm_config(adapters, ["dolly-rows"]))
    rows = train_adapter(tiny_model, "Rows.", tmp_path / "rows", token_rows=True)
    version = registry.register(rows, "dolly-beta", adapters, promote=False)
    with pytest.raises(openai.BadRequestError, match=rf"dolly-beta@{version} carries its own rows.*base_model=dolly@latest"):
        ask(served, f"dolly-beta@{version}")
    assert ask(served, "dolly-beta") == ("Beta.", "dolly-beta@1")
