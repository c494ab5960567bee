"""Layering: cli -> stages / server -> core, data, evals. core, data and evals never import a stage, the server
or the CLI, not even lazily inside a function (every import statement in the file is checked)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "chatforge"
UPPER = ("chatforge.stages", "chatforge.server", "chatforge.cli", "chatforge.bench")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize("layer", ["core", "data", "evals"])
def test_lower_layers_import_no_stage_server_or_cli(layer):
    bad = [f"{p.relative_to(PKG.parent)}:{line}: {name}" for p in sorted((PKG / layer).rglob("*.py"))
           for line, name in _imports(p) if name.startswith(UPPER)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from chatforge.stages.sample import load_prompts\n    import chatforge.server.app\n")
    assert [n for _, n in _imports(f) if n.startswith(UPPER)] == [
        "chatforge.stages.sample", "chatforge.stages.sample.load_prompts", "chatforge.server.app"]
