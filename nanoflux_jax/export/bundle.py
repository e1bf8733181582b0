"""Exports a whole FluxPipeline to a folder of .tflite files plus manifest.json.

Folder layout (what `TFLitePipeline` and a phone app read):
  manifest.json            everything needed to run the files (see below)
  t5.tflite                input_ids [1, T] int32 -> t5_embeds [1, T, ctx]
  clip.tflite              input_ids [1, 77] int32 -> pooled [1, vec]
                           (absent for static-modulation students: no y)
  denoiser.tflite          or denoiser_00.tflite, denoiser_01.tflite, ...
                           (chained through named hand-off tensors)
  vae_decoder.tflite       latents [1, L, 4C] (packed) -> image [1, H, W, 3] u8
  tokenizer/, tokenizer_2/ the CLIP and T5 tokenizers (save_pretrained)

The folder is written to a hidden temporary sibling and renamed into place
only when every file converted and passed the builtin-op check, so a failed
export never replaces a good folder. An existing out_dir is replaced only when
it is an earlier export (or empty); temporary folders of interrupted exports
are removed on the next export to the same place.
"""
from __future__ import annotations

import json
import numbers
import os
import shutil
import time
from typing import Any

import numpy as np

from nanoflux_jax import atomic
from nanoflux_jax import call_args
from nanoflux_jax import sampling
from nanoflux_jax.export import components
from nanoflux_jax.export import tflite

MANIFEST = 'manifest.json'
FORMAT = 'nanoflux-tflite'
VERSION = 1
DEFAULT_CHUNK_BYTES = 1 << 30  # ~1 GB per denoiser file.
CLIP_LENGTH = 77
PACKING = ('latents [1, C, 2*gh, 2*gw] -> packed [1, gh*gw, 4*C]: '
           "'b c (h ph) (w pw) -> b (h w) (c ph pw)', ph = pw = 2")


def is_export(path: str) -> bool:
  """True for a folder that `export_pipeline` wrote (it has a manifest)."""
  return os.path.isfile(os.path.join(path, MANIFEST))


def check_export_args(out_dir: str, height, width, *, num_steps=4,
                      max_sequence_length=256, quantize: str = 'none',
                      factor: int = 1) -> None:
  """Validates export arguments before any expensive work.

  Args:
    factor: pixels per packed token side (2 x the VAE down-sampling); 1
      when not known yet (only positivity is checked then).
  Raises:
    ValueError: naming the argument and what was expected.
    OverwriteError: out_dir exists and is neither an export nor empty.
  """
  def is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
  for name, v in (('height', height), ('width', width)):
    if not is_int(v) or v <= 0 or v % factor:
      raise ValueError(f'export_pipeline: {name}={v!r} must be a positive '
                       f'multiple of {factor} (2 x the VAE downsampling)'
                       if factor > 1 else
                       f'export_pipeline: {name}={v!r} must be a positive '
                       'integer')
  if not is_int(num_steps) or num_steps < 1:
    raise ValueError(f'export_pipeline: num_steps={num_steps!r} must be an '
                     'integer >= 1')
  if not is_int(max_sequence_length) or not 0 < max_sequence_length <= 512:
    raise ValueError(f'export_pipeline: max_sequence_length='
                     f'{max_sequence_length!r} must be in [1, 512]')
  tflite.check_quantize(quantize)
  atomic.check_replaceable(os.path.abspath(os.fspath(out_dir)), is_export,
                           'TFLite export (no manifest.json)')


