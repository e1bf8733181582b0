"""The built-in evaluators: importing this module registers them.

  'clip'    CLIP score and CLIP-FID of real-image pipelines (clip_eval.py,
            which registers itself);
  'shapes'  toy-GenEval, toy-FID, PSNR and timings on the shapes world
            (shapes/evaluation.py; registered here because the shapes
            package sits below the ladder and cannot import it).
A new evaluator is one function plus its `evaluators.register_evaluator`
line (evaluators.py), and, if it lives outside this package, an import here.
"""
from nanoflux_jax.ladder import clip_eval  # pylint: disable=unused-import
from nanoflux_jax.ladder import evaluators
from nanoflux_jax.shapes import evaluation as shapes_eval
from nanoflux_jax.shapes import evaluation_report as shapes_report

evaluators.register_evaluator(
    'shapes', defaults=shapes_eval.DEFAULTS, check=shapes_eval.check,
    summary=shapes_eval.summary, markdown=shapes_report.markdown,
    report_only=('targets',))(shapes_eval.evaluate)
