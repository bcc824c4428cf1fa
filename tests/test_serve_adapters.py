"""LoRA adapters side by side on one base, as their clients meet them: a real Serve application
over HTTP, one model replica holding a tiny base and at most one adapter at a time, and adapters
trained (in this process, in seconds) to give different answers: `dolly-alpha` says "Alpha.",
`dolly-beta` "Beta.". The official `openai` client picks one by `model`. Tests run in file order;
the last one promotes a new version of dolly-alpha."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from contract import END_KEY, registry, render_generation_prompt
from contract.decoding import Decoding
from contract.errors import UserError
from contract.models import load_model, load_tokenizer, special_token_ids
from pipelines.configs import LoraSettings
from pipelines.export import generation_config
from pipelines.lora import adapt
from services.config import ServeConfig, what_to_serve
from tests.conftest import export_tiny_model, free_port
from tests.test_serve import model_stats, wait_until

pytestmark = pytest.mark.timeout(300)

APP = "adapters"


def train_adapter(base: Path, answer: str, folder: Path, token_rows: bool = True) -> Path:
    """An adapter on `base` that answers every instruction with `answer`, exported as training
    exports one: PEFT's adapter folder naming its base, the tokenizer, the generation config; with
    `token_rows`, Dolly's token rows trained with it (as on a base new to them), else LoRA alone."""
    tokenizer = load_tokenizer(str(base))
    torch.manual_seed(0)
    model = adapt(
        load_model(str(base), tokenizer),
        LoraSettings(r=8, alpha=16, dropout=0.0),
        sorted(special_token_ids(tokenizer).values()) if token_rows else [],
        str(base),
    )
    prompt = tokenizer(render_generation_prompt("Who are you?"))["input_ids"]
    target = tokenizer(f" {answer}")["input_ids"] + [tokenizer.convert_tokens_to_ids(END_KEY)]
    inputs, labels = torch.tensor([prompt + target]), torch.tensor([[-100] * len(prompt) + target])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(60):
        model(input_ids=inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generation_config(tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tokenizer_path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bases")
    return export_tiny_model(root / "base", tokenizer_path), export_tiny_model(root / "other-base", tokenizer_path, seed=1)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, bases) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    base, _ = bases
    for name, answer in (("dolly-alpha", "Alpha."), ("dolly-beta", "Beta.")):
        folder = train_adapter(base, answer, root / name)
        if name == "dolly-beta":  # an adapter that carries a decoding of its own
            BETA_DECODING.write_to(folder)
        registry.register(folder, name, root / "registry")
    return root / "registry"


@pytest.fixture(scope="module")
def served(ray_cluster, adapters, tmp_path_factory):
    from ray import serve

    from services.app import build_app

    config = ServeConfig(
        adapters=["dolly-alpha", "dolly-beta"],
        served_model_name="base",
        registry=adapters,
        app_name=APP,
        auth={"insecure_no_auth": True},
        engine={"max_context": 512, "max_batch_size": 8, "batch_wait_timeout_s": 0.005, "stream_interval_s": 0},
        deployment={"min_replicas": 1, "max_replicas": 1, "max_adapters_per_replica": 1, "num_cpus": 0.5},
        ingress={"num_cpus": 0.25},
        feedback={"url": f"sqlite:///{tmp_path_factory.mktemp('feedback') / 'feedback.db'}"},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name=APP, route_prefix="/")
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    finally:
        serve.shutdown()


def ask(client: openai.OpenAI, model: str, stream: bool = False) -> tuple[str, str]:
    """(the answer, the version that answered), greedy."""
    messages = [{"role": "user", "content": "Tell me about yourself."}]
    if not stream:
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        return answer.choices[0].message.content, answer.model
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].model


BETA_DECODING = Decoding(temperature=0, max_tokens=16)


def held() -> list[str]:
    return model_stats(APP)["adapters"]


def test_models_lists_the_base_and_every_adapter_on_it_each_with_its_decoding(served):
    models = {m.id: m.model_extra for m in served.models.list().data}
    dolly = Decoding().model_dump()  # what the exports carry unless told otherwise
    assert models == {
        "base": {"version": "base", "parent": None, "decoding": dolly},
        "dolly-alpha": {"version": "dolly-alpha@1", "parent": "base", "decoding": dolly},
        "dolly-beta": {"version": "dolly-beta@1", "parent": "base", "decoding": BETA_DECODING.model_dump()},
    }


def test_what_a_request_leaves_out_is_the_answering_models_own_decoding(served):
    messages = [{"role": "user", "content": "Tell me about yourself."}]
    beta = [served.chat.completions.create(model="dolly-beta", messages=messages, seed=seed) for seed in (1, 2, 3)]
    assert {b.choices[0].message.content for b in beta} == {"Beta."}, "greedy, as dolly-beta carries"
    base = [served.chat.completions.create(model="base", messages=messages, seed=seed, max_tokens=16) for seed in (1, 2, 3)]
    assert len({b.choices[0].message.content for b in base}) > 1, "Dolly's sampling, as the base carries"


