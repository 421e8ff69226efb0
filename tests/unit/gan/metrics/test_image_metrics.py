"""Image metrics against closed forms and reference computations in feature space; determinism; Inception-v3."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchvision.models import inception_v3

from gan.config_loader import load_config
from gan.data import to_model_range
from gan.metrics import (
    Evaluator,
    check_inception_weights,
    count_tag,
    evaluate_images,
    extract,
    fid_from_features,
    is_from_logits,
    kid_from_features,
    latent_sampler,
    load_inception,
    precision_recall,
    real_floor,
)
from gan.metrics.image_metrics import class_agreement, class_sampler
from gan.scoring import score_images


def normal(n: int, d: int, seed: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    return mean + std * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_count_tag_names_the_sample_count():
    assert [count_tag(n) for n in (10000, 2000, 2500, 500, 50000, 1234)] == ["10k", "2k", "2.5k", "500", "50k", "1234"]


def test_fid_of_unit_gaussians_is_the_squared_mean_shift():
    mu = torch.full((8,), 0.5)  # |mu|^2 = 2
    a = normal(5000, 8, 0)
    assert fid_from_features(a, a + mu) == pytest.approx(2.0, abs=1e-6)  # equal covariances: only the shift
    # Independent draws: the mean difference's error gives the estimate a standard deviation of
    # 2 |mu| sqrt(2 / n) = 0.057 here.
    assert fid_from_features(a, normal(5000, 8, 1) + mu) == pytest.approx(2.0, abs=0.25)


def test_fid_of_scaled_gaussians_is_the_trace_term():
    # N(0, I) vs N(0, s^2 I): tr(I + s^2 I - 2 s I) = d (1 - s)^2 = 8 for d=8, s=2.
    assert fid_from_features(normal(5000, 8, 0), normal(5000, 8, 1, std=2.0)) == pytest.approx(8.0, rel=0.05)


def test_fid_matches_the_scipy_sqrtm_formula():
    mix = torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
    a, b = normal(400, 6, 0), normal(300, 6, 1, mean=0.3) @ mix
    x, y = a.double().numpy(), b.double().numpy()
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-4)


def test_inception_score_of_uniform_predictions_is_one_and_of_confident_balanced_ones_is_k():
    assert is_from_logits(torch.zeros(1000, 10)) == pytest.approx(1.0, abs=1e-6)
    confident = 30.0 * torch.nn.functional.one_hot(torch.arange(1000) % 10, 10).float()
    assert is_from_logits(confident) == pytest.approx(10.0, rel=1e-4)
    two_classes = 30.0 * torch.nn.functional.one_hot(torch.arange(1000) % 2, 10).float()
    assert is_from_logits(two_classes) == pytest.approx(2.0, rel=1e-4)


def test_inception_score_leaves_the_global_rng_alone():
    logits = normal(100, 10, 0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    is_from_logits(logits)
    assert torch.equal(torch.rand(3), expected)


def test_kid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    a = normal(2000, 8, 0)
    kid, std = kid_from_features(a, a, subsets=50, subset_size=500)
    assert abs(kid) < 0.01 and std < 0.02
    shifted, _ = kid_from_features(a, normal(2000, 8, 1) + 0.5, subsets=50, subset_size=500)
    assert shifted > 0.2


def test_kid_on_whole_sets_is_the_unbiased_cubic_kernel_mmd():
    a, b = normal(200, 5, 0), normal(200, 5, 1, mean=0.2)
    x, y = a.double().numpy(), b.double().numpy()
    n = len(x)

    def k(u, v):
        return (u @ v.T / 5 + 1) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    ref = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
    # One subset of the full size is a permutation of each set, which the formula does not see.
    kid, std = kid_from_features(a, b, subsets=1, subset_size=n)
    assert kid == pytest.approx(ref, rel=1e-6) and std == 0.0


def test_kid_is_seeded():
    a, b = normal(600, 4, 0), normal(600, 4, 1, mean=0.1)
    assert kid_from_features(a, b, subset_size=100, seed=3) == kid_from_features(a, b, subset_size=100, seed=3)
    assert kid_from_features(a, b, subset_size=100, seed=3) != kid_from_features(a, b, subset_size=100, seed=4)


def test_precision_recall_of_a_set_with_itself_is_one_and_of_far_sets_zero():
    a = normal(1000, 16, 0)
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)


def test_precision_and_recall_count_the_shares_on_the_other_manifold():
    a, far = normal(1000, 16, 0), normal(500, 16, 1) + 100.0
    half_copied = torch.cat([a[:500], far])
    # Half the fakes are real points, half lie far from every real one (and vice versa for recall).
    assert precision_recall(a, half_copied)[0] == 0.5
    assert precision_recall(half_copied, a)[1] == 0.5


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def dist(u, v):
        return np.sqrt(((u[:, None, :] - v[None, :, :]) ** 2).sum(-1))
    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(fake, real)
    return float((d <= r_real[None, :]).any(1).mean()), float((d <= r_fake[:, None]).any(0).mean())


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_match_a_brute_force_reference_across_chunks(k):
    real, fake = normal(230, 4, 0), normal(170, 4, 1, mean=0.4, std=1.3)
    expected = brute_precision_recall(real.double().numpy(), fake.double().numpy(), k)
    assert precision_recall(real, fake, k, chunk=7) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(real, fake, k) == pytest.approx(expected, abs=1e-12)


def test_feature_functions_reject_mismatched_features():
    with pytest.raises(ValueError, match="same D"):
        fid_from_features(normal(10, 4, 0), normal(10, 5, 0))
    with pytest.raises(ValueError, match="more than 3 samples"):
        precision_recall(normal(3, 4, 0), normal(10, 4, 0))


# --- images through a (small, untrained) evaluator ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> tuple[Evaluator, np.ndarray]:
    torch.manual_seed(0)
    net = Evaluator(in_channels=1, resolution=16, num_classes=10, feature_dim=32, width=4).eval()
    images = torch.randint(0, 256, (300, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return net, images.numpy()


def noise_fn(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=gen) * 2 - 1


KEYS = ["fid", "is", "kid", "kid_std", "precision", "recall"]


def test_evaluate_images_is_deterministic_for_a_seed_and_names_the_count(tiny):
    net, real = tiny
    first = evaluate_images(noise_fn, real, net, num_samples=250, batch_size=64, seed=7)
    assert list(first) == [f"eval/{k}_250" for k in KEYS]
    assert all(np.isfinite(v) for v in first.values())
    assert evaluate_images(noise_fn, real, net, num_samples=250, batch_size=64, seed=7) == first
    assert evaluate_images(noise_fn, real, net, num_samples=250, batch_size=64, seed=8) != first


def test_real_floor_keys_and_a_set_against_itself(tiny):
    net, real = tiny
    floor = real_floor(real, real, net, num_samples=300, batch_size=128, seed=0)
    assert sorted(floor) == sorted([f"eval/{k}_floor_300" for k in KEYS if k != "is"] + ["eval/is_real_300"])
    assert floor["eval/fid_floor_300"] == pytest.approx(0.0, abs=1e-6)
    assert floor["eval/precision_floor_300"] == floor["eval/recall_floor_300"] == 1.0


class TinyG(torch.nn.Module):
    """A conditional G (z, y) -> 16 x 16 image that shows whether labels reach it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 256)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.tanh(self.fc(z)).view(-1, 1, 16, 16)
        return out if y is None else out * (y.view(-1, 1, 1, 1) + 1) / 10


