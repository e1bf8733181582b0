r"""Proof that the tests catch planted bugs: applies domain mutants one at a time.

For every mutant: copy the package (nanoflux_jax/, tests/, experiments/,
setup.py) to a fresh temporary folder, apply the mutant there (exact string
replacements, each asserted to match exactly once), and run the mutant's
targeted tests in that copy (cwd and PYTHONPATH point at it, so the copy's
package is the one imported, which is checked). A mutant is caught when
pytest reports failing tests (exit status 1); a collection or import error
is an 'error', not a catch. A baseline run of every targeted test on the
unmutated copy (alongside the mutants) must pass, or the table means
nothing; its status is in the JSON line.

Prints a caught/missed table and, last, one JSON line
{"mutants": N, "caught": M, ...}. Runs outside CI (minutes on 2 cores):

  nice -n 19 python experiments/check_mutants.py [--only=name,name]
      [--skip_baseline] [--jobs=2] [--timeout=1800]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY = ('nanoflux_jax', 'tests', 'experiments', 'setup.py')


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  what: str                                  # the planted bug, in words.
  edits: tuple[tuple[str, str, str], ...]    # (file, old, new)
  tests: tuple[str, ...]                     # pytest node ids.


F = 'tests/test_flux.py::'
MUTANTS = (
    Mutant('bfl_qk_norm_swap',
           'query/key norm scales swapped in the BFL map, both directions '
           '(import and export), so a BFL round trip still agrees',
           (('nanoflux_jax/convert/flux_keys.py',
             "plan[f'{dst}/{s}_attn/{n}_norm/scale'] = same(f'{a}.norm.{n}_norm.scale')",
             "plan[f'{dst}/{s}_attn/{n}_norm/scale'] = same(f'{a}.norm.{ {\"query\": \"key\", \"key\": \"query\"}[n]}_norm.scale')"),
            ('nanoflux_jax/convert/flux_keys.py',
             "out[f'{d}_attn.norm.{n}_norm.scale'] = p[f'{b}_attn/{n}_norm/scale']",
             "out[f'{d}_attn.norm.{ {\"query\": \"key\", \"key\": \"query\"}[n]}_norm.scale'] = p[f'{b}_attn/{n}_norm/scale']")),
           # (test_bfl_key_map_matches_diffusers_converter, at FLUX's full
           # width, catches it too; this one is cheaper.)
           (F + 'test_bfl_export_and_import_follow_the_documented_map',)),
    Mutant('diffusers_qk_norm_swap',
           'norm_q / norm_k swapped in the diffusers map (double blocks)',
           (('nanoflux_jax/convert/flux_keys.py',
             "plan[f'{dst}/{s}_attn/query_norm/scale'] = same(f'{a}.{nq}q.weight')\n"
             "      plan[f'{dst}/{s}_attn/key_norm/scale'] = same(f'{a}.{nq}k.weight')",
             "plan[f'{dst}/{s}_attn/query_norm/scale'] = same(f'{a}.{nq}k.weight')\n"
             "      plan[f'{dst}/{s}_attn/key_norm/scale'] = same(f'{a}.{nq}q.weight')"),),
           (F + 'test_forward_matches_diffusers[kw0-1-4-6]',)),
    Mutant('img_txt_qkv_swap',
           "the image stream's to_q/k/v loaded into the text stream and back",
           (('nanoflux_jax/convert/flux_keys.py',
             "('img', 'norm1', ('to_q', 'to_k', 'to_v'), 'to_out.0', 'ff', 'norm_'),\n"
             "        ('txt', 'norm1_context', ('add_q_proj', 'add_k_proj', 'add_v_proj'),",
             "('img', 'norm1', ('add_q_proj', 'add_k_proj', 'add_v_proj'), 'to_out.0', 'ff', 'norm_'),\n"
             "        ('txt', 'norm1_context', ('to_q', 'to_k', 'to_v'),"),),
           (F + 'test_forward_matches_diffusers[kw0-1-4-6]',)),
    Mutant('modulation_shift_scale_order',
           "the final layer's modulation read as (scale, shift)",
           (('nanoflux_jax/models/flux.py',
             "shift, scale = Modulation(cfg, 2, name='final_mod')(cond)",
             "scale, shift = Modulation(cfg, 2, name='final_mod')(cond)"),),
           (F + 'test_forward_matches_diffusers[kw0-1-4-6]',)),
    Mutant('rope_axis_order',
           'RoPE axes taken in reverse order (col, row, index)',
           (('nanoflux_jax/models/layers.py',
             'angles.append(ids[..., i:i + 1].astype(jnp.float32) * omega)',
             'j = len(axes_dim) - 1 - i\n'
             '    angles.append(ids[..., j:j + 1].astype(jnp.float32) * omega)'),),
           (F + 'test_rope_matches_diffusers',)),
    Mutant('rope_theta_1000',
           "RoPE theta 1000 instead of FLUX's 10000 (a known anchor bug)",
           (('nanoflux_jax/configs.py', 'theta: int = 10_000',
             'theta: int = 1_000'),),
           (F + 'test_forward_matches_diffusers[kw0-1-4-6]',)),
    Mutant('timestep_scale_missing',
           'the timestep embedding without the x1000 scale',
           (('nanoflux_jax/models/layers.py', 'time_factor: float = 1000.)',
             'time_factor: float = 1.)'),),
           (F + 'test_timestep_embedding_matches_diffusers',)),
    Mutant('schedule_shift_off_by_one',
           'the dev schedule shift mu computed for one token too many',
           (('nanoflux_jax/sampling.py',
             'return image_seq_len * m + base_shift - m * base_len',
             'return (image_seq_len + 1) * m + base_shift - m * base_len'),),
           ('tests/test_sampling.py::test_dev_schedule_matches_bfl_formula_and_diffusers',)),
    Mutant('loss_sum_over_batch',
           'the MSE summed over the batch (data) axis instead of averaged',
           (('nanoflux_jax/distill/losses.py', '    return d.mean()\n',
             '    return d.mean(axis=tuple(range(1, d.ndim))).sum()\n'),),
           ('tests/test_losses.py::test_mse_and_masked_mse',)),
    Mutant('grad_accum_no_mean',
           'accumulated gradients summed over micro-batches, not averaged '
           "(Adam's first step hides the scale from the params)",
           (('nanoflux_jax/distill/loop.py',
             'grads, metrics = jax.tree.map(lambda x: x / grad_accum, (grads, metrics))',
             'metrics = jax.tree.map(lambda x: x / grad_accum, metrics)'),),
           ('tests/test_trainer.py::test_grad_accumulation_matches_one_big_batch',)),
    Mutant('rf_interpolation_swapped',
           'rectified-flow x_t interpolated from noise to data the wrong way',
           (('nanoflux_jax/distill/trainer.py',
             'losses.interpolate(x0, noise, t_rf)',
             'losses.interpolate(noise, x0, t_rf)'),),
           ('tests/test_trainer.py::test_from_scratch_rectified_flow_mode',)),
    Mutant('vae_scaling_inverted',
           'model latents -> VAE latents multiplied by the scaling factor '
           'instead of divided',
           (('nanoflux_jax/models/vae.py',
             'return x / cfg.scaling_factor + cfg.shift_factor',
             'return x * cfg.scaling_factor + cfg.shift_factor'),),
           ('tests/test_vae.py::test_latent_scaling_round_trip',)),
    Mutant('t5_bucket_off_by_one',
           'T5 relative-position buckets: the exact range one bucket wider',
           (('nanoflux_jax/models/t5.py', 'max_exact = num_buckets // 2\n',
             'max_exact = num_buckets // 2 + 1\n'),),
           ('tests/test_t5.py::test_relative_position_bucket_matches_transformers',)),
    Mutant('clip_eos_pooling_index',
           'CLIP pooled at the token before EOS (legacy argmax rule)',
           (('nanoflux_jax/models/clip.py',
             'return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)',
             'return (jnp.argmax(input_ids, axis=-1) - 1).astype(jnp.int32)'),),
           ('tests/test_clip.py::test_parity',)),
    Mutant('downsample_grid_transposed',
           "the token down-sampler's coarse grid laid out w x h instead of "
           'h x w',
           (('nanoflux_jax/models/downsample.py',
             'return x.reshape(x.shape[0], grid[0] // f, grid[1] // f, x.shape[-1])',
             'return x.reshape(x.shape[0], grid[1] // f, grid[0] // f, x.shape[-1])'),),
           ('tests/test_downsample_reference.py',)),
    Mutant('linear1_split_hardcoded',
           "BFL single-block linear1 split at 3 * hidden rows instead of the "
           "block's heads (a known anchor bug; pruned students break)",
           (('nanoflux_jax/convert/flux_keys.py',
             "    n = 3 * h * hd\n    plan.update(_static_or_adaln(cfg, f'{src}.modulation.lin',",
             "    n = 3 * cfg.hidden_size\n    plan.update(_static_or_adaln(cfg, f'{src}.modulation.lin',"),),
           ('tests/test_convert.py::test_pruned_widths_are_inferred',)),
    Mutant('resume_one_step_off',
           'a resumed run starts from the batch of the step after its '
           'checkpoint',
           (('nanoflux_jax/distill/loop.py',
             'first = jax.tree.map(np.asarray, data.batch(start, jax.process_index(),',
             'first = jax.tree.map(np.asarray, data.batch(start + (latest is not None), jax.process_index(),'),),
           ('tests/test_trainer.py::test_fit_resume_reads_the_step_it_stopped_at',)),
    # Issue 25 item 7: functions whose result only met itself in a comparison.
    Mutant('select_block_keeps_lowest',
           "per-block selection keeps each block's lowest-scoring heads (the "
           'counts stay right)',
           (('nanoflux_jax/compress/selection.py',
             "k[np.argsort(-g, kind='stable')[:max(1, round(ratio * len(g)))]] = 1",
             "k[np.argsort(g, kind='stable')[:max(1, round(ratio * len(g)))]] = 1"),),
           ('tests/test_compress_sensitivity.py::'
            'test_select_keeps_the_units_a_hand_ranking_keeps',)),
    Mutant('pipeline_drops_guidance',
           'FluxPipeline ignores its guidance argument (always 3.5, the '
           'default both sides of a defaults-only parity test use)',
           (('nanoflux_jax/pipeline.py',
             'g = jnp.full((b,), DEFAULT_GUIDANCE if guidance is None else guidance,',
             'g = jnp.full((b,), DEFAULT_GUIDANCE,'),),
           ('tests/test_pipeline.py::'
            'test_latents_and_images_match_diffusers[dev]',)),
    Mutant('pipeline_drops_max_sequence_length',
           'FluxPipeline encodes at the default T5 length whatever '
           'max_sequence_length it is given',
           (('nanoflux_jax/pipeline.py',
             'txt, pooled = self.encode_prompt(prompts, max_sequence_length)',
             'txt, pooled = self.encode_prompt(prompts)'),),
           ('tests/test_pipeline.py::'
            'test_latents_and_images_match_diffusers[schnell]',)),
    Mutant('ladder_static_tables_off_schedule',
           "the static-modulation rung builds its tables at each step's end "
           'instead of its start',
           (('nanoflux_jax/ladder/compress_rungs.py',
             "stage.schedule[:-1], ctx.embed(prompts)['y'],",
             "stage.schedule[1:], ctx.embed(prompts)['y'],"),),
           ('tests/test_ladder.py::'
            'test_cli_writes_report_checkpoints_samples_then_resumes',)),
)


def _copy_tree(dst: str) -> None:
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc', '.pytest_cache')
  for name in COPY:
    src = os.path.join(ROOT, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dst, name), ignore=ignore)
    else:
      shutil.copy(src, os.path.join(dst, name))


def apply(root: str, mutant: Mutant) -> None:
  """Applies every edit of `mutant` under `root` (each must match once)."""
  for file, old, new in mutant.edits:
    path = os.path.join(root, file)
    with open(path) as f:
      text = f.read()
    n = text.count(old)
    assert n == 1, f'{mutant.name}: {file}: target found {n} times: {old!r}'
    with open(path, 'w') as f:
      f.write(text.replace(old, new))


def run_tests(root: str, tests, timeout: float) -> tuple[int, str, float]:
  """(pytest exit status, output tail, seconds) of `tests` in the copy."""
  env = dict(os.environ, PYTHONPATH=root, NANOFLUX_REQUIRE_REFERENCE='1',
             JAX_PLATFORMS='cpu', PYTHONDONTWRITEBYTECODE='1')
  check = subprocess.run(
      [sys.executable, '-c', 'import nanoflux_jax; print(nanoflux_jax.__file__)'],
      capture_output=True, text=True, env=env, cwd=root, check=True)
  assert check.stdout.strip().startswith(root), (
      f'the copy is not the package imported: {check.stdout}')
  t0 = time.time()
  try:
    out = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
         *tests], capture_output=True, text=True, env=env, cwd=root,
        timeout=timeout)
    rc, text = out.returncode, out.stdout + out.stderr
  except subprocess.TimeoutExpired as e:
    rc, text = -1, f'timed out after {timeout}s\n{e.stdout or ""}'
  return rc, text[-2000:], time.time() - t0


def _status(rc: int) -> str:
  return {0: 'MISSED', 1: 'caught'}.get(rc, 'error' if rc != -1 else 'timeout')


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--only', default='', help='comma-separated mutant names')
  ap.add_argument('--skip_baseline', action='store_true')
  ap.add_argument('--timeout', type=float, default=1800.0,
                  help='seconds per pytest run')
  ap.add_argument('--jobs', type=int, default=1,
                  help='mutants tested at once (each in its own copy)')
  ap.add_argument('--list', action='store_true')
  args = ap.parse_args(argv)
  mutants = [m for m in MUTANTS
             if not args.only or m.name in args.only.split(',')]
  if args.list:
    for m in mutants:
      print(f'{m.name}: {m.what}\n  tests: {" ".join(m.tests)}')
    return 0
  tmp = tempfile.mkdtemp(prefix='nf_mutants_')
  try:
    base = os.path.join(tmp, 'baseline')
    os.makedirs(base)
    _copy_tree(base)
    for m in mutants:  # Every target matches once, before anything runs.
      probe = os.path.join(tmp, 'probe')
      shutil.copytree(base, probe)
      apply(probe, m)
      shutil.rmtree(probe)
    baseline = None
    tests = sorted({t for m in mutants for t in m.tests})

    def run_baseline():
      rc, text, secs = run_tests(base, tests, args.timeout * 2)
      print(f'baseline ({len(tests)} targets, unmutated): rc={rc} '
            f'{secs:.0f}s', flush=True)
      if rc != 0:
        print(text, flush=True)
      return {'rc': rc, 'seconds': round(secs)}

    def one(m):
      work = os.path.join(tmp, m.name)
      shutil.copytree(base, work)
      apply(work, m)
      rc, text, secs = run_tests(work, m.tests, args.timeout)
      status = _status(rc)
      failed = [l for l in text.splitlines() if l.startswith('FAILED')]
      print(f'{m.name}: {status} ({secs:.0f}s) {failed[:1]}', flush=True)
      if status != 'caught':
        print(text, flush=True)
      shutil.rmtree(work, ignore_errors=True)
      return m, status, secs, failed[:1]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
      # The baseline runs alongside the mutants, in its own unmutated copy.
      base_job = None if args.skip_baseline else pool.submit(run_baseline)
      rows = list(pool.map(one, mutants))
      baseline = None if base_job is None else base_job.result()
    print()
    print('| mutant | planted bug | targeted tests | result | s |')
    print('|---|---|---|---|---|')
    for m, status, secs, _ in rows:
      tests = ', '.join(t.split('/')[-1] for t in m.tests)
      print(f'| {m.name} | {m.what} | {tests} | {status} | {secs:.0f} |')
    caught = sum(s == 'caught' for _, s, _, _ in rows)
    print(json.dumps({'mutants': len(rows), 'caught': caught,
                      'missed': [m.name for m, s, _, _ in rows
                                 if s != 'caught'],
                      'baseline': baseline}))
    ok = caught == len(rows) and (baseline is None or baseline['rc'] == 0)
    return 0 if ok else 1
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  sys.exit(main())
