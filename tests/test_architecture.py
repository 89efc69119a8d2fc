"""The import graph of finextract_jax follows docs/architecture.md: no circles (deferred imports
included) and no import from a lower layer to a higher one; no module grows past ~500 lines."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "finextract_jax"

# docs/architecture.md's table: a module may import its own layer or lower ones.
LAYERS = {
    "errors": 0, "fileio": 0, "imageio": 0, "grids": 0, "logs": 0, "noise_schedule": 0, "guidance": 0,
    "options": 0,
    "models": 1,
    "sampling": 2, "features": 2, "cluster": 2, "metrics": 2, "finetune": 2,
    "caption": 3, "caption_scoring": 3, "guidance_fit": 3, "stages": 3,
    "reproduce": 4, "demo": 4, "testbed": 4, "audit": 4,
}
MAX_LINES = 500


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, name: str, known) -> set:
    """Every finextract_jax module `path` imports, at the top or inside functions."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("finextract_jax"):
                found.add(target)
    return found


def _layer(module: str):
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    unplaced = sorted(m for m in graph if m != "finextract_jax" and _layer(m) is None)
    assert not unplaced, f"add these to docs/architecture.md and LAYERS: {unplaced}"


def test_no_import_goes_up_a_layer(graph):
    upward = [f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
              for src, targets in graph.items() for dst in targets
              if _layer(src) is not None and _layer(dst) is not None and _layer(dst) > _layer(src)]
    assert not upward, "\n".join(upward)


def test_no_import_circle(graph):
    # A package's __init__ re-exporting its submodules is not a circle of concerns: drop the
    # edges from a package to its own submodules before looking for cycles.
    edges = {src: {dst for dst in targets if not dst.startswith(src + ".")} for src, targets in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_no_module_is_too_long():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these (> {MAX_LINES} lines): {long}"


def test_the_checker_sees_deferred_and_relative_imports(tmp_path):
    """Guard against a checker that passes because it sees nothing."""
    pkg = tmp_path / "finextract_jax"
    (pkg / "sampling").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "caption.py").write_text("")
    (pkg / "sampling" / "__init__.py").write_text("from . import run\n")
    (pkg / "sampling" / "run.py").write_text("def f():\n    from finextract_jax.caption import x\n")
    known = {"finextract_jax", "finextract_jax.caption", "finextract_jax.sampling", "finextract_jax.sampling.run"}
    assert _imports(pkg / "sampling" / "run.py", "finextract_jax.sampling.run", known) == {"finextract_jax.caption"}
    assert _imports(pkg / "sampling" / "__init__.py", "finextract_jax.sampling", known) == {"finextract_jax.sampling.run"}


def test_every_doc_reference_resolves():
    """Code, README and docs cite files inside the repository (docs/method.md §N: a heading exists)."""
    import re

    root = PACKAGE.parent
    sources = [*root.glob("finextract_jax/**/*.py"), *root.glob("experiments/*.py"), *root.glob("benchmarks/*"),
               *root.glob("docs/*.md"), root / "README.md"]
    cited = set()
    for path in sources:
        if path.is_file():
            cited |= set(re.findall(r"(docs/[\w./-]+\.(?:md|png))(?: §(\d+))?", path.read_text(errors="ignore")))
    assert cited
    headings = (root / "docs" / "method.md").read_text()
    missing = [f"{doc} §{section}" if section else doc for doc, section in sorted(cited)
               if not (root / doc).is_file() or (section and f"## §{section} " not in headings)]
    assert not missing, f"cited but not in the repository: {missing}"
    for name in ("METHOD.md", "INTERFACE.md"):  # the old citations of files that never existed
        assert not [p for p in sources if p.is_file() and name in p.read_text(errors="ignore")], name
