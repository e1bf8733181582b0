"""TFLite (LiteRT) export of FLUX pipelines and the LiteRT runner.

  manifest = nf.export.export_pipeline(pipe, out_dir, height=512, width=512,
                                       quantize='int8')
  images = nf.export.TFLitePipeline(out_dir)(['a cat'], seed=0)

TensorFlow / LiteRT / ai-edge-quantizer are imported only when used.
"""
from nanoflux_jax.export.bundle import check_export_args
from nanoflux_jax.export.bundle import export_denoiser
from nanoflux_jax.export.bundle import export_pipeline
from nanoflux_jax.export.bundle import size_table
from nanoflux_jax.export.runner import ManifestError
from nanoflux_jax.export.runner import TFLiteModel
from nanoflux_jax.export.runner import TFLitePipeline
from nanoflux_jax.export.streaming import export_denoiser_streaming
from nanoflux_jax.export.streaming import RandomSource
from nanoflux_jax.export.streaming import TreeSource
from nanoflux_jax.export.student import nanoflux_student
from nanoflux_jax.export.tflite import ExportError
from nanoflux_jax.export.tflite import QUANTIZE_OPTIONS
from nanoflux_jax.export.tflite import convert
from nanoflux_jax.export.tflite import non_builtin_ops
from nanoflux_jax.export.tflite import tflite_ops
