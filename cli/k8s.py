"""`dolly k8s ...`: the KubeRay manifests in k8s/, generated from the typed configs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cli.configs import load_config
from cluster import k8s
from loop.configs import RetrainConfig
from pipelines.configs import TrainConfig

app = typer.Typer(
    help="KubeRay manifests (RayCluster, RayJobs, RayService) generated from the typed configs.", no_args_is_help=True
)

# RayJob names become pod and Service names: a DNS-1035 label, short enough for KubeRay's suffixes.
_JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,45}[a-z0-9])?$")


def _profiles(presets: list[str] | None) -> list[str]:
    unknown = [p for p in presets or [] if p not in k8s.PROFILES]
    if unknown:
        raise typer.BadParameter(
            f"unknown preset(s) {', '.join(unknown)}; known: {', '.join(k8s.PROFILES)}", param_hint="--preset"
        )
    return presets or list(k8s.PROFILES)


PRESET = typer.Option(..., "--preset", help=f"the overlay deployed: {', '.join(k8s.PROFILES)}")
IMAGE = typer.Option(
    None, help="the image your deployment runs (default: the overlay's, e.g. registry.example.com/dolly-ray:0.1.0-gpu)"
)


def _print_job(job: dict, image: str) -> None:
    """Print `job` with `image` in every container: what an overlay's `images:` does to what it applies."""
    spec = job["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            container["image"] = image
    print(k8s.to_yaml(job), end="")


@app.command()
def render(
    presets: Optional[list[str]] = typer.Option(
        None, "--preset", help=f"overlay to write, repeatable: {', '.join(k8s.PROFILES)} (default: all)"
    ),
    out: Path = typer.Option(Path("k8s"), "--out", help="root folder: writes OUT/base and OUT/overlays/PRESET"),
    model: str = typer.Option(
        k8s.DEFAULT_MODEL,
        help="what the RayService serves, and the version retraining must beat: NAME@latest, or a pinned NAME@N to promote a version",
    ),
    check: bool = typer.Option(False, "--check", help="write nothing; exit 1 if the files on disk differ"),
) -> None:
    """Write the kustomize base and overlays. The committed k8s/ is exactly this command's output.

    Example: dolly k8s render --preset gpu-a100 --model dolly@4 --out deploy/
    """
    profiles = _profiles(presets)
    for name in profiles:  # cluster/ sits below loop/: retrain.yaml is checked here, as the job will read it
        load_config(RetrainConfig, None, k8s.retrain_settings(k8s.PROFILES[name], model), [])
    files = k8s.render(profiles, model)
    console = Console()
    if check:
        stale = k8s.drift(out, files)
        if stale:
            console.print(
                f"[red]{len(stale)} file(s) under {out} differ from the generator[/]: "
                + ", ".join(map(str, stale))
                + f"\nrun `dolly k8s render --out {out}` to update them"
            )
            raise typer.Exit(1)
        console.print(f"{out} is up to date ({len(files)} files)")
        return
    for path, text in files.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text(text)
    console.print(f"[green]Wrote[/] {len(files)} files under {out}: kubectl apply -k {out}/overlays/<preset>")


@app.command()
def job(
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="`dolly train` settings on top of the overlay's train.yaml"
    ),
    preset: str = PRESET,
    run_name: str = typer.Option(..., help="the new run's name: its checkpoints, and the RayJob's name (dolly-train-RUN_NAME)"),
    image: Optional[str] = IMAGE,
) -> None:
    """Print a RayJob for a retraining run, for `kubectl create -f -`. A new run_name starts a new
    run (the same one resumes it, or re-exports a finished one); a retry of the job resumes it.

    Example: dolly k8s job --preset gpu-a100 --run-name dolly-2 epochs=3 | kubectl create -f -
    """
    profile = k8s.PROFILES[_profiles([preset])[0]]
    name = f"{k8s.JOB}-{run_name}"
    if not _JOB_NAME.match(name):
        raise typer.BadParameter(
            f"the RayJob would be named {name!r}: use lowercase letters, digits and '-', 47 characters in all",
            param_hint="--run-name",
        )
    arguments = [f"run_name={run_name}", *(overrides or [])]
    load_config(TrainConfig, None, k8s.train_settings(profile), arguments)  # as the cluster will read them
    _print_job(k8s.rayjob(profile, name, arguments), image or k8s.image(profile))


@app.command()
def retrain(
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="`dolly retrain` settings on top of the overlay's retrain.yaml"
    ),
    preset: str = PRESET,
    image: Optional[str] = IMAGE,
) -> None:
    """Print the retraining RayJob (dolly-retrain) with settings of your own, for `kubectl create -f -`;
    without any, it is the overlay's retrain/rayjob.yaml. New records are files on the volume.

    Example: dolly k8s retrain --preset gpu-a100 'new_records=\\[/mnt/dolly/incoming/june.jsonl]' | kubectl create -f -
    """
    profile = k8s.PROFILES[_profiles([preset])[0]]
    load_config(RetrainConfig, None, k8s.retrain_settings(profile), overrides or [])  # as the cluster will read them
    _print_job(k8s.retrain_rayjob(profile, overrides or []), image or k8s.image(profile))
