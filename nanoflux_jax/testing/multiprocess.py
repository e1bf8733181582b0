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
    WorkerError: a process failed or timed out; the message has the tail of
      every process's log (the others are killed).
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
  deadline = time.time() + timeout
  # One failed process leaves the others waiting in a collective: stop all.
  while any(p.poll() is None for p in procs):
    if time.time() > deadline or any(
        p.returncode not in (None, 0) for p in procs):
      break
    time.sleep(0.2)
  timed_out = any(p.poll() is None for p in procs)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  outs = []
  for f in files:
    f.seek(0)
    outs.append(f.read())
    f.close()
  failed = [i for i, p in enumerate(procs) if p.returncode != 0]
  if failed:
    tails = '\n'.join(f'--- process {i} (rc {procs[i].returncode}) ---\n'
                      f'{_tail(outs[i])}' for i in range(num_processes))
    why = f'timed out after {timeout:.0f}s' if timed_out else 'failed'
    raise WorkerError(f'{script}: processes {failed} {why}\n{tails}')
  return outs


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
