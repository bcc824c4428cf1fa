"""The shape of the code: imports flow one way, from the command line down to the contract.

A folder may import itself and the folders in the layers below it, never one above it or a peer
in its own layer (README, "Architecture"). Read from the source with `ast`, so the check costs
no imports and sees imports inside functions too.
"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

# Top to bottom; folders in one layer are peers and do not import each other.
LAYERS = [
    ("cli", "bench"),
    ("loop",),
    ("cluster",),
    ("pipelines", "services", "ui"),
    ("contract",),
]
LAYER_OF = {folder: depth for depth, folders in enumerate(LAYERS) for folder in folders}


def allowed(importer: str, imported: str) -> bool:
    return importer == imported or LAYER_OF[imported] > LAYER_OF[importer]


def first_party_imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] in LAYER_OF]


def modules() -> list:
    return sorted(p for folder in LAYER_OF for p in (REPO / folder).rglob("*.py"))


def test_every_top_level_package_has_a_layer():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(LAYER_OF), f"give {sorted(packages - set(LAYER_OF))} a layer in LAYERS and the README"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_only_go_down_the_layers(path):
    importer = path.relative_to(REPO).parts[0]
    wrong = [
        f"line {line}: {name}"
        for line, name in first_party_imports(ast.parse(path.read_text()))
        if not allowed(importer, name.split(".")[0])
    ]
    assert not wrong, f"{path.relative_to(REPO)} ({importer}) imports against the layers: {', '.join(wrong)}"


def test_the_check_refuses_an_upward_or_sideways_import():
    tree = ast.parse("from services.config import ServeConfig\nimport cli.configs\nfrom contract import prompt\n")
    verdicts = {name: allowed("pipelines", name.split(".")[0]) for _, name in first_party_imports(tree)}
    assert verdicts == {"services.config": False, "cli.configs": False, "contract": True}