def export_denoiser(cfg, params, out_dir: str, grid_h: int, grid_w: int,
                    txt_len: int, *, quantize: str = 'none',
                    max_chunk_bytes: float | None = DEFAULT_CHUNK_BYTES,
                    use_buffer_offset: bool | None = None,
                    prefix: str = 'denoiser',
                    workdir: str | None = None) -> list[dict[str, Any]]:
  """Writes the denoiser as one file, or as a chain of block chunks.

  Args:
    cfg, params: the FluxConfig and its params.
    grid_h, grid_w: the packed token grid (height / 16, width / 16 for FLUX).
    txt_len: T5 tokens.
    max_chunk_bytes: chunk when the (quantized) weights exceed this; None
      never chunks (then files above 2 GB use buffer offsets).
    workdir: where the intermediate SavedModels go (default: a temp folder).
  Returns:
    One manifest entry per file, in execution order.
  """
  tflite.check_quantize(quantize)
  bpp = tflite.BYTES_PER_PARAM[quantize]
  total = tflite.tree_bytes(params) / 4 * bpp
  if max_chunk_bytes is None or total <= max_chunk_bytes:
    chunks = [None]
  else:
    chunks = components.plan_chunks(cfg, params, max_chunk_bytes, bpp)
  entries = []
  for i, keys in enumerate(chunks):
    if keys is None:
      fn, inputs = components.denoiser_fn(cfg, grid_h, grid_w, txt_len)
      sub, name = params, f'{prefix}.tflite'
    else:
      fn, inputs = components.chunk_fn(cfg, keys, grid_h, grid_w, txt_len)
      sub = components.chunk_params(params, keys)
      name = f'{prefix}_{i:02d}.tflite'
    entry = tflite.convert(fn, sub, inputs, os.path.join(out_dir, name),
                           quantize=quantize,
                           use_buffer_offset=use_buffer_offset,
                           workdir=workdir)
    entry['blocks'] = [k for k in (keys or components.block_keys(cfg))
                       if 'blocks_' in k]
    entries.append(entry)
  return entries


def _schedule(cfg, num_steps: int, num_tokens: int) -> dict[str, Any]:
  ts = sampling.schedule_for(cfg, num_steps, num_tokens)
  out = {'num_steps': num_steps, 'timesteps': ts}
  if cfg.modulation == 'static':
    table = np.asarray(cfg.static_timesteps)
    out['step_indices'] = [int(np.argmin(np.abs(table - t))) for t in ts[:-1]]
    out['static_timesteps'] = list(cfg.static_timesteps)
  return out


