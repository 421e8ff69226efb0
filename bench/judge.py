"""What the quality benchmark's MNIST parts share: presets with overrides, in-memory training (optionally on a
subset, or for a wall-time budget), one prepared split with one evaluator that scores every run, and the tables."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gan.config import Config
from gan.config_loader import apply_overrides, from_dict, load_config, parse_override, to_dict
from gan.data import Manifest, load_manifest, prepare, read_split, to_model_range
from gan.data.labelled import LabelledPool
from gan.data.transforms import to_pixels
from gan.loop import DataSpec, TrainState, fit
from gan.metrics import count_tag, latent_sampler, real_floor, train_evaluator
from gan.scoring import primary_generator, score_images

REPO = Path(__file__).resolve().parents[1]
MNIST_ROOT = REPO.parent / "shared" / "data" / "mnist-t10k"
BALANCE_SAMPLES, FLOOR_SAMPLES = 2000, 2000
PRESENT_SHARE = 0.01
SUBSET_SEED = 2024
Row = dict[str, float]


def every(kimg: float) -> list[str]:
    """Overrides for `kimg` thousand images with one log interval and one checkpoint (at the end)."""
    return [f"train.kimg={kimg}", f"train.log_every_kimg={kimg}", f"train.checkpoint_every_kimg={kimg}"]


def preset(name: str, kimg: float | None, extra: list[str]) -> Config:
    """configs/<name>.yaml run for `kimg` (default: the preset's) with one log interval and one checkpoint."""
    path = REPO / "configs" / f"{name}.yaml"
    if kimg is None:
        kimg = load_config(path).train.kimg
    return load_config(path, [*extra, *every(kimg)])


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    return from_dict(apply_overrides(to_dict(cfg), dict(map(parse_override, overrides))))


def train(cfg: Config, dataset_dir: Path, *, subset: int = 0, budget_s: float = 0.0,
          on_checkpoint: Callable[[dict[str, float], str], None] | None = None) -> tuple[TrainState, float]:
    """fit on the train split held in memory (its first `subset` images of a seeded shuffle when > 0), reshuffled per
    epoch by seed; ends after `budget_s` seconds when > 0 (checked at each log interval); a semi-supervised run gets
    its labelled pool (`model.labels` rows chosen by `train.seed`); `on_checkpoint(metrics, folder)` sees each
    checkpoint before it is deleted. The state and seconds."""
    manifest = load_manifest(dataset_dir)
    x, y = read_split(manifest, "train")
    pool = (LabelledPool.from_split(x, y, labels=cfg.model.labels, seed=cfg.train.seed, scale=manifest.scale)
            if cfg.model.semi_supervised else None)
    real_all = to_model_range(x, manifest.scale)
    labels = torch.as_tensor(y) if cfg.model.conditional and y is not None else None
    if subset:
        keep = torch.randperm(len(real_all), generator=torch.Generator().manual_seed(SUBSET_SEED))[:subset]
        real_all, labels = real_all[keep], None if labels is None else labels[keep]
    batch = cfg.train.batch_size

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        order = torch.randperm(len(real_all), generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            yield real_all[idx], None if labels is None else labels[idx]

    t0 = time.perf_counter()

    def report(metrics: dict[str, float], ckpt: str | None) -> bool:
        if ckpt is not None and on_checkpoint is not None:
            on_checkpoint(metrics, ckpt)
        return budget_s > 0 and time.perf_counter() - t0 >= budget_s

    state = fit(cfg, batches, spec=DataSpec.from_manifest(manifest), report=report, labelled=pool)
    return state, time.perf_counter() - t0


def generator(state: TrainState, cfg: Config) -> nn.Module:
    """The generator a run is scored by (G_ema unless EMA is off), frozen."""
    G = state.G_ema if primary_generator(cfg) == "G_ema" else state.G
    return G.eval().requires_grad_(False)


@torch.no_grad()
def class_shares(images: torch.Tensor, evaluator: nn.Module, batch_size: int = 500) -> np.ndarray:
    """Share of images (model range) per class by the evaluator's argmax."""
    pred = torch.cat([evaluator(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    return np.bincount(pred.numpy(), minlength=evaluator.num_classes) / len(images)


def balance(shares: np.ndarray) -> Row:
    return {"max_share": float(shares.max()), "classes": float((shares >= PRESENT_SHARE).sum())}


@dataclass
class Judge:
    """One prepared MNIST split and one evaluator that every MNIST row is trained on and scored by."""

    dataset_dir: Path
    manifest: Manifest
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    evaluator: nn.Module
    num_samples: int

    def rate(self, G: nn.Module, cfg: Config) -> Row:
        """FID/IS/KID/precision/recall of a frozen generator against the whole train split, its class balance, and
        the seconds its scoring took."""
        t0 = time.perf_counter()
        metrics = score_images(G, cfg, self.manifest.num_classes, self.x_train, self.evaluator)
        eval_s = time.perf_counter() - t0
        sample = latent_sampler(G, cfg.model.z_dim, self.manifest.num_classes if cfg.model.conditional else 0)
        fake = to_model_range(to_pixels(sample(BALANCE_SAMPLES, torch.Generator().manual_seed(cfg.eval.seed + 7))))
        tag = count_tag(self.num_samples)
        row = {key: metrics[f"eval/{key}_{tag}"] for key in ("fid", "is", "kid", "precision", "recall")}
        row.update(balance(class_shares(fake, self.evaluator)), eval_s=eval_s)
        if f"eval/class_agreement_{tag}" in metrics:  # a conditional G: the share drawn as the class asked
            row["class_agreement"] = metrics[f"eval/class_agreement_{tag}"]
        return row

    def score(self, name: str, cfg: Config, *, subset: int = 0, budget_s: float = 0.0) -> tuple[Row, TrainState]:
        """Trains `cfg` (see `train`) and scores its generator: FID/IS/KID/precision/recall against the whole
        train split, class balance, seconds."""
        print(f"{name}: training {cfg.train.kimg:g} kimg{f' on {subset} images' if subset else ''}"
              f"{f' or {budget_s:.0f} s' if budget_s else ''} ...", flush=True)
        state, train_s = train(cfg, self.dataset_dir, subset=subset, budget_s=budget_s)
        row = {**self.rate(generator(state, cfg), cfg), "train_s": train_s, "kimg": state.kimg}
        print(f"{name}: FID {row['fid']:.2f}, IS {row['is']:.2f} at {state.kimg:.1f} kimg (train {train_s:.0f} s, "
              f"eval {row['eval_s']:.1f} s)", flush=True)
        return row, state


def mnist_judge(args: argparse.Namespace, cfgs: dict[str, Config]) -> tuple[Judge, Row]:
    """The prepared split all `cfgs` share, its trained evaluator, and the real-vs-real floor's row."""
    dirs = {name: prepare(cfg.data, out_dir=REPO / "data") for name, cfg in cfgs.items()}
    if len(set(dirs.values())) != 1:
        raise ValueError(f"the MNIST presets prepare different datasets, so one evaluator cannot judge both: {dirs}")
    cfg0 = next(iter(cfgs.values()))
    dataset_dir = next(iter(dirs.values()))
    manifest = load_manifest(dataset_dir)
    x_train, y_train = read_split(manifest, "train")
    x_test, y_test = read_split(manifest, "test")

    t0 = time.perf_counter()
    evaluator, acc = train_evaluator(x_train, y_train, x_test, y_test, epochs=cfg0.eval.evaluator_epochs,
                                     seed=cfg0.eval.seed)
    print(f"evaluator: test accuracy {acc:.4f} on {len(x_test)} held-out images "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    # The held-out split has only 2k images, so the floor is at 2k, not at --num-samples.
    n_floor = min(FLOOR_SAMPLES, len(x_train), len(x_test))
    t0 = time.perf_counter()
    floor = real_floor(x_train, x_test, evaluator, num_samples=n_floor, batch_size=cfg0.eval.batch_size,
                       seed=cfg0.eval.seed)
    ft = count_tag(n_floor)
    floor_row = {
        "fid": floor[f"eval/fid_floor_{ft}"], "is": floor[f"eval/is_real_{ft}"], "kid": floor[f"eval/kid_floor_{ft}"],
        "precision": floor[f"eval/precision_floor_{ft}"], "recall": floor[f"eval/recall_floor_{ft}"],
        **balance(class_shares(to_model_range(x_test[:BALANCE_SAMPLES]), evaluator)),
        "eval_s": time.perf_counter() - t0}
    judge = Judge(dataset_dir, manifest, x_train, y_train, x_test, y_test, evaluator,
                  min(args.num_samples, len(x_train)))
    return judge, floor_row


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def image_table(rows: dict[str, Row], num_classes: int, tag: str, extra: tuple[str, ...] = ()) -> list[str]:
    """One markdown row per run: the metrics at `tag` samples, class balance, images shown, seconds, and the
    `extra` keys (e.g. d_gap) when asked."""
    head = ["model", "FID", "IS", "KID", "precision", "recall", "max class share", "classes present", "kimg",
            "train s", f"eval s ({tag})", *extra]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name, r in rows.items():
        kimg = f"{r['kimg']:.1f}" if "kimg" in r else "-"
        train_s = f"{r['train_s']:.0f}" if "train_s" in r else "-"
        cells = [name, f"{r['fid']:.3f}", f"{r['is']:.2f}", f"{r['kid']:.4f}", f"{r['precision']:.3f}",
                 f"{r['recall']:.3f}", f"{r['max_share']:.3f}", f"{r['classes']:.0f}/{num_classes}", kimg, train_s,
                 f"{r['eval_s']:.1f}", *(f"{r[key]:.3f}" if key in r else "-" for key in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