def test_latent_sampler_draws_latents_and_labels_from_the_generator(tiny):
    net, real = tiny
    G = TinyG()
    sample = latent_sampler(G, z_dim=4, num_classes=10)
    a, b = sample(5, torch.Generator().manual_seed(0)), sample(5, torch.Generator().manual_seed(0))
    assert a.shape == (5, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, latent_sampler(G, z_dim=4)(5, torch.Generator().manual_seed(0)))
    first = evaluate_images(sample, real, net, num_samples=100, batch_size=30, seed=1)
    assert first == evaluate_images(sample, real, net, num_samples=100, batch_size=30, seed=1)


def test_sample_fn_output_is_checked(tiny):
    net, real = tiny
    with pytest.raises(ValueError, match=r"must return float images \(10, 1, 16, 16\)"):
        evaluate_images(lambda n, g: torch.zeros(n, 1, 8, 8), real, net, num_samples=10)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_images(lambda n, g: torch.full((n, 1, 16, 16), float("nan")), real, net, num_samples=10)


class FeatureAdapter(nn.Module):
    """Test-only: a feature net's features (or logits) as torchmetrics' `feature=` module, on float images in [-1, 1]:
    `num_features` spares torchmetrics its probe with a (1, 3, 299, 299) dummy image."""

    def __init__(self, net: nn.Module, output: str = "features"):
        super().__init__()
        if output not in ("features", "logits"):
            raise ValueError(f"output must be 'features' or 'logits', got {output!r}")
        self.net, self.output = net, output
        self.num_features = net.feature_dim if output == "features" else net.num_classes
        self.train(False)

    def train(self, mode: bool = True) -> FeatureAdapter:
        """Stays in eval mode, as torchmetrics' own NoTrainInceptionV3 does: a metric's .train() must not switch
        the net's BatchNorm to batch statistics."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        features, logits = self.net.features_and_logits(x)
        return features if self.output == "features" else logits


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save", "ignore:std")
def test_feature_adapter_is_a_torchmetrics_feature_module_giving_the_same_numbers(tiny):
    net, real_uint8 = tiny
    real = to_model_range(real_uint8[:200])
    fake = noise_fn(200, torch.Generator().manual_seed(1))
    fid = FrechetInceptionDistance(feature=FeatureAdapter(net), normalize=False)
    fid.train()  # must not put the evaluator's BatchNorm into batch statistics
    fid.update(real, real=True)
    fid.update(fake, real=False)
    score = InceptionScore(feature=FeatureAdapter(net, "logits"), splits=1, normalize=False)
    score.update(fake)
    real_f, _ = extract(net, [real])
    fake_f, fake_logits = extract(net, [fake])
    assert float(fid.compute()) == pytest.approx(fid_from_features(real_f, fake_f), rel=1e-5)
    assert float(score.compute()[0]) == pytest.approx(is_from_logits(fake_logits), rel=1e-5)


# --- Inception-v3 from a local file -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("inception") / "inception_v3.pt"
    torch.save(net.state_dict(), path)
    return str(path)


def test_missing_inception_weights_are_an_error_naming_the_key_not_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        load_inception(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="eval.inception_weights is empty"):
        check_inception_weights("")
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="eval.inception_weights"):
        load_inception(tmp_path / "junk.pt")
    torch.save(Evaluator(in_channels=1, resolution=16, num_classes=10).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="eval.inception_weights"):
        load_inception(tmp_path / "other.pt")


def test_inception_features_and_logits_from_a_local_state_dict(inception_file):
    net = load_inception(inception_file)
    grey = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        feats, logits = net.features_and_logits(grey)
        rgb_feats, _ = net.features_and_logits(grey.repeat(1, 3, 1, 1))
        reference = net.net(torch.nn.functional.interpolate(grey.repeat(1, 3, 1, 1), size=(299, 299),
                                                            mode="bilinear", align_corners=False))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1000)
    assert torch.equal(feats, rgb_feats)
    torch.testing.assert_close(logits, reference)
    metrics = evaluate_images(lambda n, g: torch.rand(n, 1, 28, 28, generator=g) * 2 - 1,
                              torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8), net,
                              num_samples=5, batch_size=5)
    assert list(metrics) == [f"eval/{k}_5" for k in KEYS] and all(np.isfinite(v) for v in metrics.values())


def _score_on_rank_zero_only(rank: int, port: int, done, results) -> None:
    """A DDP-like group of 2 where only rank 0 computes metrics, as when it scores a checkpoint in training."""
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    try:
        if rank == 0:
            feats = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            results.put((fid_from_features(feats, feats + 1.0), is_from_logits(feats),
                         kid_from_features(feats, feats, subset_size=32)[0]))
            done.set()
        else:
            done.wait(30)
    finally:
        dist.destroy_process_group()


def test_metrics_inside_a_process_group_score_locally_without_waiting_for_other_ranks():
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    done, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_score_on_rank_zero_only, args=(r, port, done, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    fid, score, kid = results.get(timeout=1)
    assert fid == pytest.approx(4.0, abs=1e-6) and score >= 1.0 and np.isfinite(kid)


K = 10
LEVELS = torch.linspace(-1.0, 1.0, K)


class BrightnessOracle(nn.Module):
    """An evaluator with a known answer: an image's class is the level nearest its mean brightness (class k is
    drawn at LEVELS[k]), so a class drawn as asked is always classified as asked."""

    num_classes = K

    def __init__(self):
        super().__init__()
        self.levels = nn.Parameter(LEVELS.clone(), requires_grad=False)

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = x.mean(dim=(1, 2, 3))
        return mean[:, None], -(mean[:, None] - self.levels[None, :]).square()


def drawn_as(classes: Tensor, gen: torch.Generator) -> Tensor:
    """Images of `classes` in the oracle's code, with a little pixel noise drawn from `gen`."""
    noise = 0.02 * torch.randn(len(classes), 1, 8, 8, generator=gen)
    return (LEVELS[classes].view(-1, 1, 1, 1) + noise).clamp(-1, 1)


