"""A pipeline folder checked as a whole at load, before any tensor or compute.

Each part of a FLUX folder can be fine on its own and still not fit the
others: tokenizer/ and tokenizer_2/ swapped give ids past the T5 embedding
table (NaN embeddings, a black image, no error), a T5 of the wrong width
fails only inside a jitted call. `FluxPipeline.from_pretrained` and `load`
call these checks with the configs alone (config files and tensor headers)
and the tokenizers, then load the params:

  - every tokenizer's ids fit its encoder's embedding table;
  - the T5 (or student) width is the DiT's context_in_dim, CLIP's pooled
    width its vec_in_dim (AdaLN models; static modulation reads no CLIP);
  - 4 x the VAE's latent channels are the DiT's in_channels and out_dim;
  - in a nanoflux folder, each component's stored params have the shapes
    its nanoflux_config.json implies (diffusers folders get this check from
    the converters, tensor by tensor).

Every error is a CheckpointError naming the folder and the parts that
disagree, all of them at once.
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from nanoflux_jax import checkpoint
from nanoflux_jax.configs import ClipConfig, FluxConfig, T5Config, VAEConfig
from nanoflux_jax.convert import text_encoders
from nanoflux_jax.errors import CheckpointError
from nanoflux_jax.models import flux
from nanoflux_jax.models.clip import ClipTextModel
from nanoflux_jax.models.t5 import StudentTextEncoder, T5Encoder
from nanoflux_jax.models.vae import vae_module

CLIP_MAX_LENGTH = 77  # CLIP ids are padded to 77 (pipeline.CLIP_MAX_LENGTH).
_MAX_LISTED = 8       # Shape mismatches listed per component.


def _vocab(tokenizer) -> int:
  """How many ids the tokenizer can produce (added tokens included)."""
  return len(tokenizer)


def check_parts(folder: str, flux_cfg: FluxConfig, clip_cfg: ClipConfig,
                t5_cfg: T5Config, t5_out_dim: int | None,
                vae_cfg: VAEConfig, tokenizer, tokenizer_2) -> None:
  """Raises CheckpointError when the parts of pipeline `folder` disagree.

  Args:
    t5_out_dim: None for a T5 teacher, else a student's projection width.
    tokenizer, tokenizer_2: the CLIP and T5 tokenizers (None: not checked).
  """
  errors = []
  t5_name = 'text_encoder_2/ (T5)' if t5_out_dim is None else (
      'text_encoder_2/ (student T5)')
  toks = ((tokenizer, 'tokenizer/', clip_cfg.vocab_size, 'text_encoder/ (CLIP)'),
          (tokenizer_2, 'tokenizer_2/', t5_cfg.vocab_size, t5_name))
  for tok, name, vocab, enc in toks:
    if tok is not None and _vocab(tok) > vocab:
      errors.append(f'{name} yields ids up to {_vocab(tok) - 1}, but {enc} '
                    f'has an embedding table of {vocab} rows')
  if (tokenizer is not None and tokenizer_2 is not None and len(errors) and
      _vocab(tokenizer) <= t5_cfg.vocab_size and
      _vocab(tokenizer_2) <= clip_cfg.vocab_size):
    errors.append('tokenizer/ and tokenizer_2/ look swapped: each fits the '
                  "other's encoder")
  width = t5_cfg.d_model if t5_out_dim is None else t5_out_dim
  if width != flux_cfg.context_in_dim:
    errors.append(f'{t5_name} gives {width}-wide embeddings, but '
                  'transformer/ reads context_in_dim='
                  f'{flux_cfg.context_in_dim}')
  if (flux_cfg.modulation == 'adaln' and
      clip_cfg.hidden_size != flux_cfg.vec_in_dim):
    errors.append(f'text_encoder/ (CLIP) pools to {clip_cfg.hidden_size} '
                  'values, but transformer/ reads vec_in_dim='
                  f'{flux_cfg.vec_in_dim}')
  if clip_cfg.max_position_embeddings < CLIP_MAX_LENGTH:
    errors.append(f'text_encoder/ (CLIP) has max_position_embeddings='
                  f'{clip_cfg.max_position_embeddings}, but its ids are '
                  f'padded to {CLIP_MAX_LENGTH}')
  packed = 4 * vae_cfg.latent_channels  # 2 x 2 latent patches per token.
  for field, value in (('in_channels', flux_cfg.in_channels),
                       ('out_channels', flux_cfg.out_dim)):
    if value != packed:
      errors.append(f'vae/ has {vae_cfg.latent_channels} latent channels '
                    f'(packed 2x2: {packed}), but transformer/ has '
                    f'{field}={value}')
  if errors:
    raise CheckpointError(f'{folder}: the pipeline\'s parts disagree:\n  ' +
                          '\n  '.join(errors))


# ---------------------------------------------------------------------------
# A nanoflux component's config against its stored params.
# ---------------------------------------------------------------------------
def expected_shapes(config) -> dict | None:
  """The param tree (ShapeDtypeStructs) a component config implies, or None
  for configs this module does not know (e.g. an evaluator's dict)."""
  if isinstance(config, FluxConfig):
    return flux.param_shapes(config)
  if isinstance(config, T5Config):
    return text_encoders.param_shapes(T5Encoder(config))
  if isinstance(config, ClipConfig):
    return text_encoders.param_shapes(ClipTextModel(config))
  if isinstance(config, dict) and set(config) == {'t5', 'out_dim'}:
    return text_encoders.param_shapes(StudentTextEncoder(
        T5Config.from_dict(config['t5']), int(config['out_dim'])))
  if isinstance(config, VAEConfig):
    s = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, s, s, config.in_channels), jnp.float32)
    variables = jax.eval_shape(
        lambda x: vae_module(config).init(jax.random.key(0), x), x)
    return nn.meta.unbox(variables).get('params', {})
  return None


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(k, simple=True, separator='/'):
          tuple(int(d) for d in v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def stored_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
  """{param path: shape} of checkpoint folder `path`'s params, read from
  orbax's metadata (no array is read); None when it has no params/."""
  # Absolute: orbax reads no metadata from a relative path (it then
  # returns an empty tree, and every param would look missing).
  params = os.path.abspath(os.path.join(path, 'params'))
  if not os.path.isdir(params):
    return None  # checkpoint.load says what is missing.
  try:
    meta = ocp.StandardCheckpointer().metadata(params)
  except Exception as e:  # orbax raises many types; name the folder.
    raise CheckpointError(f'{params}: unreadable params metadata: {e}') from e
  tree = getattr(meta, 'item_metadata', meta)
  return _flat_shapes(getattr(tree, 'tree', tree))


def check_stored_params(path: str, config: Any = None) -> None:
  """Raises CheckpointError when the params stored in checkpoint folder
  `path` do not have the shapes its config implies (an edited
  nanoflux_config.json, or params copied from another model), listing the
  keys that differ. Nothing is compiled or allocated."""
  config = checkpoint.load_config(path) if config is None else config
  want = expected_shapes(config)
  have = stored_shapes(path)
  if want is None or have is None:
    return
  want = _flat_shapes(want)
  diffs = [f'{k}: config gives {list(want[k])}, stored {list(have[k])}'
           for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  diffs += [f'{k}: in the config, not stored' for k in sorted(set(want) -
                                                              set(have))]
  diffs += [f'{k}: stored, not in the config' for k in sorted(set(have) -
                                                              set(want))]
  if diffs:
    more = (f'\n  ... and {len(diffs) - _MAX_LISTED} more'
            if len(diffs) > _MAX_LISTED else '')
    raise CheckpointError(
        f'{path}: {checkpoint.CONFIG_FILE} ({type(config).__name__}) does '
        f'not match the stored params ({len(diffs)} difference(s)):\n  ' +
        '\n  '.join(diffs[:_MAX_LISTED]) + more)
