"""A model registry on a plain folder (local, NFS or a mounted PVC): exported models become
numbered versions, and `latest` points at the one to serve.

    <root>/<name>/1/        an exported HF folder (safetensors, tokenizer, generation_config)
    <root>/<name>/2/
    <root>/<name>/LATEST    the version number `NAME@latest` resolves to

Serving refers to `NAME@latest` or `NAME@N`; a plain folder path works everywhere too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from contract import runs
from contract.errors import UserError

DEFAULT_ROOT = runs.REGISTRY
LATEST = "LATEST"
TRAINING_FACTS = "training.json"  # written into every export: what it was trained on, and how
# An exported model folder holds a model config, or PEFT's adapter config that names its base.
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIGS = ("config.json", ADAPTER_CONFIG)


def is_model_folder(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in MODEL_CONFIGS)


def check_servable(folder: Path) -> None:
    """Serving loads an exported folder strictly: safetensors only."""
    if not is_model_folder(folder):
        raise UserError(f"{folder} is not an exported model folder (no {' or '.join(MODEL_CONFIGS)})")
    if not any(Path(folder).glob("*.safetensors")):
        raise UserError(
            f"{folder} has no .safetensors weights: serving loads safetensors only; "
            "export with save_pretrained(safe_serialization=True)"
        )


def adapter_base(name_or_path: str | Path | None) -> str | None:
    """The base that a LoRA adapter folder (PEFT's adapter_config.json) names, else None."""
    config = Path(name_or_path or "") / ADAPTER_CONFIG
    return json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else None


def carries_token_rows(folder: Path) -> bool:
    """Whether a LoRA adapter folder holds trained embedding rows beside its LoRA weights (PEFT's
    trainable tokens)."""
    return bool(json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("trainable_token_indices"))


def check_base(folder: Path, version: str, base: str) -> None:
    """Refuse to serve `version` (in `folder`) as an adapter on `base` unless it was trained on
    that very base: its weights mean nothing on another."""
    trained_on = adapter_base(folder)
    if trained_on is None:
        raise UserError(f"{version} is not a LoRA adapter (no {ADAPTER_CONFIG}): serve it as model={version}, not among adapters")
    if not same_model(trained_on, base):
        raise UserError(
            f"{version} is an adapter trained on {trained_on!r}, not on {base!r}, the base served here: "
            "serve it in an application of its own base"
        )


def same_model(a: str, b: str) -> bool:
    """Two names of one model: equal Hub ids or names, or the same folder however it is spelt."""
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve())


def versions(name: str, root: Path = DEFAULT_ROOT) -> list[int]:
    folder = Path(root) / name
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def register(export_dir: Path, name: str, root: Path = DEFAULT_ROOT, promote: bool = True) -> int:
    """Copy an exported model folder in as the next version; make it `latest` unless told not to."""
    if not is_model_folder(export_dir):
        raise UserError(f"{export_dir} is not an exported model folder (no {' or '.join(MODEL_CONFIGS)})")
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    # A staging folder of its own, then a version claimed by renaming it: the rename fails when
    # another registration took that number first, so concurrent registrations (two jobs on one
    # shared volume) each get a complete version of their own. No lock, which NFS would not honour.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the version from serving pods of another user
    try:
        shutil.copytree(export_dir, staging, dirs_exist_ok=True)
        version = max(versions(name, root), default=0) + 1
        while True:
            try:
                staging.rename(folder / str(version))  # complete or absent, never half-copied
                break
            except OSError:  # taken (a version folder is never empty, so the rename cannot merge)
                if not (folder / str(version)).exists():
                    raise
                version += 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if promote:
        set_latest(name, version, root)
    return version


def find_registered(export_dir: Path, name: str, root: Path = DEFAULT_ROOT) -> int | None:
    """The version already registered from this very training run (the same training.json), if any."""
    facts = Path(export_dir) / TRAINING_FACTS
    for version in versions(name, root):
        registered = Path(root) / name / str(version) / TRAINING_FACTS
        if facts.is_file() and registered.is_file() and registered.read_bytes() == facts.read_bytes():
            return version
    return None


def register_once(export_dir: Path, name: str, root: Path = DEFAULT_ROOT, promote: bool = True) -> int:
    """`register`, unless this export is registered already: re-running a pipeline must not pile
    up copies of one model."""
    version = find_registered(export_dir, name, root)
    if version is None:
        return register(export_dir, name, root, promote)
    if promote:
        set_latest(name, version, root)
    return version


def set_latest(name: str, version: int, root: Path = DEFAULT_ROOT) -> None:
    if version not in versions(name, root):
        raise UserError(f"{name} has no version {version}; it has {versions(name, root) or 'none'}")
    pointer = Path(root) / name / LATEST
    fd, tmp = tempfile.mkstemp(prefix=".latest-", dir=pointer.parent)  # its own: promotions may overlap
    with os.fdopen(fd, "w") as out:
        out.write(f"{version}\n")
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from readers of another user
    os.replace(tmp, pointer)  # atomic: a reader sees the old or the new version, never neither


def latest(name: str, root: Path = DEFAULT_ROOT) -> int:
    pointer = Path(root) / name / LATEST
    if not pointer.exists():
        raise UserError(f"model {name!r} has no versions in {root}: train and export one first")
    return int(pointer.read_text())


def resolve(spec: str, root: Path = DEFAULT_ROOT) -> tuple[Path, str]:
    """(folder, display name) for `NAME@latest`, `NAME@N` or a folder path."""
    if Path(spec).is_dir():
        return Path(spec), Path(spec).name
    name, sep, version = spec.partition("@")
    if not sep:
        raise UserError(f"model {spec!r} is neither a folder nor NAME@VERSION (e.g. dolly@latest, dolly@3)")
    number = latest(name, root) if version == "latest" else int(version) if version.isdigit() else None
    if number is None or number not in versions(name, root):
        raise UserError(f"model {spec!r} not found in {root}; versions of {name!r}: {versions(name, root) or 'none'}")
    return Path(root) / name / str(number), f"{name}@{number}"