def agreement(sample_fn, **kwargs) -> dict[str, float]:
    return class_agreement(sample_fn, BrightnessOracle(), num_classes=K, shape=(1, 8, 8),
                           **{"num_samples": 2000, "batch_size": 300, "seed": 0, **kwargs})


def test_class_agreement_of_a_generator_that_draws_the_asked_class_is_one():
    assert agreement(lambda y, g: drawn_as(y, g)) == {"eval/class_agreement_2k": 1.0,
                                                      "eval/class_agreement_worst_2k": 1.0}


def test_class_agreement_of_a_generator_that_ignores_its_labels_is_one_in_k():
    # Labels independent of the images: each sample agrees with probability 1/K; the share's std is
    # sqrt(0.1 * 0.9 / 2000) = 0.0067.
    out = agreement(lambda y, g: drawn_as(torch.randint(0, K, (len(y),), generator=g), g))
    assert out["eval/class_agreement_2k"] == pytest.approx(1 / K, abs=0.025)
    assert out["eval/class_agreement_worst_2k"] < 1 / K


def test_class_agreement_counts_each_class_alike_and_names_the_worst():
    # Odd classes come out as the next class: exactly half agree, and an odd class never does.
    out = agreement(lambda y, g: drawn_as(torch.where(y % 2 == 1, (y + 1) % K, y), g), num_samples=1000)
    assert out == {"eval/class_agreement_1k": 0.5, "eval/class_agreement_worst_1k": 0.0}
    # Only class 3 goes wrong, and every class has the same number of samples (1000 / 10).
    out = agreement(lambda y, g: drawn_as(torch.where(y == 3, torch.zeros_like(y), y), g), num_samples=1000)
    assert out == {"eval/class_agreement_1k": 0.9, "eval/class_agreement_worst_1k": 0.0}


