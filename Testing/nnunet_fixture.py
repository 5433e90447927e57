"""Make a real nnU-Net v2 results folder: a tiny synthetic dataset, nnunetv2's own planner, preprocessor and trainer.

Run as a script (nnU-Net reads its folders from environment variables when it is imported, and its planner starts
worker processes that import the main module):

    python nnunet_fixture.py ROOT [FOLD ...]

writes ``ROOT/nnUNet_raw``, ``ROOT/nnUNet_preprocessed`` and ``ROOT/nnUNet_results/Dataset001_Tiny/
nnUNetTrainer__nnUNetPlans__3d_fullres/fold_N`` after two training iterations per fold, on the CPU.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

SPACING_XYZ = (0.8, 0.8, 2.0)  # anisotropic, as most MRI
SHAPE_DHW = (16, 28, 24)
CHANNELS = {"0": "T2", "1": "ADC"}


def write_dataset(raw: Path, cases: int = 6) -> None:
    """Six cases of two sequences: a bright/dark box lesion on noise, inside a zero border that nnU-Net crops."""
    import numpy as np
    import SimpleITK as sitk

    folder = raw / "Dataset001_Tiny"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for case in range(cases):
        label = np.zeros(SHAPE_DHW, np.uint8)
        d, h, w = rng.integers(5, 11), rng.integers(8, 20), rng.integers(8, 16)
        label[d - 2:d + 2, h - 3:h + 3, w - 3:w + 3] = 1
        body = np.zeros(SHAPE_DHW, bool)
        body[1:-1, 2:-2, 2:-2] = True
        for channel, contrast in ((0, 60.0), (1, -40.0)):
            values = (rng.normal(200.0, 15.0, SHAPE_DHW) + contrast * label) * body
            image = sitk.GetImageFromArray(values.astype(np.float32))
            image.SetSpacing(SPACING_XYZ)
            sitk.WriteImage(image, str(folder / "imagesTr" / f"case{case:03d}_{channel:04d}.nii.gz"))
        image = sitk.GetImageFromArray(label)
        image.SetSpacing(SPACING_XYZ)
        sitk.WriteImage(image, str(folder / "labelsTr" / f"case{case:03d}.nii.gz"))
    dataset = {"channel_names": CHANNELS, "labels": {"background": 0, "lesion": 1}, "numTraining": cases,
               "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset))


def main(root: Path, folds: list[int]) -> None:
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(root / name)
        (root / name).mkdir(parents=True, exist_ok=True)
    os.environ["nnUNet_compile"] = "false"
    write_dataset(root / "nnUNet_raw")

    import numpy as np
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.run.run_training import get_trainer_from_args

    # the trainer's cropping and augmentation draw from numpy's and Python's generators: seeded with torch's, the
    # folds' weights are the same in every run (a test bounds a sum-rule delta that depends on them)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    extract_fingerprints([1], num_processes=1, check_dataset_integrity=True, verbose=False)
    plan_experiments([1])
    preprocess([1], configurations=("3d_fullres",), num_processes=(1,), verbose=False)
    os.environ["nnUNet_n_proc_DA"] = "0"  # training's augmentation in this process (the planner needs it unset)
    for fold in folds:
        trainer = get_trainer_from_args("1", "3d_fullres", fold, "nnUNetTrainer", "nnUNetPlans",
                                        device=torch.device("cpu"))
        trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 2, 1
        trainer.run_training()  # writes plans.json, dataset.json and checkpoint_final.pth


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(fold) for fold in sys.argv[2:]] or [0])
