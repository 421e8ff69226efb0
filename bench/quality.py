"""Quality benchmark: the MNIST presets under one evaluator (GANs, VAE, autoencoder, semi-supervised and conditional
GANs), a low-data part with and without DiffAugment, and ring8/grid25 mode coverage."""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning workers stall torch badly when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.judge import (
    BALANCE_SAMPLES,
    FLOOR_SAMPLES,
    MNIST_ROOT,
    PRESENT_SHARE,
    REPO,
    SUBSET_SEED,
    Judge,
    Row,
    every,
    generator,
    image_table,
    mnist_judge,
    preset,
    train,
    verdict,
    with_overrides,
)
from gan.autoencoding import reconstruction_metrics
from gan.config import Config
from gan.data import load_manifest, prepare, to_model_range
from gan.data.sources import mode_centres
from gan.loop import TrainState
from gan.metrics import count_tag
from gan.metrics.semi_supervised import plain_accuracy, sgan_accuracy
from gan.models import realness_logit
from gan.scoring import POINT_SAMPLES, generators_from_checkpoint, primary_generator, score_points

MNIST_PRESETS = ("mnist-mlp", "mnist-dcgan", "mnist-resnet", "mnist-vae", "mnist-cdcgan", "mnist-ae")
POINT_PRESETS = ("ring8", "grid25")
EQUAL_TIME_ROW = "mnist-resnet (mnist-dcgan's wall time)"
MAX_SHARE = 0.20
DIFFAUGMENT = "color,translation,cutout"
CURVE_PRESETS = ("mnist-dcgan", "mnist-resnet")


def mnist_configs(args: argparse.Namespace) -> dict[str, Config]:
    common = ["data.source=idx", f"data.root={MNIST_ROOT}", f"eval.num_samples={args.num_samples}"]
    return {name: preset(name, args.kimg, common) for name in MNIST_PRESETS}


def run_mnist(args: argparse.Namespace, judge: Judge, cfgs: dict[str, Config]) -> tuple[dict[str, Row], dict[str, Row]]:
    """The MNIST generators at --kimg each, the residual family again at mnist-dcgan's training wall time; and the
    autoencoders' reconstruction rows (mnist-ae's, and the VAE's beside it)."""
    rows, states = {}, {}
    for name, cfg in cfgs.items():
        if cfg.model.family != "ae":
            rows[name], states[name] = judge.score(name, cfg)
    budget = rows["mnist-dcgan"]["train_s"]
    # Reports (the budget's checks) every kimg; no checkpoint but the last.
    timed = with_overrides(cfgs["mnist-resnet"], [f"train.kimg={args.kimg * 100:g}", "train.log_every_kimg=1"])
    rows[EQUAL_TIME_ROW] = judge.score(EQUAL_TIME_ROW, timed, budget_s=budget)[0]
    print(f"mnist-ae: training {cfgs['mnist-ae'].train.kimg:g} kimg ...", flush=True)
    ae_state, ae_s = train(cfgs["mnist-ae"], judge.dataset_dir)
    reconstruction = {"mnist-ae": reconstruction_row(ae_state, judge, ae_s),
                      "mnist-vae": reconstruction_row(states["mnist-vae"], judge, rows["mnist-vae"]["train_s"])}
    return rows, reconstruction


def train_keeping_checkpoints(cfg: Config, judge: Judge, kept: Path) -> list[tuple[Path, float, float]]:
    """Trains `cfg` (see `train`) and copies each checkpoint under `kept`: (folder, kimg, the steps' own seconds)."""
    points: list[tuple[Path, float, float]] = []

    def keep(metrics: dict[str, float], folder: str) -> None:
        points.append((kept / str(len(points)), metrics["progress/kimg"], metrics["time/steps_s"]))
        shutil.copytree(folder, points[-1][0])
    train(cfg, judge.dataset_dir, on_checkpoint=keep)
    return points


