"""CLIP's vision tower and dual-tower model: parity with transformers'
CLIPModel, the ViT-L/14 preset's size, strict import, CLIPImageProcessor."""
import json
import os

import jax
import numpy as np
import pytest

from nanoflux_jax.configs import ClipConfig
from nanoflux_jax.configs import ClipModelConfig
from nanoflux_jax.configs import ClipVisionConfig
from nanoflux_jax.convert import clip_model
from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.errors import CheckpointError
from nanoflux_jax.evaluate import clip_score
from nanoflux_jax.models import clip_vision
from tests.refs import fill_unique
from tests.refs import max_rel_err
from tests.refs import require
from tests.refs import resave_hf_folder
from tests.refs import to_numpy

# fp32 on CPU; observed errors are ~5e-7.
TOL = 1e-5
HF_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=37,
               num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=20, bos_token_id=0, pad_token_id=1,
               eos_token_id=2)
HF_VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                 num_attention_heads=2, image_size=28, patch_size=7)


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
  """(torch CLIPModel with every tensor distinct, its saved folder)."""
  torch = require('torch')
  transformers = require('transformers')
  torch.manual_seed(0)
  model = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=HF_TEXT, vision_config=HF_VISION, projection_dim=16)).eval()
  fill_unique(model)
  path = str(tmp_path_factory.mktemp('clip') / 'clip')
  model.save_pretrained(path)
  return model, path


