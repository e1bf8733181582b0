"""Streaming (chunk-bounded) denoiser export: the path export_large.py runs
on the 2.4B NanoFLUX student, here on a tiny student with every rung
(pruned widths, removed blocks, static modulation, the down-sampler)."""
import filecmp
import os

import jax
import numpy as np
import pytest

import nanoflux_jax as nf
from nanoflux_jax.export import bundle, components, streaming, student

pytest.importorskip('tensorflow')
pytest.importorskip('ai_edge_litert')

GRID, TXT = 4, 5
CHUNK = 120_000  # int8 bytes: 2 chunks, split inside the down-sampled range.


@pytest.fixture(scope='module')
def tiny_student():
  base = nf.FluxConfig.tiny(depth=3, depth_single_blocks=3)
  return student.compressed_shapes(base, student.Recipe(
      keep_heads=0.5, keep_mlp=0.5, keep_double=3, keep_single=3,
      downsample=(1, 4)))


def _inputs(cfg):
  rng = np.random.default_rng(0)
  return {'img': rng.standard_normal((1, GRID * GRID, cfg.in_channels),
                                     np.float32),
          'txt': rng.standard_normal((1, TXT, cfg.context_in_dim), np.float32),
          'step': np.asarray([1], np.int32)}


def test_student_is_built_by_compress_calls(tiny_student):
  cfg, shapes = tiny_student
  assert cfg.modulation == 'static' and len(cfg.static_timesteps) == 4
  assert (cfg.downsample_start, cfg.downsample_end) == (1, 4)
  assert cfg.double_heads == (2, 2, 2) and cfg.single_mlp == (64, 64, 64)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n == nf.compress.count_params(cfg)


def test_chunks_with_downsampler_match_flux(tiny_student):
  cfg, shapes = tiny_student
  params = streaming.materialize(
      streaming.RandomSource(shapes, 0).load(sorted(shapes)))
  x = _inputs(cfg)
  want = nf.Flux(components.export_flux_config(cfg)).apply(
      {'params': params}, img=x['img'],
      img_ids=nf.sampling.image_ids(1, GRID, GRID), txt=x['txt'],
      txt_ids=nf.sampling.text_ids(1, TXT),
      timesteps=np.asarray([cfg.static_timesteps[1]], np.float32),
      img_grid=(GRID, GRID)).velocity
  chunks = components.plan_chunks(cfg, shapes, 1.0)  # one block per chunk.
  assert [components.DOWN_KEY, 'double_blocks_1'] in chunks
  assert ['single_blocks_1', components.UP_KEY] in chunks
  got = components.run_chunks_jax(cfg, params, chunks, GRID, GRID, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_streaming_export_equals_in_memory_export(tiny_student, tmp_path):
  cfg, shapes = tiny_student
  params = streaming.materialize(
      streaming.RandomSource(shapes, 0).load(sorted(shapes)))
  os.makedirs(tmp_path / 'a')
  want = bundle.export_denoiser(cfg, params, str(tmp_path / 'a'), GRID, GRID,
                                TXT, quantize='int8', max_chunk_bytes=CHUNK)
  del params

  source = streaming.RandomSource(shapes, 0)
  got = streaming.export_denoiser_streaming(
      cfg, source, str(tmp_path / 'b'), GRID, GRID, TXT, quantize='int8',
      max_chunk_bytes=CHUNK, processes=False)
  assert len(got) == len(want) == 2
  for a, b in zip(want, got):
    assert a['file'] == b['file']
    assert filecmp.cmp(tmp_path / 'a' / a['file'], tmp_path / 'b' / b['file'],
                       shallow=False), a['file']

  # The loader was asked for each chunk once, in order, and never had more
  # than one chunk's float32 weights alive at a time.
  chunks = components.plan_chunks(cfg, shapes, CHUNK, 1.0)
  chunk_bytes = [4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      components.chunk_params(shapes, keys))) for keys in chunks]
  assert [list(k) for k, _ in source.meter.loads] == chunks
  assert [n for _, n in source.meter.loads] == chunk_bytes
  assert source.meter.total_bytes == 4 * nf.compress.count_params(cfg)
  assert 0 < source.meter.peak_live_bytes <= max(chunk_bytes)
  largest = max(4 * int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert source.meter.peak_live_bytes <= largest  # one tensor at a time.

  # Parity of the chained files (LiteRT) with the simulated-int8 JAX chain.
  x = _inputs(cfg)
  lite = streaming.run_litert(str(tmp_path / 'b'), got, x, num_threads=2)
  ref = streaming.run_jax_streaming(cfg, source, chunks, GRID, GRID, x,
                                    transform=streaming.fake_quant_int8,
                                    quantize_inputs=True)
  fp32 = streaming.run_jax_streaming(cfg, source, chunks, GRID, GRID, x)
  # Measured 0.0093 (x86, XNNPACK); hidden 64 makes the runtime's per-row
  # int8 inputs coarse, so the bound leaves room for other kernels.
  assert streaming.max_rel_err(lite['velocity'], ref['velocity']) < 1.5e-2
  assert streaming.psnr(lite['velocity'], fp32['velocity']) > 30


def test_streaming_export_in_subprocesses(tiny_student, tmp_path):
  """Each file converted by a fresh process, which reports its own peak."""
  cfg, shapes = tiny_student
  source = streaming.RandomSource(shapes, 0)
  entries = streaming.export_denoiser_streaming(
      cfg, source, str(tmp_path), GRID, GRID, TXT, quantize='fp16',
      max_chunk_bytes=None, processes=True)
  assert [e['file'] for e in entries] == ['denoiser.tflite']
  assert entries[0]['loaded_bytes'] == 4 * nf.compress.count_params(cfg)
  assert entries[0]['peak_rss_mb'] > 0
  assert source.meter.loads == []  # The parent loaded nothing.
  x = _inputs(cfg)
  lite = streaming.run_litert(str(tmp_path), entries, x, num_threads=2)
  fp32 = streaming.run_jax_streaming(cfg, source, [None], GRID, GRID, x)
  assert streaming.psnr(lite['velocity'], fp32['velocity']) > 40
