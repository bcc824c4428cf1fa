"""The chat page as a Ray Serve deployment, so that one Serve instance hosts the API and the page.

Ray's own GradioIngress does not work with Gradio 6. Here the page is mounted on a FastAPI app
built inside the replica (`serve.ingress()` with `__serve_build_asgi_app__`): the API key is read
where the page runs, never shipped in the Serve config, and never sent to the browser.
"""

# No `from __future__ import annotations`: Serve reads build_page_app's annotation to turn a
# serveConfigV2's args into a UIConfig.
import gradio as gr
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from ui.config import UIConfig
from ui.page import build_page


@serve.deployment(name="ChatPage", num_replicas=1, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class ChatPage:
    def __init__(self, config: UIConfig):
        self.config = config

    def __serve_build_asgi_app__(self) -> FastAPI:
        return gr.mount_gradio_app(FastAPI(), build_page(self.config), path="/", auth=self.config.logins())


def build_page_app(config: UIConfig) -> Application:
    return ChatPage.bind(config)
