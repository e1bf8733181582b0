r"""Trains the shapes-world teacher, scores it and writes the shipped asset.

  python experiments/train_shapes_teacher.py \
      --config=experiments/configs/shapes.py:teacher --workdir=/tmp/teacher

(`:teacher16` for the 16x16-token 'shapes9' world, judged by the geometric
judge, shapes/geometry.py, since the shipped classifier knows only the
classic world.)

1. trains (or resumes) the teacher of config.teacher.shapes in
   workdir (shapes_teacher.load_or_train: T5 caption pretraining, then the
   DiT with rectified flow);
2. scores it on --num_prompts held-out prompts (world --world_seed):
   toy-GenEval with 95% intervals, overall and by object count; writes
   workdir/eval.json and workdir/eval.png;
3. with --out, copies the pipeline there (atomically) with a README.md that
   records this command, the training time and the scores. The package
   ships it as nanoflux_jax/shapes/assets/shapes_teacher
   (`nanoflux_jax.shapes.world.teacher_path()`).
"""
import json
import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
import jax

import config_flag  # experiments/config_flag.py, beside this binary.
from nanoflux_jax import atomic
from nanoflux_jax import images
from nanoflux_jax.shapes import teacher as shapes_teacher
from nanoflux_jax.shapes import classifier
from nanoflux_jax.shapes import scoring as toy
from nanoflux_jax.pipeline import PIPELINE_FILE

_CONFIG = config_flag.define_config_file('config', 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training folder; resumed.',
                               required=True)
_OUT = flags.DEFINE_string('out', '', 'Where to write the finished teacher '
                           'pipeline (replaced atomically); empty: nowhere.')
_NUM_PROMPTS = flags.DEFINE_integer('num_prompts', 512, 'Held-out prompts.')
_WORLD_SEED = flags.DEFINE_integer('world_seed', 1000, 'Held-out world.')


def _readme(command: str, seconds: float, ev: dict, device: str,
            c) -> str:
  by = ev['geneval_by_objects']
  line = lambda name, x: (f"- {name}: {x['score']:.3f}, 95% CI "
                          f"[{x['ci'][0]:.3f}, {x['ci'][1]:.3f}], n={x['n']}")
  return '\n'.join([
      '# The shapes-world teacher', '',
      'A FLUX-architecture `FluxPipeline` (tokenizers fitted on the '
      'captions, a T5-style encoder pretrained on caption structure, a '
      'random frozen CLIP-style encoder, a PCA patch autoencoder and a DiT '
      f"trained with rectified flow) for the {c.resolution} px "
      f"'{c.get('world', 'shapes')}' shapes world. Load it with "
      '`nf.FluxPipeline.from_pretrained(path)`.', '',
      'Reproduce it with:', '', '```bash', command, '```', '',
      f'Trained on {device} in {seconds / 60:.0f} minutes (wall time from '
      'the untrained pipeline to the trained one).', '',
      f"toy-GenEval on {ev['num_prompts']} held-out prompts (world "
      f"{ev['world_seed']}), {ev['num_steps']} Euler steps, judged by "
      f"{ev['judge']}:", '',
      line('all prompts', {'score': ev['geneval'], 'ci': ev['geneval_ci'],
                           'n': ev['num_prompts']}),
      *[line(f'{name}-object prompts', by[key]) for name, key in (
          ('one', '1_object'), ('two', '2_objects'), ('three', '3_objects'))
        if key in by],
      f"- toy-FID {ev['fid']:.3g}", ''])


def main(argv):
  del argv
  c = _CONFIG.value.teacher.shapes
  pipe = shapes_teacher.load_or_train(c, _WORKDIR.value)
  # Training time, also when an earlier call trained it: from the untrained
  # pipeline's folder to the trained one's.
  seconds = (os.path.getmtime(os.path.join(_WORKDIR.value, 'pipeline')) -
             os.path.getmtime(os.path.join(_WORKDIR.value, 'init')))

  grid = c.resolution // pipe.latent_factor
  world = c.get('world', 'shapes')
  s = toy.eval_set(_WORLD_SEED.value, _NUM_PROMPTS.value, c.resolution,
                   (grid * grid, pipe.flux_cfg.in_channels), world=world)
  # The shipped classifier knows the classic world only.
  judge = '' if world == 'shapes' else 'geometry'
  clf = classifier.load_judge(judge, world, c.resolution)
  num_steps = c.train.num_sampling_steps
  imgs = toy.generate(pipe, s, num_steps, c.txt_len)
  ev = dict(toy.scores(clf, imgs, s, None), num_prompts=len(s.prompts),
            world_seed=_WORLD_SEED.value, num_steps=num_steps,
            judge=('the shipped classifier' if not judge else
                   'the geometric judge (shapes/geometry.py)'))
  ev.pop('psnr')
  logging.info('teacher: %s', ev)
  with open(os.path.join(_WORKDIR.value, 'eval.json'), 'w') as f:
    json.dump(ev, f, indent=2)
  images.save_grid(imgs[:32], os.path.join(_WORKDIR.value, 'eval.png'))
  print(json.dumps(ev))

  if _OUT.value:
    out = os.path.abspath(_OUT.value)
    atomic.check_replaceable(
        out, lambda p: os.path.isfile(os.path.join(p, PIPELINE_FILE)),
        'FluxPipeline folder')
    atomic.remove_stale(out)
    tmp = atomic.tmp_sibling(out)
    shutil.copytree(os.path.join(_WORKDIR.value, 'pipeline'), tmp)
    command = ' '.join(['python', 'experiments/train_shapes_teacher.py'] +
                       [a for a in sys.argv[1:]
                        if not a.startswith('--workdir')] +
                       ['--workdir=/tmp/shapes_teacher'])
    with open(os.path.join(tmp, 'README.md'), 'w') as f:
      f.write(_readme(command, seconds, ev,
                      jax.devices()[0].device_kind, c))
    images.save_grid(imgs[:16], os.path.join(tmp, 'samples.png'))
    atomic.replace_dir(tmp, out)
    logging.info('teacher written to %s', out)


if __name__ == '__main__':
  app.run(main)
