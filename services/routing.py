"""Which model answers a request's `model`: the served one by its name or version, or with
`adapters` a LoRA adapter on the served base (NAME, NAME@latest or NAME@N) resolved in the
registry and sent as the request's multiplexed model id (services/adapters.py). A name that is
neither gets 404 naming those there are."""

from __future__ import annotations

import re

from contract import registry
from contract.errors import UserError
from services.config import ServeConfig
from services.errors import ApiError


class ServedModels:
    def __init__(self, version: str, config: ServeConfig, base: str | None = None):
        """`version` answers requests for the served name; with `config.adapters`, `base` is the
        model they run on, and `version` its display name."""
        self.version = version
        self.served_name = config.served_model_name or version.split("@")[0]
        self._names = {self.served_name, version}
        self._adapters, self._registry, self._base = config.adapters, config.registry, base
        self._on_base: set[str] = set()  # adapter versions checked to be on the base (versions never change)

    def listing(self) -> dict:
        """`GET /v1/models`: the served model, and each adapter at its current version."""
        served = [{"id": self.served_name, "object": "model", "created": 0, "owned_by": "dolly-ray", "version": self.version}]
        for name in self._adapters:
            if registry.versions(name, self._registry):
                version = f"{name}@{registry.latest(name, self._registry)}"
                served.append({**served[0], "id": name, "version": version, "parent": self.served_name})
        return {"object": "list", "data": served}

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
            except UserError as e:
                raise ApiError(400, str(e), "model") from None
            self._on_base.add(version)
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
