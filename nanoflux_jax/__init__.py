"""nanoflux_jax: FLUX.1 in pure JAX, compressed NanoFLUX-style for phones."""
from nanoflux_jax import compress
from nanoflux_jax import convert
from nanoflux_jax import export
from nanoflux_jax import sampling
from nanoflux_jax.configs import ClipConfig
from nanoflux_jax.configs import ClipModelConfig
from nanoflux_jax.configs import ClipVisionConfig
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.configs import T5Config
from nanoflux_jax.configs import VAEConfig
from nanoflux_jax.errors import CheckpointError
from nanoflux_jax.errors import OverwriteError
from nanoflux_jax.models.clip import ClipTextModel
from nanoflux_jax.models.clip_vision import ClipModel
from nanoflux_jax.models.clip_vision import ClipVisionModel
from nanoflux_jax.models.flux import Flux
from nanoflux_jax.models.flux import FluxOutput
from nanoflux_jax.models.t5 import T5Encoder
from nanoflux_jax.models.vae import AutoencoderKL
from nanoflux_jax.pipeline import FluxPipeline

__version__ = '0.1.0'
