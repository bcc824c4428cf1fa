"""The chat page as a person meets it: headless Chromium (Debian's) driven by Playwright (the
`browser` fixture, tests/conftest.py), against a real Ray Serve backend serving a tiny model.
Screenshots land in tests/artifacts/.

Tests run in file order and share one backend; the last one stops it."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.config import ServeConfig
from tests.conftest import free_port
from ui.config import UIConfig

pytestmark = pytest.mark.timeout(300)
ARTIFACTS = Path(__file__).parent / "artifacts"
KEY = "ui-test-key"


@dataclass
class Backend:
    api_url: str
    key_file: Path
    port: int
    feedback_url: str


@pytest.fixture(scope="module")
def backend(ray_cluster, tiny_model, tmp_path_factory):
    from ray import serve

    from services.app import build_app

    key_file = tmp_path_factory.mktemp("ui") / "key"
    key_file.write_text(f"{KEY}\n")
    config = ServeConfig(
        model=str(tiny_model),
        auth={"api_keys_file": str(key_file)},
        engine={"max_context": 512},
        deployment={"num_cpus": 0.5},
        ingress={"num_cpus": 0.25},
        feedback={"url": f"sqlite:///{key_file.parent / 'feedback.db'}"},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
        yield Backend(f"http://127.0.0.1:{port}/v1", key_file, port, config.feedback.url)
    finally:
        serve.shutdown()


def launch(config: UIConfig) -> tuple[str, object]:
    from ui.page import launch_page

    config = config.model_copy(update={"port": free_port()})
    return f"http://127.0.0.1:{config.port}/", launch_page(config, block=False)


@pytest.fixture(scope="module")
def page_url(backend):
    url, page = launch(UIConfig(api_url=backend.api_url, api_key_file=backend.key_file))
    try:
        yield url
    finally:
        page.close()


@pytest.fixture
def tab(browser, page_url, request):
    tab = browser.new_page(viewport={"width": 1280, "height": 1100})
    tab.goto(page_url)
    tab.wait_for_selector("#model-banner :text('Serving')", timeout=60_000)
    yield tab
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    tab.close()


def answer(tab) -> str:
    bots = tab.locator("#chatbot [data-testid='bot']")
    return bots.last.inner_text() if bots.count() else ""


def watch_answer(tab, seconds: float) -> list[str]:
    """The answer's text, sampled as it streams in."""
    seen, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(answer(tab))
        tab.wait_for_timeout(150)
    return seen


def send(tab, message: str) -> None:
    tab.fill("#message textarea", message)
    tab.click("#send")


def test_the_page_names_the_served_model(tab, tiny_model):
    assert f"Serving {tiny_model.name}" in tab.inner_text("#model-banner")


def test_a_registered_model_shows_its_version():
    from openai.types import Model

    from ui.page import _model_label

    assert (
        _model_label(Model(id="dolly", created=0, object="model", owned_by="me", version="dolly@3"))
        == "**dolly** (version dolly@3)"
    )


def test_a_message_gets_an_answer_that_streams_in(tab):
    send(tab, "Name a colour.")
    samples = watch_answer(tab, 12)
    tab.wait_for_selector("#chatbot [data-testid='user'] :text('Name a colour.')")
    growing = [s for s in dict.fromkeys(samples) if s.strip()]
    assert len(growing) >= 3, f"the answer should arrive in pieces, saw {growing[:3]}"
    assert all(a in b for a, b in zip(growing, growing[1:])) or len(growing[-1]) >= len(growing[0])


def test_the_context_box_reaches_the_model_as_dollys_input(tab):
    # A context longer than the model's 512-token window can only be refused if it reached the API.
    tab.fill("#context textarea", "word " * 700)
    send(tab, "Summarize this.")
    tab.wait_for_selector("#status :text('The request was refused')", timeout=60_000)
    assert "512" in tab.inner_text("#status")
    tab.fill("#context textarea", "Cats sleep for most of the day.")
    send(tab, "Summarize this.")
    tab.wait_for_function("() => document.querySelectorAll(\"#chatbot [data-testid='bot']\").length >= 1", timeout=60_000)
    assert tab.inner_text("#status").strip() == ""


def test_an_example_fills_instruction_and_context_and_is_answered(tab):
    tab.get_by_role("button", name="closed QA").click()
    # Gradio fills the boxes a moment after the click, on a loaded machine more than a moment.
    tab.wait_for_function("() => document.querySelector('#message textarea').value !== ''", timeout=30_000)
    assert tab.input_value("#message textarea") == "When was the Eiffel Tower finished?"
    assert "Eiffel Tower" in tab.input_value("#context textarea")
    tab.click("#send")
    tab.wait_for_function("() => document.querySelectorAll(\"#chatbot [data-testid='bot']\").length >= 1", timeout=60_000)
    tab.wait_for_selector("#chatbot [data-testid='user'] :text('Eiffel Tower')")


