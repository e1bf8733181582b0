"""T5 v1.1 encoder: parity with transformers' T5EncoderModel, import errors."""
import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflux_jax.configs import T5Config
from nanoflux_jax.convert import text_encoders
from nanoflux_jax.convert.safetensors_io import CheckpointError
from nanoflux_jax.models.t5 import T5Encoder
from nanoflux_jax.models.t5 import relative_position_bucket
from tests.refs import max_rel_err
from tests.refs import require
from tests.refs import resave_hf_folder
from tests.refs import to_numpy

# fp32 on CPU; observed errors are ~1e-7.
TOL = 1e-5
T = 24  # > relative_attention_max_distance, so the clamped bucket is used.
# heads * d_kv = 24 != d_model = 32, as T5 allows: a transposed q is caught.
HF_KW = dict(vocab_size=100, d_model=32, d_kv=6, d_ff=48, num_layers=3,
             num_heads=4, relative_attention_num_buckets=8,
             relative_attention_max_distance=20, feed_forward_proj='gated-gelu',
             dropout_rate=0.0)


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
  """(torch model, single-file folder, sharded folder)."""
  torch = require('torch')
  transformers = require('transformers')
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(transformers.T5Config(**HF_KW)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:  # Initialised to ones: make them matter.
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  root = tmp_path_factory.mktemp('t5')
  single, sharded = str(root / 'single'), str(root / 'sharded')
  model.save_pretrained(single)
  model.save_pretrained(sharded, max_shard_size='20KB')
  assert os.path.exists(os.path.join(sharded, 'model.safetensors.index.json'))
  return model, single, sharded


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, HF_KW['vocab_size'], (2, T)).astype(np.int32)
  mask = np.ones((2, T), np.int32)
  mask[1, T - 7:] = 0
  return ids, mask


def _reference(model, ids, mask):
  torch = require('torch')
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=None if mask is None else torch.tensor(mask))
  return to_numpy(out.last_hidden_state)


@functools.lru_cache(maxsize=None)
def _apply_fn(cfg):
  # jit: one compilation per config instead of compiling op by op.
  return jax.jit(lambda p, i, m: T5Encoder(cfg).apply({'params': p}, i, m))


def _ours(cfg, params, ids, mask):
  return _apply_fn(cfg)(params, jnp.asarray(ids),
                        None if mask is None else jnp.asarray(mask))


@pytest.mark.parametrize('layout', ['single', 'sharded'])
def test_parity(hf, layout):
  model, single, sharded = hf
  cfg, params = text_encoders.load_t5_encoder(
      single if layout == 'single' else sharded)
  assert cfg == T5Config(**{k: v for k, v in HF_KW.items()
                            if k not in ('feed_forward_proj', 'dropout_rate')})
  ids, mask = _inputs()
  for m in (mask, None):
    err = max_rel_err(_ours(cfg, params, ids, m), _reference(model, ids, m))
    print(f'T5 {layout} mask={m is not None}: max rel err {err:.2e}')
    assert err <= TOL


def test_relative_position_bucket_matches_transformers():
  torch = require('torch')
  transformers = require('transformers')
  ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  rel = np.arange(-600, 601)
  for buckets, dist in ((32, 128), (8, 20), (16, 64)):
    want = ref(torch.tensor(rel), bidirectional=True, num_buckets=buckets,
               max_distance=dist).numpy()
    np.testing.assert_array_equal(
        relative_position_bucket(rel, buckets, dist), want)


def test_bfloat16_load(hf):
  model, single, _ = hf
  cfg, params = text_encoders.load_t5_encoder(single, dtype=jnp.bfloat16)
  assert cfg.param_dtype == cfg.dtype == 'bfloat16'
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  ids, mask = _inputs()
  out = _ours(cfg, params, ids, mask)
  assert out.dtype == jnp.bfloat16
  assert max_rel_err(out, _reference(model, ids, mask)) < 5e-2


