"""Multi-process runs: joining hosts and stopping when a peer is lost.

One process per host, joined by `jax.distributed.initialize`
(`setup_distributed`). Each process trains on its part of every global
batch; orbax writes the replicated state once and every process restores it
from the shared workdir. The checks here make a badly set-up run fail on
every process with one clear message (`lock_workdir`: all stop when process
0 cannot lock the workdir), and `stop_after_failure` turns a lost peer into
a bounded exit that names it.
"""

import os
import sys
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

import lock
from utils import UserError


def setup_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  heartbeat_timeout_seconds: int = 100,
  initialization_timeout_seconds: int = 300,
) -> None:
  """Joins a multi-process run with `jax.distributed.initialize`.

  Call it before anything else touches JAX. Arguments left as None are
  detected by JAX on Slurm, Open MPI and Cloud TPU (and `coordinator_address`
  also from `$JAX_COORDINATOR_ADDRESS`).

  Args:
    coordinator_address: `host:port` where process 0 serves the JAX
      coordination service.
    num_processes: number of processes in the run.
    process_id: this process, in `[0, num_processes)`.
    heartbeat_timeout_seconds: a process that sends no heartbeat to the
      coordination service for this long is declared dead, and every other
      process stops with an error naming it.
    initialization_timeout_seconds: how long the processes wait for each other
      to connect at start-up.

  Raises:
    UserError: the run is not described by the arguments or the cluster
      (the message names the flags to set).
  """
  # Cross-process collectives of the CPU backend (the 2-process tests on one
  # machine). gloo is JAX 0.10's default but not older versions'; GPU and
  # TPU backends ignore the option.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=initialization_timeout_seconds,
      heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
  except (ValueError, TypeError) as e:
    given = {
      'coordinator_address': coordinator_address,
      'num_processes': num_processes,
      'process_id': process_id,
    }
    unset = [f'--{name}' for name, value in given.items() if value is None]
    raise UserError(
      f'Cannot join a multi-process run: {e}'
      + (f' Set {", ".join(unset)}' if unset else ' Check the flags')
      + ': every process passes --coordinator_address=<host:port of process'
      ' 0> and --num_processes, and its own --process_id (0 to'
      ' num_processes - 1). JAX detects them itself only on Slurm, Open MPI'
      ' and Cloud TPU.'
    ) from e


def live_processes(timeout: float) -> set[int] | Exception | None:
  """The processes the JAX coordination service holds alive.

  `multihost_utils.live_devices` acts as a barrier: it answers once every
  live process has asked, or once the others are declared dead (no heartbeat
  for the heartbeat timeout).

  Returns:
    Their indices; the exception when the service cannot be reached (it runs
    in process 0); or None when no answer came within `timeout` seconds
    (some process is still busy, e.g. waiting in a collective).
  """
  answer = {}

  def ask():
    try:
      with multihost_utils.live_devices(jax.devices()) as devices:
        answer['live'] = {d.process_index for d in devices}
    except multihost_utils.ProcessFailureError as e:
      # Leaving the block asks again: a process lost in between is dead too.
      lost = {d.process_index for d in e.failed_devices}
      answer['live'] = answer.get('live', set()) - lost
    except Exception as e:  # pylint: disable=broad-except
      answer['error'] = e

  # A daemon thread, so that an unanswered question cannot keep us alive.
  thread = threading.Thread(target=ask, daemon=True)
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    return None
  return answer.get('live', answer.get('error'))


