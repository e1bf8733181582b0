"""Real multi-process sharded training: 2 JAX processes x 4 CPU devices.

`jax.distributed.initialize` with a local coordinator and gloo collectives;
the (data 2, fsdp 2, tensor 2) mesh spans both processes, as a pod slice
spans its hosts. tests/mp_train_worker.py is one process. Checked here:
  * 3 steps equal a single-process, 1-device run (loss and params, 1e-5);
  * the orbax checkpoint the 2 processes wrote after step 1 resumes, in a
    fresh 2-process run, to the bit-identical state (params, Adam moments,
    step) and losses of the uninterrupted run;
  * each process loaded only its half of every global batch, and its
    devices hold exactly those rows.
"""
import os
import shutil

import jax
import numpy as np
import pytest

import mp_train_worker as worker
from nanoflux_jax import parallel
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import teacher as teacher_lib
from nanoflux_jax.distill import trainer
from nanoflux_jax.testing import multiprocess

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'mp_train_worker.py')


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('mp'))
  multiprocess.launch(WORKER, ['fresh', root], num_processes=2, devices=4,
                      timeout=900)
  # A fresh run finds only the checkpoint of step 1 (as after a crash).
  shutil.copytree(os.path.join(root, 'full', 'checkpoints', '1'),
                  os.path.join(root, 'resumed', 'checkpoints', '1'))
  multiprocess.launch(WORKER, ['resume', root], num_processes=2, devices=4,
                      timeout=900)
  return {n: dict(np.load(os.path.join(root, f'{n}.npz')))
          for n in ('full', 'resumed')}


def test_two_processes_equal_one_device(runs, tmp_path):
  full = runs['full']
  assert int(full['step']) == 3
  c = worker.config()
  single, hist = trainer.train(
      c, str(tmp_path / 'single'),
      mesh=parallel.create_mesh((1, 1, 1), jax.devices()[:1]))
  np.testing.assert_allclose(full['losses'], [h['loss'] for h in hist],
                             rtol=1e-5, atol=1e-6)
  want = _flat(single.params)
  got = {k[len('param'):]: v for k, v in full.items()
         if k.startswith('param')}
  assert set(got) == set(want) and len(want) > 10
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)


def test_checkpoint_of_two_processes_resumes_bit_for_bit(runs):
  full, resumed = runs['full'], runs['resumed']
  assert int(full['step']) == int(resumed['step']) == 3
  assert list(resumed['logged_steps']) == [2, 3]
  np.testing.assert_array_equal(resumed['losses'], full['losses'][1:])
  keys = [k for k in full if k.startswith(('param', 'opt'))]
  assert keys and set(keys) == {k for k in resumed
                                if k.startswith(('param', 'opt'))}
  for k in keys:
    np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)


def test_each_process_fed_only_its_half_of_the_batch(runs):
  c = worker.config()
  t_cfg = teacher_lib.flux_config(c.teacher, 'teacher')
  source = data_lib.PromptData(
      data_lib.load_prompts(c.data.prompts),
      data_lib.random_embedder(t_cfg, c.data.txt_len, c.seed), t_cfg,
      tuple(c.data.grid), c.batch_size, c.seed)
  for name, steps in (('full', range(3)), ('resumed', range(1, 3))):
    r = runs[name]
    assert list(r['rec_pid']) == [0, 1]
    for p in range(2):
      loaded = r['rec_loaded'][p]            # (step, index, count, rows)
      assert [tuple(x) for x in loaded] == [(s, p, 2, 4) for s in steps]
      for i, s in enumerate(steps):
        whole = source.batch(s)['noise']
        np.testing.assert_array_equal(r['rec_noise'][p][i],
                                      whole[4 * p:4 * p + 4])
      held = r['rec_held'][p]               # (step, start, stop) per shard.
      assert len(held) == 4 * len(steps)     # 4 local devices per step.
      assert all(4 * p <= a < b <= 4 * p + 4 for _, a, b in held), held
