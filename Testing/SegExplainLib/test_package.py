"""The engine stays a plain Python package: importing any of its modules pulls in no Slicer, VTK, Qt or trame."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import SegExplainLib


def test_no_module_of_the_engine_imports_slicer_vtk_qt_or_trame():
    modules = sorted(m.name for m in pkgutil.walk_packages(SegExplainLib.__path__, "SegExplainLib.")
                     if m.name != "SegExplainLib.__main__")  # __main__ runs the command line
    assert "SegExplainLib.frontends.cli" in modules and "SegExplainLib.engine.api" in modules
    code = (f"import importlib, json, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('slicer', 'vtk', 'vtkmodules', 'qt', 'ctk', 'PythonQt', 'trame', 'SegExplainMRML', 'SegExplainReview'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_every_package_folder_is_installed():
    """A non-editable install copies only the packages pyproject.toml lists: each folder of the layout must be there."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(folder.relative_to(root).parts) for folder in (root / "SegExplainLib").rglob("*")
             if (folder / "__init__.py").is_file()} | {"SegExplainLib", "SegExplainMRML", "SegExplainReview"}
    assert listed == found
