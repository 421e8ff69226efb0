"""FID, IS, KID (torchmetrics) and improved precision/recall in a feature net's space, and the real-vs-real floor."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from gan.data.transforms import to_model_range, to_pixels
from gan.rendering import eval_mode, generate

log = logging.getLogger(__name__)

# Every metric here scores features this process holds. torchmetrics would otherwise all-gather its states
# whenever torch.distributed is initialised: inside a DDP worker group (rank 0 scoring a checkpoint in training)
# that waits forever for ranks that never compute the metric.
LOCAL = {"sync_on_compute": False}

SampleFn = Callable[[int, torch.Generator], Tensor]
"""`sample_fn(n, generator)` -> n images (n, C, H, W) in the model range [-1, 1], drawn with `generator`."""

ClassSampleFn = Callable[[Tensor, torch.Generator], Tensor]
"""`sample_fn(y, generator)` -> one image per label of `y` (len(y), C, H, W) in [-1, 1], latents drawn with
`generator`: a conditional generator asked for classes."""


def count_tag(n: int) -> str:
    """Sample count as it appears in metric keys: 10000 -> 10k, 2500 -> 2.5k, 500 -> 500."""
    if n >= 1000 and n % 100 == 0:
        return f"{n / 1000:g}k"
    return str(n)


class _Identity(nn.Module):
    """The `feature=` module for inputs that already are features: the metrics below work in feature space."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


