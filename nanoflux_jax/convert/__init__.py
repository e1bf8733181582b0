"""Checkpoint import: streaming safetensors reading and FLUX / HF key maps."""
from nanoflux_jax.convert.safetensors_io import CheckpointError
from nanoflux_jax.convert.safetensors_io import open_tensors
from nanoflux_jax.convert.safetensors_io import save_file