def run_curves(args: argparse.Namespace, judge: Judge, cfgs: dict[str, Config]) -> dict[str, list[Row]]:
    """mnist-dcgan and mnist-resnet for --kimg each, with a checkpoint every --curve-every kimg whose generator is
    scored after training: FID against the steps' own seconds (saving checkpoints excluded), one row per checkpoint."""
    curves = {}
    for name in CURVE_PRESETS:
        cfg = with_overrides(cfgs[name], [f"train.log_every_kimg={args.curve_every}",
                                          f"train.checkpoint_every_kimg={args.curve_every}"])
        print(f"{name}: training {cfg.train.kimg:g} kimg, a checkpoint every {args.curve_every:g} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="curve-") as kept:
            curves[name] = [{**judge.rate(generators_from_checkpoint(folder)[0][primary_generator(cfg)], cfg),
                             "kimg": kimg, "train_s": seconds}
                            for folder, kimg, seconds in train_keeping_checkpoints(cfg, judge, Path(kept))]
        print(f"{name}: " + ", ".join(f"{r['kimg']:.0f} kimg {r['train_s']:.0f} s FID {r['fid']:.1f}"
                                      for r in curves[name]), flush=True)
    return curves


def reconstruction_row(state: TrainState, judge: Judge, train_s: float) -> Row:
    """An autoencoder's (encoder D, decoder G) reconstruction error on the whole held-out split."""
    metrics = reconstruction_metrics(state.D.eval(), state.G.eval(), judge.x_test)
    return {"mse": metrics["eval/reconstruction_error"], "bce": metrics["eval/reconstruction_bce"],
            "kimg": state.kimg, "train_s": train_s}


def d_overfit_gap(state: TrainState, judge: Judge, subset: int, batch_size: int = 500) -> float:
    """Mean D(x) (as a probability of real) on the training subset minus on the held-out split: near 0 while D
    generalises, towards 1 as it memorises its training images (StyleGAN2-ADA's overfitting signal)."""
    D = state.D.eval()
    keep = torch.randperm(len(judge.x_train), generator=torch.Generator().manual_seed(SUBSET_SEED))[:subset]

    @torch.no_grad()
    def mean_real(x: np.ndarray) -> float:
        images = to_model_range(x)
        return float(torch.cat([torch.sigmoid(realness_logit(D(images[i:i + batch_size]).float()))
                                for i in range(0, len(images), batch_size)]).mean())

    return mean_real(judge.x_train[keep.numpy()]) - mean_real(judge.x_test)


def run_low_data(args: argparse.Namespace, judge: Judge, cfgs: dict[str, Config]) -> dict[str, Row]:
    """The --low-data-presets on a --low-data-images subset for --low-data-kimg, each without and with
    DiffAugment; FID against the whole train split, and D's overfitting gap."""
    rows = {}
    for name in args.low_data_presets.split(","):
        for policies in ("", DIFFAUGMENT):
            cfg = with_overrides(cfgs[name], [f"model.diffaugment={policies}", *every(args.low_data_kimg)])
            row_name = f"{name}{' + DiffAugment' if policies else ''}"
            row, state = judge.score(row_name, cfg, subset=args.low_data_images)
            row["d_gap"] = d_overfit_gap(state, judge, args.low_data_images)
            rows[row_name] = row
    return rows


def run_semi_supervised(args: argparse.Namespace, judge: Judge) -> dict[str, Row]:
    """mnist-sgan with --sgan-draws draws of its labelled subset (train.seed 0, 1, ...): the K+1 D's test accuracy
    beside a plain classifier's trained on the same labels."""
    common = ["data.source=idx", f"data.root={MNIST_ROOT}"]
    rows = {}
    for seed in range(args.sgan_draws):
        cfg = preset("mnist-sgan", args.sgan_kimg, [*common, f"train.seed={seed}"])
        print(f"mnist-sgan draw {seed}: training {cfg.train.kimg:g} kimg ...", flush=True)
        state, train_s = train(cfg, judge.dataset_dir)
        labels = cfg.model.labels
        rows[f"draw {seed}"] = {
            "sgan": sgan_accuracy(state.D, judge.x_test, judge.y_test),
            "plain": plain_accuracy(judge.x_train, judge.y_train, judge.x_test, judge.y_test, labels=labels,
                                    seed=seed),
            "labels": float(labels), "kimg": state.kimg, "train_s": train_s}
        print(f"mnist-sgan draw {seed}: {rows[f'draw {seed}']}", flush=True)
    return rows


def semi_supervised_lines(rows: dict[str, Row], num_test: int) -> list[str]:
    lines = ["| labelled subset | labels | SGAN accuracy | plain classifier accuracy | kimg | train s |",
             "| --- |" + " ---: |" * 5]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['labels']:.0f} | {r['sgan']:.4f} | {r['plain']:.4f} | {r['kimg']:.0f} | "
                     f"{r['train_s']:.0f} |")
    sgan, plain = (np.array([r[k] for r in rows.values()]) for k in ("sgan", "plain"))
    return [*lines, "", f"Test accuracy on the {num_test} held-out images; the plain classifier is the evaluator's CNN "
                        "with its augmentation, trained on the same labelled rows.", "",
            f"- SGAN mean {sgan.mean():.4f} (spread {sgan.min():.4f}-{sgan.max():.4f}) vs plain {plain.mean():.4f} "
            f"({plain.min():.4f}-{plain.max():.4f})",
            f"- SGAN >= 0.95 on every draw: {verdict(bool((sgan >= 0.95).all()))}",
            f"- SGAN beats the plain classifier on every draw: {verdict(bool((sgan > plain).all()))}"]


