"""Which Ray a command uses: an embedded one by default, else the address given or $RAY_ADDRESS;
a dashboard URL is for jobs only and is refused with what to use instead. Ray itself is faked:
these tests check what `ray.init` is asked, not Ray."""

from __future__ import annotations

import os

import pytest

from cluster import connect
from cluster.connect import RayAddress, client_auth_env, ray_session, resolve_address
from contract.errors import UserError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No Ray address, token or mode from the developer's shell; no `ray start` token file."""
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.setenv(name, "")  # recorded, so that what ray_session sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setattr(connect, "AUTH_TOKEN", tmp_path / "no-token")
    return monkeypatch


@pytest.fixture
def ray_calls(env):
    """Fake ray.init/shutdown: the calls they got, in order."""
    calls = []
    env.setattr(connect.ray, "is_initialized", lambda: False)
    env.setattr(connect.ray, "init", lambda **kwargs: calls.append(("init", kwargs)))
    env.setattr(connect.ray, "shutdown", lambda: calls.append(("shutdown", {})))
    return calls


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        (None, "local"),
        ("local", "local"),
        ("auto", "auto"),
        ("10.0.0.5:6379", "gcs"),
        ("ray://dolly-head-svc:10001", "client"),
        ("http://127.0.0.1:8265", "dashboard"),
        ("https://ray.example.com", "dashboard"),
    ],
)
def test_an_address_resolves_to_its_kind(env, address, kind):
    assert resolve_address(address) == RayAddress(kind, address or "local")


def test_ray_address_from_the_environment_is_used_when_none_is_given(env):
    env.setenv("RAY_ADDRESS", "ray://head:10001")
    assert resolve_address() == RayAddress("client", "ray://head:10001")
    assert resolve_address("local").kind == "local", "an explicit address wins"


def test_an_unknown_scheme_is_refused(env):
    with pytest.raises(UserError, match="not one of"):
        resolve_address("grpc://head:10001")


def test_the_default_is_an_embedded_ray_with_room_for_data_and_training(ray_calls):
    with ray_session():
        pass
    (_, kwargs), shutdown = ray_calls
    assert kwargs["address"] == "local" and kwargs["num_cpus"] >= connect.MIN_LOCAL_CPUS
    # The dashboard, for Ray's State API, on a port of its own and this machine only.
    assert kwargs["include_dashboard"] is True and kwargs["dashboard_host"] == "127.0.0.1" and kwargs["dashboard_port"] != 8265
    # ...which every process of the session, and this one while it lasts, asks first.
    url = f"http://127.0.0.1:{kwargs['dashboard_port']}"
    assert kwargs["runtime_env"] == {"env_vars": {connect.STATE_API_ENV: url}} and connect.STATE_API_ENV not in os.environ
    assert shutdown == ("shutdown", {})


def test_ray_client_gets_token_mode_when_a_token_is_at_hand(ray_calls, env):
    env.setenv("RAY_AUTH_TOKEN", "secret")  # e.g. read from the KubeRay cluster's Secret
    with ray_session("ray://dolly-head-svc:10001"):
        assert connect.os.environ["RAY_AUTH_MODE"] == "token"
    # Workers' output stays in Ray's logs, never on the user's screen (see cli/screen.py).
    assert ray_calls[0] == (
        "init",
        {"address": "ray://dolly-head-svc:10001", "logging_level": connect.logging.WARNING, "log_to_driver": False},
    )


def test_a_dashboard_url_is_refused_before_ray_starts_with_what_to_use_instead(ray_calls):
    with pytest.raises(UserError) as refused, ray_session("http://dolly-head-svc:8265"):
        pass
    message = str(refused.value)
    assert "dolly submit train --address http://dolly-head-svc:8265" in message
    assert "ray://dolly-head-svc:10001" in message
    assert ray_calls == []


def test_a_dashboard_url_in_ray_address_is_refused_too(ray_calls, env):
    env.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # what Ray's docs export for `ray job submit`
    with pytest.raises(UserError, match="unset RAY_ADDRESS"), ray_session():
        pass


def test_an_initialized_ray_is_used_as_it_is_and_left_running(env):
    calls = []
    env.setattr(connect.ray, "is_initialized", lambda: True)
    env.setattr(connect.ray, "init", lambda **kwargs: calls.append("init"))
    env.setattr(connect.ray, "shutdown", lambda: calls.append("shutdown"))
    with ray_session("http://ignored:8265"):
        pass
    assert calls == []


def test_client_auth_env_turns_token_mode_on_only_with_a_token_and_no_chosen_mode(env, tmp_path):
    assert client_auth_env() == {}
    env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert client_auth_env() == {"RAY_AUTH_MODE": "token"}
    env.setenv("RAY_AUTH_MODE", "disabled")
    assert client_auth_env() == {}
    env.delenv("RAY_AUTH_MODE")
    env.delenv("RAY_AUTH_TOKEN_PATH")
    (tmp_path / "no-token").write_text("t")  # the file `ray start` reads
    assert client_auth_env() == {"RAY_AUTH_MODE": "token"}


@pytest.mark.timeout(120)
def test_the_embedded_ray_answers_the_state_api_that_ray_train_polls(env):
    """Ray Train's PlacementGroupCleaner asks the State API once a second whether the controller
    lives, and logs a warning each time it cannot. A real Ray, in a process of its own."""
    import subprocess
    import sys

    probe = "from cluster.connect import ray_session\nfrom ray.util.state import list_actors\nwith ray_session():\n    list_actors()\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-2000:]
