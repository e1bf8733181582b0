"""Runs a Python script as N real JAX processes on this machine (CPU).

Each process gets `--xla_force_host_platform_device_count=<devices>` fake CPU
devices and calls `initialize(process_id)` (below), which joins a local
coordinator with `jax.distributed.initialize` and uses gloo for the
cross-process collectives, so a mesh spans every process's devices exactly
as it spans the hosts of a pod slice.

  results = launch('worker.py', ['--out', d], num_processes=2, devices=4)
  # worker.py: pid, n, addr = multiprocess.worker_args(); initialize(...)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import jax
from jax._src import distributed

ENV_ID = 'NANOFLUX_PROCESS_ID'
ENV_COUNT = 'NANOFLUX_PROCESS_COUNT'
ENV_ADDR = 'NANOFLUX_COORDINATOR'


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def initialize() -> tuple[int, int]:
  """In a launched worker, before any other jax call: joins the others.

  Returns (process_id, process_count).
  """
  pid, n = int(os.environ[ENV_ID]), int(os.environ[ENV_COUNT])
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=os.environ[ENV_ADDR],
                             num_processes=n, process_id=pid,
                             initialization_timeout=120)
  return pid, n


def barrier(name: str, timeout_s: float = 600) -> None:
  """Waits for every process at a coordination-service barrier.

  Gloo sets up each group's connections at its first collective and gives
  up after 30 s, so processes skewed by a busy machine (imports, compiles)
  are lined up here, outside gloo, before their first collective.
  """
  client = distributed.global_state.client
  if client is not None:
    client.wait_at_barrier(name, int(timeout_s * 1000))


class WorkerError(RuntimeError):
  pass


def launch(script: str, args: Sequence[str] = (), *, num_processes: int = 2,
           devices: int = 4, timeout: float = 300, cwd: str | None = None,
           env: dict | None = None) -> list[str]:
  """Runs `python script *args` as `num_processes` processes; their logs.

  Raises:
    WorkerError: a process failed (noticed within 0.2 s, whichever it is:
      the message names it and its exit status or signal) or the run timed
      out; the message has the tail of every process's log (the processes
      still running are killed).
  """
  addr = f'127.0.0.1:{free_port()}'
  procs, files = [], []
  for pid in range(num_processes):
    e = dict(os.environ, **(env or {}))
    # Gloo's collectives time out after 30 s by default: far too short when
    # one process is still compiling on a busy machine.
    e['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={devices} '
                      f'--xla_cpu_collective_timeout_seconds={int(timeout)}')
    e.update({ENV_ID: str(pid), ENV_COUNT: str(num_processes), ENV_ADDR: addr,
              'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'})
    f = tempfile.TemporaryFile('w+')
    files.append(f)
    procs.append(subprocess.Popen([sys.executable, script, *args], env=e,
                                  cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                  text=True))
  t0 = time.time()
  # Every process is polled (not only process 0): one that dies leaves the
  # others waiting in a collective, so the first failure stops them all.
  while True:
    codes = [p.poll() for p in procs]
    failed = [i for i, rc in enumerate(codes) if rc not in (None, 0)]
    if failed or None not in codes or time.time() - t0 > timeout:
      break
    time.sleep(0.2)
  elapsed = time.time() - t0
  stopped = [i for i, rc in enumerate(codes) if rc is None]
  for i in stopped:
    procs[i].kill()
    procs[i].wait()
  outs = []
  for f in files:
    f.seek(0)
    outs.append(f.read())
    f.close()
  if failed or stopped:
    tails = '\n'.join(f'--- process {i} ({_how(procs[i].returncode)}'
                      f'{", stopped by launch" if i in stopped else ""}) ---'
                      f'\n{_tail(outs[i])}' for i in range(num_processes))
    if failed:
      why = '; '.join(f'process {i} {_how(codes[i])}' for i in failed)
      why += f' after {elapsed:.1f}s'
    else:
      why = f'timed out after {timeout:.0f}s'
    others = f'; stopped the processes still running: {stopped}' if (
        stopped) else ''
    raise WorkerError(f'{script}: {why}{others}\n{tails}')
  return outs


def _how(returncode: int | None) -> str:
  """'exited with status 3' / 'was killed by signal SIGKILL'."""
  if returncode is None:
    return 'still running'
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = str(-returncode)
    return f'was killed by signal {name}'
  return f'exited with status {returncode}'


def _tail(log: str, n: int = 6000) -> str:
  """The log from its first Python traceback (else its end), <= n chars."""
  lines = [l for l in log.splitlines() if not l.startswith(('W0000',
                                                             'I0000',
                                                             '[Gloo]'))]
  log = '\n'.join(lines)
  errors = [l for l in lines if l.startswith('WORKER ERROR')]
  if errors:  # A worker's own summary line first.
    return '\n'.join(errors)[:n // 3] + '\n' + _tail(log.replace(
        'WORKER ERROR', 'worker error'), n - n // 3)
  i = log.find('Traceback (most recent call last)')
  if i < 0 or len(log) - i <= n:
    return log[i:] if i >= 0 else log[-n:]
  return log[i:i + n // 2] + '\n[...]\n' + log[-n // 2:]
