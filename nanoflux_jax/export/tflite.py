"""JAX function -> .tflite: jax2tf (StableHLO) -> SavedModel -> LiteRT builtins.

One exported file is one jitted JAX function `fn(params, inputs) -> outputs`
(both dicts of arrays) with fixed input shapes:

  1. `jax2tf.convert` with native serialization for CPU: the function becomes
     one StableHLO module (an XlaCallModule op);
  2. the params become `tf.Variable`s of a `tf.Module` (not graph constants:
     a graph constant is capped at 2 GB by the GraphDef proto and would be a
     second in-memory copy inside the traced graph);
  3. `tf.saved_model.save`, then `TFLiteConverter.from_saved_model` with
     TFLITE_BUILTINS only, which legalizes StableHLO to builtin TFLite ops and
     freezes the variables into the flatbuffer.

A conversion that would need Flex (Select TF) or custom ops fails with an
`ExportError` that names the offending ops, and every written file is read
back to check that its op list holds builtin ops only.

Quantization ('none' | 'fp16' | 'int8' | 'int4'): fp16 weights and int8
dynamic-range weights come from the converter; int4 (blockwise, 32 weights
per scale, int8 dynamic activations) from ai-edge-quantizer on the float
flatbuffer.

TensorFlow, ai_edge_litert and ai_edge_quantizer are imported lazily, so
`import nanoflux_jax` never needs them.
"""
from __future__ import annotations

import gc
import os
import re
import resource
import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np

QUANTIZE_OPTIONS = ('none', 'fp16', 'int8', 'int4')
# Stored bytes per weight for each option (for chunk planning and estimates).
BYTES_PER_PARAM = {'none': 4.0, 'fp16': 2.0, 'int8': 1.0, 'int4': 0.5625}
# A flatbuffer cannot address more than 2 GB; above this the weights are
# written after the flatbuffer and referenced by offset.
FLATBUFFER_LIMIT = 2**31 - 2**26  # 2 GB less 64 MB of headroom for the graph.
SIGNATURE_KEY = 'serving_default'

InputSpecs = Mapping[str, tuple[tuple[int, ...], Any]]


class ExportError(RuntimeError):
  """A model cannot be exported with builtin TFLite ops (or quantized)."""


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far, in MiB (Linux: KiB units)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def tree_bytes(params) -> int:
  """Bytes of all leaves of a params tree at float32."""
  return int(sum(np.prod(x.shape) * 4 for x in jax.tree.leaves(params)))


def _tf():
  try:
    # Deferred: TensorFlow is optional (the 'export' extra) and heavy.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError('TFLite export needs tensorflow (pip install '
                      'tensorflow-cpu)') from e
  return tf


def check_quantize(quantize: str) -> None:
  if quantize not in QUANTIZE_OPTIONS:
    raise ValueError(f'quantize={quantize!r}; expected one of '
                     f'{QUANTIZE_OPTIONS}')
  if quantize == 'int4':
    try:
      # Deferred: ai-edge-quantizer is optional (the 'export' extra).
      import ai_edge_quantizer  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise ExportError("quantize='int4' needs ai-edge-quantizer (pip install "
                        'ai-edge-quantizer); it is not installed') from e


# ----------------------------------------------------------------------------
# Reading .tflite files.
# ----------------------------------------------------------------------------
def _interpreter(path: str, num_threads: int = 1):
  # Deferred: ai-edge-litert is optional (the 'export' extra).
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  try:
    return Interpreter(model_path=path, num_threads=num_threads)
  except (ValueError, RuntimeError) as e:  # e.g. not a valid Flatbuffer.
    raise ExportError(f'{path}: not a valid .tflite file ({e})') from e


def tflite_ops(path: str) -> list[str]:
  """Sorted names of the operators used by a .tflite file."""
  return sorted({op['op_name'] for op in _interpreter(path)._get_ops_details()})  # pylint: disable=protected-access


