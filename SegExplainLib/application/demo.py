"""The bundled demo: synthetic multi-sequence MRI cases and a small U-Net trained on them.

The demo needs no data download. :func:`make_case` draws a reproducible, MRI-like volume with six "sequences" (named
after the liver LRP study) and one or two lesion-like blobs whose contrast differs per sequence: bright on T2 and
on the late contrast phases, dark on T1, nearly invisible on the arterial phase. A network trained on such cases
should therefore draw its relevance mostly from the sequences where the lesion shows, which makes the
per-sequence relevance shares of an explanation meaningful.

The shipped model (``Resources/demo/``) was made with ``python -m SegExplainLib.application.demo train``; it is a
``UNet3D(in_channels=6, out_channels=2, base_channels=8, depth=3, norm="instance", activation="leaky_relu")``
trained on z-score normalized inputs, and its card records the held-out Dice.

Example:
    >>> from SegExplainLib.application import demo
    >>> from SegExplainLib.models.demo_card import demo_card_path
    >>> image, label = demo.make_case(1000)             # (6, 24, 48, 48) float32, (24, 48, 48) uint8
    >>> files, label_path = demo.write_demo_case("case/")  # NIfTI files for segexplain explain --card ...
    >>> card = ModelCard.read(demo_card_path())
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..models.demo_card import DEMO_CARD_NAME, DEMO_RESOURCES, DEMO_WEIGHTS_NAME, demo_card_path

if TYPE_CHECKING:
    from ..io.imaging import Geometry

__all__ = [
    "CLASS_NAMES",
    "HELD_OUT_SEEDS",
    "MODEL_KWARGS",
    "SEQUENCE_NAMES",
    "SPACING",
    "demo_geometry",
    "dice",
    "make_case",
    "run_demo",
    "train",
    "write_demo_case",
]

#: The six sequences of the liver LRP study: T2 and a dynamic contrast-enhanced T1 series.
SEQUENCE_NAMES = ["T2", "T1", "T1-20s", "T1-60s", "T1-120s", "T1-15min"]
#: Output classes of the demo network.
CLASS_NAMES = ["background", "lesion"]
#: Voxel spacing (x, y, z) in mm of the written demo cases: 2 mm slices.
SPACING = (1.0, 1.0, 2.0)
#: Case seeds never used for training; the held-out Dice is measured on them.
HELD_OUT_SEEDS = tuple(range(1000, 1010))
#: Architecture of the demo network (the nnU-Net-like layout: instance norm, leaky ReLU).
MODEL_KWARGS: dict[str, Any] = {
    "in_channels": 6, "out_channels": 2, "base_channels": 8, "depth": 3, "norm": "instance",
    "activation": "leaky_relu",
}

# Per sequence: tissue intensity, tissue texture amplitude, lesion contrast (added to tissue), fat/vessel contrast.
# The lesion is bright on T2 and on the late phases, dark on native T1 and almost invisible in the arterial phase.
_TISSUE = np.array([0.55, 0.70, 0.75, 0.80, 0.78, 0.72])
_TEXTURE = np.array([0.10, 0.08, 0.10, 0.08, 0.08, 0.08])
_LESION = np.array([0.55, -0.30, 0.04, 0.30, 0.40, 0.50])
_VESSEL = np.array([-0.20, 0.10, 0.60, 0.40, 0.20, 0.05])
_NOISE = 0.04



# --------------------------------------------------------------------------------------------------- synthetic cases
def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """White noise low-passed by a Gaussian (sigma in voxels, per axis) via the FFT; unit standard deviation."""
    noise = rng.standard_normal(shape)
    spectrum = np.fft.fftn(noise)
    for axis, (n, s) in enumerate(zip(shape, sigma)):
        frequency = np.fft.fftfreq(n)
        kernel = np.exp(-2.0 * (np.pi * s * frequency) ** 2)
        view = [1] * len(shape)
        view[axis] = n
        spectrum *= kernel.reshape(view)
    field = np.real(np.fft.ifftn(spectrum))
    std = field.std()
    return field / std if std > 0 else field


def make_case(seed: int, *, shape: tuple[int, int, int] = (24, 48, 48),
              sequences: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A reproducible synthetic MRI-like case: ``sequences`` co-registered volumes and a lesion label.

    A head/organ-like ellipsoid with smooth tissue texture and a few tubular "vessels" holds one or two lesion-like
    blobs (position, size and irregular shape drawn from ``seed``). Lesion contrast differs per sequence (bright
    on T2 and the late phases, dark on T1, nearly invisible at 20 s), plus a smooth multiplicative bias field and
    Rician-like noise. Voxels are anisotropic like the written cases: 2 mm along D, 1 mm along H and W.

    Args:
        seed: Seed of the ``numpy.random.Generator``; the same seed always gives the same case.
        shape: ``(D, H, W)`` of the volume.
        sequences: Number of channels; the first six follow :data:`SEQUENCE_NAMES`, more repeat the pattern
            with other contrasts.

    Returns:
        ``(image, label)``: image ``(sequences, D, H, W)`` float32 with positive intensities, label ``(D, H, W)``
        uint8 with 1 on the lesion voxels.
    """
    rng = np.random.default_rng(seed)
    depth, height, width = (int(n) for n in shape)
    z, y, x = np.meshgrid(np.arange(depth) * 2.0, np.arange(height, dtype=float), np.arange(width, dtype=float),
                          indexing="ij")  # mm
    center = np.array([(depth - 1), (height - 1) / 2, (width - 1) / 2]) + rng.uniform(-1.5, 1.5, 3)
    semi = np.array([depth * 0.85, height * 0.42, width * 0.45]) * rng.uniform(0.92, 1.05, 3)
    radius = np.sqrt(((z - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2
                     + ((x - center[2]) / semi[2]) ** 2)
    body = 1.0 / (1.0 + np.exp((radius - 1.0) / 0.03))  # soft-edged ellipsoid
    inside = radius < 0.8

    smooth_sigma = (1.5, 3.0, 3.0)
    texture = _smooth_field(rng, shape, smooth_sigma)
    # Vessels: thresholded band of a smooth field gives curvy tubes.
    vessel_field = _smooth_field(rng, shape, (2.0, 4.0, 4.0))
    vessels = np.exp(-(vessel_field / 0.12) ** 2) * (radius < 0.9)

    label = np.zeros(shape, dtype=np.uint8)
    lesion = np.zeros(shape)
    candidates = np.argwhere(radius < 0.55)
    for _ in range(int(rng.integers(1, 3))):
        cz, cy, cx = candidates[rng.integers(len(candidates))]
        size_mm = rng.uniform(3.5, 7.0)
        axes = size_mm * rng.uniform(0.75, 1.3, 3)
        rotation = np.linalg.qr(rng.standard_normal((3, 3)))[0]
        offsets = np.stack([z - cz * 2.0, y - cy, x - cx], axis=-1) @ rotation
        distance = np.sqrt(((offsets / axes) ** 2).sum(axis=-1))
        distance = distance + 0.18 * _smooth_field(rng, shape, (1.0, 2.0, 2.0))  # irregular margin
        blob = 1.0 / (1.0 + np.exp((distance - 1.0) / 0.08))
        lesion = np.maximum(lesion, blob)
        label |= ((distance < 1.0) & inside).astype(np.uint8)
    lesion *= inside

    bias = np.exp(0.12 * _smooth_field(rng, shape, (6.0, 12.0, 12.0)))
    image = np.empty((sequences, *shape), dtype=np.float32)
    for c in range(sequences):
        k = c % len(_TISSUE)
        tissue = _TISSUE[k] + _TEXTURE[k] * texture * rng.uniform(0.8, 1.2)
        contrast = _LESION[k] * rng.uniform(0.8, 1.2)
        channel = body * (tissue + _VESSEL[k] * vessels) + contrast * lesion
        channel = np.clip(channel, 0.0, None) * bias * rng.uniform(0.8, 1.25) * 100.0
        noise_level = _NOISE * 100.0
        real = channel + noise_level * rng.standard_normal(shape)
        imaginary = noise_level * rng.standard_normal(shape)
        image[c] = np.sqrt(real**2 + imaginary**2)  # magnitude image: Rician noise, positive background
    return image, label


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks; 1.0 when both are empty."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * (prediction & truth).sum() / total)


def _zscore(image: np.ndarray) -> np.ndarray:
    from ..models.loading import normalize

    return normalize(image, {"kind": "zscore"}).astype(np.float32)


# --------------------------------------------------------------------------------------------------- training
def _predict(model, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    import torch

    out = []
    with torch.no_grad():
        for image in images:
            logits = model(torch.from_numpy(image)[None])
            out.append(logits.argmax(1)[0].numpy())
    return out


def train(output_dir: str | Path, *, cases: int = 64, epochs: int = 50, seed: int = 0, batch_size: int = 4,
          learning_rate: float = 3e-3, verbose: bool = True) -> dict[str, Any]:
    """Train the demo U-Net on synthetic cases and write ``demo_unet.safetensors`` and ``card.json``.

    Cases ``0 .. cases-1`` are generated with :func:`make_case` and z-score normalized per channel (the card's
    normalization). The network is trained with cross-entropy plus soft Dice of the lesion class, Adam, random
    flips, on the CPU, with ``torch.manual_seed(seed)``. The lesion Dice is then measured on the held-out cases
    :data:`HELD_OUT_SEEDS`.

    Args:
        output_dir: Folder for the weights and the card (created if missing).
        cases: Number of training cases.
        epochs: Passes over the training cases.
        seed: Seed of torch (initialization, batch order, flips).
        batch_size: Cases per optimizer step.
        learning_rate: Adam's learning rate (cosine-decayed to 5 % of it).
        verbose: Print the loss per epoch.

    Returns:
        Metrics: ``held_out_dice`` (mean), ``held_out_dice_per_case``, ``train_dice``, ``seconds``, ``epochs``,
        ``cases``, ``parameters``, ``weights_bytes`` and the paths written.
    """
    import torch
    from safetensors.torch import save_file

    from ..models.networks import UNet3D, count_parameters

    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)

    pairs = [make_case(s) for s in range(cases)]
    images = torch.from_numpy(np.stack([_zscore(image) for image, _ in pairs]))
    labels = torch.from_numpy(np.stack([label for _, label in pairs]).astype(np.int64))
    model = UNet3D(**MODEL_KWARGS)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    steps = epochs * ((cases + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=0.05 * learning_rate)
    history = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(cases, generator=generator)
        total = 0.0
        for start in range(0, cases, batch_size):
            index = order[start:start + batch_size]
            x, y = images[index], labels[index]
            flips = [d for d in (2, 3, 4) if torch.rand((), generator=generator) < 0.5]
            if flips:
                x, y = x.flip(flips), y.flip([d - 1 for d in flips])
            logits = model(x)
            probability = logits.softmax(1)[:, 1]
            truth = (y == 1).float()
            soft_dice = (2 * (probability * truth).sum() + 1.0) / (probability.sum() + truth.sum() + 1.0)
            loss = torch.nn.functional.cross_entropy(logits, y) + (1.0 - soft_dice)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        history.append(total / cases)
        if verbose:
            print(f"epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    train_seconds = time.perf_counter() - started
    model.eval()

    held_out = [make_case(s) for s in HELD_OUT_SEEDS]
    predictions = _predict(model, [_zscore(image) for image, _ in held_out])
    per_case = [dice(p == 1, label == 1) for p, (_, label) in zip(predictions, held_out)]
    train_predictions = _predict(model, [images[i].numpy() for i in range(min(cases, 10))])
    train_dice = float(np.mean([dice(p == 1, labels[i].numpy() == 1) for i, p in enumerate(train_predictions)]))
    held_out_dice = float(np.mean(per_case))

    weights_path = output / DEMO_WEIGHTS_NAME
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path))
    card = {
        "name": "segexplain-demo-unet",
        "model": "unet3d",
        "kwargs": dict(MODEL_KWARGS),
        "weights": DEMO_WEIGHTS_NAME,
        "sequences": list(SEQUENCE_NAMES),
        "classes": list(CLASS_NAMES),
        "normalization": {"kind": "zscore"},
        "description": (
            f"Demo 3D U-Net ({count_parameters(model)} parameters; base_channels 8, depth 3, instance norm, "
            f"leaky ReLU) trained on {cases} synthetic 6-sequence cases (SegExplainLib.application.demo.make_case seeds "
            f"0..{cases - 1}, shape 24x48x48, z-score normalized per channel) for {epochs} epochs with "
            f"cross-entropy + soft Dice, Adam (lr {learning_rate}, cosine decay), batch {batch_size}, random flips, "
            f"torch seed {seed}, CPU, {train_seconds:.0f} s. Held-out lesion Dice {held_out_dice:.3f} "
            f"(mean over seeds {HELD_OUT_SEEDS[0]}..{HELD_OUT_SEEDS[-1]}). Synthetic data only: not a clinical "
            f"model. Reproduce with: python -m SegExplainLib.application.demo train"
        ),
    }
    card_path = output / DEMO_CARD_NAME
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return {
        "held_out_dice": held_out_dice,
        "held_out_dice_per_case": per_case,
        "train_dice": train_dice,
        "loss_history": history,
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "epochs": epochs,
        "cases": cases,
        "parameters": count_parameters(model),
        "weights_bytes": weights_path.stat().st_size,
        "weights": str(weights_path),
        "card": str(card_path),
    }


# --------------------------------------------------------------------------------------------------- demo case files
def demo_geometry(shape: Sequence[int]) -> Geometry:
    """The grid of a demo case of ``shape`` ``(D, H, W)``: spacing :data:`SPACING`, origin 0, identity direction."""
    from ..io.imaging import Geometry

    depth, height, width = (int(n) for n in shape)
    return Geometry(spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
                    size=(width, height, depth))


def write_demo_case(folder: str | Path, seed: int = HELD_OUT_SEEDS[0]) -> tuple[list[Path], Path]:
    """Write the case :func:`make_case` ``(seed)`` as NIfTI files: one per sequence and the lesion label.

    The grid has spacing :data:`SPACING` (1 x 1 x 2 mm), origin 0 and identity direction.

    Returns:
        ``(sequence_paths, label_path)``; the sequence files are named after :data:`SEQUENCE_NAMES`, in channel
        order, e.g. ``case_1000_T1-20s.nii.gz``.
    """
    from ..io.imaging import write_volume

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image, label = make_case(seed)
    geometry = demo_geometry(label.shape)
    paths = [write_volume(image[c], geometry, folder / f"case_{seed}_{name}.nii.gz")
             for c, name in enumerate(SEQUENCE_NAMES)]
    label_path = write_volume(label.astype(np.uint8), geometry, folder / f"case_{seed}_label.nii.gz")
    return paths, label_path


def run_demo(output_dir: str | Path, *, seed: int = HELD_OUT_SEEDS[0], overwrite: bool = False, figures: bool = True,
             progress: str | None = None) -> Path:
    """Explain the shipped demo network on a demo case, exactly as ``segexplain explain --card`` would.

    Writes the case to a temporary folder and runs it (:func:`~SegExplainLib.application.case_run.run_case`) with the
    demo card, the case's ground truth and LRP (the default composite ``epsilon_plus``) of the predicted lesion region;
    the case's files are then kept in the output folder's ``case`` folder, where ``summary.json``'s ``inputs`` point
    (``demo_case`` records its seed). The shares follow the lesion's contrast (T2 and the late phases high, the 20 s
    phase low).

    Args:
        output_dir: The output folder.
        seed: Which generated case (held out from training).
        overwrite: Replace an output folder that SegExplain wrote earlier.
        figures: Draw the PNG figures.
        progress: ``bar``, ``json`` or ``none``; None: a bar on a terminal.

    Returns:
        ``output_dir`` with the relevance maps, ``summary.json`` and figures.

    Raises:
        SegExplainError: The explain run failed (its message names why).
    """
    from .case_run import run_case
    from .model_source import ModelSource
    from .requests import CaseRun, ExplainRequest

    with tempfile.TemporaryDirectory(prefix="segexplain-demo-") as folder:
        inputs, label = write_demo_case(folder, seed)
        run = CaseRun(tuple(map(str, inputs)), str(output_dir), ModelSource("card", str(demo_card_path())),
                      ExplainRequest(class_index=1, method="lrp", device="cpu"),
                      ground_truth=str(label), overwrite=overwrite, figures=figures, progress=progress)
        output = run_case(run)
    # the results are complete: the case joins them, so that summary.json never names the deleted temporary folder
    kept, _ = write_demo_case(Path(output) / "case", seed)
    summary_path = Path(output) / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(inputs=[str(p.resolve()) for p in kept], demo_case={
        "seed": seed, "folder": "case", "written_by": f"python -m SegExplainLib.application.demo case --output DIR "
                                                      f"--seed {seed}"})
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m SegExplainLib.application.demo train [--output DIR]``, ``... run --output DIR`` or ``... case --output DIR``."""
    parser = argparse.ArgumentParser(prog="python -m SegExplainLib.application.demo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train the demo network and write weights and card")
    train_parser.add_argument("--output", default=str(DEMO_RESOURCES), help=f"folder (default: {DEMO_RESOURCES})")
    train_parser.add_argument("--cases", type=int, default=64)
    train_parser.add_argument("--epochs", type=int, default=50)
    train_parser.add_argument("--seed", type=int, default=0)
    run_parser = commands.add_parser("run", help="explain the shipped network on a demo case")
    run_parser.add_argument("--output", required=True)
    run_parser.add_argument("--overwrite", action="store_true")
    case_parser = commands.add_parser("case", help="write a demo case (6 sequences and the lesion label) to load in "
                                                   "Slicer or the review app")
    case_parser.add_argument("--output", required=True)
    case_parser.add_argument("--seed", type=int, default=HELD_OUT_SEEDS[0])
    args = parser.parse_args(argv)
    if args.command == "case":
        paths, label = write_demo_case(args.output, args.seed)
        print("\n".join(str(p) for p in [*paths, label]))
        return 0
    if args.command == "train":
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        metrics = train(args.output, cases=args.cases, epochs=args.epochs, seed=args.seed)
        print(json.dumps({k: v for k, v in metrics.items() if k != "loss_history"}, indent=2))
        return 0
    run_demo(args.output, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":  # pragma: no cover - python -m SegExplainLib.application.demo
    sys.exit(main())
