"""The :full ladder's committed student (docs/shapes_full) loads and
reproduces its report on a slice of the report's own evaluation set."""
import json
import os

import numpy as np
import pytest

import nanoflux_jax as nf
from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.shapes import classifier
from nanoflux_jax.shapes import evaluation
from nanoflux_jax.ladder.rungs import RUNG_KINDS
from nanoflux_jax.evaluate import metrics
from nanoflux_jax.shapes import scoring as toy
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'docs', 'shapes_full')


@pytest.fixture(scope='module')
def report():
  with open(os.path.join(DOCS, 'report.json')) as f:
    return json.load(f)


def _eval_set(report, latent_shape, num):
  e, _ = evaluation.results(report)
  return toy.eval_set(e['world_seed'], num, e['resolution'], latent_shape,
                      e['noise_seed'], num_reference=8)


def test_committed_student_and_bundle_reproduce_the_report(report):
  """The first 32 prompts of the report: the pipeline is the report's final
  student (its parameter count), the int8 bundle draws what the JAX
  pipeline draws, and both score like the report says (the whole set:
  experiments/evaluate_shapes.py, README)."""
  pipe = nf.FluxPipeline.from_pretrained(os.path.join(DOCS, 'pipeline'))
  final = [r for r in report['rungs'] if not r.get('ablation') and
           RUNG_KINDS[r['kind']].role != 'export'][-1]
  assert nf.compress.count_params(pipe.flux_cfg) == final['params']
  assert report['teacher']['params'] / final['params'] >= 4
  e, results = evaluation.results(report)
  s = _eval_set(report, (64, pipe.flux_cfg.in_channels), 32)
  images = toy.generate(pipe, s, results[final['name']]['num_steps'],
                        e['txt_len'])
  tfl = nf.export.TFLitePipeline(os.path.join(DOCS, 'tflite', 'int8'))
  litert = toy.generate_litert(tfl, s)
  assert metrics.psnr(litert, images) > 30
  clf = classifier.Classifier.load(shapes.classifier_path())
  for imgs in (images, litert):
    per_image = metrics.geneval_per_image(clf, imgs, s.scenes)
    assert np.mean(per_image) >= results[final['name']]['geneval'] - 0.1