def test_stop_halts_a_streaming_answer(tab):
    send(tab, "Write a long story about the sea.")
    tab.wait_for_function(
        "() => { const b = document.querySelectorAll(\"#chatbot [data-testid='bot']\");"
        " return b.length && b[b.length-1].innerText.trim().length > 0; }",
        timeout=60_000,
    )
    tab.click("#stop")
    tab.wait_for_timeout(500)
    stopped = answer(tab)
    tab.wait_for_timeout(2500)
    assert answer(tab) == stopped, "no more text arrives after Stop"


def rate_the_last_answer(tab, verdict: str) -> None:
    tab.wait_for_function("() => document.querySelectorAll(\"#chatbot [data-testid='bot']\").length >= 1", timeout=60_000)
    whole = ""
    while whole != answer(tab) or not whole:  # the answer is whole when it stops growing
        whole = answer(tab)
        tab.wait_for_timeout(1500)
    tab.locator(f"#chatbot button[aria-label='{verdict}']").last.click()


def test_a_thumbs_down_then_a_better_answer_are_stored_for_review(tab, backend):
    from contract.feedback import FeedbackStore

    store = FeedbackStore(backend.feedback_url)
    send(tab, "Name a colour.")
    rate_the_last_answer(tab, "Dislike")
    tab.wait_for_selector("#feedback-status :text('rating saved')", timeout=60_000)
    # The editor opens on the answer that was rated down.
    tab.wait_for_function(
        "() => document.querySelector('#better-instruction textarea').value === 'Name a colour.'", timeout=30_000
    )
    shown = tab.input_value("#better-answer textarea")
    tab.fill("#better-response textarea", "Blue.")
    tab.click("#better-submit")
    tab.wait_for_selector("#feedback-status :text('Saved for review')", timeout=60_000)
    rated, written = store.rows()[-2:]
    assert (rated["rating"], rated["instruction"], rated["status"]) == ("down", "Name a colour.", None)
    assert (written["response"], written["category"], written["status"]) == ("Blue.", "open_qa", "pending")
    assert written["model"] == rated["model"] != "" and written["answer_id"] == rated["answer_id"] != ""
    assert rated["answer"] == written["answer"] != "" and rated["answer"].split() == shown.split()  # a textarea redoes line ends


def test_the_api_key_never_reaches_the_browser(page_url):
    for path in ("", "config", "gradio_api/info"):
        assert KEY not in httpx.get(page_url + path, timeout=30).text


def test_a_follow_up_question_carries_the_conversation(tab):
    send(tab, "Name a colour.")
    tab.wait_for_function("() => document.querySelectorAll(\"#chatbot [data-testid='bot']\").length >= 1", timeout=60_000)
    seen = watch_answer(tab, 2)
    while seen[-1] != seen[0]:  # the first answer has finished streaming
        seen = watch_answer(tab, 2)
    send(tab, "And another one?")
    tab.wait_for_function(
        "() => { const b = document.querySelectorAll(\"#chatbot [data-testid='bot']\");"
        " return b.length >= 2 && b[1].innerText.trim().length > 0; }",
        timeout=60_000,
    )
    assert tab.inner_text("#status").strip() == ""


def test_gradio_client_drives_the_named_chat_endpoint(page_url, tokenizer):
    from gradio_client import Client

    from ui.page import as_text

    client = Client(page_url, verbose=False)
    history, message, status = client.predict("Name a colour.", [], "", 1.0, 0.92, 16, api_name="/chat")
    assert status == "" and message == ""
    assert [m["role"] for m in history] == ["user", "assistant"] and as_text(history[-1]["content"])
    # The max-new-tokens slider's 16 reached the API, not the default 256 (slack: decoded text from
    # a random model can re-tokenize into more pieces).
    assert len(tokenizer(as_text(history[-1]["content"]), add_special_tokens=False)["input_ids"]) <= 32
    # The history comes back in Gradio's own message format; a second turn must still go through.
    history, _, status = client.predict("And another?", history, "", 1.0, 0.92, 16, api_name="/chat")
    assert status == "" and [m["role"] for m in history] == ["user", "assistant"] * 2


