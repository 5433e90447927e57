"""Adversarial names for model files: dotted paths from allowed roots to callables outside an allow-list.

An attacker who may write names into ``plans.json`` or a bundle's configuration looks for a path that starts at a
package the loader trusts and walks attributes to something that runs code (``torch.nn.functional.torch.hub.os.
system``). :func:`callable_paths` walks the attribute graph breadth first from each root, a few levels deep, and
returns such paths, so that every one of them can be written into every name-taking field of a model file.
"""

from __future__ import annotations

import builtins
import importlib
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

#: The packages a model file's names start from.
ROOTS = ("torch", "torch.nn", "monai", "numpy", "dynamic_network_architectures")
#: Callables that run commands, code or touch files: every path reaching one is kept, beside the even sample.
DANGEROUS = (os.system, os.popen, os.remove, os.execv, subprocess.Popen, subprocess.run, subprocess.call,
             subprocess.check_output, builtins.exec, builtins.eval, builtins.open, builtins.__import__,
             importlib.import_module, pickle.loads, shutil.rmtree)


def _public(obj: Any) -> Iterable[tuple[str, Any]]:
    try:
        names = sorted(vars(obj)) if isinstance(obj, (ModuleType, type)) else []
    except TypeError:
        return
    for name in names:
        if name.startswith("_"):
            continue
        try:
            yield name, getattr(obj, name)
        except Exception:  # noqa: BLE001 - lazy attributes may fail to import; an attacker cannot use them either
            continue


def callable_paths(roots: Iterable[str] = ROOTS, *, depth: int = 3, allowed: Callable[[Any], bool],
                   per_root: int = 400) -> list[str]:
    """Dotted paths of up to ``depth`` attributes from each root that reach a callable ``allowed`` refuses.

    Every root's search is breadth first over public attributes of modules and classes, so the shortest path to
    each object is found first; each object is reported once per root. Every path to one of :data:`DANGEROUS`
    (``torch.hub.os.system``) is kept, and besides those at most ``per_root`` paths per root, taken evenly over the
    depths.
    """
    dangerous = {id(f) for f in DANGEROUS}
    paths: list[str] = []
    for root_name in roots:
        try:
            root = importlib.import_module(root_name)
        except ImportError:
            continue
        seen, frontier, found = {id(root)}, [(root_name, root)], {level: [] for level in range(1, depth + 1)}
        for level in range(1, depth + 1):
            following = []
            for path, obj in frontier:
                for name, value in _public(obj):
                    if id(value) in seen and id(value) not in dangerous:
                        continue
                    seen.add(id(value))
                    dotted = f"{path}.{name}"
                    if isinstance(value, (ModuleType, type)):
                        following.append((dotted, value))
                    if callable(value) and not allowed(value):
                        (paths if id(value) in dangerous else found[level]).append(dotted)
            frontier = following
        share = max(1, per_root // depth)
        for level in range(1, depth + 1):
            chosen = found[level]
            step = max(1, len(chosen) // share)
            paths.extend(chosen[::step][:share])
    return sorted(set(paths))


def reaches(path: str, target: Callable) -> bool:
    """Whether walking ``path`` attribute by attribute from its first module reaches ``target``."""
    first, *rest = path.split(".")
    obj: Any = importlib.import_module(first)
    for name in rest:
        obj = getattr(obj, name, None)
    return obj is target
