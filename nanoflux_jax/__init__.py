"""nanoflux_jax: FLUX.1 in pure JAX, compressed NanoFLUX-style for phones."""
from nanoflux_jax import convert
from nanoflux_jax.configs import ClipConfig
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.configs import T5Config
from nanoflux_jax.configs import VAEConfig

__version__ = '0.1.0'