def test_the_conversation_so_far_goes_to_the_api_in_order_with_the_context_first():
    from ui.page import to_api_messages

    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert to_api_messages(history, "And now?", "A passage.") == [
        {"role": "system", "content": "A passage."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And now?"},
    ]
    assert to_api_messages(history, "And now?", "  ")[0] == {"role": "user", "content": "Hi"}
    as_gradio_parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in history]
    assert to_api_messages(as_gradio_parts, "And now?", "") == to_api_messages(history, "And now?", "")


def test_a_rejected_api_key_is_explained(backend, tmp_path):
    from gradio_client import Client

    wrong = tmp_path / "wrong-key"
    wrong.write_text("not-the-key\n")
    url, page = launch(UIConfig(api_url=backend.api_url, api_key_file=wrong))
    try:
        history, _, status = Client(url, verbose=False).predict("Hi", [], "", 1.0, 0.92, 16, api_name="/chat")
    finally:
        page.close()
    assert "rejected this page's API key" in status and history == []


def test_the_optional_login_guards_the_page(backend, tmp_path):
    logins = tmp_path / "logins"
    logins.write_text("ada:lovelace\n")
    url, page = launch(UIConfig(api_url=backend.api_url, api_key_file=backend.key_file, auth_file=logins))
    try:
        assert httpx.get(url + "gradio_api/info", timeout=30).status_code == 401
        assert httpx.post(url + "login", data={"username": "ada", "password": "wrong"}, timeout=30).status_code >= 400
        with httpx.Client(timeout=30) as browser:
            assert browser.post(url + "login", data={"username": "ada", "password": "lovelace"}).status_code == 200
            assert browser.get(url + "gradio_api/info").status_code == 200
    finally:
        page.close()


def test_the_page_mounts_in_serve_beside_the_api(backend):
    from gradio_client import Client
    from ray import serve

    from ui.deployment import build_page_app

    serve.run(
        build_page_app(UIConfig(api_url=backend.api_url, api_key_file=backend.key_file)), name="chat-page", route_prefix="/ui"
    )
    try:
        page = httpx.get(f"http://127.0.0.1:{backend.port}/ui/", timeout=60)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        history, _, status = Client(f"http://127.0.0.1:{backend.port}/ui/", verbose=False).predict(
            "Name a colour.", [], "", 1.0, 0.92, 16, api_name="/chat"
        )
        assert status == "" and history[-1]["content"]
    finally:
        serve.delete("chat-page")


def test_a_stopped_backend_shows_a_readable_error(tab, backend):
    from ray import serve

    serve.shutdown()
    send(tab, "Are you there?")
    tab.wait_for_selector("#status :text('not reachable')", timeout=60_000)
    assert backend.api_url in tab.inner_text("#status")
    assert tab.input_value("#message textarea") == "Are you there?", "the message is kept, to send again"


def test_a_better_answer_written_while_the_api_is_down_is_kept_as_a_draft(browser, page_url):
    # The backend is down since the test before: the page must say so and keep what was typed.
    tab = browser.new_page(viewport={"width": 1280, "height": 1100})
    try:
        tab.goto(page_url)
        tab.get_by_text("Write a better answer").click()
        tab.fill("#better-instruction textarea", "Name a colour.")
        tab.fill("#better-response textarea", "Blue, as the sky.")
        tab.click("#better-submit")
        tab.wait_for_selector("#feedback-status :text('Your draft is kept')", timeout=60_000)
        assert tab.input_value("#better-response textarea") == "Blue, as the sky."
    finally:
        tab.close()


def test_error_messages_for_a_busy_server_say_when_to_retry():
    import openai

    from ui.page import error_message

    response = httpx.Response(503, headers={"retry-after": "2"}, request=httpx.Request("POST", "http://x/v1/chat/completions"))
    busy = openai.APIStatusError("busy", response=response, body=None)
    assert error_message(busy, "http://x/v1") == "⚠️ The model is busy with other requests. Try again in 2 s."