def _inputs():
  """Token ids [3, 12] (EOS 99, the largest id, at 5 / 8 / 11, then padded
  with it) and normalised pixels [2, 28, 28, 3]."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 90, (3, 12)).astype(np.int32)
  ids[:, 0] = 0
  for row, n in enumerate((5, 8, 11)):
    ids[row, n:] = 99
  pixels = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
  return ids, pixels


def test_parity_with_transformers_clipmodel(hf):
  torch = require('torch')
  model, path = hf
  cfg, params = clip_model.load_clip_model(path)
  assert cfg == ClipModelConfig(
      text=ClipConfig(vocab_size=100, hidden_size=32, intermediate_size=37,
                      num_layers=2, num_heads=4, max_position_embeddings=20,
                      eos_token_id=2),
      vision=ClipVisionConfig.tiny(), projection_dim=16)
  assert ClipModelConfig.from_json(cfg.to_json()) == cfg
  ids, pixels = _inputs()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    ref_img = model.get_image_features(
        pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
  ours = jax.jit(lambda p, i, x: clip_vision.ClipModel(cfg).apply(
      {'params': p}, i, x))(params, ids, pixels)
  errs = {k: max_rel_err(ours[k], to_numpy(getattr(ref, k)))
          for k in ('text_embeds', 'image_embeds', 'logits_per_image',
                    'logits_per_text')}
  feats = clip_vision.ClipModel(cfg).apply({'params': params}, pixels,
                                           method='image_features')
  errs['image_features'] = max_rel_err(feats, to_numpy(ref_img.pooler_output))
  print('CLIPModel max rel errs:', errs)
  assert max(errs.values()) <= TOL, errs
  # The logit scale is the checkpoint's (perturbed), not the init value.
  np.testing.assert_allclose(
      float(params['logit_scale']), float(model.logit_scale.detach()),
      rtol=1e-6)


def test_vit_l14_param_count_matches_transformers():
  torch = require('torch')
  transformers = require('transformers')
  # openai/clip-vit-large-patch14's config, built on the meta device.
  with torch.device('meta'):
    ref = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14),
        projection_dim=768))
  want = sum(p.numel() for p in ref.parameters())
  shapes = clip_vision.param_shapes(ClipModelConfig.vit_l14())
  got = sum(x.size for x in jax.tree.leaves(shapes))
  assert got == want == 427_616_513
  vision = sum(x.size for x in jax.tree.leaves(shapes['vision']))
  assert vision == sum(p.numel() for p in ref.vision_model.parameters())


def test_legacy_position_ids_are_consumed(hf, tmp_path):
  """openai's snapshots store both towers' position_ids buffers."""
  model, path = hf
  dst = resave_hf_folder(path, str(tmp_path / 'legacy'), lambda t: t.update({
      'text_model.embeddings.position_ids': np.arange(20)[None],
      'vision_model.embeddings.position_ids': np.arange(17)[None]}))
  _, params = clip_model.load_clip_model(dst)
  _, ref = clip_model.load_clip_model(path)
  jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_missing_unexpected_and_misshaped_tensors(hf, tmp_path):
  _, path = hf
  key = 'vision_model.encoder.layers.1.self_attn.k_proj.bias'
  with pytest.raises(CheckpointError, match=key.replace('.', r'\.')):
    clip_model.load_clip_model(
        resave_hf_folder(path, str(tmp_path / 'a'), lambda t: t.pop(key)))
  with pytest.raises(CheckpointError, match='vision_model.extra'):
    clip_model.load_clip_model(resave_hf_folder(
        path, str(tmp_path / 'b'),
        lambda t: t.update({'vision_model.extra': np.ones(3, np.float32)})))
  patch = 'vision_model.embeddings.patch_embedding.weight'
  with pytest.raises(CheckpointError, match='patch_embedding'):
    clip_model.load_clip_model(resave_hf_folder(
        path, str(tmp_path / 'c'),
        lambda t: t.update({patch: np.ascontiguousarray(
            t[patch].transpose(0, 1, 3, 2)[:, :, :, :6])})))


def test_bad_config(hf, tmp_path):
  _, path = hf
  with open(os.path.join(path, 'config.json')) as f:
    good = json.load(f)
  for name, cfg, match in (
      ('text_only', good['text_config'], 'not a CLIPModel config'),
      ('gelu', dict(good, vision_config=dict(good['vision_config'],
                                             hidden_act='gelu')),
       'vision_config.hidden_act'),
      ('patch', dict(good, vision_config=dict(good['vision_config'],
                                              patch_size=5)), 'patch_size'),
      ('proj', dict(good, projection_dim=-1), 'projection_dim')):
    os.makedirs(tmp_path / name)
    (tmp_path / name / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match) as e:
      clip_model.load_clip_model(str(tmp_path / name))
    assert 'config.json' in str(e.value)
  with pytest.raises(CheckpointError, match='not a folder'):
    clip_model.load_clip_model(str(tmp_path / 'nowhere'))


def test_vision_input_size_is_checked():
  cfg = ClipModelConfig.tiny()
  with pytest.raises(ValueError, match=r'\[B, 28, 28, 3\]'):
    jax.eval_shape(clip_vision.ClipModel(cfg).init, jax.random.key(0),
                   np.zeros((1, 4), np.int32), np.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize('shape', [(40, 33), (20, 50), (28, 28), (300, 301)])
def test_preprocess_matches_clip_image_processor(shape, tmp_path):
  transformers = require('transformers')
  rng = np.random.default_rng(shape[0])
  imgs = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
  ref_proc = transformers.CLIPImageProcessor(
      size={'shortest_edge': 28}, crop_size={'height': 28, 'width': 28})
  ref_proc.save_pretrained(tmp_path)
  pp = clip_score.Preprocess.from_folder(str(tmp_path))
  assert pp == clip_score.Preprocess(shortest_edge=28, crop=(28, 28))
  ref = ref_proc(images=list(imgs), return_tensors='np')['pixel_values']
  ours = clip_score.preprocess(imgs, pp)
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), atol=1e-5)
  # transformers 5's CLIPProcessor.save_pretrained nests the same settings
  # in processor_config.json.
  tok = transformers.AutoTokenizer.from_pretrained(
      os.path.join(shapes.teacher_path(), 'tokenizer'))
  transformers.CLIPProcessor(image_processor=ref_proc, tokenizer=tok
                             ).save_pretrained(tmp_path / 'v5')
  assert clip_score.Preprocess.from_folder(str(tmp_path / 'v5')) == pp
  # openai CLIP's defaults (224 px) when the folder has no processor file.
  ref224 = transformers.CLIPImageProcessor()(
      images=list(imgs), return_tensors='np')['pixel_values']
  ours224 = clip_score.preprocess(imgs, clip_score.Preprocess.from_folder(
      str(tmp_path / 'none')))
  np.testing.assert_allclose(ours224, ref224.transpose(0, 2, 3, 1), atol=1e-5)


def test_preprocess_refuses_bad_images():
  with pytest.raises(ValueError, match='uint8'):
    clip_score.preprocess(np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match='uint8'):
    clip_score.preprocess(np.zeros((8, 8, 3), np.uint8))
