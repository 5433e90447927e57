"""The code's shape: layers that import only downwards, no import circles, no private names taken across modules.

The imports are read from the source (``ast``), every one of them: at module level, inside functions (lazy imports)
and under ``TYPE_CHECKING``, so a circle cannot hide in a function body. See docs/architecture.md for the layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The project's packages and module files: top-level name -> source path.
SOURCES = {"SegExplainLib": ROOT / "SegExplainLib", "SegExplainMRML": ROOT / "SegExplain" / "SegExplainMRML",
           "SegExplainReview": ROOT / "SegExplainReview", "SegExplain": ROOT / "SegExplain" / "SegExplain.py"}
#: The layers from the bottom up, each with the module prefixes it holds (an entry ending in '.' holds a package's
#: modules, any other entry is one module). A module may import its own layer and the layers below.
LAYERS = (
    ("shared", ("SegExplainLib.errors", "SegExplainLib.version")),
    ("engine", ("SegExplainLib.engine", "SegExplainLib.engine.")),
    ("models", ("SegExplainLib.models", "SegExplainLib.models.")),
    ("io", ("SegExplainLib.io", "SegExplainLib.io.")),
    ("application", ("SegExplainLib.application", "SegExplainLib.application.")),
    ("public face", ("SegExplainLib",)),  # `import SegExplainLib as sx`: what users and the front ends may import
    ("front ends", ("SegExplainLib.frontends", "SegExplainLib.frontends.", "SegExplainLib.__main__",
                    "SegExplainMRML", "SegExplainMRML.", "SegExplainReview", "SegExplainReview.", "SegExplain")),
)
#: Imports refused whatever the layers say: the library never reaches the Slicer module's logic or the review app,
#: and the module's logic (which runs inside Slicer) never reaches the web app.
FORBIDDEN = (("SegExplainLib", "SegExplainMRML"), ("SegExplainLib", "SegExplainReview"),
             ("SegExplainMRML", "SegExplainReview"))
#: The one door through FORBIDDEN: ``segexplain review`` imports the app when it runs (inside a function), so the
#: library imports without it and its extra.
LAZY_ENTRANCES = {("SegExplainLib.frontends.cli", "SegExplainReview.app")}


@dataclass(frozen=True)
class Import:
    """One import of a project module by another: where it is written and what it takes."""

    importer: str
    imported: str
    line: int
    names: tuple[str, ...] = ()  # the names taken by `from imported import ...` (not modules)
    lazy: bool = False  # written inside a function: runs when the function does


def modules_of(sources: Mapping[str, Path]) -> dict[str, Path]:
    """Every module of the sources: dotted name -> file (a package is its ``__init__.py``)."""
    found = {}
    for top, path in sources.items():
        if path.is_file():
            found[top] = path
            continue
        for file in sorted(path.rglob("*.py")):
            parts = file.relative_to(path).with_suffix("").parts
            found[".".join((top, *parts[:-1], *(() if parts[-1] == "__init__" else parts[-1:])))] = file
    return found


def _package_of(module: str, file: Path) -> str:
    return module if file.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(modules: Mapping[str, Path]) -> Iterator[Import]:
    """The imports of project modules written in every module's source."""
    for module, file in modules.items():
        tree = ast.parse(file.read_text(), str(file))
        lazy = {id(inner) for outer in ast.walk(tree) if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef))
                for inner in ast.walk(outer)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _known_prefix(alias.name, modules)
                    if target and target != module:
                        yield Import(module, target, node.lineno, lazy=id(node) in lazy)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = _package_of(module, file).split(".")
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                if _known_prefix(base, modules) is None:
                    continue
                names = []
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:  # `from package import module`
                        if f"{base}.{alias.name}" != module:
                            yield Import(module, f"{base}.{alias.name}", node.lineno, lazy=id(node) in lazy)
                    else:
                        names.append(alias.name)
                if names and base in modules and base != module:
                    yield Import(module, base, node.lineno, tuple(names), lazy=id(node) in lazy)


def _known_prefix(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest project module that ``name`` is or lies in, or None for another library."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of a module's layer."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module.startswith(prefix) if prefix.endswith(".") else module == prefix
            if matches and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"module {module} lies in no layer of LAYERS: add it")
    return best[0]


def upward_imports(imports: list[Import]) -> list[str]:
    """Imports that run up a layer, or that :data:`FORBIDDEN` refuses."""
    found = []
    for item in imports:
        low, high = layer_of(item.importer), layer_of(item.imported)
        where = f"{item.importer}:{item.line} imports {item.imported}"
        if high > low:
            found.append(f"{where} ({LAYERS[low][0]} -> {LAYERS[high][0]})")
        elif any(item.importer.split(".")[0] == a and item.imported.split(".")[0] == b for a, b in FORBIDDEN) and not (
                item.lazy and (item.importer, item.imported) in LAZY_ENTRANCES):
            found.append(f"{where} (forbidden)")
    return found


