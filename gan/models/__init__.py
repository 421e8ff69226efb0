"""Network families: `build_models(cfg.model, ...) -> (G, D)` for the mlp, dcgan and resnet GANs and the ae and vae
autoencoders (decoder, encoder); D's heads."""

from gan.models import autoencoder, dcgan, mlp, resnet  # noqa: F401  (importing a family registers it)
from gan.models.families import MODELS, build_models, register_model
from gan.models.heads import DiscriminatorHead, GeneratorInput, apply_spectral_norm, realness_logit

__all__ = ["MODELS", "DiscriminatorHead", "GeneratorInput", "apply_spectral_norm", "build_models",
           "realness_logit", "register_model"]
