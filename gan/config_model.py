"""The model and loss sections of the run configuration (gan.config re-exports them with the other sections): the
network families, their options and their training objective, each key with the docstring that is its help text."""

from __future__ import annotations

from dataclasses import dataclass

from gan.config_checks import check as _check

MODEL_FAMILIES = ("mlp", "dcgan", "resnet", "ae", "vae")
AUTOENCODER_FAMILIES = ("ae", "vae")
"""Families trained on a reconstruction likelihood (gan.autoencoding) instead of an adversarial loss: G is the
decoder, D the encoder."""
LIKELIHOODS = ("bernoulli", "gaussian")
LOSSES = ("bce", "hinge", "wgan-gp", "lsgan", "rpgan")
IMAGE_RESOLUTIONS = {"dcgan": (28, 32, 64), "resnet": (28, 32, 64, 128)}
"""Image sides each conv family is built for."""
DIFFAUGMENT_POLICIES = ("color", "translation", "cutout")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: str = "mlp"
    """Network family: mlp, dcgan, resnet (residual G and D without normalisation, R3GAN-like; 28-128 px), ae (an MLP
    autoencoder, a dimensionality reducer registered as its own model) or vae (a variational autoencoder, whose
    decoder samples from the prior and is scored and registered like the GANs' G)."""
    z_dim: int = 100
    """Latent size."""
    latent_codes: int = 0
    """G reads z's first coordinate as one of this many equally likely discrete codes (the bin of its normal
    CDF) and takes a learned embedding of the code in its place, beside the other z_dim - 1 coordinates. The
    latent then has this many disconnected pieces, so G can put separate modes on separate pieces instead of
    stretching one connected latent across the gaps between them, which leaves samples on the way (DeLiGAN,
    Gurumurthy et al. 2017; Khayatkhoei et al. 2018). z stays N(0, I) for sampling, evaluation and served
    models. grid25 goes from 21/25 modes to 25/25 with it (bench/README.md). 0: off; else >= 2, with z_dim >= 2."""
    hidden: tuple[int, ...] = (256,)
    """MLP generator widths from latent to output; D mirrors them (2-D reference: (256,), MNIST: (256, 512, 1024))."""
    g_width: int = 64
    """DCGAN: channels of G's last hidden block (doubled per block towards the latent)."""
    d_width: int = 64
    """DCGAN: channels of D's first block (doubled per block)."""
    d_convs_per_stage: int = 1
    """DCGAN: conv layers per D stage. 1 is the DCGAN paper's D (one 4x4 stride-2 conv per stage); each extra
    layer is a 3x3 stride-1 conv at the stage's output resolution, as in SNGAN's CNN D: depth without
    downsampling. MNIST's D goes from FID(2k) 40 to 13 at 160 kimg with 2 (bench/README.md)."""
    spectral_norm: bool = False
    """Spectral normalisation on D's layers."""
    pack: int = 1
    """PacGAN (Lin et al. 2018): D judges this many samples at once, real with real and fake with fake, side by
    side (MLP) or stacked along the channels (DCGAN); 1 is a plain D. Packing penalises a G that drops modes.
    Each worker's batch must be a multiple of it. R1 and WGAN-GP penalties stay averaged per sample."""
    g_batch_norm: bool = False
    """MLP G: BatchNorm before each hidden activation (PacGAN's 2-D G). The DCGAN G always has it."""
    d_fourier_features: int = 0
    """MLP D: random Fourier features per sample, sin and cos of x W for a fixed W ~ N(0, d_fourier_scale^2)
    (Tancik et al. 2020), beside x. They let D resolve modes far narrower than the data's spread (grid25's
    modes have sigma 0.01 in model units and lie 0.4 apart), which a ReLU D learns only after thousands
    of epochs. 0: off."""
    d_fourier_scale: float = 1.0
    """MLP D: standard deviation of the Fourier frequencies, in model-range units (the 2-D data divided by
    its scale, e.g. 5 for grid25): about 1 / (the finest length D must resolve)."""
    d_input_noise: float = 0.0
    """MLP D: std of the Gaussian noise added to D's input in training (model-range units, pixels in [-1, 1]); 0:
    off. With d_hidden_noise and d_weight_norm, Salimans et al. 2016's semi-supervised D (0.6 here is their 0.3 on
    [0, 1] pixels)."""
    d_hidden_noise: float = 0.0
    """MLP D: std of the Gaussian noise added to the input of every D layer after the first (the head's included)
    in training; 0: off (Salimans et al. 2016: 0.5)."""
    d_weight_norm: bool = False
    """MLP D: weight normalisation (w = g v / ||v||) of every Linear layer (Salimans et al. 2016's D)."""
    conditional: bool = False
    """Class-conditional G (label embedding) and projection D; needs labelled data."""
    semi_supervised: bool = False
    """D with K+1 outputs (K classes + fake), trained from `labels` labelled examples."""
    labels: int = 100
    """Semi-supervised: how many training examples keep their label (which ones: train.seed). They form the
    labelled pool every worker holds, and each D step adds the cross-entropy of a batch drawn from it."""
    augment_labelled: bool = False
    """Semi-supervised: each labelled batch gets random shifts (up to 2 px) and zooms (up to 10%), the augmentation
    of the plain classifier it is compared with (images only)."""
    encoder_hidden: tuple[int, ...] = (32,)
    """ae/vae: encoder widths from the pixels towards the latent, a ReLU after each (ae: the code's too; vae: the last
    feeds the mean and log-variance heads). (32,) with model.z_dim 128 is the reference autoencoder's
    784 -> 32 -> 128."""
    decoder_hidden: tuple[int, ...] = ()
    """ae/vae: decoder widths from the latent towards the pixels, a ReLU after each; empty maps the latent straight to
    the pixel logits (the reference autoencoder's 128 -> 784 with a sigmoid)."""
    likelihood: str = "bernoulli"
    """ae/vae: the decoder's likelihood of a pixel in [0, 1]: bernoulli (binary cross-entropy with the sigmoid of its
    logit) or gaussian (mean the sigmoid of its logit; unit variance for ae, i.e. squared error, and one learned
    variance for all pixels for vae)."""
    beta: float = 1.0
    """vae: weight of the KL term of the ELBO (1 is the ELBO itself; beta-VAE above 1)."""
    diffaugment: str = ""
    """DiffAugment policies for every image D sees, comma-separated: color, translation, cutout (the paper's
    "color,translation,cutout" for small datasets); empty: off. Image data only."""

    def __post_init__(self) -> None:
        _check(self.family in MODEL_FAMILIES, "model.family", f"must be one of {', '.join(MODEL_FAMILIES)}",
               self.family)
        _check(self.z_dim >= 1, "model.z_dim", "must be >= 1", self.z_dim)
        _check(self.latent_codes == 0 or self.latent_codes >= 2, "model.latent_codes", "must be 0 (off) or >= 2",
               self.latent_codes)
        _check(self.latent_codes == 0 or self.z_dim >= 2, "model.z_dim",
               "must be >= 2 with model.latent_codes (the code takes z's first coordinate)", self.z_dim)
        _check(len(self.hidden) >= 1 and all(w >= 1 for w in self.hidden), "model.hidden",
               "must be a non-empty list of positive widths", self.hidden)
        _check(self.g_width >= 1, "model.g_width", "must be >= 1", self.g_width)
        _check(self.d_width >= 1, "model.d_width", "must be >= 1", self.d_width)
        _check(self.d_convs_per_stage >= 1, "model.d_convs_per_stage", "must be >= 1", self.d_convs_per_stage)
        _check(not (self.conditional and self.semi_supervised), "model.semi_supervised",
               "cannot be combined with model.conditional", self.semi_supervised)
        _check(self.labels >= 1, "model.labels", "must be >= 1", self.labels)
        _check(not self.augment_labelled or self.semi_supervised, "model.augment_labelled",
               "needs model.semi_supervised (it augments the labelled batches)", self.augment_labelled)
        _check(self.pack >= 1, "model.pack", "must be >= 1", self.pack)
        _check(self.pack == 1 or not (self.conditional or self.semi_supervised), "model.pack",
               "must be 1 with model.conditional or model.semi_supervised (labels are per sample)", self.pack)
        _check(self.d_fourier_features >= 0, "model.d_fourier_features", "must be >= 0", self.d_fourier_features)
        _check(self.d_fourier_scale > 0, "model.d_fourier_scale", "must be > 0", self.d_fourier_scale)
        _check(self.d_input_noise >= 0, "model.d_input_noise", "must be >= 0", self.d_input_noise)
        _check(self.d_hidden_noise >= 0, "model.d_hidden_noise", "must be >= 0", self.d_hidden_noise)
        _check(not (self.d_weight_norm and self.spectral_norm), "model.d_weight_norm",
               "cannot be combined with model.spectral_norm (both reparametrise D's weights)", self.d_weight_norm)
        for key in ("encoder_hidden", "decoder_hidden"):
            _check(all(w >= 1 for w in getattr(self, key)), f"model.{key}", "must be a list of positive widths",
                   getattr(self, key))
        _check(self.likelihood in LIKELIHOODS, "model.likelihood", f"must be one of {', '.join(LIKELIHOODS)}",
               self.likelihood)
        _check(self.beta > 0, "model.beta", "must be > 0", self.beta)
        if self.family in AUTOENCODER_FAMILIES:
            self._check_autoencoder()
        policies = [p.strip() for p in self.diffaugment.split(",") if p.strip()]
        _check(all(p in DIFFAUGMENT_POLICIES for p in policies), "model.diffaugment",
               f"must list policies among {', '.join(DIFFAUGMENT_POLICIES)}", self.diffaugment)
        if self.family != "mlp":
            _check(not self.g_batch_norm, "model.g_batch_norm", f"is for the mlp family ({self.family}'s G has "
                   "its own normalisation)", self.g_batch_norm)
            _check(self.d_fourier_features == 0, "model.d_fourier_features", "is for the mlp family",
                   self.d_fourier_features)
            for key in ("d_input_noise", "d_hidden_noise", "d_weight_norm"):
                _check(not getattr(self, key), f"model.{key}", "is for the mlp family", getattr(self, key))

    def _check_autoencoder(self) -> None:
        """The GAN-only settings mean nothing to an autoencoder: set, they are refused rather than ignored."""
        gan_only = {"conditional": False, "semi_supervised": False, "pack": 1, "spectral_norm": False,
                    "latent_codes": 0, "diffaugment": ""}
        for key, off in gan_only.items():
            _check(getattr(self, key) == off, f"model.{key}", f"is a GAN setting; the {self.family} family needs "
                   f"{off!r}", getattr(self, key))


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    kind: str = "bce"
    """Adversarial loss: bce (non-saturating), hinge, wgan-gp, lsgan, rpgan (relativistic pairing: D judges
    D(real) - D(fake) of paired samples; with r1_gamma and r2_gamma, R3GAN's loss)."""
    gp_weight: float = 10.0
    """Gradient-penalty weight for wgan-gp."""
    n_critic: int = 1
    """D steps per G step (5 is usual for wgan-gp)."""
    r1_gamma: float = 0.0
    """R1 penalty weight on real data (0 disables it)."""
    r2_gamma: float = 0.0
    """R2 penalty weight: R1's gradient penalty on generated data (0 disables it)."""
    reg_every: int = 1
    """R1 and R2 only every this many D steps, weighted by it (StyleGAN2's lazy regularisation): each penalty's
    double backward costs about two D steps, so 4 saves most of that time for the same expected gradient; 1: every
    step (R3GAN). WGAN-GP's gradient penalty, part of its loss, stays on every step."""
    feature_matching: bool = False
    """G minimises the squared distance between the mean features of a real and a generated batch in D's last
    hidden layer (averaged over the features) instead of its adversarial loss; D keeps `kind`'s loss. Salimans et
    al. 2016's G for a semi-supervised GAN: it makes a worse sampler and a better classifier D."""

    def __post_init__(self) -> None:
        _check(self.kind in LOSSES, "loss.kind", f"must be one of {', '.join(LOSSES)}", self.kind)
        _check(self.gp_weight >= 0, "loss.gp_weight", "must be >= 0", self.gp_weight)
        _check(self.n_critic >= 1, "loss.n_critic", "must be >= 1", self.n_critic)
        _check(self.r1_gamma >= 0, "loss.r1_gamma", "must be >= 0", self.r1_gamma)
        _check(self.r2_gamma >= 0, "loss.r2_gamma", "must be >= 0", self.r2_gamma)
        _check(self.reg_every >= 1, "loss.reg_every", "must be >= 1", self.reg_every)
