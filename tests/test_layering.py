"""The layering rule of DESIGN.md, checked on the source (AST): `core` ← `models`, `data` ← `actors` ←
`pipelines`, `serve_apps` ← `cli`, never reversed; `core` imports no Ray, web framework or vLLM."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trustray"
# Framework-free modules at the package's top level that every layer may use.
SHARED = {"trustray", "trustray.config", "trustray.artifacts", "trustray.runtime"}
LAYERS = {
    "core": {"trustray.core"},
    "models": {"trustray.core", "trustray.models"},
    "data": {"trustray.core", "trustray.data"},
    "actors": {"trustray.core", "trustray.models", "trustray.data", "trustray.actors"},
    "pipelines": {"trustray.core", "trustray.models", "trustray.data", "trustray.actors", "trustray.pipelines"},
    "serve_apps": {"trustray.core", "trustray.models", "trustray.data", "trustray.actors", "trustray.serve_apps"},
}
CORE_FORBIDDEN = ("ray", "fastapi", "starlette", "vllm", "uvicorn")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module an import statement in `path` names (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def layer_violations(layer: str) -> list[str]:
    allowed = LAYERS[layer] | SHARED
    violations = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, module in imported_modules(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
            top = module.split(".")[0]
            if top == "trustray":
                owner = ".".join(module.split(".")[:2])
                if owner not in allowed:
                    violations.append(where)
            elif layer == "core" and top in CORE_FORBIDDEN:
                violations.append(where)
    return violations


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_layer_imports_a_layer_above_it(layer):
    assert layer_violations(layer) == []


def test_the_checker_sees_function_level_imports(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("def f():\n    import ray\n    from trustray.pipelines import gather\n")
    assert imported_modules(source) == [(2, "ray"), (3, "trustray.pipelines")]