def run_points(args: argparse.Namespace) -> dict[str, Row]:
    # One thread: these MLPs' matmuls are too small to split, and a second thread only adds its wake-up
    # latency (ring8 took 82 s with two threads, 35 s with one).
    torch.set_num_threads(1)
    rows = {}
    for name in POINT_PRESETS:
        cfg = preset(name, args.kimg_2d, [])
        dataset_dir = prepare(cfg.data, out_dir=REPO / "data")
        print(f"{name}: training {cfg.train.kimg:g} kimg ...", flush=True)
        state, train_s = train(cfg, dataset_dir)
        metrics, _ = score_points(generator(state, cfg), cfg, load_manifest(dataset_dir).scale)
        rows[name] = {"kimg": cfg.train.kimg, "modes": metrics["eval/modes_covered"],
                      "num_modes": float(len(mode_centres(cfg.data.source))), "hq": metrics["eval/high_quality"],
                      "reverse_kl": metrics["eval/reverse_kl"], "train_s": train_s}
        print(f"{name}: {rows[name]['modes']:.0f}/{rows[name]['num_modes']:.0f} modes, "
              f"HQ {rows[name]['hq']:.3f} (train {train_s:.0f} s)", flush=True)
    return rows


def mnist_lines(rows: dict[str, Row], num_classes: int, num_samples: int, num_real: int) -> list[str]:
    tag = count_tag(num_samples)
    mlp, dcgan = rows["mnist-mlp"], rows["mnist-dcgan"]
    resnet, timed = rows["mnist-resnet"], rows[EQUAL_TIME_ROW]
    slowest = max(mlp["eval_s"], dcgan["eval_s"])
    eval_verdict = verdict(slowest < 60) if num_samples == 10000 else f"n/a (measured at {tag}, the target is at 10k)"
    sound = mlp["is"] >= 8 and mlp["classes"] == num_classes and mlp["max_share"] <= MAX_SHARE
    vae, conditional = rows["mnist-vae"], rows["mnist-cdcgan"]
    return [*image_table(rows, num_classes, tag, ("class_agreement",)), "",
            f"Generators: {num_samples} samples against {num_real} training images; the floor is at 2k because "
            f"the held-out split holds only 2k images (FID is biased upward at fewer samples). Class balance: "
            f"{BALANCE_SAMPLES} samples by the evaluator's argmax, a class present at >= {PRESENT_SHARE:.0%}.", "",
            f"- DCGAN FID <= 0.5 x MLP FID: {dcgan['fid']:.3f} vs {0.5 * mlp['fid']:.3f}: "
            f"{verdict(dcgan['fid'] <= 0.5 * mlp['fid'])}",
            f"- mnist-mlp sound (IS >= 8, all {num_classes} classes, none > {MAX_SHARE:.0%}): IS {mlp['is']:.2f}, "
            f"{mlp['classes']:.0f} classes, max share {mlp['max_share']:.3f}: {verdict(sound)}",
            f"- eval of 10k samples < 60 s: slowest {slowest:.1f} s: {eval_verdict}",
            f"- resnet FID <= dcgan FID at equal wall time ({timed['train_s']:.0f} s vs {dcgan['train_s']:.0f} s): "
            f"{timed['fid']:.3f} vs {dcgan['fid']:.3f}: {verdict(timed['fid'] <= dcgan['fid'])}",
            f"- resnet FID <= dcgan FID at equal images ({resnet['kimg']:.0f} kimg): {resnet['fid']:.3f} vs "
            f"{dcgan['fid']:.3f}: {verdict(resnet['fid'] <= dcgan['fid'])}",
            f"- the gap a GAN closes: VAE FID {vae['fid']:.3f} vs DCGAN {dcgan['fid']:.3f} "
            f"({vae['fid'] / dcgan['fid']:.1f}x)",
            f"- conditional samples classified as the class asked >= 95%: {conditional['class_agreement']:.1%}: "
            f"{verdict(conditional['class_agreement'] >= 0.95)}"]


