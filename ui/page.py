"""The chat page: Gradio in front of the OpenAI-compatible Serve API.

The page's Python side calls the API with the key; the browser only ever talks to the page, so
the key never leaves the server. Dolly's `Input:` context goes to the API as a system message,
which the API folds into the prompt's `Input:` block.

Every answer can be rated (👍/👎), and after a 👎 the person can write the answer it should have
given: both go to the API's /v1/feedback, with the version that answered, for review
(`dolly feedback`). An answer cut by a lost server replica goes on where it stopped
(ui/resume.py). When the API is down, the page says so and keeps the draft.
"""

from __future__ import annotations

import uuid

import gradio as gr
import httpx
import openai

from contract import generation
from contract.records import DOLLY_CATEGORIES
from ui.config import UIConfig
from ui.resume import resuming_http_client

# One example per task kind Dolly was trained on: (kind, instruction, context).
EXAMPLES = [
    ("open QA", "Why do cats purr?", ""),
    (
        "closed QA",
        "When was the Eiffel Tower finished?",
        "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was built from 1887 to 1889 as the "
        "centrepiece of the 1889 World's Fair.",
    ),
    (
        "information extraction",
        "List the people named in this text.",
        "Ada Lovelace worked with Charles Babbage on the Analytical Engine, and later corresponded with Michael Faraday.",
    ),
    (
        "summarization",
        "Summarize this in one sentence.",
        "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
        "glucose and oxygen. It takes place mainly in the leaves, inside chloroplasts.",
    ),
    ("brainstorming", "Give me five names for a bakery by the sea.", ""),
    ("classification", "Classify each as a fruit or a vegetable: apple, carrot, banana, leek.", ""),
    ("creative writing", "Write a haiku about the first snow of winter.", ""),
]


def error_message(error: Exception, api_url: str) -> str:
    """What a person should read when the API fails, by the kind of failure."""
    if isinstance(error, openai.APIConnectionError):
        return f"⚠️ The model server is not reachable at {api_url}. It may be starting or stopped; try again shortly."
    if isinstance(error, openai.AuthenticationError):
        return "⚠️ The model server rejected this page's API key. Ask the operator to check the page's key."
    if isinstance(error, openai.APIStatusError) and error.status_code == 503:
        retry = error.response.headers.get("retry-after")
        return f"⚠️ The model is busy with other requests. Try again{f' in {retry} s' if retry else ' shortly'}."
    if isinstance(error, openai.APIStatusError) and error.status_code in (400, 422):
        return f"⚠️ The request was refused: {_detail(error)}"
    return f"⚠️ Something went wrong ({type(error).__name__}). Try again."


def _detail(error: openai.APIStatusError) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    return str(body.get("message") or body.get("detail") or error.message)


def _model_label(model) -> str:
    version = (model.model_extra or {}).get("version")
    return f"**{model.id}**" + (f" (version {version})" if version and version != model.id else "")


def _picker_label(model) -> str:
    parent = (model.model_extra or {}).get("parent")
    return f"{model.id} (adapter on {parent})" if parent else model.id


