"""Compression: masks, sensitivity, pruning, depth, static modulation."""
from nanoflux_jax.compress.counting import count_flops
from nanoflux_jax.compress.counting import count_params
from nanoflux_jax.compress.depth import remove_blocks
from nanoflux_jax.compress.masks import apply_masks
from nanoflux_jax.compress.masks import prune
from nanoflux_jax.compress.masks import PruneMask
from nanoflux_jax.compress.selection import select
from nanoflux_jax.compress.sensitivity import calibration_set
from nanoflux_jax.compress.sensitivity import CRITERIA
from nanoflux_jax.compress.sensitivity import register
from nanoflux_jax.compress.sensitivity import sensitivity
from nanoflux_jax.compress.static_modulation import to_static_modulation
from nanoflux_jax.compress.token_downsample import add_downsampler
from nanoflux_jax.compress.token_downsample import widen_downsampler
