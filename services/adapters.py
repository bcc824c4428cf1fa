"""LoRA adapters side by side on one base: a replica holds the base once, and the adapters that
its requests ask for, loaded on demand.

A request's `model` names an adapter; the ingress resolves `dolly-support@latest` to a version
(`dolly-support@4`) and sends that as the request's multiplexed model id, which Serve's router
uses to prefer a replica that holds it already. On the replica, Serve's multiplexer keeps at
most `deployment.max_adapters_per_replica` adapters, the least recently used going first, and
PEFT computes a batch whose rows run different adapters (contract/decode.py).

An adapter that Serve evicts is retired: no new request gets it, and its weights go once the
requests still decoding with it are done. PEFT cannot hold a base with no adapter at all, so the
last one stays until another has loaded: with a bound of 1, two adapters are held for the moment
of a swap. Promoting a version restarts nothing: `NAME@latest` then resolves to an id that no
replica holds yet, which loads, and the old version ages out.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from contract import registry


class Adapter:
    """What Serve's multiplexer caches for one adapter version: `__del__` is its eviction hook
    (and Python's, once the object goes; the first call alone counts)."""

    def __init__(self, version: str, pool: AdapterPool):
        self.version, self._pool, self._retired = version, pool, False

    @contextmanager
    def in_use(self):
        """Around a request decoding with this adapter: it stays loaded until the request ends."""
        self._pool.users[self.version] += 1
        try:
            yield self.version
        finally:
            self._pool.users[self.version] -= 1
            self._pool.tidy()

    def __del__(self) -> None:
        if not self._retired:
            self._retired = True
            self._pool.retire(self.version)


class AdapterPool:
    """The adapters of one replica's PEFT model (`model`, already holding one, which is not
    Serve's and so retired from the start). `lock` is held by every model call, so that no
    adapter comes or goes in the middle of one."""

    def __init__(self, model, lock: asyncio.Lock, registry_root: Path, base: str):
        self._model, self._lock, self._root, self._base = model, lock, registry_root, base
        self.users: Counter[str] = Counter()  # requests decoding, by adapter
        self._retired: set[str] = set(model.peft_config)
        self._loop: asyncio.AbstractEventLoop | None = None  # the replica's, known from the first load

    @property
    def held(self) -> list[str]:
        return sorted(self._model.peft_config)

    async def load(self, version: str) -> Adapter:
        self._loop = asyncio.get_running_loop()
        if version in self._model.peft_config:
            self._retired.discard(version)  # retired but not gone yet: in use again
        else:
            folder, _ = registry.resolve(version, self._root)
            registry.check_base(folder, version, self._base)
            async with self._lock:
                await asyncio.to_thread(self._model.load_adapter, str(folder), adapter_name=version)
        await self._delete_idle()
        return Adapter(version, self)

    def retire(self, version: str) -> None:
        # Serve calls the eviction hook on a thread of its own; the pool changes on its loop (none
        # left when Python collects an adapter at the replica's end).
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._retire, version)

    def _retire(self, version: str) -> None:
        if version in self._model.peft_config:
            self._retired.add(version)
            self.tidy()

    def tidy(self) -> None:
        if any(not self.users[v] for v in self._retired):
            self._loop.create_task(self._delete_idle())

    async def _delete_idle(self) -> None:
        async with self._lock:
            idle = [v for v in sorted(self._retired) if not self.users[v] and v in self._model.peft_config]
            if len(idle) == len(self._model.peft_config):
                idle = idle[1:]  # PEFT needs one adapter on its base: the last stays until another loads
            for version in idle:
                self._model.delete_adapter(version)
                self._retired.discard(version)
