"""How the serving application is packaged and started: importable for Serve's own tools, and
`dolly serve` refusing to start insecurely or on a model that is not there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_cli import dolly

pytestmark = pytest.mark.timeout(180)
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def test_serve_build_turns_the_application_into_a_serve_config(tiny_model, tmp_path):
    settings = tmp_path / "serve.yaml"
    settings.write_text("deployment:\n  max_replicas: 3\n  max_queued_requests: 7\n")
    out = tmp_path / "built.yaml"
    env = {**os.environ, "DOLLY_MODEL": str(tiny_model), "DOLLY_SERVE_CONFIG": str(settings)}
    result = subprocess.run(
        [str(BIN / "serve"), "build", "services.env:app", "-o", str(out), "--app-dir", str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=150,
    )
    assert result.returncode == 0, result.stderr
    [application] = yaml.safe_load(out.read_text())["applications"]
    deployments = {d["name"]: d for d in application["deployments"]}
    model = deployments["DollyModel"]
    assert model["autoscaling_config"]["min_replicas"] == 1 and model["autoscaling_config"]["max_replicas"] == 3
    assert model["max_queued_requests"] == 7 and model["health_check_period_s"] > 0
    assert deployments["OpenAIIngress"]["backpressure_config"]["retry_after_s"] > 0
    assert deployments["OpenAIIngress"]["health_check_period_s"] == model["health_check_period_s"], "a lost ingress noticed alike"


def test_a_bad_setting_under_serve_build_names_the_setting_not_a_command_line(tmp_path, monkeypatch):
    """services.env is library code: its settings error is the contract's, free of the CLI's typer."""
    from contract.errors import UserError
    from contract.settings import SettingsError

    settings = tmp_path / "serve.yaml"
    settings.write_text("deployment:\n  max_replicas: many\n")
    monkeypatch.setenv("DOLLY_MODEL", "dolly@latest")
    monkeypatch.setenv("DOLLY_SERVE_CONFIG", str(settings))
    monkeypatch.delitem(sys.modules, "services.env", raising=False)
    with pytest.raises(SettingsError, match=r"setting 'deployment.max_replicas'.*got 'many'") as error:
        import services.env  # noqa: F401
    assert isinstance(error.value, UserError)  # shown plainly wherever it surfaces, like every user error


def test_serve_help_lists_every_setting():
    result = dolly("serve", "--help")
    assert result.returncode == 0
    for setting in ("model", "registry", "engine", "deployment", "auth", "log_content", "--insecure-no-auth"):
        assert setting in result.stdout


def test_serve_refuses_to_start_without_api_keys(tiny_model):
    env_without_keys = {k: v for k, v in os.environ.items() if k != "DOLLY_API_KEYS"}
    result = subprocess.run(
        [str(BIN / "dolly"), "serve", "--model", str(tiny_model)],
        capture_output=True,
        text=True,
        env={**env_without_keys, "COLUMNS": "300"},
        timeout=120,
    )
    assert result.returncode == 1
    assert "no API keys: set DOLLY_API_KEYS" in result.stderr and "--insecure-no-auth" in result.stderr


def test_serve_names_a_model_that_is_not_there(tmp_path):
    result = dolly("serve", "--model", "dolly@4", "--registry", str(tmp_path), "--insecure-no-auth")
    assert result.returncode == 1 and "versions of 'dolly': none" in result.stderr
