"""TFLite (LiteRT) export: parity with JAX, quantization, chunking, runner.

Conversions dominate the runtime (~5-10 s each on 2 cores), so the exported
folders are module fixtures shared by several tests:
  * `fp32`: the tiny random diffusers pipeline (full FLUX tiny config, adaln),
    unchunked, 32x48 px, T5 length 16, 3 steps;
  * `int8`: the same pipeline, int8 dynamic-range, denoiser forced into
    block chunks by a small `max_chunk_bytes` (chunked adaln hand-off);
  * a static-modulation student, unchunked and chunked (denoiser only);
  * a hidden-256 2-block denoiser (2.8M params) for the quantization size table: the
    tiny pipeline's 0.36M-param DiT is too small for the int8 ratio because
    the graph (RoPE constants, op tables) is a fixed ~0.5 MB.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanoflux_jax as nf
from nanoflux_jax.export import bundle
from nanoflux_jax.export import components
from nanoflux_jax.export import runner
from nanoflux_jax.export import tflite
from nanoflux_jax.models import flux

from refs import max_rel_err, require
from nanoflux_jax.testing.tiny_flux import make_tiny_flux_pipeline

H, W, T, STEPS = 32, 48, 16, 3   # tiny VAE factor 2: packed grid 8 x 12.
PROMPTS = ['a red circle on the left', 'a photo of a blue dog']
TOL = 1e-5  # fp32 TFLite vs JAX: max relative error (~3e-6 measured).
STATIC_TS = (1.0, 0.75, 0.5, 0.25)


def _require_tflite():
  require('tensorflow')
  require('ai_edge_litert')


@pytest.fixture(scope='module')
def jax_pipe(tmp_path_factory):
  _require_tflite()
  path = tmp_path_factory.mktemp('pipe')
  make_tiny_flux_pipeline(path)
  return nf.FluxPipeline.from_pretrained(str(path))


@pytest.fixture(scope='module')
def fp32(jax_pipe, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('export') / 'fp32')
  bundle.export_pipeline(jax_pipe, out, H, W, num_steps=STEPS,
                         max_sequence_length=T)
  return out


@pytest.fixture(scope='module')
def int8(jax_pipe, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('export') / 'int8')
  total = tflite.tree_bytes(jax_pipe.flux_params) / 4  # int8: 1 byte each.
  bundle.export_pipeline(jax_pipe, out, H, W, num_steps=STEPS,
                         max_sequence_length=T, quantize='int8',
                         max_chunk_bytes=total * 0.6)
  return out


def _random_inputs(specs, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(d) if d == np.float32
          else np.zeros(s, d) for k, (s, d) in specs.items()}


def _manifest(path):
  with open(os.path.join(path, 'manifest.json')) as f:
    return json.load(f)


def _files(m):
  f = m['files']
  return [e for k in ('t5', 'clip', 'denoiser', 'vae_decoder') if k in f
          for e in (f[k] if isinstance(f[k], list) else [f[k]])]


# ----------------------------------------------------------------------------
# Denoiser parity.
# ----------------------------------------------------------------------------
def test_denoiser_fp32_matches_jax(jax_pipe, fp32):
  cfg, params = jax_pipe.flux_cfg, jax_pipe.flux_params
  m = _manifest(fp32)
  assert [e['file'] for e in m['files']['denoiser']] == ['denoiser.tflite']
  model = runner.TFLiteModel(fp32, m['files']['denoiser'][0])
  gh, gw = m['latent']['grid']
  x = _random_inputs(components.denoiser_inputs(cfg, gh * gw, T))
  x['timesteps'] = np.array([0.7], np.float32)
  got = model(**x)['velocity']
  want = jax.jit(flux.Flux(cfg).apply)(
      {'params': params}, img=x['img'],
      img_ids=nf.sampling.image_ids(1, gh, gw), txt=x['txt'],
      txt_ids=nf.sampling.text_ids(1, T), timesteps=x['timesteps'],
      y=x['y']).velocity
  assert max_rel_err(got, want) < TOL


@pytest.fixture(scope='module')
def static_student(tmp_path_factory):
  _require_tflite()
  cfg = nf.FluxConfig.tiny(modulation='static', static_timesteps=STATIC_TS)
  params = flux.init_params(cfg, jax.random.key(1))
  # The tables init to zeros (identity modulation); random rows make the
  # step index matter.
  keys = iter(jax.random.split(jax.random.key(2), 64))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: (0.3 * jax.random.normal(next(keys), x.shape)
                    if 'table' in jax.tree_util.keystr(p) else x), params)
  out = str(tmp_path_factory.mktemp('static'))
  full = bundle.export_denoiser(cfg, params, out, 4, 4, 8,
                                max_chunk_bytes=None, prefix='full')
  chunked = bundle.export_denoiser(
      cfg, params, out, 4, 4, 8, prefix='chunk',
      max_chunk_bytes=tflite.tree_bytes(params) * 0.6)
  return cfg, params, out, full, chunked


def test_static_student_matches_jax_and_chunks(static_student):
  cfg, params, out, full, chunked = static_student
  assert 'y' not in full[0]['inputs'] and 'timesteps' not in full[0]['inputs']
  assert full[0]['inputs']['step']['dtype'] == 'int32'
  assert len(chunked) >= 2
  assert chunked[1]['inputs'].keys() == {'img_h', 'txt_h', 'step'}
  whole = runner.TFLiteModel(out, full[0])
  parts = [runner.TFLiteModel(out, e) for e in chunked]
  x = _random_inputs(components.denoiser_inputs(cfg, 16, 8))
  apply = jax.jit(flux.Flux(cfg).apply)
  outs = []
  for step, t in enumerate(STATIC_TS):
    x['step'] = np.array([step], np.int32)
    got = whole(**x)['velocity']
    want = apply(
        {'params': params}, img=x['img'], img_ids=nf.sampling.image_ids(1, 4, 4),
        txt=x['txt'], txt_ids=nf.sampling.text_ids(1, 8),
        timesteps=jnp.array([t])).velocity
    assert max_rel_err(got, want) < TOL, step
    state = dict(x)
    for p in parts:
      state.update(p(**{k: state[k] for k in p.inputs}))
    assert max_rel_err(state['velocity'], got) < 1e-5, step
    outs.append(got)
  assert max_rel_err(outs[0], outs[1]) > 1e-2  # The step index is used.


def test_compressed_student_with_downsampler_matches_jax(tmp_path):
  """Pruned widths + static modulation + token down-sampler (unchunked)."""
  _require_tflite()
  from nanoflux_jax import compress
  cfg = nf.FluxConfig.tiny(depth=2, depth_single_blocks=3)
  params = flux.init_params(cfg, jax.random.key(3))
  mask = compress.select(cfg, jax.tree.map(
      lambda m: np.random.default_rng(0).random(m.shape),
      compress.PruneMask.ones(cfg)), keep_heads=0.5, keep_mlp=0.5,
                         scope='block')
  cfg, params = compress.prune(cfg, params, mask)
  pooled = jax.random.normal(jax.random.key(4), (2, cfg.vec_in_dim))
  cfg, params = compress.to_static_modulation(cfg, params, STATIC_TS, pooled)
  cfg, params = compress.add_downsampler(cfg, params, 1, 3, jax.random.key(5))
  entries = bundle.export_denoiser(cfg, params, str(tmp_path), 4, 4, 8,
                                   max_chunk_bytes=None)
  model = runner.TFLiteModel(str(tmp_path), entries[0])
  assert tflite.non_builtin_ops(tflite.tflite_ops(model.path)) == []
  x = _random_inputs(components.denoiser_inputs(cfg, 16, 8))
  x['step'] = np.array([2], np.int32)
  want = flux.Flux(cfg).apply(
      {'params': params}, img=x['img'], img_ids=nf.sampling.image_ids(1, 4, 4),
      txt=x['txt'], txt_ids=nf.sampling.text_ids(1, 8),
      timesteps=jnp.array([STATIC_TS[2]]), img_grid=(4, 4)).velocity
  assert max_rel_err(model(**x)['velocity'], want) < TOL


def test_chunk_chain_equals_flux_in_jax():
  # The adaln hand-off with every embedder (time, guidance, vector).
  cfg = nf.FluxConfig.tiny(guidance_embed=True, depth=1)
  params = flux.init_params(cfg, jax.random.key(0))
  fn, specs = components.denoiser_fn(cfg, 4, 4, 8)
  x = _random_inputs(specs)
  x['timesteps'] = np.array([0.4], np.float32)
  x['guidance'] = np.array([3.5], np.float32)
  chunks = components.plan_chunks(cfg, params, 1.0)  # one block per chunk.
  assert len(chunks) == cfg.num_blocks and chunks[0][0] == 'img_in'
  got = jax.jit(lambda p, x: components.run_chunks_jax(
      cfg, p, chunks, 4, 4, x))(params, x)
  np.testing.assert_allclose(got, jax.jit(fn)(params, x)['velocity'],
                             rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Quantization and op lists.
# ----------------------------------------------------------------------------
def test_quantization_sizes(tmp_path, capsys):
  _require_tflite()
  # hidden 256 (4 heads x 64), 1 double + 1 single block: 2.8M params.
  cfg = nf.FluxConfig.tiny(hidden_size=256, head_dim=64, axes_dim=(16, 24, 24),
                           in_channels=64, context_in_dim=64, depth=1,
                           depth_single_blocks=1)
  params = flux.init_params(cfg, jax.random.key(0))
  fn, specs = components.denoiser_fn(cfg, 4, 4, 8)
  x = _random_inputs(specs)
  x['timesteps'] = np.array([0.5], np.float32)
  want = jax.jit(fn)(params, x)['velocity']
  sizes, errs = {}, {}
  for q in tflite.QUANTIZE_OPTIONS:
    e = tflite.convert(fn, params, specs, str(tmp_path / f'{q}.tflite'),
                       quantize=q)
    assert tflite.non_builtin_ops(e['ops']) == [], (q, e['ops'])
    sizes[q] = e['bytes']
    # Every quantized width divides by 32: int4 must not silently fall back
    # from blockwise (32 weights per scale) to per-channel.
    assert e['scheme'] == ('int4_block32' if q == 'int4' else q), e['scheme']
    errs[q] = max_rel_err(runner.TFLiteModel(str(tmp_path), e)(**x)
                          ['velocity'], want)
  with capsys.disabled():
    print('\nquantize  MB     x fp32  max rel err (hidden-256 2-block DiT)')
    for q in sizes:
      print(f'{q:8s} {sizes[q] / 1e6:6.2f}  {sizes[q] / sizes["none"]:.3f}  '
            f'{errs[q]:.2e}')
  assert errs['none'] < TOL
  assert sizes['int8'] <= 0.3 * sizes['none']
  assert sizes['fp16'] <= 0.55 * sizes['none']
  assert sizes['int4'] < sizes['int8']
  # Random weights amplify quantization noise; these bound gross breakage.
  # Measured: fp16 1.3e-2, int8 1.8e-2, int4 (block 32) 1.9e-1.
  assert errs['fp16'] < 0.05 and errs['int8'] < 0.1 and errs['int4'] < 0.3


def test_every_exported_file_is_builtin_only(fp32, int8):
  for folder in (fp32, int8):
    m = _manifest(folder)
    for e in _files(m):
      ops = tflite.tflite_ops(os.path.join(folder, e['file']))
      assert ops == e['ops'] and tflite.non_builtin_ops(ops) == [], e['file']
  assert len(_manifest(int8)['files']['denoiser']) >= 2


def test_unsupported_op_is_named(tmp_path):
  _require_tflite()
  fn = lambda p, x: {'y': jnp.linalg.cholesky(x['a'] @ x['a'].T + p['w'])}
  with pytest.raises(tflite.ExportError, match='lapack'):
    tflite.convert(fn, {'w': np.eye(4, dtype=np.float32)},
                   {'a': ((4, 4), np.float32)}, str(tmp_path / 'bad.tflite'))
  assert not os.path.exists(tmp_path / 'bad.tflite')


# ----------------------------------------------------------------------------
# End to end.
# ----------------------------------------------------------------------------
def _noise(batch, seed=0):
  x = jax.random.normal(jax.random.key(seed), (batch, 16, H // 2, W // 2))
  return np.asarray(nf.sampling.pack(x))


def test_manifest(fp32, jax_pipe):
  m = _manifest(fp32)
  assert m['latent']['packed_shape'] == [1, (H // 4) * (W // 4), 64]
  # The one schedule owner, with the exported (schnell-like) denoiser.
  assert not jax_pipe.flux_cfg.guidance_embed
  assert m['schedule']['timesteps'] == nf.sampling.schedule_for(
      jax_pipe.flux_cfg, STEPS, 96)
  assert m['vae']['scaling_factor'] == pytest.approx(0.3611)
  assert m['files']['t5']['inputs']['input_ids'] == {
      'shape': [1, T], 'dtype': 'int32'}
  assert m['files']['vae_decoder']['outputs']['image'] == {
      'shape': [1, H, W, 3], 'dtype': 'uint8'}
  for d in ('tokenizer', 'tokenizer_2'):
    assert os.listdir(os.path.join(fp32, d))


def test_tflite_pipeline_reproduces_jax(jax_pipe, fp32):
  noise = _noise(2)
  pipe = nf.export.TFLitePipeline(fp32, num_threads=2)
  got = pipe(PROMPTS, latents=noise, output_type='latent')
  want = jax_pipe(PROMPTS, H, W, num_steps=STEPS, latents=noise,
                  max_sequence_length=T, output_type='latent')
  assert max_rel_err(got, want) < TOL
  img = pipe(PROMPTS, height=H, width=W, latents=noise)
  want_img = jax_pipe(PROMPTS, H, W, num_steps=STEPS, latents=noise,
                      max_sequence_length=T)
  assert img.dtype == np.uint8 and img.shape == (2, H, W, 3)
  assert np.abs(img.astype(int) - want_img.astype(int)).max() <= 1


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def test_int8_image_psnr(jax_pipe, int8, capsys):
  noise = _noise(2, seed=1)
  got = nf.export.TFLitePipeline(int8)(PROMPTS, latents=noise)
  want = jax_pipe(PROMPTS, H, W, num_steps=STEPS, latents=noise,
                  max_sequence_length=T)
  psnr = _psnr(got, want)
  with capsys.disabled():
    print(f'\nint8 (chunked denoiser) vs fp32 JAX image PSNR: {psnr:.1f} dB')
  assert psnr >= 30.0


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------
def test_bad_resolution_fails_before_converting(jax_pipe, tmp_path):
  with pytest.raises(ValueError, match='height=30'):
    bundle.export_pipeline(jax_pipe, str(tmp_path / 'x'), 30, 48)
  with pytest.raises(ValueError, match='quantize'):
    bundle.export_pipeline(jax_pipe, str(tmp_path / 'x'), 32, 48,
                           quantize='int3')
  assert not os.listdir(tmp_path)


def test_failed_export_keeps_good_folder(jax_pipe, fp32, tmp_path,
                                         monkeypatch):
  good = str(tmp_path / 'good')
  shutil.copytree(fp32, good)

  def boom(*a, **k):
    raise tflite.ExportError('simulated failure')

  monkeypatch.setattr(tflite, 'convert', boom)
  with pytest.raises(tflite.ExportError, match='simulated'):
    bundle.export_pipeline(jax_pipe, good, H, W, max_sequence_length=T)
  assert sorted(os.listdir(tmp_path)) == ['good']  # no temp folder left.
  assert _manifest(good) == _manifest(fp32)


def test_runner_errors(fp32, tmp_path):
  pipe = nf.export.TFLitePipeline(fp32)
  with pytest.raises(ValueError, match='height=64'):
    pipe(PROMPTS, height=64, width=W)
  with pytest.raises(ValueError, match='latents have shape'):
    pipe(PROMPTS, latents=np.zeros((2, 95, 64), np.float32))
  with pytest.raises(ValueError, match='empty'):
    pipe([])
  with pytest.raises(ValueError, match=r"'img' has shape \[1, 80, 64\]"):
    pipe.denoiser[0](img=np.zeros((1, 80, 64)), txt=np.zeros((1, T, 32)),
                     timesteps=np.zeros(1), y=np.zeros((1, 32)))
  with pytest.raises(ValueError, match="'y' is missing"):
    pipe.denoiser[0](img=np.zeros((1, 96, 64)), txt=np.zeros((1, T, 32)),
                     timesteps=np.zeros(1))

  broken = str(tmp_path / 'broken')
  shutil.copytree(fp32, broken)
  m = _manifest(broken)
  del m['files']['vae_decoder']
  with open(os.path.join(broken, 'manifest.json'), 'w') as f:
    json.dump(m, f)
  with pytest.raises(runner.ManifestError, match='files.vae_decoder'):
    nf.export.TFLitePipeline(broken)
  os.remove(os.path.join(broken, 'manifest.json'))
  with pytest.raises(FileNotFoundError, match='manifest'):
    nf.export.TFLitePipeline(broken)
