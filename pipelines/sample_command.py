"""`python -m pipelines sample`: images (or 2-D points) from a logged or registered generator into a PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from gan.data.sources import mode_centres
from gan.rendering import class_grid_inputs, save_image_grid, save_scatter
from pipelines.tracking import Tracker, default_tracking_uri

UNCONDITIONAL_DEFAULT, PER_CLASS_DEFAULT = 64, 8


class SampleRequestError(ValueError):
    """A sample request the model cannot serve (a class it does not have, --class for an unconditional model)."""


def check_arguments(num: int | None, classes: list[int] | None) -> None:
    """The checks that need no model: counts >= 1, classes >= 0."""
    if num is not None and num < 1:
        raise SampleRequestError(f"--num must be >= 1, got {num}")
    for k in classes or []:
        if k < 0:
            raise SampleRequestError(f"--class must be >= 0, got {k}")


def model_classes(shapes: list[tuple[int, ...]], metadata: dict, model: str) -> int:
    """The class count of a logged generator: 0 for one that takes latents only."""
    if len(shapes) == 1:
        return 0
    if not metadata.get("num_classes"):
        raise SampleRequestError(f"{model} takes class labels but its metadata records no num_classes")
    return int(metadata["num_classes"])


def grid_classes(classes: list[int] | None, num_classes: int, model: str) -> list[int] | None:
    """The rows of the grid: the --class values, every class of a conditional model when none is given, None for
    an unconditional model (`num_classes` 0), which refuses --class."""
    if not num_classes:
        if classes:
            raise SampleRequestError(f"--class needs a conditional generator; {model} is unconditional")
        return None
    for k in classes or []:
        if k >= num_classes:
            raise SampleRequestError(f"--class {k} is out of range: {model} has {num_classes} classes "
                                     f"(0..{num_classes - 1})")
    return list(dict.fromkeys(classes)) if classes else list(range(num_classes))


def draw(module: torch.nn.Module, z: torch.Tensor, y: torch.Tensor | None, device: str = "cpu") -> torch.Tensor:
    """The module's outputs (on the CPU) for latents `z` (and labels `y` of a conditional model), run on `device`."""
    inputs = [z] if y is None else [z, y]
    with torch.no_grad():
        return module.to(device)(*(x.to(device) for x in inputs)).float().cpu()


def sample_command(args: argparse.Namespace) -> int:
    try:
        check_arguments(args.num, args.classes)
    except SampleRequestError as err:
        print(err, file=sys.stderr)
        return 2
    tracker = Tracker(args.tracking_uri or default_tracking_uri("runs"))
    try:
        module, shapes, metadata = tracker.load_generator(args.model)
    except Exception as err:  # MLflow raises several types for a missing model, alias or store
        print(f"cannot load {args.model} from {tracker.tracking_uri}: {err}", file=sys.stderr)
        return 2
    try:
        classes = grid_classes(args.classes, model_classes(shapes, metadata, args.model), args.model)
    except SampleRequestError as err:
        print(err, file=sys.stderr)
        return 2
    z_dim = shapes[0][1]
    if classes is None:
        n = args.num or UNCONDITIONAL_DEFAULT
        z, y, nrow = torch.randn(n, z_dim, generator=torch.Generator().manual_seed(args.seed)), None, None
    else:
        nrow = args.num or PER_CLASS_DEFAULT
        z, y = class_grid_inputs(z_dim, classes, nrow, args.seed)
    samples = draw(module, z, y, args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    array = _write(samples, out, metadata, nrow, args.model)
    rows = f" (classes {classes}, a row of {nrow} per class)" if classes is not None else ""
    print(f"wrote {len(samples)} samples of {args.model} to {out}{rows}")
    if args.npy:
        np.save(out.with_suffix(".npy"), array)
        print(f"wrote {out.with_suffix('.npy')} {array.dtype} {tuple(array.shape)}")
        if y is not None:
            np.save(out.with_suffix(".labels.npy"), y.numpy())
            print(f"wrote {out.with_suffix('.labels.npy')}: the class asked of each image")
    return 0


def _write(samples: torch.Tensor, out: Path, metadata: dict, nrow: int | None, title: str) -> np.ndarray:
    """A scatter PNG for 2-D points, an image grid (`nrow` to a row, default square) otherwise; the saved array."""
    if metadata.get("points"):
        source = metadata.get("data_source", "")
        centres = mode_centres(source) if source in ("ring8", "grid25") else None
        save_scatter(samples.numpy(), out, centres, title=title)
        return samples.numpy()
    save_image_grid(samples, out, nrow=nrow, value_range=(0.0, 1.0))
    return (samples * 255).round().clamp(0, 255).to(torch.uint8).numpy()
