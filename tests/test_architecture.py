"""The layout the README's Architecture section describes: stages import only what comes before
them, the workflows sit on top, and the repository stands alone."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wsi_damm"


def _import_nodes(path: Path):
    """(absolute module, imported names) of every `wsi_damm` import statement in a file: at module level, in
    functions and under `TYPE_CHECKING` alike (an import cycle hidden from the interpreter is still one)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("wsi_damm"):
                    yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("wsi_damm"):
                if node.module:
                    yield base, [a.name for a in node.names]
                else:
                    for a in node.names:
                        yield f"{base}.{a.name}", []


def _imports(path: Path) -> set[str]:
    """Absolute names of the wsi_damm modules a file imports."""
    return {name for name, _ in _import_nodes(path)}


def _modules() -> dict[str, set[str]]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_stage_imports_a_workflow_or_train():
    for name, imports in _modules().items():
        if (
            name.startswith(("wsi_damm.workflows", "wsi_damm.api")) or name == "wsi_damm.__init__"
        ):  # the top: the Python API (exported by the package), like the CLI, sits on everything
            continue
        assert not any(i.startswith("wsi_damm.api") for i in imports), f"{name} imports the API layer"
        assert not any(i.startswith("wsi_damm.workflows") for i in imports), name
        assert "wsi_damm.stages.train" not in imports, f"{name} imports the train stage (read a run through wsi_damm.training.run_dir)"


def test_report_only_draws_and_baseline_does_not_reach_into_evaluate():
    mods = _modules()
    assert "wsi_damm.stages.evaluate" not in mods["wsi_damm.evaluation.report"]
    assert "wsi_damm.stages.evaluate" not in mods["wsi_damm.workflows.baseline"]
    assert not any(i.startswith("wsi_damm.") and i != "wsi_damm.util.errors" for i in mods["wsi_damm.diffusion.damm"])


def test_the_repository_stands_alone():
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "cli").rglob("*.py")):
        text = path.read_text()
        assert "DESIGN.md" not in text and "../shared" not in text, path


def _module_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (a name imported from a package resolves to its module)."""
    mods = {k.removesuffix(".__init__"): v for k, v in _modules().items()}

    def resolve(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    return {m: {resolve(i) for i in imports} - {m, "wsi_damm"} for m, imports in mods.items() if m != "wsi_damm"}


def _find_cycle(graph: dict[str, set[str]]) -> None:
    """Raise naming the first cycle of a directed graph, if it has one."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " → ".join(path[path.index(n) :] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_import_cycles_counting_every_import_statement():
    _find_cycle(_module_graph())


def _package(module: str) -> str:
    """The package folder (or top-level module) of `wsi_damm` a module sits in."""
    return ".".join(module.split(".")[:2])


def test_the_package_folders_form_layers():
    """Folders, not only modules, import one way (the order the architecture page draws from the code)."""
    packages: dict[str, set[str]] = {}
    for m, imports in _module_graph().items():
        packages.setdefault(_package(m), set()).update(_package(i) for i in imports if _package(i) != _package(m))
    _find_cycle(packages)


def test_the_top_level_shows_the_flow():
    """At most about ten folders at the top of the package, beside its `__init__`, version and API."""
    entries = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith((".", "__pycache__")))
    assert [e for e in entries if not (PACKAGE / e).is_dir()] == ["__init__.py", "_version.py"], entries
    assert len(entries) <= 14, entries


def test_every_module_holds_at_most_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_module_imports_another_modules_private_names():
    for path in PACKAGE.rglob("*.py"):
        for base, names in _import_nodes(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{path.relative_to(ROOT)} imports {private} from {base}"
