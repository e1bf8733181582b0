"""CLIP text model: parity with transformers' CLIPTextModel, import errors."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflux_jax.configs import ClipConfig
from nanoflux_jax.convert import text_encoders
from nanoflux_jax.convert.safetensors_io import CheckpointError
from nanoflux_jax.models.clip import ClipTextModel
from tests.refs import max_rel_err
from tests.refs import require
from tests.refs import resave_hf_folder
from tests.refs import to_numpy

# fp32 on CPU; observed errors are ~1e-7.
TOL = 1e-5
T = 16
EOS_OTHER = 7  # A non-legacy eos id: pooling at its first occurrence.
HF_KW = dict(vocab_size=100, hidden_size=32, intermediate_size=37,
             num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=20, bos_token_id=0, pad_token_id=1)


def _build(root, eos):
  torch = require('torch')
  transformers = require('transformers')
  torch.manual_seed(eos)
  model = transformers.CLIPTextModel(
      transformers.CLIPTextConfig(eos_token_id=eos, **HF_KW)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name or name.endswith('bias'):
        # Norm scales start at one and biases at zero: make them matter.
        p.copy_((1.0 if name.endswith('weight') else 0.0)
                + 0.3 * torch.randn_like(p))
  path = str(root / f'eos{eos}')
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
  """eos id -> (torch model, folder)."""
  root = tmp_path_factory.mktemp('clip')
  return {eos: _build(root, eos) for eos in (2, EOS_OTHER)}


def _inputs():
  """Rows: [bos, words..., eos, pad...], eos (99, the largest id) at 9 / 13.

  Padding repeats the eos token, as FLUX's CLIP tokenizer does, so
  first-occurrence pooling is exercised; EOS_OTHER appears twice in row 0.
  """
  rng = np.random.default_rng(0)
  ids = rng.integers(10, 90, (2, T)).astype(np.int32)
  ids[:, 0] = 0
  mask = np.ones((2, T), np.int32)
  for row, n in ((0, 9), (1, 13)):
    ids[row, n] = 99
    ids[row, n + 1:] = 99
    mask[row, n + 1:] = 0
  ids[0, 5] = ids[0, 11] = EOS_OTHER
  return ids, mask


def _reference(model, ids, mask):
  torch = require('torch')
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=None if mask is None else torch.tensor(mask))
  return to_numpy(out.last_hidden_state), to_numpy(out.pooler_output)


@functools.lru_cache(maxsize=None)
def _apply_fn(cfg):
  return jax.jit(lambda p, i, m: ClipTextModel(cfg).apply({'params': p}, i, m))


def _ours(cfg, params, ids, mask):
  return _apply_fn(cfg)(params, jnp.asarray(ids),
                        None if mask is None else jnp.asarray(mask))


@pytest.mark.parametrize('eos', [2, EOS_OTHER])
def test_parity(hf, eos):
  model, path = hf[eos]
  cfg, params = text_encoders.load_clip_text(path)
  assert cfg == ClipConfig(
      vocab_size=100, hidden_size=32, intermediate_size=37, num_layers=2,
      num_heads=4, max_position_embeddings=20, eos_token_id=eos)
  ids, mask = _inputs()
  for m in (None, mask):
    hidden, pooled = _ours(cfg, params, ids, m)
    ref_hidden, ref_pooled = _reference(model, ids, m)
    errs = max_rel_err(hidden, ref_hidden), max_rel_err(pooled, ref_pooled)
    print(f'CLIP eos={eos} mask={m is not None}: max rel err hidden '
          f'{errs[0]:.2e} pooled {errs[1]:.2e}')
    assert max(errs) <= TOL
  # The rule itself: argmax of ids (legacy eos 2) or first eos occurrence.
  at = (9, 13) if eos == 2 else (5, 0)
  np.testing.assert_allclose(pooled, np.asarray(hidden)[[0, 1], at])


def test_legacy_layout_with_position_ids(hf, tmp_path):
  """transformers 4.x layout, as FLUX's text_encoder/ ships it.

  Keys under `text_model.` plus the stored `position_ids` buffer, which is
  consumed and ignored.
  """
  model, path = hf[2]

  def legacy(t):
    for k in list(t):
      t[f'text_model.{k}'] = t.pop(k)
    t['text_model.embeddings.position_ids'] = np.arange(20)[None]
  dst = resave_hf_folder(path, str(tmp_path / 'legacy'), legacy)
  cfg, params = text_encoders.load_clip_text(dst)
  ids, mask = _inputs()
  hidden, pooled = _ours(cfg, params, ids, mask)
  ref_hidden, ref_pooled = _reference(model, ids, mask)
  assert max(max_rel_err(hidden, ref_hidden),
             max_rel_err(pooled, ref_pooled)) <= TOL
  # A mix of both layouts is not silently accepted.
  mixed = resave_hf_folder(dst, str(tmp_path / 'mixed'), lambda t: t.update(
      {'final_layer_norm.bias': t['text_model.final_layer_norm.bias']}))
  with pytest.raises(CheckpointError, match='unexpected'):
    text_encoders.load_clip_text(mixed)


def test_missing_and_unexpected_tensors(hf, tmp_path):
  _, path = hf[2]
  key = 'encoder.layers.1.self_attn.k_proj.bias'
  with pytest.raises(CheckpointError, match=key.replace('.', r'\.')):
    text_encoders.load_clip_text(
        resave_hf_folder(path, str(tmp_path / 'a'), lambda t: t.pop(key)))
  with pytest.raises(CheckpointError, match='text_projection'):
    text_encoders.load_clip_text(resave_hf_folder(
        path, str(tmp_path / 'b'),
        lambda t: t.update({'text_projection.weight': np.ones((4, 32))})))


def test_bad_config(hf, tmp_path):
  _, path = hf[2]
  with pytest.raises(CheckpointError, match='config.json'):
    text_encoders.load_clip_text(str(tmp_path))
  with open(os.path.join(path, 'config.json')) as f:
    good = json.load(f)
  for name, cfg, match in (
      ('gelu', dict(good, hidden_act='gelu'), 'hidden_act'),
      ('heads', dict(good, num_attention_heads=5), 'num_attention_heads'),
      ('full', dict(model_type='clip', text_config=good), 'CLIPModel')):
    os.makedirs(tmp_path / name)
    (tmp_path / name / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match) as e:
      text_encoders.load_clip_text(str(tmp_path / name))
    assert 'config.json' in str(e.value)


def test_too_long_input_raises():
  cfg = ClipConfig.tiny(max_position_embeddings=8)
  with pytest.raises(ValueError, match='max_position_embeddings'):
    jax.eval_shape(ClipTextModel(cfg).init, jax.random.key(0),
                   jnp.zeros((1, 9), jnp.int32))


def test_clip_l_param_count_matches_transformers():
  torch = require('torch')
  transformers = require('transformers')
  with torch.device('meta'):
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, projection_dim=768))
  want = sum(p.numel() for p in ref.parameters())
  shapes = text_encoders.param_shapes(ClipTextModel(ClipConfig.clip_l()))
  got = sum(x.size for x in jax.tree.leaves(shapes))
  assert got == want == 123_060_480
