"""The model being evaluated and the held-out split it is evaluated on: a model reference resolved
and loaded through the contract, and the prepared test split read from shards checked against
its tokenizer."""

from __future__ import annotations

from collections import defaultdict
from itertools import zip_longest
from pathlib import Path

import pyarrow.parquet as pq
import torch

from contract.devices import default_device, default_dtype
from contract.errors import UserError
from contract.models import load_model, load_tokenizer, random_pythia_size
from contract.registry import DEFAULT_ROOT, resolve
from pipelines.manifest import VerifiedData, verified


def resolve_model(spec: str, registry: Path = DEFAULT_ROOT) -> tuple[str, str]:
    """(what contract.models.load_model takes, display name): NAME@N and folders through the
    registry; Hub ids, random shapes and packaged models as they are."""
    if "@" in spec or Path(spec).is_dir():
        folder, name = resolve(spec, registry)
        return str(folder), name
    return spec, spec


class LoadedModel:
    """A model to evaluate: its tokenizer at once (enough to check data against, and cheap), its
    weights on first use (minutes for a large model), in eval mode on the chosen device ("auto":
    the GPU Ray gave this process, if any, in the precision it computes natively)."""

    def __init__(
        self,
        spec: str,
        *,
        registry: Path = DEFAULT_ROOT,
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        device: str = "auto",
        seed: int = 42,
    ):
        self.ref, self.name = resolve_model(spec, registry)
        if tokenizer is None and random_pythia_size(self.ref):
            raise UserError(
                f"{self.ref} is a random shape with no tokenizer of its own: pass a tokenizer (e.g. ../shared/tokenizer/pythia)"
            )
        try:
            self.tokenizer = load_tokenizer(tokenizer or self.ref)
        except OSError as e:
            raise UserError(
                f"could not load the tokenizer of {self.name} from {tokenizer or self.ref!r} ({e}): pass a tokenizer folder"
            ) from None
        self._gguf_file, self._device, self._seed = gguf_file, device, seed
        self._model = None

    @property
    def model(self):
        if self._model is None:
            device = default_device() if self._device == "auto" else torch.device(self._device)
            kwargs = {"dtype": default_dtype(device)} | ({"gguf_file": self._gguf_file} if self._gguf_file else {})
            torch.manual_seed(self._seed)  # a random shape gets the weights training initialises with the same seed
            self._model = load_model(self.ref, self.tokenizer, **kwargs).to(device).eval()
        return self._model

    def release(self) -> None:
        """Free the weights (the next use loads them again)."""
        self._model = None


def loaded_model(model: str | LoadedModel, registry: Path, tokenizer: str | None, gguf_file: str | None) -> LoadedModel:
    """`model` itself if it is loaded already, else the model it names."""
    return (
        model
        if isinstance(model, LoadedModel)
        else LoadedModel(model, registry=registry, tokenizer=tokenizer, gguf_file=gguf_file)
    )


def check_data(data: Path | VerifiedData, lm: LoadedModel) -> VerifiedData:
    """`data` verified, refusing shards made with another tokenizer than the model's: their token
    ids mean other words to it, and its scores would be silently meaningless."""
    return verified(data, lm.tokenizer, model=lm.name)


def read_heldout(data_dir: Path, max_examples: int | None = None) -> list[dict]:
    """The test split's rows (input_ids, labels, category) in shard order; with `max_examples`,
    the first that many of a round-robin over categories, so every category is represented."""
    files = sorted((Path(data_dir) / "test").glob("*.parquet"))
    rows = [row for f in files for row in pq.read_table(f, columns=["input_ids", "labels", "category"]).to_pylist()]
    if max_examples is None:
        return rows
    by_category: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_category[row["category"]].append(row)
    rounds = zip_longest(*(by_category[c] for c in sorted(by_category)))
    return [row for group in rounds for row in group if row is not None][:max_examples]
