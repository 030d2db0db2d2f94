"""The layout the README's Architecture section describes: stages import only what comes before
them, the workflows sit on top, and the repository stands alone."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wsi_damm"


def _imports(path: Path) -> set[str]:
    """Absolute names of the wsi_damm modules a file imports at run time (not under TYPE_CHECKING)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom | ast.Import):
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("wsi_damm")}
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        if base.startswith("wsi_damm"):
            out |= {f"{base}.{a.name}" if not node.module else base for a in node.names}
    return out


def _modules() -> dict[str, set[str]]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_stage_imports_a_workflow_or_train():
    for name, imports in _modules().items():
        if name.startswith("wsi_damm.workflows") or name in ("wsi_damm.api", "wsi_damm.__init__"):  # the top: the Python API (exported by the package), like the CLI, sits on everything
            continue
        assert "wsi_damm.api" not in imports, f"{name} imports the API layer"
        assert not any(i.startswith("wsi_damm.workflows") for i in imports), name
        assert "wsi_damm.stages.train" not in imports, f"{name} imports the train stage (read a run through wsi_damm.run_dir)"


def test_report_only_draws_and_baseline_does_not_reach_into_evaluate():
    mods = _modules()
    assert "wsi_damm.stages.evaluate" not in mods["wsi_damm.report"]
    assert "wsi_damm.stages.evaluate" not in mods["wsi_damm.workflows.baseline"]
    assert not any(i.startswith("wsi_damm.") and i.split(".")[1] not in ("errors",) for i in mods["wsi_damm.diffusion.damm"])


def test_the_repository_stands_alone():
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "cli").rglob("*.py")):
        text = path.read_text()
        assert "DESIGN.md" not in text and "../shared" not in text, path
