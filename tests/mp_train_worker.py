"""One process of tests/test_multiprocess.py's 2-process training runs.

Launched by `nanoflux_jax.testing.multiprocess.launch` (2 processes x 4 fake
CPU devices, gloo collectives). Trains on a (data 2, fsdp 2, tensor 2) mesh
that spans both processes and writes, from process 0, an .npz with the
gathered params, the logged losses, and for every process and step the rows
of the batch it loaded and the global rows its devices hold.

  python tests/mp_train_worker.py fresh <root>   # 'full': 3 steps, a
                                                 # checkpoint after each
  python tests/mp_train_worker.py resume <root>  # 'resumed': continues from
      # the checkpoint the test copied there (full's step 1) to step 3
"""
import os
import sys

import numpy as np

TINY = {'depth': 1, 'depth_single_blocks': 1, 'attention_impl': 'xla'}
MESH = {'data': 2, 'fsdp': 2, 'tensor': 2}


def config(**kw):
  from nanoflux_jax.distill import trainer  # pylint: disable=g-import-not-at-top
  c = trainer.default_config()
  c.teacher.overrides = dict(TINY)
  c.student.overrides = dict(TINY)
  c.compute_dtype = 'float32'
  c.num_steps = 3
  c.batch_size = 8
  c.num_sampling_steps = 2
  c.log_every = 1
  c.checkpoint_every = 1
  c.adam_eps = 1e-3  # As test_trainer's sharded-vs-single comparison.
  c.async_checkpoint = False
  c.loss.weights.feature_kd = 0.5
  c.loss.feature_pairs = ((0, 1), (1, 0))
  c.data.grid = (2, 4)
  c.data.txt_len = 4
  for k, v in kw.items():
    setattr(c, k, v)
  return c


class RecordingData:
  """Wraps a data source; logs the rows each process loads."""

  def __init__(self, inner):
    self.inner, self.log = inner, []

  def batch(self, step, process_index=0, process_count=1):
    out = self.inner.batch(step, process_index, process_count)
    self.log.append((step, process_index, process_count,
                     {k: v.copy() for k, v in out.items()}))
    return out


def _flat(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def run(name, root, **kw):
  """trainer.train in root/name; returns the arrays process 0 writes."""
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.experimental import multihost_utils
  from nanoflux_jax import parallel
  from nanoflux_jax.distill import data as data_lib
  from nanoflux_jax.distill import teacher as teacher_lib
  from nanoflux_jax.distill import trainer
  from nanoflux_jax.testing import multiprocess

  c = config(**kw)
  mesh = parallel.create_mesh(MESH)
  t_cfg = teacher_lib.flux_config(c.teacher, 'teacher')
  data = RecordingData(data_lib.PromptData(
      data_lib.load_prompts(c.data.prompts),
      data_lib.random_embedder(t_cfg, c.data.txt_len, c.seed), t_cfg,
      tuple(c.data.grid), c.batch_size, c.seed))
  held = []  # (step, global row start, stop) of this process's shards.
  to_global = data_lib.to_global

  def recording_to_global(local, m):
    out = to_global(local, m)
    step = data.log[-1][0]
    for s in out['noise'].addressable_shards:
      held.append((step, s.index[0].start or 0,
                   s.index[0].stop or out['noise'].shape[0]))
    return out

  data_lib.to_global = recording_to_global
  multiprocess.barrier(f'train_{name}')  # Before the first collective.
  try:
    state, hist = trainer.train(c, os.path.join(root, name), mesh=mesh,
                                data=data)
  finally:
    data_lib.to_global = to_global
  gathered = multihost_utils.process_allgather(
      {'params': state.params, 'opt_state': state.opt_state,
       'step': state.step}, tiled=True)
  loaded = np.asarray([(s, pi, pc, v['noise'].shape[0]) for s, pi, pc, v in
                       data.log])
  noise = np.stack([v['noise'] for _, _, _, v in data.log])
  # Every process's record, gathered to all (same shapes on each process).
  rec = multihost_utils.process_allgather(
      {'loaded': loaded, 'noise': noise, 'held': np.asarray(held),
       'pid': np.asarray(jax.process_index())}, tiled=False)
  out = {f'param{k}': v for k, v in _flat(gathered['params']).items()}
  out.update({f'opt{k}': v for k, v in _flat(gathered['opt_state']).items()})
  out['step'] = np.asarray(gathered['step'])
  out['losses'] = np.asarray([h['loss'] for h in hist])
  out['logged_steps'] = np.asarray([h['step'] for h in hist])
  out.update({f'rec_{k}': np.asarray(v) for k, v in rec.items()})
  return out


def main():
  import faulthandler  # pylint: disable=g-import-not-at-top
  if os.environ.get('NANOFLUX_WORKER_TRACEBACK_S'):  # Debugging hangs.
    faulthandler.dump_traceback_later(
        float(os.environ['NANOFLUX_WORKER_TRACEBACK_S']), repeat=True)
  from nanoflux_jax.testing import multiprocess  # pylint: disable=g-import-not-at-top
  pid, n = multiprocess.initialize()
  import jax  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  # The resumed run compiles the same programs: share them (per process).
  jax.config.update('jax_compilation_cache_dir', os.path.join(
      tempfile.gettempdir(), 'nanoflux_jax_test_cache', f'mp{n}_{pid}'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  assert (jax.process_count(), jax.device_count(),
          jax.local_device_count()) == (n, 8, 8 // n), jax.devices()
  mode, root = sys.argv[1], sys.argv[2]
  name = 'full' if mode == 'fresh' else 'resumed'
  arrays = run(name, root)
  if pid == 0:
    np.savez(os.path.join(root, f'{name}.npz'), **arrays)
  print(f'process {pid}/{n}: {mode} done', flush=True)


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  try:
    main()
  except BaseException as e:  # The launcher shows this line first.
    print(f'WORKER ERROR: {type(e).__name__}: {str(e)[:3000]}', flush=True)
    raise