def circles(imports: list[Import]) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for item in imports:
        graph.setdefault(item.importer, set()).add(item.imported)
        graph.setdefault(item.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:  # recursion depth is bounded by the number of modules (a few hundred)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def private_names_taken(modules: Mapping[str, Path], imports: list[Import]) -> list[str]:
    """Private names (``_name``, not ``__dunder__``) one module takes from another: imported by name, or read as an
    attribute of an imported project module (``worker._model_parser()``)."""
    found = [f"{item.importer}:{item.line} imports {item.imported}.{name}"
             for item in imports for name in item.names if _private(name)]
    for module, file in modules.items():
        tree = ast.parse(file.read_text(), str(file))
        aliases = {}  # local name -> project module, for `import a.b as m` and `from a import module`
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in modules:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                for item in imports:
                    if item.importer == module and item.line == node.lineno and not item.names:
                        local = [a.asname or a.name for a in node.names if item.imported.endswith("." + a.name)]
                        aliases.update({name: item.imported for name in local})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and _private(node.attr) and aliases[node.value.id] != module):
                found.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@pytest.fixture(scope="module")
def project():
    modules = modules_of(SOURCES)
    return modules, list(imports_of(modules))


def test_every_module_lies_in_a_layer(project):
    modules, _ = project
    assert {module.split(".")[0] for module in modules} == set(SOURCES)
    for module in modules:
        layer_of(module)  # raises for a module no layer holds


def test_no_import_runs_up_a_layer(project):
    _, imports = project
    assert upward_imports(imports) == []


def test_no_import_circles(project):
    _, imports = project
    assert circles(imports) == []


def test_no_module_takes_another_modules_private_names(project):
    modules, imports = project
    assert private_names_taken(modules, imports) == []


def test_lazy_imports_are_read_too(project):
    """The reading sees an import inside a function body: the worker starts its child lazily."""
    _, imports = project
    assert any(item.importer == "SegExplainLib.engine.composites" for item in imports)
    assert len(imports) > 100


def _planted(tmp_path: Path) -> dict[str, Path]:
    """A small SegExplainLib with one import circle, one upward import and one private name taken."""
    files = {
        "__init__.py": "from .engine.api import explain\n",
        "errors.py": "",
        "engine/__init__.py": "",
        "engine/api.py": "from .rules import rule\ndef explain():\n    from ..models.cards import card  # upward\n",
        "engine/rules.py": "def rule():\n    from .api import explain  # circle, lazily\n",
        "models/__init__.py": "",
        "engine/kernels.py": "def _forward():\n    pass\n",
        "models/cards.py": "from ..engine import kernels\ncard = kernels._forward\n",
        "models/nnunet.py": "from .cards import _read\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return modules_of({"SegExplainLib": tmp_path})


def test_the_checks_find_what_was_planted(tmp_path):
    """Positive control: a planted circle, upward import and private names are each reported, nothing else."""
    modules = _planted(tmp_path)
    imports = list(imports_of(modules))
    assert upward_imports(imports) == [
        "SegExplainLib.engine.api:3 imports SegExplainLib.models.cards (engine -> models)"]
    assert circles(imports) == [["SegExplainLib.engine.api", "SegExplainLib.engine.rules"]]
    assert private_names_taken(modules, imports) == ["SegExplainLib.models.cards:2 uses SegExplainLib.engine.kernels._forward",
                                                     "SegExplainLib.models.nnunet:1 imports SegExplainLib.models.cards._read"]


def test_the_library_may_not_reach_the_front_end_packages():
    """Only the review command's lazy import reaches the review app; the module's logic never does."""
    imports = [Import("SegExplainLib.frontends.cli", "SegExplainReview.app", 1),
               Import("SegExplainLib.frontends.cli", "SegExplainReview.app", 2, lazy=True),
               Import("SegExplainLib.frontends.cli", "SegExplainReview.session", 3, lazy=True),
               Import("SegExplainLib.application.case_run", "SegExplainMRML.job", 4, lazy=True),
               Import("SegExplainMRML.job", "SegExplainReview.session", 5, lazy=True),
               Import("SegExplainReview.app", "SegExplainMRML.job", 6)]
    assert upward_imports(imports) == [
        "SegExplainLib.frontends.cli:1 imports SegExplainReview.app (forbidden)",
        "SegExplainLib.frontends.cli:3 imports SegExplainReview.session (forbidden)",
        "SegExplainLib.application.case_run:4 imports SegExplainMRML.job (application -> front ends)",
        "SegExplainMRML.job:5 imports SegExplainReview.session (forbidden)"]


def test_the_review_command_is_the_one_lazy_entrance(project):
    _, imports = project
    entrances = {(item.importer, item.imported) for item in imports if item.imported.startswith("SegExplainReview")
                 and item.importer.startswith("SegExplainLib")}
    assert entrances == LAZY_ENTRANCES