def export_pipeline(pipe, out_dir: str, height: int | None = None,
                    width: int | None = None, *,
                    num_steps: int | None = None,
                    max_sequence_length: int | None = None,
                    quantize: str = 'none', quantize_vae: bool = False,
                    max_chunk_bytes: float | None = DEFAULT_CHUNK_BYTES,
                    use_buffer_offset: bool | None = None) -> dict[str, Any]:
  """Exports `pipe` (a nanoflux_jax FluxPipeline) for one resolution, batch 1.

  Args:
    pipe: has flux_cfg/flux_params, t5_cfg/t5_params/t5_out_dim (a distilled
      student text encoder when t5_out_dim is set), clip_cfg/clip_params,
      vae_cfg/vae_params, tokenizer (CLIP) and tokenizer_2 (T5).
    out_dir: the folder to (re)place.
    height, width: pixels, multiples of 2 * VAE downsampling (16 for FLUX).
      height, width, num_steps and max_sequence_length left None take the
      pipeline's call defaults (its folder's call_defaults.json, else 512,
      512, 4, 256); the manifest records them, and its default_guidance is
      the call default's guidance when set.
    quantize: one of tflite.QUANTIZE_OPTIONS, for the denoiser and text
      encoders; the VAE decoder stays float32 unless `quantize_vae` (its
      convolutions are small and visible in every pixel).
  Returns:
    The manifest (also written to out_dir/manifest.json).
  """
  cfg, vae_cfg = pipe.flux_cfg, pipe.vae_cfg
  d = getattr(pipe, 'call_defaults', None) or call_args.CallDefaults()
  height = d.height if height is None else height
  width = d.width if width is None else width
  num_steps = d.num_steps if num_steps is None else num_steps
  if max_sequence_length is None:
    max_sequence_length = d.max_sequence_length
  guidance = call_args.DEFAULT_GUIDANCE if d.guidance is None else d.guidance
  f = 2 * vae_cfg.downsample_factor
  check_export_args(out_dir, height, width, num_steps=num_steps,
                    max_sequence_length=max_sequence_length,
                    quantize=quantize, factor=f)
  gh, gw = height // f, width // f
  static = cfg.modulation == 'static'
  schedule = _schedule(cfg, num_steps, gh * gw)

  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  atomic.remove_stale(out_dir)
  tmp = atomic.tmp_sibling(out_dir)
  os.makedirs(tmp)
  t_start = time.perf_counter()
  try:
    files: dict[str, Any] = {}
    fn, inputs = components.t5_fn(pipe.t5_cfg, max_sequence_length,
                                  pipe.t5_out_dim)
    files['t5'] = tflite.convert(fn, pipe.t5_params, inputs,
                                 os.path.join(tmp, 't5.tflite'),
                                 quantize=quantize, workdir=tmp)
    if not static:
      fn, inputs = components.clip_fn(pipe.clip_cfg, CLIP_LENGTH)
      files['clip'] = tflite.convert(fn, pipe.clip_params, inputs,
                                     os.path.join(tmp, 'clip.tflite'),
                                     quantize=quantize, workdir=tmp)
    files['denoiser'] = export_denoiser(
        cfg, pipe.flux_params, tmp, gh, gw, max_sequence_length,
        quantize=quantize, max_chunk_bytes=max_chunk_bytes,
        use_buffer_offset=use_buffer_offset, workdir=tmp)
    fn, inputs = components.vae_decoder_fn(vae_cfg, gh, gw, cfg.out_dim)
    files['vae_decoder'] = tflite.convert(
        fn, components.vae_decoder_params(pipe.vae_params), inputs,
        os.path.join(tmp, 'vae_decoder.tflite'),
        quantize=quantize if quantize_vae else 'none', workdir=tmp)
    pipe.tokenizer.save_pretrained(os.path.join(tmp, 'tokenizer'))
    pipe.tokenizer_2.save_pretrained(os.path.join(tmp, 'tokenizer_2'))

    entries = [files['t5'], files.get('clip'), *files['denoiser'],
               files['vae_decoder']]
    manifest = {
        'format': FORMAT, 'version': VERSION,
        'height': height, 'width': width, 'batch': 1,
        'quantize': quantize, 'quantize_vae': bool(quantize_vae),
        'modulation': cfg.modulation,
        'guidance_embed': bool(cfg.guidance_embed),
        'default_guidance': guidance if cfg.guidance_embed else None,
        'max_sequence_length': max_sequence_length,
        'clip_length': None if static else CLIP_LENGTH,
        'schedule': schedule,
        'latent': {'channels': cfg.in_channels // 4, 'grid': [gh, gw],
                   'latent_hw': [2 * gh, 2 * gw],
                   'packed_shape': [1, gh * gw, cfg.in_channels],
                   'packing': PACKING,
                   'euler': 'x += (t_next - t) * velocity, t from 1 to 0'},
        'vae': {'scaling_factor': vae_cfg.scaling_factor,
                'shift_factor': vae_cfg.shift_factor,
                'downsample_factor': vae_cfg.downsample_factor,
                'decoder_applies': 'unpack, x / scaling + shift, decode, '
                                   'round(clip(x / 2 + 0.5, 0, 1) * 255)'},
        'tokenizers': {'clip': None if static else 'tokenizer',
                       't5': 'tokenizer_2'},
        'files': files,
        'sizes': {'bytes': {e['file']: e['bytes'] for e in entries if e},
                  'total_bytes': sum(e['bytes'] for e in entries if e)},
        'export': {'seconds': round(time.perf_counter() - t_start, 1),
                   'peak_rss_mb': round(tflite.peak_rss_mb(), 1)},
        'configs': {'flux': cfg.to_dict(), 'vae': vae_cfg.to_dict()},
    }
    with open(os.path.join(tmp, MANIFEST), 'w') as fh:
      json.dump(manifest, fh, indent=2)
    atomic.check_replaceable(out_dir, is_export, 'TFLite export')
    atomic.replace_dir(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def size_table(manifests: dict[str, dict]) -> str:
  """A text table of file sizes (MB) per quantization choice."""
  names = sorted({f for m in manifests.values() for f in m['sizes']['bytes']})
  rows = [['file'] + list(manifests)]
  for n in names + ['total']:
    row = [n]
    for m in manifests.values():
      b = (m['sizes']['total_bytes'] if n == 'total'
           else m['sizes']['bytes'].get(n))
      row.append('-' if b is None else f'{b / 1e6:.2f}')
    rows.append(row)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return '\n'.join('  '.join(c.rjust(w) for c, w in zip(r, widths))
                   for r in rows)
