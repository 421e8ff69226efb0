"""Quality benchmark: mnist-mlp vs mnist-dcgan under one evaluator, and ring8/grid25 mode coverage."""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning workers stall torch badly when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gan.config import Config
from gan.config_loader import load_config
from gan.data import load_manifest, prepare, read_split, to_model_range
from gan.data.sources import mode_centres
from gan.data.transforms import to_pixels
from gan.loop import DataSpec, fit
from gan.metrics import count_tag, latent_sampler, real_floor, train_evaluator
from gan.scoring import POINT_SAMPLES, primary_generator, score_images, score_points

REPO = Path(__file__).resolve().parents[1]
MNIST_ROOT = REPO.parent / "shared" / "data" / "mnist-t10k"
MNIST_PRESETS, POINT_PRESETS = ("mnist-mlp", "mnist-dcgan"), ("ring8", "grid25")
BALANCE_SAMPLES, FLOOR_SAMPLES = 2000, 2000
PRESENT_SHARE, MAX_SHARE = 0.01, 0.20
Row = dict[str, float]


def preset(name: str, kimg: float | None, extra: list[str]) -> Config:
    """configs/<name>.yaml with one log interval and one checkpoint (at the end) over the whole run."""
    path = REPO / "configs" / f"{name}.yaml"
    if kimg is None:
        kimg = load_config(path).train.kimg
    return load_config(path, [*extra, f"train.kimg={kimg}", f"train.log_every_kimg={kimg}",
                              f"train.checkpoint_every_kimg={kimg}"])