def test_class_agreement_is_seeded_and_checks_its_inputs():
    ignore = lambda y, g: drawn_as(torch.randint(0, K, (len(y),), generator=g), g)  # noqa: E731
    assert agreement(ignore, seed=4) == agreement(ignore, seed=4) != agreement(ignore, seed=5)
    with pytest.raises(ValueError, match="the evaluator has 10 classes, the generator 7"):
        class_agreement(ignore, BrightnessOracle(), num_classes=7, num_samples=100, shape=(1, 8, 8))
    with pytest.raises(ValueError, match="at least one sample per class: num_samples=9 < 10 classes"):
        agreement(ignore, num_samples=9)
    with pytest.raises(ValueError, match=r"must return float images \(300, 1, 8, 8\)"):
        agreement(lambda y, g: torch.zeros(len(y), 1, 4, 4))
    with pytest.raises(ValueError, match="non-finite"):
        agreement(lambda y, g: torch.full((len(y), 1, 8, 8), float("nan")))


def test_class_sampler_asks_a_conditional_generator_for_the_given_labels():
    G, y = TinyG(), torch.tensor([0, 9, 9, 4])
    out = class_sampler(G, z_dim=4)(y, torch.Generator().manual_seed(0))
    z = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, G(z, y).detach())


def test_score_images_adds_class_agreement_for_a_conditional_generator_under_the_evaluator(tiny):
    net, real = tiny
    conditional = load_config(None, ["data.source=digits", "data.resolution=16", "model.family=mlp",
                                     "model.conditional=true", "model.z_dim=4", "eval.num_samples=200"])
    metrics = score_images(TinyG(), conditional, K, real, net)
    assert 0.0 <= metrics["eval/class_agreement_200"] <= 1.0
    assert 0.0 <= metrics["eval/class_agreement_worst_200"] <= metrics["eval/class_agreement_200"]
    raw = score_images(TinyG(), conditional, K, real, net, prefix="eval_raw/")
    assert raw["eval_raw/class_agreement_200"] == metrics["eval/class_agreement_200"]
    plain = replace(conditional, model=replace(conditional.model, conditional=False))
    assert not any("class_agreement" in k for k in score_images(TinyG(), plain, K, real, net))