def test_a_resumed_answer_asks_for_the_rest_and_reads_as_one():
    """ui/resume.py's bookkeeping, event by event as the API streams them: the rest is asked for
    with the text so far and the tokens left, and the caller reads one answer with the usage it
    asked for (here: at the end only), counted over the whole answer."""
    from ui.resume import Answer

    def chunk(content, tokens, role=False, **extra):
        delta = {"role": "assistant", "content": content} if role else {"content": content}
        usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}
        return {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": None}], "usage": usage, **extra}

    messages = [{"role": "user", "content": "Tell a story."}]
    answer = Answer({"model": "dolly", "messages": messages, "stream": True, "stream_options": {"include_usage": True}})
    first = answer.request()
    assert first["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "max_tokens" not in first, "the server's default budget, which its first chunk names"

    assert answer.read(chunk("", 0, role=True, dolly={"max_tokens": 10})) is not None
    read = answer.read(chunk("Once", 1))
    assert read["choices"][0]["delta"]["content"] == "Once" and "usage" not in read, "no running usage unasked"
    answer.read(chunk(" upon", 2))

    rest = answer.request()  # the stream was cut here
    assert rest["messages"] == messages + [{"role": "assistant", "content": "Once upon"}] and rest["max_tokens"] == 8
    assert answer.read(chunk("", 0, role=True, dolly={"max_tokens": 8})) is None, "the answer opened already"
    answer.read(chunk(" a time", 3))
    closing = answer.read({"id": "d", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}})
    assert closing["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert answer.text == "Once upon a time" and not answer.spent


def test_an_answer_cut_as_its_budget_ran_out_ends_without_asking_again():
    from ui.resume import Answer

    answer = Answer({"messages": [], "stream": True, "max_tokens": 2})
    answer.request()
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    answer.read({"id": "c", "choices": [{"index": 0, "delta": {"content": "ab"}, "finish_reason": None}], "usage": usage})
    assert answer.spent
    (finish,) = answer.ending()
    assert finish["choices"][0]["finish_reason"] == "length" and "usage" not in finish


def test_a_stream_closed_before_its_answer_finished_is_cut_and_its_rest_asked_for_once_more():
    """A front that closes a stream cleanly when its upstream dies must not pass for a whole
    answer; the request for the rest says which one it is, for the server's count."""
    import httpx2

    from ui.resume import _Resumption

    body = {"model": "dolly", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 9}
    resumption = _Resumption(httpx2.Request("POST", "http://x/v1/chat/completions", json=body), body, 1, 0.0)
    assert "x-dolly-resumed" not in resumption.request().headers

    def event(content: str, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
        usage = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
        return b"data: " + json.dumps({"id": "c", "choices": [choice], "usage": usage}).encode() + b"\n\n"

    assert len(list(resumption.read(event("Hel")))) == 1
    with pytest.raises(httpx2.RemoteProtocolError):
        resumption.ended()
    assert resumption.after(httpx2.RemoteProtocolError("closed")) == 0.0, "ask again, at once"
    again = resumption.request()
    assert again.headers["x-dolly-resumed"] == "1"
    assert json.loads(again.content)["messages"][-1] == {"role": "assistant", "content": "Hel"}
    assert json.loads(again.content)["max_tokens"] == 8
    list(resumption.read(event("lo", finish="stop")))
    resumption.ended()  # whole: its end needs no [DONE]
    with pytest.raises(httpx2.RemoteProtocolError, match="closed again"):  # no tries left: raised as it came
        resumption.after(httpx2.RemoteProtocolError("closed again"))


def test_dolly_serve_with_ui_starts_the_api_and_the_page_in_one_command(tiny_model, tmp_path):
    import os
    import sys

    from loop.deploy import STOP_HINT

    port = free_port()
    keys = tmp_path / "keys"
    keys.write_text("first-key\nsecond-key\n")
    command = [
        str(Path(sys.executable).parent / "dolly"),
        "serve",
        "--model",
        str(tiny_model),
        "--port",
        str(port),
        "--ui",
        f"auth.api_keys_file={keys}",
        "engine.max_context=512",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    # Read as a person does: the announcement says when both are up (the page answering HTTP comes
    # a moment before `dolly serve` has finished deploying and announced them).
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180  # not wait_until: a timeout has to show what dolly serve printed
        while time.monotonic() < deadline and server.poll() is None and STOP_HINT not in "".join(lines):
            time.sleep(1)
        assert server.poll() is None and STOP_HINT in "".join(lines), "".join(lines)[-3000:]
        from gradio_client import Client

        history, _, status = Client(f"http://127.0.0.1:{port}/ui/", verbose=False).predict(
            "Name a colour.", [], "", 1.0, 0.92, 16, api_name="/chat"
        )
        assert status == "" and history[-1]["content"], "the page reached the API with the first key"
    finally:
        import signal

        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
        reader.join(timeout=10)
    # The lifecycle dolly up has too (loop.deploy.serving): announced, served until Ctrl-C, stopped.
    output = "".join(lines)
    assert f"at http://127.0.0.1:{port}/v1" in output and f"Chat page at http://127.0.0.1:{port}/ui/" in output
    assert STOP_HINT in output and "Stopped serving." in output, output[-3000:]
