"""`python -m pipelines sample`: images (or 2-D points) from a logged or registered generator into a PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from gan.data.sources import mode_centres
from gan.rendering import save_scatter
from pipelines.tracking import Tracker, default_tracking_uri


def draw(module: torch.nn.Module, shapes: list[tuple[int, ...]], metadata: dict, n: int, seed: int,
         device: str = "cpu") -> torch.Tensor:
    """`n` samples (on the CPU) from seeded latents, drawn on the CPU and run on `device`; a conditional generator
    cycles through its classes."""
    z = torch.randn(n, shapes[0][1], generator=torch.Generator().manual_seed(seed))
    inputs = [z]
    if len(shapes) > 1:
        inputs.append(torch.arange(n) % int(metadata.get("num_classes") or 10))
    with torch.no_grad():
        return module.to(device)(*(x.to(device) for x in inputs)).float().cpu()


def sample_command(args: argparse.Namespace) -> int:
    if args.num < 1:
        print(f"--num must be >= 1, got {args.num}", file=sys.stderr)
        return 2
    tracker = Tracker(args.tracking_uri or default_tracking_uri("runs"))
    try:
        module, shapes, metadata = tracker.load_generator(args.model)
    except Exception as err:  # MLflow raises several types for a missing model, alias or store
        print(f"cannot load {args.model} from {tracker.tracking_uri}: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    samples = draw(module, shapes, metadata, args.num, args.seed, args.device)
    if metadata.get("points"):
        source = metadata.get("data_source", "")
        centres = mode_centres(source) if source in ("ring8", "grid25") else None
        save_scatter(samples.numpy(), out, centres, title=args.model)
        array = samples.numpy()
    else:
        save_image(samples, str(out), nrow=max(1, int(np.ceil(np.sqrt(args.num)))), padding=2)
        array = (samples * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    print(f"wrote {args.num} samples of {args.model} to {out}")
    if args.npy:
        np.save(out.with_suffix(".npy"), array)
        print(f"wrote {out.with_suffix('.npy')} {array.dtype} {tuple(array.shape)}")
    return 0
