"""The `dolly` command as a user meets it: help, setting errors that name the setting, reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
DOLLY = [str(Path(sys.executable).parent / "dolly")]


def dolly(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # A wide terminal, so rich does not wrap the messages the tests look for.
    env = {**os.environ, "COLUMNS": "300"}
    return subprocess.run(DOLLY + list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=240)


def test_help_lists_every_prepare_setting_with_its_meaning():
    result = dolly("data", "prepare", "--help")
    assert result.returncode == 0
    for setting in ("source", "tokenizer", "max_length", "length_policy", "on_bad", "test_size", "pack", "seed"):
        assert setting in result.stdout


def test_every_command_and_subcommand_prints_its_help():
    """Help text is rich markup: an example like `new_records=[/data/x.jsonl]` reads as a closing tag
    and crashes --help unless escaped."""
    import click
    from typer.main import get_command
    from typer.testing import CliRunner

    from cli import app

    def paths(command: click.Command, prefix: tuple[str, ...] = ()):
        yield prefix
        for name, sub in getattr(command, "commands", {}).items():
            yield from paths(sub, (*prefix, name))

    runner = CliRunner()
    for path in paths(get_command(app)):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "300"})
        assert result.exit_code == 0, (path, result.output[-2000:], result.exception)


@pytest.mark.parametrize("command", [("up",), ("train",), ("serve",), ("retrain",), ("eval",), ("data", "prepare")])
def test_every_command_lists_its_settings_with_real_defaults_and_nested_ones_dotted(command):
    result = dolly(*command, "--help")
    assert result.returncode == 0 and "Settings (YAML via --config" in result.stdout
    assert "PydanticUndefined" not in result.stdout
    if command == ("retrain",):
        assert "gate.min_improvement = 0.0" in result.stdout and "corpus = (required)" in result.stdout


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("test_size=-1", "setting 'test_size': Input should be greater than or equal to 0"),
        ("length_policy=chop", "setting 'length_policy': Input should be 'drop' or 'truncate'"),
        ("tokeniser=x", "setting 'tokeniser': Extra inputs are not permitted"),
        ("test_size", "'test_size' is not key=value"),
    ],
)
def test_a_bad_setting_is_named_and_nothing_runs(argument, message, tmp_path):
    result = dolly("data", "prepare", argument, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


def test_a_missing_source_is_a_one_line_error_not_a_traceback(tmp_path, tokenizer_path):
    result = dolly("data", "prepare", "--source", str(tmp_path / "missing.jsonl"), "--tokenizer", tokenizer_path)
    assert result.returncode == 1
    assert "error:" in result.stderr and "not an existing file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_prepare_from_yaml_then_stats_reports_and_verifies(tmp_path, tokenizer_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "\n".join(
            json.dumps({"instruction": f"Q{i}?", "context": "", "response": f"A{i}.", "category": "open_qa"}) for i in range(6)
        )
        + "\n{broken\n"
    )
    config = tmp_path / "prep.yaml"
    config.write_text(f"source: {corpus}\ntokenizer: {tokenizer_path}\ntest_size: 5\n")
    out = tmp_path / "out"
    prepared = dolly("data", "prepare", "--config", str(config), "test_size=2", "--out", str(out))
    assert prepared.returncode == 0, prepared.stderr
    assert "read 7 = kept 6 + rejected 1 (reconciled)" in prepared.stdout
    assert json.loads((out / "manifest.json").read_text())["splits"]["test"]["examples"] == 2  # key=value beat YAML

    stats = dolly("data", "stats", str(out), "--tokenizer", tokenizer_path)
    assert stats.returncode == 0, stats.stderr
    assert "Verified" in stats.stdout and "not_json 1" in stats.stdout


@pytest.mark.parametrize(
    ("host", "shown"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000/v1"),
        ("0.0.0.0", "http://127.0.0.1:8000/v1"),  # every interface: this machine's loopback too
        ("10.0.0.7", "http://10.0.0.7:8000/v1"),
    ],
)
def test_dolly_up_and_dolly_serve_announce_the_api_at_the_host_it_listens_on(host, shown):
    from loop.deploy import Deployed

    assert Deployed("http://127.0.0.1:8000/v1", None, host).shown("http://127.0.0.1:8000/v1") == shown
