"""Settings of the chat page. The API key is read on the server and never sent to the browser."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from contract.environment import API_KEYS_ENV as SERVER_KEYS_ENV  # the API's own keys, when the page runs beside it
from contract.errors import UserError
from contract.keys import parse_keys

API_KEY_ENV = "DOLLY_API_KEY"
# Where the page is deployed beside the API, by `dolly serve --ui`, `dolly up` and the RayService.
PAGE_APP, PAGE_ROUTE = "chat-page", "/ui"


class UIConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_url: str = Field("http://127.0.0.1:8000/v1", description="the OpenAI-compatible API the page talks to")
    api_key_file: Path | None = Field(
        None, description=f"file whose first line is the API key (default: ${API_KEY_ENV}, else the first of ${SERVER_KEYS_ENV})"
    )
    auth_file: Path | None = Field(None, description="optional page login: one user:password per line")
    title: str = Field("Dolly", description="page title")
    host: str = Field("127.0.0.1", description="address the standalone page listens on")
    port: int = Field(7860, ge=1, le=65535, description="port of the standalone page")
    timeout_s: float = Field(120.0, gt=0, description="longest wait for an answer")
    retries: int = Field(
        2,
        ge=0,
        description="times a request is sent again when a server replica is lost: before its answer began "
        "(the openai client's max_retries) or after (from where it stopped, ui/resume.py)",
    )
    retry_wait_s: float = Field(1.0, ge=0, description="pause before asking again, while the front learns of the loss")

    def api_key(self) -> str:
        if self.api_key_file is not None:
            if not self.api_key_file.is_file():
                raise UserError(f"api_key_file {self.api_key_file} does not exist")
            keys = parse_keys(self.api_key_file.read_text())
        else:
            keys = parse_keys(os.environ.get(API_KEY_ENV, "")) or parse_keys(os.environ.get(SERVER_KEYS_ENV, ""))
        # The OpenAI client refuses an empty key; an API without auth ignores this placeholder.
        return keys[0] if keys else "no-key"

    def logins(self) -> list[tuple[str, str]] | None:
        if self.auth_file is None:
            return None
        pairs = [line.split(":", 1) for line in self.auth_file.read_text().splitlines() if line.strip()]
        if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
            raise UserError(f"auth_file {self.auth_file} must hold one user:password per line")
        return [(user.strip(), password.strip()) for user, password in pairs]