def test_sharded_params_match_single_device(hf):
  """Heads and mlp sharded 4 ways: same output as the single-device run."""
  _, single, _ = hf
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4),
                           ('data', 'tensor'))
  rules = (('heads', 'tensor'), ('mlp', 'tensor'))
  boxed = jax.eval_shape(T5Encoder(text_encoders.t5_config_from_hf(single))
                         .init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
  shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(boxed), mesh, rules)['params']
  cfg, params = text_encoders.load_t5_encoder(single, shardings=shardings)
  q = params['layers_0']['attn']['q']['kernel']
  assert q.sharding.shard_shape(q.shape) == (32, 1, 6)
  _, ref_params = text_encoders.load_t5_encoder(single)
  ids, mask = _inputs()
  np.testing.assert_allclose(_ours(cfg, params, ids, mask),
                             _ours(cfg, ref_params, ids, mask),
                             rtol=1e-5, atol=1e-6)


def test_tied_embedding_keys(hf, tmp_path):
  model, single, _ = hf
  ids, mask = _inputs()
  ref = _reference(model, ids, mask)

  def both(t):  # shared.weight and encoder.embed_tokens.weight, as tied.
    emb = t.get('shared.weight', t.get('encoder.embed_tokens.weight'))
    t['shared.weight'] = t['encoder.embed_tokens.weight'] = emb

  def only_embed_tokens(t):
    both(t)
    del t['shared.weight']

  for name, edit in (('both', both), ('embed_tokens', only_embed_tokens)):
    cfg, params = text_encoders.load_t5_encoder(
        resave_hf_folder(single, str(tmp_path / name), edit))
    assert max_rel_err(_ours(cfg, params, ids, mask), ref) <= TOL


def test_missing_unexpected_and_misshaped_tensors(hf, tmp_path):
  _, single, _ = hf
  key = 'encoder.block.1.layer.1.DenseReluDense.wo.weight'

  def drop(t):
    del t[key]
  with pytest.raises(CheckpointError, match=key.replace('.', r'\.')):
    text_encoders.load_t5_encoder(resave_hf_folder(single, str(tmp_path / 'a'), drop))

  def extra(t):
    t['encoder.block.9.layer.0.layer_norm.weight'] = np.ones(32, np.float32)
  with pytest.raises(CheckpointError, match=r'encoder\.block\.9'):
    text_encoders.load_t5_encoder(resave_hf_folder(single, str(tmp_path / 'b'), extra))

  def reshape(t):
    t[key] = np.zeros((32, 40), np.float32)
  with pytest.raises(CheckpointError, match='wrong shape'):
    text_encoders.load_t5_encoder(resave_hf_folder(single, str(tmp_path / 'c'),
                                          reshape))

  q = 'encoder.block.0.layer.0.SelfAttention.q.weight'

  def transpose(t):  # [in, out]: the element count fits, only the shape not.
    t[q] = np.ascontiguousarray(t[q].T)
  with pytest.raises(CheckpointError, match=q.replace('.', r'\.')):
    text_encoders.load_t5_encoder(resave_hf_folder(single, str(tmp_path / 'd'),
                                          transpose))


def test_bad_config(hf, tmp_path):
  _, single, _ = hf
  with pytest.raises(CheckpointError, match='config.json'):
    text_encoders.load_t5_encoder(str(tmp_path))
  with open(os.path.join(single, 'config.json')) as f:
    good = json.load(f)
  for name, text, match in (
      ('corrupt', '{"d_model": 32,', 'corrupt'),
      ('relu', json.dumps(dict(good, feed_forward_proj='relu')),
       'feed_forward_proj'),
      ('string', json.dumps(dict(good, d_model='big')), 'd_model')):
    os.makedirs(tmp_path / name)
    (tmp_path / name / 'config.json').write_text(text)
    shutil.copy(os.path.join(single, 'model.safetensors'), tmp_path / name)
    with pytest.raises(CheckpointError, match=match) as e:
      text_encoders.load_t5_encoder(str(tmp_path / name))
    assert 'config.json' in str(e.value)


def test_xxl_param_count_matches_transformers():
  torch = require('torch')
  transformers = require('transformers')
  with torch.device('meta'):
    ref = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
        num_heads=64, feed_forward_proj='gated-gelu'))
  want = sum(p.numel() for p in ref.parameters())  # Tied embedding once.
  shapes = text_encoders.param_shapes(T5Encoder(T5Config.xxl()))
  got = sum(x.size for x in jax.tree.leaves(shapes))
  assert got == want == 4_762_310_656