def test_two_adapters_answer_each_its_own_side_by_side_on_one_replica_within_its_bound(served):
    asked = ["dolly-alpha", "dolly-beta@1", "dolly-alpha@latest", "dolly-beta"] * 4
    most, done = [], threading.Event()

    def watch():  # the adapters held, while the requests run
        while not done.is_set():
            most.append(len(held()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: ask(served, asked[i], stream=i % 2 == 1), range(len(asked))))
    finally:
        done.set()
        watcher.join()
    for model, (text, version) in zip(asked, answers):
        name = model.split("@")[0]
        assert (text, version) == ({"dolly-alpha": "Alpha.", "dolly-beta": "Beta."}[name], f"{name}@1"), model
    # One adapter cached by Serve, and for the moment of a swap the one it replaces.
    assert max(most) <= 2, most
    assert ask(served, "dolly-beta") == ("Beta.", "dolly-beta@1")
    wait_until(lambda: held() == ["dolly-beta@1"], 10, "the evicted adapter deleted")
    base_answer, version = ask(served, "base")
    assert version == "base" and base_answer not in ("Alpha.", "Beta.")


def test_a_model_that_is_neither_the_base_nor_an_adapter_gets_404_naming_those_there_are(served):
    for model, named in (
        ("dolly-gamma", "these are: 'base' and the adapters dolly-alpha, dolly-beta"),
        ("dolly-alpha@9", "versions of 'dolly-alpha': [1]"),
    ):
        with pytest.raises(openai.NotFoundError) as refused:
            ask(served, model)
        assert named in refused.value.message and refused.value.body["param"] == "model"


def test_an_adapter_version_trained_on_another_base_is_refused_naming_both(served, adapters, bases, tmp_path):
    base, other = bases
    registry.register(train_adapter(other, "Alpha.", tmp_path / "elsewhere"), "dolly-alpha", adapters, promote=False)
    with pytest.raises(openai.BadRequestError) as refused:
        ask(served, "dolly-alpha@2")
    assert str(other) in str(refused.value) and str(base) in str(refused.value)
    # And before anything starts, when it is the version to serve.
    with pytest.raises(UserError, match=r"dolly-alpha@1 is an adapter trained on '.*/base', not on '.*/other-base'"):
        what_to_serve(ServeConfig(adapters=["dolly-alpha", "dolly-beta"], model=str(other), registry=adapters))


def test_promoting_a_new_adapter_version_answers_with_it_without_restarting_replicas(served, adapters, bases, tmp_path):
    from ray.util import list_named_actors

    replicas = sorted(a["name"] for a in list_named_actors(all_namespaces=True) if f"{APP}#DollyModel" in a["name"])
    version = registry.register(train_adapter(bases[0], "Gamma.", tmp_path / "gamma"), "dolly-alpha", adapters)
    assert ask(served, "dolly-alpha") == ("Gamma.", f"dolly-alpha@{version}")
    assert ask(served, "dolly-alpha@1") == ("Alpha.", "dolly-alpha@1")  # earlier versions stay servable by number
    assert {m.id: m.model_extra["version"] for m in served.models.list().data}["dolly-alpha"] == f"dolly-alpha@{version}"
    assert sorted(a["name"] for a in list_named_actors(all_namespaces=True) if f"{APP}#DollyModel" in a["name"]) == replicas


def test_the_chat_page_lets_a_person_pick_the_base_or_an_adapter(served, browser):
    from tests.test_ui import ARTIFACTS, answer, launch, send
    from ui.config import UIConfig

    url, page = launch(UIConfig(api_url=str(served.base_url).rstrip("/")))
    tab = browser.new_page(viewport={"width": 1280, "height": 1100})
    try:
        tab.goto(url)
        tab.wait_for_selector("#model-banner :text('Serving')", timeout=60_000)
        picker = tab.locator("#model-picker input")
        assert picker.input_value() == "dolly-alpha (adapter on base)"  # an adapter first, not the bare base
        tab.get_by_text("Generation settings").click()
        sliders = {key: tab.locator(f"#{key} input[type='number']") for key in ("temperature", "max-tokens")}
        for label, said, decoding in (
            ("dolly-beta (adapter on base)", "Beta.", BETA_DECODING),
            ("dolly-alpha (adapter on base)", "Gamma.", Decoding()),
        ):
            picker.click()
            tab.get_by_role("option", name=label).click()
            # The sliders move to the picked model's own decoding: a person who leaves them gets it.
            tab.wait_for_function(
                f"() => document.querySelector(\"#max-tokens input[type='number']\").value == {decoding.max_tokens}",
                timeout=30_000,
            )
            assert float(sliders["temperature"].input_value()) == decoding.temperature
            send(tab, "Who are you?")
            tab.wait_for_function(
                f"() => {{ const b = document.querySelectorAll(\"#chatbot [data-testid='bot']\");"
                f" return b.length && b[b.length-1].innerText.includes({said!r}); }}",
                timeout=60_000,
            )
            assert answer(tab).strip() == said
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / "the_chat_page_lets_a_person_pick_an_adapter.png"), full_page=True)
        tab.close()
        page.close()