def as_text(content) -> str:
    """Gradio hands the chat history back with content as typed parts; the API wants plain text."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def to_api_messages(history: list[dict], message: str, context: str) -> list[dict]:
    prior = [{"role": m["role"], "content": as_text(m["content"])} for m in history if m["role"] in ("user", "assistant")]
    system = [{"role": "system", "content": context}] if context.strip() else []
    return system + prior + [{"role": "user", "content": message}]


# The sliders, by the name of the decoding setting each starts from (/v1/models' "decoding").
_SLIDERS = ("temperature", "top_p", "max_tokens")
_UNCHANGED = tuple(gr.skip() for _ in _SLIDERS)


def build_page(config: UIConfig) -> gr.Blocks:
    client = openai.AsyncOpenAI(
        base_url=config.api_url,
        api_key=config.api_key(),
        timeout=config.timeout_s,
        max_retries=config.retries,
        http_client=resuming_http_client(config.retries, config.retry_wait_s),
    )

    served: dict[str, dict] = {}  # each model's decoding, as /v1/models says it

    async def model_banner():
        """The banner, the picker of the models served (shown when there is a choice: the base
        and its LoRA adapters), and the sliders at the picked model's own decoding."""
        try:
            models = (await client.models.list()).data
        except openai.OpenAIError as e:
            return error_message(e, config.api_url), gr.Dropdown(visible=False), None, *_UNCHANGED
        if not models:
            return "No model is being served.", gr.Dropdown(visible=False), None, *_UNCHANGED
        served.update({m.id: (m.model_extra or {}).get("decoding") or {} for m in models})
        choices = [(_picker_label(m), m.id) for m in models]
        # The first after the base: an adapter someone tuned, rather than the base it runs on.
        first = models[1].id if len(models) > 1 and (models[1].model_extra or {}).get("parent") else models[0].id
        picker = gr.Dropdown(choices=choices, value=first, visible=len(models) > 1)
        return "Serving " + ", ".join(_model_label(m) for m in models), picker, first, *sliders_for(first)

    def sliders_for(model: str | None) -> tuple:
        """The sliders at `model`'s decoding: a person who leaves them alone gets the decoding the
        model was scored with, not Dolly's sampling over a model tuned for another."""
        decoding = served.get(model) or {}
        return tuple(gr.Slider(value=decoding[key]) if key in decoding else gr.skip() for key in _SLIDERS)

    async def chat(
        message: str,
        history: list[dict],
        context: str,
        temperature: float,
        top_p: float,
        max_tokens: int,
        answers: dict,
        picked: str | None,
    ):
        history = list(history or [])
        if not message.strip():
            yield history, message, "", answers
            return
        messages = to_api_messages(history, message, context)
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield history, "", "", answers
        try:
            # A name, not a version: the page follows a version switch without a reload.
            model = picked or (await client.models.list()).data[0].id
            stream = await client.chat.completions.create(
                model=model, messages=messages, temperature=temperature, top_p=top_p, max_tokens=int(max_tokens), stream=True
            )
            async for chunk in stream:
                # What feedback on this answer must name: the version that answered, and the answer.
                asked = {"model": chunk.model, "answer_id": chunk.id, "instruction": message, "context": context}
                if chunk.choices and chunk.choices[0].delta.content:
                    history[-1]["content"] += chunk.choices[0].delta.content
                    yield history, "", "", answers
            answers = answers | {len(history) - 1: asked | {"answer": history[-1]["content"]}}
            yield history, "", "", answers
        except openai.OpenAIError as e:
            # The failed turn leaves the history, so the next request does not carry it as context.
            yield history[:-2], message, error_message(e, config.api_url), answers

    async def send_feedback(body: dict, request: gr.Request | None) -> str | None:
        """None once stored; else what the person should read."""
        user = getattr(request, "username", None)
        try:
            # One key for the client's every retry: a rating whose answer was lost is stored once.
            once = {"headers": {"Idempotency-Key": uuid.uuid4().hex}}
            await client.post("/feedback", cast_to=httpx.Response, body=body | ({"user": user} if user else {}), options=once)
        except openai.OpenAIError as e:
            return error_message(e, config.api_url)
        return None

    async def rate(answers: dict, liked: gr.LikeData, request: gr.Request):
        asked = answers.get(liked.index)
        if asked is None:  # an answer that failed, or from before a reload
            return "This answer cannot be rated.", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        up = liked.liked is True
        failed = await send_feedback(asked | {"rating": "up" if up else "down"}, request)
        said = failed or ("Thanks: rating saved." if up else "Thanks: rating saved. You can write a better answer below.")
        if up:
            return said, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        # A thumbs down opens the editor on that answer.
        return said, gr.Accordion(open=True), asked["instruction"], asked["context"], asked["answer"], asked

    async def submit_better(
        instruction: str,
        context: str,
        response: str,
        category: str,
        asked: dict | None,
        picked: str | None,
        request: gr.Request,
    ):
        body = {"instruction": instruction, "context": context, "correction": {"response": response, "category": category}}
        try:
            if asked is None:  # written without rating an answer first: it names the version serving now
                models = (await client.models.list()).data
                served = next((m for m in models if m.id == picked), models[0])
                asked = {"model": (served.model_extra or {}).get("version", served.id)}
        except openai.OpenAIError as e:
            failed = error_message(e, config.api_url)
        else:
            failed = await send_feedback(asked | body, request)
        if failed:  # the draft stays where it is
            return f"{failed} Your draft is kept here: submit it again when the server answers.", gr.skip()
        return "✅ Saved for review. Once a reviewer approves it, it trains the next model.", ""

    with gr.Blocks(title=config.title) as page:
        gr.Markdown(f"# {config.title}\nAn instruction-following model, fine-tuned on databricks-dolly-15k.")
        banner = gr.Markdown(elem_id="model-banner")
        picker = gr.Dropdown(label="Model", visible=False, elem_id="model-picker")
        picked = gr.State(None)  # the picker's choice, kept out of the /chat API (None: the first served)
        chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420)
        status = gr.Markdown(elem_id="status")
        feedback_status = gr.Markdown(elem_id="feedback-status")
        with gr.Row():
            message = gr.Textbox(
                placeholder="Ask something, or give an instruction", show_label=False, scale=6, elem_id="message"
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
        context = gr.Textbox(
            label="Context (optional): a passage for closed QA, extraction or summarization", lines=3, elem_id="context"
        )
        with gr.Accordion("Generation settings", open=False):
            temperature = gr.Slider(0.0, 2.0, value=generation.TEMPERATURE, step=0.05, label="Temperature", elem_id="temperature")
            top_p = gr.Slider(
                0.05, 1.0, value=generation.TOP_P, step=0.01, label=f"Top-p (Dolly: {generation.TOP_P})", elem_id="top-p"
            )
            max_tokens = gr.Slider(
                16,
                1024,
                value=generation.MAX_NEW_TOKENS,
                step=16,
                label=f"Max new tokens (Dolly: {generation.MAX_NEW_TOKENS})",
                elem_id="max-tokens",
            )
        gr.Examples(
            examples=[[instruction, ctx] for _, instruction, ctx in EXAMPLES],
            inputs=[message, context],
            example_labels=[kind for kind, _, _ in EXAMPLES],
            label="Examples, one per task kind",
        )
        clear = gr.Button("New conversation", size="sm")
        # Per answer, by its index in the conversation: what its feedback must name.
        answers = gr.State({})
        corrected = gr.State(None)  # the answer the editor below is about
        with gr.Accordion("Write a better answer", open=False, elem_id="better") as better:
            gr.Markdown("Rate an answer with 👍 or 👎; after a 👎, write the answer it should have given.")
            better_instruction = gr.Textbox(label="Instruction", elem_id="better-instruction")
            better_context = gr.Textbox(label="Context", lines=2, elem_id="better-context")
            better_answer = gr.Textbox(label="The model's answer", interactive=False, elem_id="better-answer")
            better_response = gr.Textbox(label="A better answer", lines=4, elem_id="better-response")
            category = gr.Dropdown(list(DOLLY_CATEGORIES), value="open_qa", label="Kind of task", elem_id="better-category")
            submit = gr.Button("Submit for review", elem_id="better-submit")

        sliders = [temperature, top_p, max_tokens]  # in _SLIDERS' order
        inputs = [message, chatbot, context, temperature, top_p, max_tokens, answers, picked]
        outputs = [chatbot, message, status, answers]
        sent = send.click(chat, inputs, outputs, api_name="chat")
        submitted = message.submit(chat, inputs, outputs, api_visibility="private")
        # Cancelling the event closes the stream, and the API cancels generation on disconnect.
        stop.click(None, cancels=[sent, submitted])
        clear.click(lambda: ([], "", "", {}), None, [chatbot, message, status, answers], api_visibility="private")
        chatbot.like(
            rate,
            [answers],
            [feedback_status, better, better_instruction, better_context, better_answer, corrected],
            api_visibility="private",
        )
        submit.click(
            submit_better,
            [better_instruction, better_context, better_response, category, corrected, picked],
            [feedback_status, better_response],
            api_visibility="private",
        )
        picker.change(lambda model: (model, *sliders_for(model)), picker, [picked, *sliders], api_visibility="private")
        page.load(model_banner, None, [banner, picker, picked, *sliders], api_visibility="private")
    return page


def launch_page(config: UIConfig, block: bool = True) -> gr.Blocks:
    """Serve the page standalone at config.host:config.port (with its login, if configured)."""
    page = build_page(config)
    page.queue().launch(
        server_name=config.host,
        server_port=config.port,
        auth=config.logins(),
        prevent_thread_lock=not block,
        quiet=not block,
        show_error=True,
    )
    return page