def curve_lines(curves: dict[str, list[Row]], num_samples: int) -> list[str]:
    """The two curves side by side, and the verdict at mnist-dcgan's last time against the residual family's last
    checkpoint at or before it (no extra time for the residual family, and no interpolation)."""
    dcgan, resnet = (curves[name] for name in CURVE_PRESETS)
    lines = ["| checkpoint | mnist-dcgan kimg | s | FID | mnist-resnet kimg | s | FID |", "| ---: |" + " ---: |" * 6]
    for i, (d, r) in enumerate(zip(dcgan, resnet, strict=True), start=1):
        lines.append(f"| {i} | {d['kimg']:.0f} | {d['train_s']:.0f} | {d['fid']:.2f} | {r['kimg']:.0f} | "
                     f"{r['train_s']:.0f} | {r['fid']:.2f} |")
    end = dcgan[-1]
    within = [r for r in resnet if r["train_s"] <= end["train_s"]]
    lines += ["", f"FID of {count_tag(num_samples)} samples of each checkpoint's generator; seconds are the training "
                  "steps' own (saving checkpoints excluded).", ""]
    if not within:
        return [*lines, f"- resnet FID <= dcgan FID at equal wall time: no resnet checkpoint within "
                        f"{end['train_s']:.0f} s: MISS"]
    timed = within[-1]
    return [*lines, f"- resnet FID <= dcgan FID at equal wall time (resnet's last checkpoint within dcgan's "
                    f"{end['train_s']:.0f} s: {timed['kimg']:.0f} kimg, {timed['train_s']:.0f} s): {timed['fid']:.3f} "
                    f"vs {end['fid']:.3f}: {verdict(timed['fid'] <= end['fid'])}"]


def reconstruction_lines(rows: dict[str, Row]) -> list[str]:
    lines = ["| model | MSE / pixel | BCE / pixel | kimg | train s |", "| --- |" + " ---: |" * 4]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['mse']:.4f} | {r['bce']:.4f} | {r['kimg']:.1f} | {r['train_s']:.0f} |")
    return [*lines, "", "Reconstructions of the 2k held-out images (pixels in [0, 1]; the VAE's from its posterior "
                        "mean)."]