def non_builtin_ops(ops) -> list[str]:
  """Ops that are not LiteRT builtins: Flex (Select TF) and custom ops."""
  return sorted(o for o in ops if o.startswith('Flex') or o in (
      'CUSTOM', 'DELEGATE') or not re.fullmatch(r'[A-Z0-9_]+', o))


def signature(path: str) -> dict[str, dict[str, dict]]:
  """{'inputs'|'outputs': {name: {'shape': [...], 'dtype': 'float32'}}}."""
  runner = _interpreter(path).get_signature_runner(SIGNATURE_KEY)
  out = {}
  for kind, details in (('inputs', runner.get_input_details()),
                        ('outputs', runner.get_output_details())):
    out[kind] = {name: {'shape': [int(s) for s in d['shape']],
                        'dtype': np.dtype(d['dtype']).name}
                 for name, d in sorted(details.items())}
  return out


# ----------------------------------------------------------------------------
# Conversion.
# ----------------------------------------------------------------------------
def _unsupported_ops(message: str, fn: Callable, params,
                     inputs: InputSpecs) -> list[str]:
  """Names what blocked a conversion, from the converter error and the HLO.

  The converter reports the TF-level op it could not map ('Custom ops:
  XlaCallModule' when some StableHLO op inside had no builtin lowering), so
  the StableHLO custom calls (LAPACK, FFI targets, ...) are listed too: they
  are the usual culprits.
  """
  ops = []
  for line in re.findall(r'(?:Custom|Flex|Select TF) ops: ([^\n]*)', message):
    ops += [o.strip() for o in line.split(',') if o.strip()]
  ops += re.findall(r"'((?:tf|stablehlo|mhlo|chlo)\.\w+)' op is", message)
  try:
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32),
                          params)
    specs = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in inputs.items()}
    hlo = jax.jit(fn).lower(shapes, specs).as_text()
    ops += [f'stablehlo.custom_call @{t}' for t in
            re.findall(r'stablehlo\.custom_call @(\w+)', hlo)]
  except Exception:  # pylint: disable=broad-except
    pass  # The diagnosis is best effort; the converter error is still shown.
  return sorted(set(ops))


def _saved_model(fn: Callable, params, inputs: InputSpecs, path: str) -> None:
  """Writes `fn` with `params` held as tf.Variables as a SavedModel at path."""
  tf = _tf()
  # Deferred: jax2tf imports TensorFlow, optional and heavy.
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  tf_fn = jax2tf.convert(fn, native_serialization_platforms=('cpu',),
                         with_gradient=False)
  module = tf.Module()
  # One leaf at a time: the only extra copy of the weights is these variables
  # (cast to float32 leaf by leaf, so bf16 params never exist twice in fp32).
  # A callable leaf (streaming.LazyLeaf) makes its tensor only here, so a
  # streaming export never holds a second copy of the chunk.
  module.params = jax.tree.map(
      lambda x: tf.Variable(np.asarray(x() if callable(x) else x, np.float32),
                            trainable=False),
      params)
  specs = {k: tf.TensorSpec(shape, tf.as_dtype(np.dtype(dtype)), name=k)
           for k, (shape, dtype) in inputs.items()}

  @tf.function(autograph=False, input_signature=[specs])
  def serve(x):
    return tf_fn(module.params, x)

  module.serve = serve
  tf.saved_model.save(module, path, signatures={SIGNATURE_KEY: serve})
  del module, serve
  gc.collect()