@contextmanager
def _quiet() -> Iterator[None]:
    """Silences torchmetrics' warning that IS/KID keep every feature: here they are small tensors we hold anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom")  # IS's std of one split
        yield


def _check_feats(real: Tensor, fake: Tensor) -> None:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), computed by torchmetrics in float64."""
    _check_feats(real, fake)
    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]), normalize=False, **LOCAL)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid_from_features(real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance (mean, std over `subsets` random subsets; cubic polynomial kernel). Subsets are
    capped at the smaller set's size and drawn from `seed`, leaving the global RNG as it was."""
    _check_feats(real, fake)
    size = min(subset_size, len(real), len(fake))
    with _quiet():
        metric = KernelInceptionDistance(feature=_Identity(real.shape[1]), subsets=subsets, subset_size=size,
                                          **LOCAL)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def is_from_logits(logits: Tensor) -> float:
    """Inception score exp(E_x KL(p(y|x) || p(y))) of softmax(logits), over all samples at once (one split).
    normalize=False: with True, torchmetrics would turn these float inputs into bytes."""
    with _quiet():
        metric = InceptionScore(feature=_Identity(logits.shape[1]), splits=1, normalize=False, **LOCAL)
        metric.update(logits.double())
        with torch.random.fork_rng(devices=[]):  # compute() shuffles with the global RNG; one split makes it moot
            score, _ = metric.compute()
    return float(score)


def _radii(feats: Tensor, k: int, chunk: int) -> Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    sq = feats.square().sum(1)
    out = torch.empty(len(feats), dtype=feats.dtype)
    for i in range(0, len(feats), chunk):
        d = (sq[i:i + chunk, None] + sq[None, :] - 2 * feats[i:i + chunk] @ feats.T).clamp_min_(0)
        # The k+1 smallest include the point itself at distance ~0.
        out[i:i + chunk] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


@torch.no_grad()
def precision_recall(real: Tensor, fake: Tensor, k: int = 3, *, chunk: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of fakes inside the real manifold (the
    union of balls reaching each real point's k-th nearest real neighbour), and of reals inside the fake one.
    Distances are computed `chunk` rows at a time, so 10k x 10k features fit in a few hundred MB."""
    _check_feats(real, fake)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {len(real)} real and {len(fake)} fake")
    real, fake = real.double(), fake.double()
    r_real, r_fake = _radii(real, k, chunk), _radii(fake, k, chunk)
    sq_real, sq_fake = real.square().sum(1), fake.square().sum(1)
    fake_in = torch.zeros(len(fake), dtype=torch.bool)
    real_in = torch.zeros(len(real), dtype=torch.bool)
    for i in range(0, len(fake), chunk):
        d = (sq_fake[i:i + chunk, None] + sq_real[None, :] - 2 * fake[i:i + chunk] @ real.T).clamp_min_(0)
        fake_in[i:i + chunk] = (d <= r_real[None, :]).any(1)
        real_in |= (d <= r_fake[i:i + chunk, None]).any(0)
    return float(fake_in.double().mean()), float(real_in.double().mean())


@torch.no_grad()
def extract(net: nn.Module, batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Runs `net` (eval mode, no grad) over image batches in [-1, 1]; returns CPU float32 (features, logits)."""
    with eval_mode(net):
        device = next(net.parameters()).device
        feats, logits = [], []
        for x in batches:
            f, lg = net.features_and_logits(x.to(device, torch.float32))
            feats.append(f.float().cpu())
            logits.append(lg.float().cpu())
        return torch.cat(feats), torch.cat(logits)


def _subset(images: np.ndarray | Tensor, n: int, seed: int) -> Tensor:
    """`n` of the images, drawn without replacement by `seed` (all of them, with a warning, if there are fewer)."""
    images = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"real images must be uint8 (N, C, H, W), got {images.dtype} {list(images.shape)}")
    if len(images) < n:
        log.warning("only %d real images for %d samples: using all of them", len(images), n)
        return images
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx.sort().values]


def _uint8_batches(images: Tensor, batch_size: int) -> Iterator[Tensor]:
    for i in range(0, len(images), batch_size):
        yield to_model_range(images[i:i + batch_size])


class NonFiniteSamplesError(ValueError):
    """A generator's samples hold NaN or inf (a diverged generator)."""


def fake_batches(sample_fn: SampleFn, n: int, batch_size: int, seed: int, shape: tuple[int, ...],
                 quantize: bool = True) -> Iterator[Tensor]:
    """`n` samples of `sample_fn` in batches, drawn from one generator seeded by `seed`, checked for shape and
    finiteness."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        yield _checked_fakes(sample_fn(m, gen), f"sample_fn({m}, generator)", (m, *shape), quantize)


def _checked_fakes(x: Tensor, call: str, shape: tuple[int, ...], quantize: bool) -> Tensor:
    """A batch of fakes checked for shape and finiteness, quantized when asked."""
    x = x.detach()
    if tuple(x.shape) != shape or not x.is_floating_point():
        raise ValueError(f"{call} must return float images {shape}, got {x.dtype} {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise NonFiniteSamplesError(f"{call.split('(')[0]} returned non-finite values (a diverged generator?)")
    # Fakes are scored on the uint8 pixels they would be saved as, like the stored real images.
    return to_model_range(to_pixels(x)) if quantize else x


def real_features(real_uint8: np.ndarray | Tensor, net: nn.Module, *, num_samples: int, batch_size: int = 500,
                  seed: int = 0) -> tuple[Tensor, Tensor]:
    """(features, logits) of `num_samples` real uint8 images drawn by `seed`."""
    return extract(net, _uint8_batches(_subset(real_uint8, num_samples, seed), batch_size))


def feature_metrics(real: Tensor, fake: Tensor, fake_logits: Tensor, tag: str, *, k: int = 3, seed: int = 0,
                    suffix: str = "") -> dict[str, float]:
    """FID, IS, KID (mean and std), precision and recall from features, keyed `eval/<name><suffix>_<tag>`."""
    kid, kid_std = kid_from_features(real, fake, seed=seed)
    precision, recall = precision_recall(real, fake, k)
    values = {"fid": fid_from_features(real, fake), "is": is_from_logits(fake_logits), "kid": kid,
              "kid_std": kid_std, "precision": precision, "recall": recall}
    return {f"eval/{name}{suffix}_{tag}": v for name, v in values.items()}


def evaluate_images(sample_fn: SampleFn, real_uint8: np.ndarray | Tensor, evaluator: nn.Module, *,
                    num_samples: int, batch_size: int = 500, seed: int = 0, k: int = 3,
                    quantize: bool = True) -> dict[str, float]:
    """Scores `num_samples` images from `sample_fn` against as many real uint8 images (N, C, H, W) in the feature
    space of `evaluator` (an Evaluator or InceptionFeatures): eval/fid_10k, is, kid, kid_std, precision, recall.
    The same inputs and seed give the same numbers."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    real_x = _subset(real_uint8, num_samples, seed)
    real, _ = extract(evaluator, _uint8_batches(real_x, batch_size))
    fake, fake_logits = extract(evaluator, fake_batches(sample_fn, num_samples, batch_size, seed + 1,
                                                         tuple(real_x.shape[1:]), quantize))
    return feature_metrics(real, fake, fake_logits, count_tag(num_samples), k=k, seed=seed + 2)


def real_floor(real_a_uint8: np.ndarray | Tensor, real_b_uint8: np.ndarray | Tensor, evaluator: nn.Module, *,
               num_samples: int, batch_size: int = 500, seed: int = 0, k: int = 3) -> dict[str, float]:
    """The best a generator can score: `real_b` (held out) evaluated as if generated, against `real_a` (what the
    generator saw), at the same sample count: eval/fid_floor_10k, kid_floor, kid_std_floor, precision_floor,
    recall_floor, and is_real (the held-out images' IS)."""
    real, _ = real_features(real_a_uint8, evaluator, num_samples=num_samples, batch_size=batch_size, seed=seed)
    held, held_logits = real_features(real_b_uint8, evaluator, num_samples=num_samples, batch_size=batch_size,
                                      seed=seed + 1)
    tag = count_tag(num_samples)
    floor = feature_metrics(real, held, held_logits, tag, k=k, seed=seed + 2, suffix="_floor")
    floor[f"eval/is_real_{tag}"] = floor.pop(f"eval/is_floor_{tag}")  # a ceiling, not a floor
    return floor


def latent_sampler(G: nn.Module, z_dim: int, num_classes: int = 0) -> SampleFn:
    """`sample_fn` of a generator: z ~ N(0, I) and, for a conditional G, uniform labels, both from the generator."""
    def sample(n: int, gen: torch.Generator) -> Tensor:
        z = torch.randn(n, z_dim, generator=gen)
        y = torch.randint(0, num_classes, (n,), generator=gen) if num_classes else None
        return generate(G, z, y, batch_size=n)

    return sample


def class_sampler(G: nn.Module, z_dim: int) -> ClassSampleFn:
    """`sample_fn(y, generator)` of a conditional generator: z ~ N(0, I) from the generator, labels as asked."""
    def sample(y: Tensor, gen: torch.Generator) -> Tensor:
        return generate(G, torch.randn(len(y), z_dim, generator=gen), y, batch_size=len(y))

    return sample


def class_agreement(sample_fn: ClassSampleFn, evaluator: nn.Module, *, num_classes: int, num_samples: int,
                    shape: tuple[int, ...], batch_size: int = 500, seed: int = 0,
                    quantize: bool = True) -> dict[str, float]:
    """How often a conditional generator draws the class it is asked for: `num_samples` samples, the classes in
    turn (equal shares), classified by `evaluator`'s argmax. eval/class_agreement_<n> is the share classified as
    asked (about 1/K for a generator that ignores its labels), eval/class_agreement_worst_<n> the lowest share
    of one class. `evaluator` (an Evaluator) must know the generator's `num_classes` classes."""
    if evaluator.num_classes != num_classes:
        raise ValueError(f"the evaluator has {evaluator.num_classes} classes, the generator {num_classes}")
    if num_samples < num_classes:
        raise ValueError(f"class agreement needs at least one sample per class: num_samples={num_samples} < "
                         f"{num_classes} classes")
    labels = torch.arange(num_samples) % num_classes
    gen = torch.Generator().manual_seed(seed)
    batches = (_checked_fakes(sample_fn(y, gen), f"sample_fn(y of {len(y)}, generator)", (len(y), *shape), quantize)
               for y in labels.split(batch_size))
    _, logits = extract(evaluator, batches)
    hits = (logits.argmax(1) == labels).double()
    per_class = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, hits) / labels.bincount()
    tag = count_tag(num_samples)
    return {f"eval/class_agreement_{tag}": float(hits.mean()), f"eval/class_agreement_worst_{tag}":
            float(per_class.min())}