def low_data_lines(rows: dict[str, Row], num_classes: int, num_samples: int, args: argparse.Namespace) -> list[str]:
    lines = [*image_table(rows, num_classes, count_tag(num_samples), ("d_gap",)), "",
             f"Each run sees only {args.low_data_images} images of the train split (a seeded draw) for "
             f"{args.low_data_kimg:g} kimg; FID is against the whole train split. d_gap: D's mean probability of "
             f"'real' on its training images minus on the 2k held-out images (0: D generalises; towards 1: it "
             f"memorises). DiffAugment: {DIFFAUGMENT}.", ""]
    for name in args.low_data_presets.split(","):
        plain, augmented = rows[name], rows[f"{name} + DiffAugment"]
        ratio = augmented["fid"] / plain["fid"]
        lines.append(f"- {name}: FID with DiffAugment <= 0.7x without: {augmented['fid']:.3f} vs {plain['fid']:.3f} "
                     f"({ratio:.2f}x): {verdict(ratio <= 0.7)}")
    return lines


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


PARTS = ("mnist", "curve", "low-data", "sgan", "2d")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated parts to run, among {', '.join(PARTS)} (default: all)")
    parser.add_argument("--kimg", type=float, default=480.0, help="images per MNIST preset, in thousands")
    parser.add_argument("--curve-every", type=float, default=40.0,
                        help="kimg between the curve part's checkpoints (it trains for --kimg)")
    parser.add_argument("--low-data-images", type=int, default=1000, help="training images of the low-data part")
    parser.add_argument("--low-data-presets", default="mnist-dcgan,mnist-resnet",
                        help="comma-separated MNIST presets of the low-data part")
    parser.add_argument("--low-data-kimg", type=float, default=400.0, help="images per low-data run, in thousands")
    parser.add_argument("--sgan-draws", type=int, default=3, help="labelled subsets drawn for the sgan part")
    parser.add_argument("--sgan-kimg", type=float, default=None, help="images per sgan run (default: the preset's)")
    parser.add_argument("--kimg-2d", type=float, default=None, help="images per 2-D preset (default: the preset's)")
    parser.add_argument("--num-samples", type=int, default=10000, help="generated samples per MNIST metric")
    parser.add_argument("--out", type=Path, help="also write the tables and verdicts here as markdown")
    args = parser.parse_args()
    parts = PARTS if args.only is None else tuple(p.strip() for p in args.only.split(","))
    if unknown := set(parts) - set(PARTS):
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose among {', '.join(PARTS)}")
    torch.set_num_threads(2)

    lines: list[str] = []
    image_parts = [p for p in parts if p != "2d"]
    if image_parts and not MNIST_ROOT.is_dir():
        print(f"note: {MNIST_ROOT} is absent; skipping the MNIST parts")
    elif image_parts:
        cfgs = mnist_configs(args)
        judge, floor_row = mnist_judge(args, cfgs)
        num_classes, floor_name = judge.evaluator.num_classes, f"floor (real {count_tag(FLOOR_SAMPLES)} vs same)"
        if "mnist" in parts:
            generators, reconstruction = run_mnist(args, judge, cfgs)
            rows = {floor_name: floor_row, **generators}
            lines += ["## MNIST", "", *mnist_lines(rows, num_classes, judge.num_samples, len(judge.x_train)), "",
                      "## MNIST autoencoders", "", *reconstruction_lines(reconstruction), ""]
        if "curve" in parts:
            lines += ["## MNIST: mnist-dcgan and mnist-resnet over training", "",
                      *curve_lines(run_curves(args, judge, cfgs), judge.num_samples), ""]
        if "low-data" in parts:
            rows = {floor_name: floor_row, **run_low_data(args, judge, cfgs)}
            lines += [f"## MNIST, {args.low_data_images} training images", "",
                      *low_data_lines(rows, num_classes, judge.num_samples, args), ""]
        if "sgan" in parts:
            rows = run_semi_supervised(args, judge)
            lines += ["## MNIST semi-supervised", "", *semi_supervised_lines(rows, len(judge.x_test)), ""]
    if "2d" in parts:
        lines += ["## 2-D mixtures", "", *point_lines(run_points(args)), ""]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
