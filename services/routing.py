"""Which model answers a request's `model`: the served one by its name or version, or with
`adapters` a LoRA adapter on the served base (NAME, NAME@latest or NAME@N) resolved in the
registry and sent as the request's multiplexed model id (services/adapters.py). A name that is
neither gets 404 naming those there are.

Each version answers with its own decoding for what a request leaves out (`ServeConfig.defaults_for`:
the model's generation_config.json under the server's defaults), and `/v1/models` says which, so a
client (the chat page's sliders) can start from it."""

from __future__ import annotations

import re
from pathlib import Path

from contract import registry
from contract.errors import UserError
from services.config import SamplingDefaults, ServeConfig, check_lora_only
from services.errors import ApiError


class ServedModels:
    def __init__(self, version: str, folder: Path, config: ServeConfig, base: str | None = None):
        """`version` (in `folder`) answers requests for the served name; with `config.adapters`,
        `base` is the model they run on, and `version` its display name."""
        self.version = version
        self._config = config
        self._defaults = {version: config.defaults_for(folder)}  # by version: versions never change
        self.served_name = config.served_model_name or version.split("@")[0]
        self._names = {self.served_name, version}
        self._adapters, self._registry, self._base = config.adapters, config.registry, base
        self._on_base: set[str] = set()  # adapter versions checked to be on the base (versions never change)

    def listing(self) -> dict:
        """`GET /v1/models`: the served model, and each adapter at its current version."""
        served = [
            {
                "id": self.served_name,
                "object": "model",
                "created": 0,
                "owned_by": "dolly-ray",
                "version": self.version,
                "decoding": self._decoding(self.version),
            }
        ]
        for name in self._adapters:
            if registry.versions(name, self._registry):
                folder, version = registry.resolve(f"{name}@latest", self._registry)
                self._known(version, folder)
                served.append(
                    {**served[0], "id": name, "version": version, "parent": self.served_name, "decoding": self._decoding(version)}
                )
        return {"object": "list", "data": served}

    def defaults(self, version: str) -> SamplingDefaults:
        """What a request answered by `version` (one `route` returned) gets for what it leaves out."""
        return self._defaults[version]

    def _known(self, version: str, folder: Path) -> None:
        if version not in self._defaults:
            try:
                self._defaults[version] = self._config.defaults_for(folder)
            except UserError as e:
                raise ApiError(400, str(e), "model") from None

    def _decoding(self, version: str) -> dict:
        """A version's decoding as `/v1/models` tells it (the OpenAI names; min_tokens is the server's)."""
        return self._defaults[version].model_dump(exclude={"min_tokens"})

    def route(self, requested: str) -> tuple[str, str]:
        """(the multiplexed model id, the version that answers) for a request's `model`; the id is
        "" for the served model itself."""
        if requested in self._names:
            return "", self.version
        name, _, number = requested.partition("@")
        if name not in self._adapters:
            raise ApiError(
                404, f"model {requested!r} is not served here; these are: {self._served_ids()}", "model", kind="not_found_error"
            )
        try:
            folder, version = registry.resolve(f"{name}@{number or 'latest'}", self._registry)
        except UserError as e:
            raise ApiError(404, str(e), "model", kind="not_found_error") from None
        if version not in self._on_base:
            try:
                registry.check_base(folder, version, self._base)
                if self._config.engine.kind == "vllm":
                    check_lora_only(folder, version)
            except UserError as e:
                raise ApiError(400, str(e), "model") from None
            self._on_base.add(version)
        self._known(version, folder)
        return version, version

    def check_answered_here(self, model: str) -> None:
        """Refuses (404) a rated answer's `model` that no version served here could have given."""
        # An earlier version may have answered (NAME@N); any other name is not ours to record, and
        # would grow the metric's labels without bound.
        names = [self.version.split("@")[0], *self._adapters]
        if model not in self._names | set(self._adapters) and not re.fullmatch(
            rf"({'|'.join(map(re.escape, names))})@\d+", model
        ):
            raise ApiError(
                404,
                f"model {model!r} is not served here: send the answer's `model` "
                f"({' or '.join(f'{name}@N' for name in names)}), or {self._served_ids()}",
                "model",
                kind="not_found_error",
            )

    def _served_ids(self) -> str:
        adapters = ", ".join(self._adapters)
        return repr(self.served_name) + (f" and the adapters {adapters} (as NAME, NAME@latest or NAME@N)" if adapters else "")
