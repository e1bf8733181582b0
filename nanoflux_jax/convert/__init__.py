"""Checkpoint import: streaming safetensors reading and FLUX / HF key maps."""
from nanoflux_jax.convert.clip_model import load_clip_model
from nanoflux_jax.convert.flux import load_flux_transformer
from nanoflux_jax.convert.flux import save_bfl
from nanoflux_jax.convert.safetensors_io import open_tensors
from nanoflux_jax.convert.safetensors_io import save_file
from nanoflux_jax.convert.text_encoders import load_clip_text
from nanoflux_jax.convert.text_encoders import load_t5_encoder
from nanoflux_jax.convert.vae import load_vae
from nanoflux_jax.errors import CheckpointError
