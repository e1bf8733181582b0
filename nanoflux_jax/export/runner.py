"""TFLitePipeline: runs an exported folder with LiteRT, numpy and tokenizers.

This module deliberately imports neither JAX nor TensorFlow: it is the
reference for what a phone app does with the folder `bundle.export_pipeline`
writes (see manifest.json there):

  t5_ids, clip_ids = tokenize(prompt)         # padded to the exported lengths
  txt = t5(t5_ids); pooled = clip(clip_ids)   # clip absent for static students
  x = noise [1, L, 64] (packed)
  for i in range(num_steps):                  # Euler, t from 1 to 0
    v = denoiser file(s)(img=x, txt=txt, timesteps=[t_i], y=pooled)
        (static students: step=[step_indices[i]] instead of timesteps, y)
    x = x + (t_{i+1} - t_i) * v
  image = vae_decoder(latents=x)              # uint8 [1, H, W, 3]

Interpreters use LiteRT's default XNNPACK delegate with `num_threads`.
The manifest is checked as a whole (export.manifest_checks) before any file
loads; prompts, seeds, guidance and latents are checked as FluxPipeline
checks them (call_args), and a long prompt is truncated with its warning.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np

from nanoflux_jax import call_args
from nanoflux_jax import jsonfile
from nanoflux_jax.export.manifest_checks import check_manifest
from nanoflux_jax.export.manifest_checks import get_entry
from nanoflux_jax.export.manifest_checks import ManifestError

MANIFEST = 'manifest.json'
SIGNATURE_KEY = 'serving_default'


def pack(latents: np.ndarray) -> np.ndarray:
  """[B, C, h, w] -> [B, (h/2)(w/2), 4C], as nanoflux_jax.sampling.pack."""
  b, c, h, w = latents.shape
  x = latents.reshape(b, c, h // 2, 2, w // 2, 2)
  return x.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


class TFLiteModel:
  """One .tflite file's serving signature, with input checks.

  Inputs are checked against the manifest entry (names, shapes, dtypes)
  before LiteRT sees them, so a wrong shape fails with the file and input
  named instead of a resize error deep in the interpreter.
  """

  def __init__(self, directory: str, entry: dict, num_threads: int = 2):
    # Deferred: ai-edge-litert is optional (the 'export' extra).
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
    where = f'{directory}/{MANIFEST}'
    self.file = get_entry(entry, 'file', where)
    self.path = os.path.join(directory, self.file)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f'{self.path}: listed in {MANIFEST} but missing')
    self.inputs = get_entry(entry, 'inputs', where)
    self.outputs = get_entry(entry, 'outputs', where)
    try:
      self._interp = Interpreter(model_path=self.path, num_threads=num_threads)
    except (ValueError, RuntimeError) as e:  # e.g. not a valid Flatbuffer.
      raise ManifestError(f'{self.path}: not a valid .tflite file ({e})') from e
    self._runner = self._interp.get_signature_runner(SIGNATURE_KEY)
    actual = self._runner.get_input_details()
    for name, spec in self.inputs.items():
      if name not in actual or list(actual[name]['shape']) != spec['shape']:
        raise ManifestError(
            f'{self.path}: input {name!r} is {spec} in {MANIFEST} but '
            f'{actual.get(name, {}).get("shape", "absent")} in the file')

  def __call__(self, **inputs) -> dict[str, np.ndarray]:
    feed = {}
    for name, spec in self.inputs.items():
      if name not in inputs:
        raise ValueError(f'{self.file}: input {name!r} is missing (expects '
                         f'{sorted(self.inputs)})')
      x = np.asarray(inputs[name])
      if list(x.shape) != spec['shape']:
        raise ValueError(f'{self.file}: input {name!r} has shape '
                         f'{list(x.shape)}, but the file was exported for '
                         f'{spec["shape"]}')
      feed[name] = x.astype(spec['dtype'], copy=False)
    return self._runner(**feed)


class TFLitePipeline:
  """Text-to-image from an exported folder, batch 1 per file call.

    pipe = TFLitePipeline('/path/export', num_threads=2)
    images = pipe(['a red circle'], seed=0)   # uint8 [B, H, W, 3]
  """

  def __init__(self, directory: str, num_threads: int = 2):
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no manifest (not an exported folder)')
    m = jsonfile.read_object(path, ManifestError, 'manifest')
    check_manifest(m, path)  # Before any .tflite or tokenizer loads.
    self.directory, self.manifest = directory, m
    g = lambda key: get_entry(m, key, path)
    self.height, self.width = int(g('height')), int(g('width'))
    self.static = g('modulation') == 'static'
    self.guidance_embed = bool(g('guidance_embed'))
    self.default_guidance = m.get('default_guidance')
    self.max_sequence_length = int(g('max_sequence_length'))
    self.timesteps = [float(t) for t in g('schedule.timesteps')]
    self.step_indices = g('schedule.step_indices') if self.static else None
    self.packed_shape = tuple(g('latent.packed_shape'))
    self.latent_hw = tuple(g('latent.latent_hw'))
    self.latent_channels = int(g('latent.channels'))

    model = lambda e: TFLiteModel(directory, e, num_threads)
    self.t5 = model(g('files.t5'))
    self.clip = None if self.static else model(g('files.clip'))
    self.clip_length = None if self.static else int(g('clip_length'))
    denoiser = g('files.denoiser')
    if not isinstance(denoiser, list) or not denoiser:
      raise ManifestError(f'{path}: files.denoiser must be a non-empty list')
    self.denoiser = [model(e) for e in denoiser]
    self.vae_decoder = model(g('files.vae_decoder'))
    self.tokenizer_2 = self._tokenizer(g('tokenizers.t5'))
    self.tokenizer = None if self.static else self._tokenizer(
        g('tokenizers.clip'))
    self.last_timings: dict[str, Any] = {}

  def _tokenizer(self, name: str):
    # Deferred: transformers (tokenizers only) is heavy to import.
    import transformers  # pylint: disable=g-import-not-at-top
    path = os.path.join(self.directory, name)
    if not os.path.isdir(path):
      raise FileNotFoundError(f'{path}: tokenizer folder listed in '
                              f'{MANIFEST} is missing')
    return transformers.AutoTokenizer.from_pretrained(path)

  # --------------------------------------------------------------------------
  # Stages (batch 1).
  # --------------------------------------------------------------------------
  def tokenize(self, prompt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (t5_ids [1, T], clip_ids [1, 77] or None) int32, padded/truncated
    (with FluxPipeline's warning) by the same call_args.token_ids."""
    t5 = call_args.token_ids(self.tokenizer_2, [prompt],
                             self.max_sequence_length, 'T5')
    clip = None if self.static else call_args.token_ids(
        self.tokenizer, [prompt], self.clip_length, 'CLIP')
    return t5, clip

  def encode_prompt(self, prompt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (t5 embeddings [1, T, ctx], pooled CLIP [1, vec] or None)."""
    t5_ids, clip_ids = self.tokenize(prompt)
    txt = self.t5(input_ids=t5_ids)['t5_embeds']
    pooled = None if self.static else self.clip(input_ids=clip_ids)['pooled']
    return txt, pooled

  def velocity(self, x: np.ndarray, txt: np.ndarray, pooled, step: int,
               guidance: float | None = None) -> np.ndarray:
    """One denoiser evaluation at schedule step `step`, through every chunk."""
    state = {'img': x, 'txt': txt}
    if self.static:
      state['step'] = np.asarray([self.step_indices[step]], np.int32)
    else:
      state['timesteps'] = np.asarray([self.timesteps[step]], np.float32)
      state['y'] = pooled
      if self.guidance_embed:
        g = self.default_guidance if guidance is None else guidance
        state['guidance'] = np.asarray([g], np.float32)
    for model in self.denoiser:
      state.update(model(**{k: state[k] for k in model.inputs if k in state}))
    return state['velocity']

  def denoise(self, x: np.ndarray, txt: np.ndarray, pooled,
              guidance: float | None = None) -> np.ndarray:
    """Euler steps over the exported schedule: [1, L, C] -> [1, L, C]."""
    x = np.asarray(x, np.float32)
    ts = np.asarray(self.timesteps, np.float32)
    for i in range(len(ts) - 1):
      x = x + (ts[i + 1] - ts[i]) * self.velocity(x, txt, pooled, i, guidance)
    return x

  def decode(self, packed: np.ndarray) -> np.ndarray:
    """Packed latents [1, L, C] -> uint8 image [1, H, W, 3]."""
    return self.vae_decoder(latents=packed)['image']

  def _check(self, prompts, height, width, seed=None, guidance=None):
    prompts = call_args.check_prompts('TFLitePipeline', prompts)
    if guidance is not None:
      call_args.check_number('TFLitePipeline', 'guidance', guidance)
    if seed is not None and (isinstance(seed, bool) or
                             not isinstance(seed, (int, np.integer)) or
                             seed < 0):
      raise ValueError(f'TFLitePipeline: seed={seed!r} must be an integer '
                       '>= 0')
    for name, v, want in (('height', height, self.height),
                          ('width', width, self.width)):
      if v is not None and v != want:
        raise ValueError(f'TFLitePipeline: {name}={v}, but {self.directory} '
                         f'was exported for {self.height}x{self.width} '
                         '(re-export for another resolution)')
    return list(prompts)

  def __call__(self, prompts: Sequence[str] | str, height: int | None = None,
               width: int | None = None, seed: int | None = None,
               latents: np.ndarray | None = None,
               guidance: float | None = None, output_type: str = 'np'):
    """Generates images one prompt at a time.

    Args:
      prompts: a prompt or B prompts.
      height, width: optional; must equal the exported resolution.
      seed: numpy noise seed (not the JAX pipeline's noise: pass `latents`
        to reproduce it); ignored when `latents` is given.
      latents: packed initial noise [B, L, C], every value finite.
      guidance: for guidance-distilled models (default: manifest's); a
        finite number.
      output_type: 'np' -> uint8 [B, H, W, 3]; 'latent' -> [B, L, C] float32.
    Raises:
      ValueError: naming the argument, before any model runs.
    """
    prompts = self._check(prompts, height, width, seed, guidance)
    if output_type not in ('np', 'latent'):
      raise ValueError(f"TFLitePipeline: output_type={output_type!r}; "
                       "expected 'np' or 'latent'")
    b = len(prompts)
    shape = (b,) + self.packed_shape[1:]
    if latents is None:
      noise = np.random.default_rng(seed or 0).standard_normal(
          (b, self.latent_channels) + self.latent_hw).astype(np.float32)
      latents = pack(noise)
    else:  # A NaN here gives a garbage image and no error.
      call_args.check_finite('TFLitePipeline', 'latents', latents)
    latents = np.asarray(latents, np.float32)
    if latents.shape != shape:
      raise ValueError(f'TFLitePipeline: latents have shape '
                       f'{latents.shape}, expected packed {shape}')
    timings = {'encode': 0.0, 'denoise': 0.0, 'decode': 0.0}
    outs = []
    for i, prompt in enumerate(prompts):
      t0 = time.perf_counter()
      txt, pooled = self.encode_prompt(prompt)
      t1 = time.perf_counter()
      x = self.denoise(latents[i:i + 1], txt, pooled, guidance)
      t2 = time.perf_counter()
      outs.append(x if output_type == 'latent' else self.decode(x))
      t3 = time.perf_counter()
      for k, dt in (('encode', t1 - t0), ('denoise', t2 - t1),
                    ('decode', t3 - t2)):
        timings[k] += dt
    self.last_timings = timings
    return np.concatenate(outs, axis=0)