def stop_after_failure(
  error: BaseException, heartbeat_timeout_seconds: float
) -> None:
  """Ends this process of a multi-process run that failed with `error`.

  A process that dies leaves the others waiting in a collective or failing in
  one; this names the lost processes and exits with status 1 instead of
  hanging. Within about `heartbeat_timeout_seconds` the coordination service
  declares a silent process dead: the wait for its answer is bounded by
  that, and JAX itself then terminates every process (its log also names the
  dead task).

  Returns (for the caller to re-raise `error`) in a single-process run, and
  when every process is alive and failed too (e.g. a bad config): then they
  all leave through JAX's normal shutdown.

  Args:
    error: what stopped this process.
    heartbeat_timeout_seconds: as given to `setup_distributed`.
  """
  if jax.process_count() == 1:
    return
  me, count = jax.process_index(), jax.process_count()
  if isinstance(error, KeyboardInterrupt):
    message = (
      f'Process {me} of {count} interrupted; the others stop when the'
      ' coordination service misses its heartbeats.'
    )
  else:
    # Long enough for the service to declare a dead peer dead.
    wait = heartbeat_timeout_seconds + 10
    logging.error(
      'Process %d of %d stopped: %s: %s. Asking the JAX coordination service'
      ' which processes are alive (at most %s s).',
      me,
      count,
      type(error).__name__,
      error,
      wait,
    )
    live = live_processes(wait)
    if isinstance(live, set) and len(live) == count:
      return  # All failed alike: re-raise everywhere, shut down normally.
    if live is None:
      message = (
        f'Process {me} of {count} failed alone while the others still run;'
        ' stopping it, which stops them.'
      )
    elif isinstance(live, Exception):
      message = (
        f'Lost process 0 of {count}: the JAX coordination service it runs is'
        f' unreachable ({live}). Process {me} stops.'
      )
    else:
      lost = sorted(set(range(count)) - live)
      message = (
        f'Lost process(es) {", ".join(map(str, lost))} of {count}: no'
        f' heartbeat for {heartbeat_timeout_seconds} s. Process {me} stops.'
      )
  logging.error(
    '%s Start all %d processes again with the same flags to resume from the'
    ' latest checkpoint.',
    message,
    count,
    exc_info=error,
  )
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  # Not sys.exit: the interpreter's exit runs JAX's shutdown barrier, which
  # waits for the dead peer, and joins orbax's and the collectives' threads,
  # which may wait on it forever too. The logs are flushed above; finished
  # checkpoints are complete on disk, and a save cut short leaves only a
  # temporary directory that the next start removes.
  os._exit(1)


def check_shared_workdir(workdir: str) -> None:
  """Raises a UserError on every process unless all see process 0's files.

  Orbax writes the replicated state once and every process restores it from
  the files, so a multi-process run needs its workdir on storage that all
  hosts share. A fresh name is checked (no stale NFS lookup cache).
  """
  if jax.process_count() == 1:
    return
  token = multihost_utils.broadcast_one_to_all(
    np.frombuffer(os.urandom(8), np.uint8)
  )
  path = os.path.join(workdir, f'.shared-{np.asarray(token).tobytes().hex()}')
  if jax.process_index() == 0:
    with open(path, 'w'):
      pass
  multihost_utils.sync_global_devices('flax_fm: workdir check file written')
  seen = allgather(np.int32(os.path.exists(path)))
  if jax.process_index() == 0:
    os.remove(path)
  blind = [i for i, ok in enumerate(seen.tolist()) if not ok]
  if blind:
    raise UserError(
      f'--workdir {workdir} is not shared: process(es)'
      f' {", ".join(map(str, blind))} do not see the files process 0 writes'
      ' there. Put the workdir on storage that every host mounts at the same'
      ' path (e.g. NFS); orbax restores checkpoints from it on every process.'
    )


def assert_same_on_all_processes(
  value: int | None, what: str, workdir: str
) -> None:
  """Raises a UserError on every process if they see different `value`s.

  Args:
    value: e.g. the latest checkpoint step; None (no checkpoint) counts as -1.
    what: what `value` is, for the message.
    workdir: the workdir they should all share, for the message.
  """
  if jax.process_count() == 1:
    return
  values = allgather(np.int32(-1 if value is None else value))
  if (values != values[0]).any():
    raise UserError(
      f'The processes see different {what} in {workdir}:'
      f' {dict(enumerate(values.tolist()))} (-1: none). Every process must'
      ' see the same workdir: put it on storage that all hosts share.'
    )


def allgather(x: np.ndarray) -> np.ndarray:
  """Every process's `x` end to end, as a flat host array `[processes * n]`."""
  if jax.process_count() == 1:
    return np.asarray(x).reshape(-1)
  return np.asarray(multihost_utils.process_allgather(x)).reshape(-1)


def lock_workdir(workdir: str, is_main: bool) -> lock.Lock:
  """Process 0 locks the workdir; every process raises if it was refused."""
  try:
    held, refused = lock.acquire(workdir, enabled=is_main), None
  except UserError as e:
    held, refused = lock.Lock(), e
  if not allgather(np.int32(refused is None)).all():
    raise refused or UserError(
      f'Process 0 could not lock workdir {workdir}: see its log for why.'
    )
  return held
