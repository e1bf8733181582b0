"""The built-in rung kinds: importing this module registers them.

A new kind is one module that calls `rungs.register_rung`, plus its import
line here.
"""
# pylint: disable=unused-import
# prune, depth, static_modulation, downsample, finetune:
from nanoflux_jax.ladder import compress_rungs
from nanoflux_jax.ladder import export_rung  # export
from nanoflux_jax.ladder import step_rung  # step_distill
from nanoflux_jax.ladder import text_encoder_rung  # text_encoder
