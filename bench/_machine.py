"""What the bench scripts print of the machine they ran on."""

from __future__ import annotations

import json
import platform
from typing import Any


def cpu_model() -> str:
    """The CPU's model name, e.g. ``AMD EPYC``."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(info: dict[str, Any], results: dict[str, Any], json_path: str | None) -> None:
    """Print the machine line; with ``json_path``, also write ``{"info": info, **results}`` there."""
    print(f"machine: {info}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"info": info, **results}, handle, indent=2, default=float)
