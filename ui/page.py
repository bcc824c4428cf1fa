"""The chat page: Gradio in front of the OpenAI-compatible Serve API.

The page's Python side calls the API with the key; the browser only ever talks to the page, so
the key never leaves the server. Dolly's `Input:` context goes to the API as a system message,
which the API folds into the prompt's `Input:` block.
"""

from __future__ import annotations

import gradio as gr
import openai

from contract import generation
from ui.config import UIConfig

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


def as_text(content) -> str:
    """Gradio hands the chat history back with content as typed parts; the API wants plain text."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def to_api_messages(history: list[dict], message: str, context: str) -> list[dict]:
    prior = [{"role": m["role"], "content": as_text(m["content"])} for m in history if m["role"] in ("user", "assistant")]
    system = [{"role": "system", "content": context}] if context.strip() else []
    return system + prior + [{"role": "user", "content": message}]


def build_page(config: UIConfig) -> gr.Blocks:
    client = openai.AsyncOpenAI(base_url=config.api_url, api_key=config.api_key(), timeout=config.timeout_s, max_retries=0)

    async def model_banner() -> str:
        try:
            models = (await client.models.list()).data
        except openai.OpenAIError as e:
            return error_message(e, config.api_url)
        if not models:
            return "No model is being served."
        return "Serving " + ", ".join(_model_label(m) for m in models)

    async def chat(message: str, history: list[dict], context: str, temperature: float, top_p: float, max_tokens: int):
        history = list(history or [])
        if not message.strip():
            yield history, message, ""
            return
        messages = to_api_messages(history, message, context)
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield history, "", ""
        try:
            # Asked each time, so the page follows a version switch without a reload.
            model = (await client.models.list()).data[0].id
            stream = await client.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                temperature=temperature,
                top_p=top_p,
                max_tokens=int(max_tokens),
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    history[-1]["content"] += chunk.choices[0].delta.content
                    yield history, "", ""
        except openai.OpenAIError as e:
            # The failed turn leaves the history, so the next request does not carry it as context.
            yield history[:-2], message, error_message(e, config.api_url)

    with gr.Blocks(title=config.title) as page:
        gr.Markdown(f"# {config.title}\nAn instruction-following model, fine-tuned on databricks-dolly-15k.")
        banner = gr.Markdown(elem_id="model-banner")
        chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420)
        status = gr.Markdown(elem_id="status")
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
            temperature = gr.Slider(0.0, 2.0, value=generation.TEMPERATURE, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1.0, value=generation.TOP_P, step=0.01, label=f"Top-p (Dolly: {generation.TOP_P})")
            max_tokens = gr.Slider(
                16, 1024, value=generation.MAX_NEW_TOKENS, step=16, label=f"Max new tokens (Dolly: {generation.MAX_NEW_TOKENS})"
            )
        gr.Examples(
            examples=[[instruction, ctx] for _, instruction, ctx in EXAMPLES],
            inputs=[message, context],
            example_labels=[kind for kind, _, _ in EXAMPLES],
            label="Examples, one per task kind",
        )
        clear = gr.Button("New conversation", size="sm")

        inputs = [message, chatbot, context, temperature, top_p, max_tokens]
        outputs = [chatbot, message, status]
        sent = send.click(chat, inputs, outputs, api_name="chat")
        submitted = message.submit(chat, inputs, outputs, api_visibility="private")
        # Cancelling the event closes the stream, and the API cancels generation on disconnect.
        stop.click(None, cancels=[sent, submitted])
        clear.click(lambda: ([], "", ""), None, [chatbot, message, status], api_visibility="private")
        page.load(model_banner, None, banner, api_visibility="private")
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
