"""The model registry: numbered versions, an atomic `latest`, and NAME@version resolution."""

from __future__ import annotations

import pytest

from contract import registry
from contract.errors import UserError


def export(tmp_path, tag: str):
    folder = tmp_path / f"export-{tag}"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tag").write_text(tag)
    return folder


def test_each_registration_is_a_new_version_and_becomes_latest(tmp_path):
    root = tmp_path / "registry"
    assert registry.register(export(tmp_path, "a"), "dolly", root) == 1
    assert registry.register(export(tmp_path, "b"), "dolly", root) == 2
    folder, name = registry.resolve("dolly@latest", root)
    assert (folder / "tag").read_text() == "b" and name == "dolly@2"
    assert (registry.resolve("dolly@1", root)[0] / "tag").read_text() == "a"


def test_a_candidate_can_be_registered_without_promotion_then_promoted(tmp_path):
    root = tmp_path / "registry"
    registry.register(export(tmp_path, "a"), "dolly", root)
    registry.register(export(tmp_path, "b"), "dolly", root, promote=False)
    assert registry.latest("dolly", root) == 1
    registry.set_latest("dolly", 2, root)
    assert registry.latest("dolly", root) == 2


def test_unknown_names_and_versions_say_what_exists(tmp_path):
    root = tmp_path / "registry"
    registry.register(export(tmp_path, "a"), "dolly", root)
    with pytest.raises(UserError, match=r"versions of 'dolly': \[1\]"):
        registry.resolve("dolly@7", root)
    with pytest.raises(UserError, match="no versions"):
        registry.resolve("other@latest", root)
    with pytest.raises(UserError, match="neither a folder nor NAME@VERSION"):
        registry.resolve("not-a-folder", root)


def test_a_plain_folder_resolves_to_itself(tmp_path):
    folder = export(tmp_path, "a")
    assert registry.resolve(str(folder), tmp_path / "registry") == (folder, folder.name)


@pytest.mark.timeout(60)
def test_registrations_at_the_same_moment_each_get_their_own_complete_version(tmp_path):
    """Two retraining jobs may finish together on one shared volume: neither may take the other's
    version number or overwrite its files."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    root, exports = tmp_path / "registry", [export(tmp_path, str(i)) for i in range(8)]
    for folder in exports:  # enough to copy that the registrations overlap
        (folder / "weights.bin").write_bytes(bytes(2_000_000))
    start = Barrier(len(exports))

    def register(folder):
        start.wait()
        return registry.register(folder, "dolly", root, promote=False)

    with ThreadPoolExecutor(len(exports)) as pool:
        given = list(pool.map(register, exports))
    assert sorted(given) == list(range(1, len(exports) + 1))
    for folder, version in zip(exports, given):
        assert (registry.resolve(f"dolly@{version}", root)[0] / "tag").read_text() == (folder / "tag").read_text()
    assert registry.versions("dolly", root) == sorted(given) and not list((root / "dolly").glob(".*"))


def test_a_registered_version_is_readable_by_other_users_of_the_volume(tmp_path):
    root = tmp_path / "registry"
    version = registry.register(export(tmp_path, "a"), "dolly", root)
    assert (root / "dolly" / str(version)).stat().st_mode & 0o005 == 0o005
    assert (root / "dolly" / registry.LATEST).stat().st_mode & 0o004
