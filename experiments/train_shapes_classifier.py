r"""Trains the toy-GenEval judge and writes it where the package ships it.

  python experiments/train_shapes_classifier.py \
      --out=nanoflux_jax/shapes/assets/shapes_classifier

Deterministic: the same flags give the same classifier. Prints its accuracy
on real renderings of a held-out world and writes it, with this command, to
the folder's README.md.
"""
import os

from absl import app
from absl import flags
from absl import logging

from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.shapes import classifier
_OUT = flags.DEFINE_string(
    'out', os.path.join(os.path.dirname(shapes.__file__), 'assets',
                        'shapes_classifier'), 'Output folder (replaced).')
_STEPS = flags.DEFINE_integer('steps', 1500, 'Training steps.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size.')


def main(argv):
  del argv
  clf = classifier.train_classifier(steps=_STEPS.value, batch=_BATCH.value)
  clf.save(_OUT.value)
  acc = classifier.evaluate_on_world(clf, n=1024)
  logging.info('accuracy on 1024 real renderings: %s', acc)
  with open(os.path.join(_OUT.value, 'README.md'), 'w') as f:
    f.write(
        '# The shapes-world classifier (toy-GenEval judge)\n\n'
        'An `AttributeCNN` (nanoflux_jax/shapes/classifier.py) trained on '
        'real renderings of world 10000. Reproduce with:\n\n'
        '```bash\npython experiments/train_shapes_classifier.py '
        f'--steps={_STEPS.value} --batch={_BATCH.value}\n```\n\n'
        'Accuracy on 1024 real renderings of held-out world 777:\n\n' +
        ''.join(f'- {k}: {v:.4f}\n' for k, v in acc.items()))
  print(acc)


if __name__ == '__main__':
  app.run(main)
