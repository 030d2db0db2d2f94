"""MkDocs hook: the architecture page ends with the package's import graph, read from the code at build time
(every `wsi_damm` import statement, as `tests/test_architecture.py` reads them), so the picture cannot drift."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "wsi_damm"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (names imported from a package resolve to its modules)."""
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in paths and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                if base.startswith("wsi_damm"):
                    found |= {resolve(f"{base}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {resolve(a.name) for a in node.names if a.name.startswith("wsi_damm")}
        graph[module] = found - {module, "wsi_damm"}
    return graph


def _short(module: str) -> str:
    return module.removeprefix("wsi_damm.")


def layers() -> str:
    """The folders in import order: each imports only from those above it (a topological order of the folder graph)."""
    graph = import_graph()
    folder = lambda m: m.split(".")[1] if "." in m else m  # noqa: E731
    deps: dict[str, set[str]] = {}
    for m, imports in graph.items():
        if m == "wsi_damm":
            continue
        deps.setdefault(folder(m), set()).update(folder(i) for i in imports if folder(i) != folder(m))
    order: list[str] = []
    while len(order) < len(deps):
        ready = sorted(f for f in deps if f not in order and deps[f] <= set(order))
        if not ready:
            raise ValueError(f"the folders import in a cycle: {sorted(set(deps) - set(order))}")
        order += ready
    rows = [f"| `{f}` | {', '.join(f'`{d}`' for d in sorted(deps[f])) or '—'} |" for f in order]
    return "\n".join(["| folder (in import order) | imports from |", "|---|---|", *rows])


def table() -> str:
    graph = import_graph()
    rows = [f"| `{_short(m)}` | {', '.join(f'`{_short(i)}`' for i in sorted(graph[m])) or '—'} |" for m in sorted(graph) if m != "wsi_damm"]
    return "\n".join(["| module | imports (within the package) |", "|---|---|", *rows])


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "design/architecture.md":
        return markdown
    return (
        markdown
        + "\n\n## Import graph\n\nRead from the code when this site was built (every import statement, including those "
        + "inside functions and under `TYPE_CHECKING`); `tests/test_architecture.py` checks that it has no cycle.\n\n"
        + "### Folders\n\n"
        + layers()
        + "\n\n### Modules\n\n"
        + table()
        + "\n"
    )
