"""Fixtures shared by the test folders: models made by the real libraries they come from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def nnunet_model(tmp_path_factory) -> Path:
    """An nnU-Net v2 model folder (folds 0 and 1) made by nnunetv2's planner, preprocessor and trainer.

    Made in a child process: nnU-Net reads its folders from environment variables when imported.
    """
    root = tmp_path_factory.mktemp("nnunet")
    script = Path(__file__).with_name("nnunet_fixture.py")
    done = subprocess.run([sys.executable, str(script), str(root), "0", "1"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"nnU-Net fixture failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return root / "nnUNet_results" / "Dataset001_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