def _quantize_int4(data: bytes) -> tuple[bytes, str]:
  """int4 weights, int8 dynamic activations: blockwise (32 weights per
  scale) where every quantized dimension divides by 32, else per channel
  (e.g. a tiny CLIP's 37-wide MLP). Returns (model, scheme)."""
  # Deferred: ai-edge-quantizer is optional (the 'export' extra).
  from ai_edge_quantizer import quantizer, recipe  # pylint: disable=g-import-not-at-top
  errors = []
  for scheme, make in (('int4_block32', recipe.dynamic_wi4b32_afp32),
                       ('int4_channel', recipe.dynamic_wi4c_afp32)):
    try:
      result = quantizer.Quantizer(data, make()).quantize(
          enable_progress_bar=False, enable_progress_report=False)
      return bytes(result.quantized_model), scheme
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f'{scheme}: {e}')
  raise ExportError('ai-edge-quantizer failed: ' + '; '.join(errors))


def convert(fn: Callable, params, inputs: InputSpecs, path: str, *,
            quantize: str = 'none', use_buffer_offset: bool | None = None,
            workdir: str | None = None) -> dict[str, Any]:
  """Exports `fn(params, inputs) -> {name: array}` to the .tflite file `path`.

  Args:
    fn: a pure JAX function of (params tree, dict of named inputs) returning a
      dict of named outputs; those names become the signature's names.
    params: the params tree (jax or numpy arrays; cast to float32).
    inputs: {name: (shape, dtype)}, fixed shapes (batch included).
    path: the .tflite file to write.
    quantize: one of QUANTIZE_OPTIONS.
    use_buffer_offset: store weights after the flatbuffer (needed above 2 GB);
      None: only when the float32 weights exceed FLATBUFFER_LIMIT.
    workdir: where the intermediate SavedModel goes (default: a temp folder).
  Returns:
    {'file', 'bytes', 'ops', 'inputs', 'outputs', 'quantize', 'scheme'
     (int4: 'int4_block32' or 'int4_channel'), 'buffer_offset',
     'peak_rss_mb'}.
  Raises:
    ExportError: the model needs non-builtin ops (named), or quantization
      failed.
  """
  check_quantize(quantize)
  tf = _tf()
  if use_buffer_offset is None:
    use_buffer_offset = tree_bytes(params) * BYTES_PER_PARAM[
        'none' if quantize == 'int4' else quantize] / 4 > FLATBUFFER_LIMIT
  tmp = tempfile.mkdtemp(prefix='nf_export_', dir=workdir)
  try:
    sm = os.path.join(tmp, 'saved_model')
    _saved_model(fn, params, inputs, sm)
    conv = tf.lite.TFLiteConverter.from_saved_model(
        sm, signature_keys=[SIGNATURE_KEY])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize in ('fp16', 'int8'):
      conv.optimizations = [tf.lite.Optimize.DEFAULT]
      if quantize == 'fp16':
        conv.target_spec.supported_types = [tf.float16]
    if use_buffer_offset:
      conv._experimental_use_buffer_offset = True  # pylint: disable=protected-access
    try:
      data = conv.convert()
    except Exception as e:  # pylint: disable=broad-except
      # Drop the serialized StableHLO bytes the converter echoes back.
      msg = re.sub(r'module = "[^"]*"', 'module = <...>', str(e))
      ops = _unsupported_ops(msg, fn, params, inputs)
      raise ExportError(
          f'{os.path.basename(path)}: conversion to TFLite builtin ops failed'
          + (f'; ops without a builtin lowering: {ops}' if ops else '') +
          f'\n{msg[-3000:]}') from e
    del conv
    scheme = quantize
    if quantize == 'int4':
      data, scheme = _quantize_int4(data)
    with open(path, 'wb') as f:
      f.write(data)
    del data
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  gc.collect()

  ops = tflite_ops(path)
  bad = non_builtin_ops(ops)
  if bad:
    raise ExportError(f'{path}: non-builtin ops {bad} in the exported file')
  sig = signature(path)
  return {'file': os.path.basename(path), 'bytes': os.path.getsize(path),
          'ops': ops, 'inputs': sig['inputs'], 'outputs': sig['outputs'],
          'quantize': quantize, 'scheme': scheme,
          'buffer_offset': bool(use_buffer_offset),
          'peak_rss_mb': round(peak_rss_mb(), 1)}