def train(cfg: Config, dataset_dir: Path) -> tuple[nn.Module, float]:
    """fit on the train split held in memory, reshuffled per epoch by seed; the scored generator and seconds."""
    manifest = load_manifest(dataset_dir)
    x, y = read_split(manifest, "train")
    real_all = to_model_range(x, manifest.scale)
    labels = torch.as_tensor(y) if cfg.model.conditional and y is not None else None
    batch = cfg.train.batch_size

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        order = torch.randperm(len(real_all), generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            yield real_all[idx], None if labels is None else labels[idx]

    t0 = time.perf_counter()
    state = fit(cfg, batches, spec=DataSpec.from_manifest(manifest), report=lambda _metrics, _ckpt: None)
    seconds = time.perf_counter() - t0
    G = state.G_ema if primary_generator(cfg) == "G_ema" else state.G
    return G.eval().requires_grad_(False), seconds


@torch.no_grad()
def class_shares(images: torch.Tensor, evaluator: nn.Module, batch_size: int = 500) -> np.ndarray:
    """Share of images (model range) per class by the evaluator's argmax."""
    pred = torch.cat([evaluator(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    return np.bincount(pred.numpy(), minlength=evaluator.num_classes) / len(images)


def balance(shares: np.ndarray) -> Row:
    return {"max_share": float(shares.max()), "classes": float((shares >= PRESENT_SHARE).sum())}


def run_mnist(args: argparse.Namespace) -> tuple[dict[str, Row], int, int]:
    """Rows for both presets and the real-vs-real floor; the evaluator's class count; the real reference size."""
    common = ["data.source=idx", f"data.root={MNIST_ROOT}", f"eval.num_samples={args.num_samples}"]
    cfgs = {name: preset(name, args.kimg, common) for name in MNIST_PRESETS}
    dirs = {name: prepare(cfg.data, out_dir=REPO / "data") for name, cfg in cfgs.items()}
    if len(set(dirs.values())) != 1:
        raise ValueError(f"the MNIST presets prepare different datasets, so one evaluator cannot judge both: {dirs}")
    dataset_dir, cfg0 = dirs[MNIST_PRESETS[0]], cfgs[MNIST_PRESETS[0]]
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
    rows = {f"floor (real {ft} vs {ft})": {
        "fid": floor[f"eval/fid_floor_{ft}"], "is": floor[f"eval/is_real_{ft}"], "kid": floor[f"eval/kid_floor_{ft}"],
        "precision": floor[f"eval/precision_floor_{ft}"], "recall": floor[f"eval/recall_floor_{ft}"],
        **balance(class_shares(to_model_range(x_test[:BALANCE_SAMPLES]), evaluator)),
        "eval_s": time.perf_counter() - t0}}

    tag = count_tag(args.num_samples)
    for name, cfg in cfgs.items():
        print(f"{name}: training {cfg.train.kimg:g} kimg ...", flush=True)
        G, train_s = train(cfg, dataset_dir)
        t0 = time.perf_counter()
        metrics = score_images(G, cfg, manifest.num_classes, x_train, evaluator)
        eval_s = time.perf_counter() - t0
        sample = latent_sampler(G, cfg.model.z_dim, manifest.num_classes if cfg.model.conditional else 0)
        fake = to_model_range(to_pixels(sample(BALANCE_SAMPLES, torch.Generator().manual_seed(cfg.eval.seed + 7))))
        rows[name] = {key: metrics[f"eval/{key}_{tag}"] for key in ("fid", "is", "kid", "precision", "recall")}
        rows[name].update(balance(class_shares(fake, evaluator)), train_s=train_s, eval_s=eval_s)
        print(f"{name}: FID {rows[name]['fid']:.2f}, IS {rows[name]['is']:.2f} (train {train_s:.0f} s, "
              f"eval {eval_s:.1f} s)", flush=True)
    return rows, evaluator.num_classes, min(args.num_samples, len(x_train))


def run_points(args: argparse.Namespace) -> dict[str, Row]:
    # One thread: these MLPs' matmuls are too small to split, and a second thread only adds its wake-up
    # latency (ring8 took 82 s with two threads, 35 s with one).
    torch.set_num_threads(1)
    rows = {}
    for name in POINT_PRESETS:
        cfg = preset(name, args.kimg_2d, [])
        dataset_dir = prepare(cfg.data, out_dir=REPO / "data")
        print(f"{name}: training {cfg.train.kimg:g} kimg ...", flush=True)
        G, train_s = train(cfg, dataset_dir)
        metrics, _ = score_points(G, cfg, load_manifest(dataset_dir).scale)
        rows[name] = {"kimg": cfg.train.kimg, "modes": metrics["eval/modes_covered"],
                      "num_modes": float(len(mode_centres(cfg.data.source))), "hq": metrics["eval/high_quality"],
                      "reverse_kl": metrics["eval/reverse_kl"], "train_s": train_s}
        print(f"{name}: {rows[name]['modes']:.0f}/{rows[name]['num_modes']:.0f} modes, "
              f"HQ {rows[name]['hq']:.3f} (train {train_s:.0f} s)", flush=True)
    return rows


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def mnist_lines(rows: dict[str, Row], num_classes: int, num_samples: int, num_real: int) -> list[str]:
    tag = count_tag(num_samples)
    lines = [f"| model | FID | IS | KID | precision | recall | max class share | classes present | train s | "
             f"eval s ({tag}) |", "| --- |" + " ---: |" * 9]
    for name, r in rows.items():
        train_s = f"{r['train_s']:.0f}" if "train_s" in r else "-"
        lines.append(f"| {name} | {r['fid']:.3f} | {r['is']:.2f} | {r['kid']:.4f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['max_share']:.3f} | {r['classes']:.0f}/{num_classes} | {train_s} | "
                     f"{r['eval_s']:.1f} |")
    mlp, dcgan = rows["mnist-mlp"], rows["mnist-dcgan"]
    slowest = max(mlp["eval_s"], dcgan["eval_s"])
    eval_verdict = verdict(slowest < 60) if num_samples == 10000 else f"n/a (measured at {tag}, the target is at 10k)"
    sound = mlp["is"] >= 8 and mlp["classes"] == num_classes and mlp["max_share"] <= MAX_SHARE
    return [*lines, "",
            f"Generators: {num_samples} samples against {num_real} training images; the floor is at 2k because "
            f"the held-out split holds only 2k images (FID is biased upward at fewer samples). Class balance: "
            f"{BALANCE_SAMPLES} samples by the evaluator's argmax, a class present at >= {PRESENT_SHARE:.0%}.", "",
            f"- DCGAN FID <= 0.5 x MLP FID: {dcgan['fid']:.3f} vs {0.5 * mlp['fid']:.3f}: "
            f"{verdict(dcgan['fid'] <= 0.5 * mlp['fid'])}",
            f"- mnist-mlp sound (IS >= 8, all {num_classes} classes, none > {MAX_SHARE:.0%}): IS {mlp['is']:.2f}, "
            f"{mlp['classes']:.0f} classes, max share {mlp['max_share']:.3f}: {verdict(sound)}",
            f"- eval of 10k samples < 60 s: slowest {slowest:.1f} s: {eval_verdict}"]


def point_lines(rows: dict[str, Row]) -> list[str]:
    lines = ["| preset | kimg | modes covered | high quality | reverse KL | train s |",
             "| --- |" + " ---: |" * 5]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['kimg']:g} | {r['modes']:.0f}/{r['num_modes']:.0f} | {r['hq']:.3f} | "
                     f"{r['reverse_kl']:.3f} | {r['train_s']:.0f} |")
    lines += ["", f"{POINT_SAMPLES} samples of G_ema per preset (PacGAN reports 24.8/25 modes and 93.6% high quality "
              "on grid25).", ""]
    if "ring8" in rows:
        r = rows["ring8"]
        lines.append(f"- ring8 8/8 modes: {r['modes']:.0f}/8: {verdict(r['modes'] >= 8)}")
    if "grid25" in rows:
        r = rows["grid25"]
        lines.append(f"- grid25 >= 24/25 modes and >= 90% high quality: {r['modes']:.0f}/25, {r['hq']:.1%}: "
                     f"{verdict(r['modes'] >= 24 and r['hq'] >= 0.9)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("mnist", "2d"), help="run one part only")
    parser.add_argument("--kimg", type=float, default=480.0, help="images per MNIST preset, in thousands")
    parser.add_argument("--kimg-2d", type=float, default=None, help="images per 2-D preset (default: the preset's)")
    parser.add_argument("--num-samples", type=int, default=10000, help="generated samples per MNIST metric")
    parser.add_argument("--out", type=Path, help="also write the tables and verdicts here as markdown")
    args = parser.parse_args()
    torch.set_num_threads(2)

    lines: list[str] = []
    if args.only != "2d":
        if MNIST_ROOT.is_dir():
            rows, num_classes, num_real = run_mnist(args)
            lines += ["## MNIST", "", *mnist_lines(rows, num_classes, args.num_samples, num_real), ""]
        else:
            print(f"note: {MNIST_ROOT} is absent; skipping the MNIST part")
    if args.only != "mnist":
        lines += ["## 2-D mixtures", "", *point_lines(run_points(args)), ""]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
