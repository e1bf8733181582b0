"""A run's record never lies (issue 25): provenance, one writer, last lines.

Table-driven as tests/test_bad_input.py: each row of CASES builds its case
and returns (call, exception type, message fragments, folder that must be
left unchanged). The rows share two workdirs of a 1-rung micro ladder
(prune -> 4 distillation steps on ladder_tiny's teacher), made once per
module: `killed` stopped after step 2 (stop_after, as if preempted), and
`finished`, the same run resumed to the end.

Beyond the table: an accepted change is recorded (settings.json, report.md)
and holds on the next rerun; a stale lock is taken over; the multiprocess
launcher names the process that died, whichever it is; distill.py takes
--config.stop_after and prints why training stopped as its last line.
"""
import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import pytest

from nanoflux_jax import atomic
from nanoflux_jax import parallel
from nanoflux_jax.ladder import runner as ladder
from nanoflux_jax.distill import loop
from nanoflux_jax.ladder import provenance
from nanoflux_jax.distill import stop_reason
from nanoflux_jax.distill import workdir_lock
from nanoflux_jax.testing import multiprocess

from refusal import assert_refused

jax.config.update('jax_compilation_cache_dir', os.path.join(
    tempfile.gettempdir(), 'nanoflux_jax_test_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNG = 'rung_0_prune'


def _config(**distill):
  """ladder_tiny with one prune rung whose steps come from config.distill
  (so that --config.distill.num_steps reaches it)."""
  path = os.path.join(ROOT, 'experiments', 'configs', 'ladder_tiny.py')
  spec = importlib.util.spec_from_file_location('ladder_tiny', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.rungs = [{'kind': 'prune', 'keep_heads': 0.5, 'keep_mlp': 0.5,
              'calib_n': 2, 'distill': {}}]
  c.samples.num = 2
  c.timing.repeats = 1
  for k, v in distill.items():
    setattr(c.distill, k, v)
  return c


def _run(c, workdir):
  return ladder.run_ladder(c, str(workdir), mesh=parallel.create_mesh(
      (1, 1, 1), jax.devices()[:1]))


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('record')
  killed, finished = root / 'killed', root / 'finished'
  assert not _run(_config(stop_after=2), killed)['complete']
  shutil.copytree(killed, finished)
  assert _run(_config(), finished)['complete']
  return {'killed': killed, 'finished': finished}


def _copy(workdirs, name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(workdirs[name], dst)
  return dst


def _lock_record(pid, host=None):
  here = atomic._host()  # pylint: disable=protected-access
  return json.dumps(dict(pid=pid, host=host or here,
                         hostname=host or 'here', what='ladder',
                         start=0.0, started='2026-01-01T00:00:00Z',
                         command='python experiments/ladder.py'))


# ---------------------------------------------------------------- the table --
def _killed_then_keep_mlp_changed(workdirs, tmp_path):
  wd = _copy(workdirs, 'killed', tmp_path)
  c = _config()
  c.rungs[0]['keep_mlp'] = 0.25
  return (lambda: _run(c, wd), provenance.SettingsChanged,
          [f'{RUNG} was trained to step 2 with other settings',
           'keep_mlp: 0.5 -> 0.25', 'use a new --workdir',
           '--config.accept_changed_settings=True'], wd)


def _killed_then_teacher_seed_changed(workdirs, tmp_path):  # Variant.
  wd = _copy(workdirs, 'killed', tmp_path)
  c = _config()
  c.teacher.seed = 2
  return (lambda: _run(c, wd), provenance.SettingsChanged,
          ['teacher.config.seed: 1 -> 2'], wd)


def _finished_then_num_steps_changed(workdirs, tmp_path):
  wd = _copy(workdirs, 'finished', tmp_path)
  c = _config(num_steps=6)
  return (lambda: _run(c, wd), provenance.SettingsChanged,
          [f'{RUNG} was finished with other settings',
           'distill.num_steps: 4 -> 6'], wd)


def _finished_then_learning_rate_changed(workdirs, tmp_path):  # Variant.
  wd = _copy(workdirs, 'finished', tmp_path)
  c = _config(learning_rate=0.002, b2=0.99)
  return (lambda: _run(c, wd), provenance.SettingsChanged,
          ['(2 differ', 'distill.learning_rate: 0.001 -> 0.002',
           'distill.b2: 0.999 -> 0.99'], wd)


def _second_writer(workdirs, tmp_path):
  """The lock of a live process (this test's parent) on this host."""
  wd = _copy(workdirs, 'finished', tmp_path)
  (wd / workdir_lock.LOCK_FILE).write_text(_lock_record(os.getppid()))
  return (lambda: _run(_config(), wd), workdir_lock.WorkdirLocked,
          [f'{wd} is in use', f'held by pid {os.getppid()} on host here',
           'python experiments/ladder.py', 'use another --workdir'], wd)


def _writer_on_another_host(workdirs, tmp_path):  # Variant: never stale.
  wd = _copy(workdirs, 'finished', tmp_path)
  (wd / workdir_lock.LOCK_FILE).write_text(_lock_record(999999999,
                                                        'otherhost'))
  return (lambda: _run(_config(), wd), workdir_lock.WorkdirLocked,
          ['on host otherhost', f'delete {wd / workdir_lock.LOCK_FILE}'], wd)


def _old_marker_option_changed(workdirs, tmp_path):  # Before records.
  wd = _copy(workdirs, 'finished', tmp_path)
  os.remove(wd / RUNG / provenance.SETTINGS_FILE)
  c = _config()
  c.rungs[0]['keep_heads'] = 0.75
  return (lambda: _run(c, wd), ValueError,
          ["was finished with options", "'keep_heads': 0.5"], wd)


CASES = {
    'killed_then_keep_mlp_changed': _killed_then_keep_mlp_changed,
    'killed_then_teacher_seed_changed': _killed_then_teacher_seed_changed,
    'finished_then_num_steps_changed': _finished_then_num_steps_changed,
    'finished_then_learning_rate_changed': _finished_then_learning_rate_changed,
    'second_writer': _second_writer,
    'writer_on_another_host': _writer_on_another_host,
    'old_marker_option_changed': _old_marker_option_changed,
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_refused(case, workdirs, tmp_path):
  call, exc, fragments, owned = CASES[case](workdirs, tmp_path)
  assert_refused(call, exc, fragments, [owned])  # Before writing anything.


# ------------------------------------------------------- beyond the table --
def test_record_and_config_of_a_resumed_rung(workdirs):
  wd = workdirs['finished']
  rec = json.loads((wd / RUNG / provenance.SETTINGS_FILE).read_text())
  assert rec['options']['keep_mlp'] == 0.5 and rec['changes'] == []
  assert rec['distill']['num_steps'] == 4
  assert rec['distill']['learning_rate'] == 0.001
  assert 'stop_after' not in rec['distill']  # A run control, not a setting.
  assert rec['teacher']['config']['preset'] == 'tiny'
  ran = json.loads((wd / ladder.CONFIG_FILE).read_text())
  assert ran['distill']['stop_after'] is None  # The resumed run's config.
  assert ran['rungs'][0]['kind'] == 'prune'
  assert not (wd / workdir_lock.LOCK_FILE).exists()  # Released.
  report = json.loads((wd / 'report.json').read_text())
  assert report['rungs'][0]['start_step'] == 2  # Resumed, not retrained.


def test_accepted_change_is_recorded_and_holds(workdirs, tmp_path):
  wd = _copy(workdirs, 'finished', tmp_path)
  c = _config(num_steps=6)
  c.accept_changed_settings = True
  assert _run(c, wd)['complete']
  rec = provenance.read(str(wd / RUNG))
  assert rec.distill['num_steps'] == 6
  assert list(rec.changes) == [{'step': None, 'finished': True,
                                'diff': {'distill.num_steps': [4, 6]}}]
  md = (wd / 'report.md').read_text()
  assert ('accepted after it finished (accept_changed_settings): '
          'distill.num_steps 4 -> 6') in md, md
  # The same config again needs no flag; the old one is now the change.
  assert _run(_config(num_steps=6), wd)['complete']
  with pytest.raises(provenance.SettingsChanged,
                     match='distill.num_steps: 6 -> 4'):
    _run(_config(), wd)


def test_report_shows_settings_that_differ_from_the_defaults(workdirs):
  md = (workdirs['finished'] / 'report.md').read_text()
  section = md[md.index('## Rung settings'):]
  # The rung's options are the kind's defaults; its distill config is
  # config.distill: nothing differs.
  assert f'- {RUNG}: defaults' in section, section
  c = _config()
  c.rungs[0]['distill'] = {'learning_rate': 0.01}
  c.rungs[0]['criterion'] = 'loss'
  s = provenance.rung_settings(c, ladder.check_config(c)[0],
                               provenance.teacher_identity(c, ''))
  assert provenance.summary(s, c)['non_default'] == {
      'criterion': 'loss', 'distill.learning_rate': 0.01}


def test_stale_lock_is_taken_over_and_nesting_is_allowed(tmp_path, caplog):
  lock = tmp_path / workdir_lock.LOCK_FILE
  lock.write_text(_lock_record(999999999))  # No such process here.
  with caplog.at_level('WARNING'):
    with workdir_lock.hold(str(tmp_path), 'test'):
      held = json.loads(lock.read_text())
      assert held['pid'] == os.getpid()
      with workdir_lock.hold(str(tmp_path), 'inner'):  # Same process.
        pass
      assert lock.exists()
  assert 'took over the stale lock of pid 999999999' in caplog.text
  assert not lock.exists()
  # A workdir the lock had to create is not left behind, even on errors.
  with pytest.raises(RuntimeError, match='boom'):
    with workdir_lock.hold(str(tmp_path / 'new' / 'wd')):
      raise RuntimeError('boom')
  assert not (tmp_path / 'new').exists()


def test_second_process_is_refused_and_its_last_line_names_the_cause(
    tmp_path):
  """One subprocess: refused by the lock this process holds (a real O_EXCL
  race partner), then a full disk inside final_line, with a thread that
  keeps printing after the traceback: the cause is still the last line."""
  script = textwrap.dedent(f"""
      import errno, sys, threading, time
      from nanoflux_jax.distill import stop_reason, workdir_lock
      try:
        with workdir_lock.hold({str(tmp_path)!r}, 'second'):
          print('TOOK IT')
      except workdir_lock.WorkdirLocked as e:
        print('REFUSED', e)
      def noise():  # As orbax's savers: output after the main thread's.
        time.sleep(1)
        print('library noise', file=sys.stderr)
      threading.Thread(target=noise).start()
      with stop_reason.final_line():
        try:
          raise OSError(errno.ENOSPC, 'No space left on device', '/wd/x')
        except OSError as e:
          raise RuntimeError('async save failed') from e
      """)
  with workdir_lock.hold(str(tmp_path), 'first'):
    out = subprocess.run([sys.executable, '-c', script], capture_output=True,
                         text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert f'REFUSED {tmp_path} is in use: ' in out.stdout, out.stderr[-2000:]
  assert f'held by pid {os.getpid()}' in out.stdout
  assert out.returncode == 1
  err = out.stderr.rstrip().splitlines()
  assert 'library noise' in err and 'Traceback (most recent call last):' in err
  assert err[-1] == ('nanoflux_jax: training stopped: disk full (No space '
                     'left on device) writing /wd/x'), err[-5:]
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()  # Released.


def test_multi_process_run_takes_one_lock_and_all_stop(tmp_path):
  """2 JAX processes (jax.distributed): process 0 alone takes a free lock,
  both go on; on a held lock both are refused, not only process 0."""
  free, held = tmp_path / 'free', tmp_path / 'held'
  held.mkdir()
  (held / workdir_lock.LOCK_FILE).write_text(_lock_record(os.getpid()))
  script = tmp_path / 'worker.py'
  script.write_text(textwrap.dedent(f"""
      from nanoflux_jax.testing import multiprocess
      pid, _ = multiprocess.initialize()
      from nanoflux_jax.distill import workdir_lock
      for wd in ({str(free)!r}, {str(held)!r}):
        try:
          with workdir_lock.hold(wd, 'mp'):
            print(f'PROCESS {{pid}} HOLDS')
        except workdir_lock.WorkdirLocked as e:
          print(f'PROCESS {{pid}} REFUSED', e)
      """))
  outs = multiprocess.launch(str(script), num_processes=2, devices=1,
                             timeout=300)
  assert 'PROCESS 0 HOLDS' in outs[0] and 'PROCESS 1 HOLDS' in outs[1]
  assert f'PROCESS 0 REFUSED {held} is in use' in outs[0], outs[0][-2000:]
  assert ('PROCESS 1 REFUSED ' f'{held / workdir_lock.LOCK_FILE}: process 0 '
          'could not take the workdir lock: ') in outs[1], outs[1][-2000:]
  assert not free.exists()  # Created for the lock, removed with it.


@pytest.mark.parametrize('which, code, how', [
    (1, 'sys.exit(3)', 'process 1 exited with status 3'),
    (0, 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)',
     'process 0 was killed by signal SIGKILL'),
])
def test_launch_names_the_process_that_died(tmp_path, which, code, how):
  script = tmp_path / 'worker.py'
  script.write_text(textwrap.dedent(f"""
      import os, sys, time
      if os.environ['{multiprocess.ENV_ID}'] == '{which}':
        time.sleep(0.5)
        {code}
      time.sleep(120)  # The others: waiting as in a collective.
      """))
  t0 = time.time()
  with pytest.raises(multiprocess.WorkerError) as e:
    multiprocess.launch(str(script), num_processes=3, timeout=100)
  # Noticed at once, whichever process it was (not after the timeout or
  # after process 0 exits).
  assert time.time() - t0 < 60
  msg = str(e.value)
  assert how in msg and 'timed out' not in msg, msg
  assert 'stopped the processes still running: ' in msg
  assert f'[{", ".join(str(i) for i in range(3) if i != which)}]' in msg


@pytest.mark.parametrize('exc, line', [
    (OSError(errno.ENOSPC, 'No space left on device', '/wd/metrics.jsonl'),
     'disk full (No space left on device) writing /wd/metrics.jsonl'),
    # As orbax (tensorstore) reports it, wrapped.
    (RuntimeError('save failed'),
     'disk full (No space left on device) writing /wd/checkpoints'),
    (FloatingPointError("step 7: non-finite ['loss']: {'loss': nan}"),
     "NaN / inf at step 7: non-finite ['loss']"),
    (loop.TrainingInterrupted('SIGTERM at step 5: checkpoint saved in /wd'),
     'signal: SIGTERM at step 5: checkpoint saved in /wd'),
    (ValueError('first line\nsecond line'), 'ValueError: first line'),
])
def test_describe_names_the_cause(exc, line):
  if isinstance(exc, RuntimeError):
    exc.__cause__ = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local '
        'file "/wd/checkpoints/2.orbax-checkpoint-tmp/default/ocdbt/": '
        "No space left on device [os_error_code='28']")
  assert stop_reason.describe(exc).startswith(line), stop_reason.describe(exc)
  assert '\n' not in stop_reason.describe(exc)


def test_stop_after_flag_parses_on_the_locked_config(monkeypatch):
  """--config.stop_after=2 as experiments/distill.py parses it (a locked
  config file flag): a typed placeholder, not a FATAL flags error."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path = os.path.join(ROOT, 'experiments', 'configs', 'distill_tiny.py')
  for extra, want in (([], None), (['--config.stop_after=2'], 2)):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, 'c', flag_values=fv,
                                    lock_config=True)
    argv = ['distill.py', f'--config={path}', *extra]
    monkeypatch.setattr(sys, 'argv', argv)  # Where overrides are read from.
    fv(argv)
    assert fv.config.stop_after == want
    loop.check_loop_config(fv.config)
  fv.config.stop_after = None  # And back (tests reset it so).
  with pytest.raises(ValueError, match=r'config.stop_after=-1'):
    fv.config.stop_after = -1
    loop.check_loop_config(fv.config)
