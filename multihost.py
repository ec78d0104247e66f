"""Multi-process runs: joining hosts and stopping when a peer is lost.

One process per host, joined by `jax.distributed.initialize`
(`setup_distributed`, once `coordinator.check_coordinator` has checked the
address). Each process trains on its part of every global batch; orbax
writes the replicated state once and every process restores it from the
shared workdir. A badly set-up run fails on every process with one
clear message: `errors_shared` raises on all what one process refused alone
(process 0's lock of the workdir, a host's data); `assert_same_config` and
`assert_same_data` compare what they were given. A lost peer ends the
others with one line naming it (`peer_watch`), and `stop_after_failure`
bounds the exit of a process that failed.
"""

from collections.abc import Iterator
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from coordinator import UNJOINED
from coordinator import check_coordinator
import entry
import lock
import peer_watch
from utils import UserError
import workdir as workdir_lib

# jaxlib aborts (status 134, a C++ stack) where not every process joined in
# its timeout: given this much more, `_unjoined` ends the process first.
JOIN_GRACE_SECONDS = 10
_FAILED_BARRIER = 'flax_fm: every process failed'


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
      process stops with one line naming it, status 1 (`peer_watch`; when
      process 0 is lost, jaxlib aborts the others at once).
    initialization_timeout_seconds: how long the processes wait for each other
      to connect at start-up; then, given the address and count, a process
      still waiting exits with status 2 and one line. Given the address,
      count and id, processes given other counts or the same id stop at once
      (`check_coordinator`'s lobby).

  Raises:
    UserError: the run is not described by the arguments or the cluster
      (the message names the flags to set), or hosts hold other device
      counts or were given other `num_processes`.
  """
  # Cross-process collectives of the CPU backend (the 2-process tests): JAX
  # 0.10's default, not older versions'; GPU and TPU backends ignore it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # Its notifier took SIGTERM from entry.py and waited for a sync point.
  jax.config.update('jax_enable_preemption_service', False)
  # A lost process no longer aborts the others (a C++ stack): `peer_watch`
  # ends them in one line. Process 0's service reads it.
  jax.config.update('jax_enable_recoverability', True)
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if (
    address
    and isinstance(num_processes, int)
    and isinstance(process_id, int)
    and 0 <= process_id < num_processes
  ):
    check_coordinator(
      address,
      process_id,
      initialization_timeout_seconds,
      num_processes=num_processes,
    )
  timeout = initialization_timeout_seconds
  args = (address, timeout, num_processes)
  unjoined = threading.Timer(timeout, _unjoined, args)
  unjoined.daemon = True
  named = bool(address and num_processes)  # Else the cluster's, unknown here.
  if named:
    unjoined.start()
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=timeout + (JOIN_GRACE_SECONDS if named else 0),
      heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
  except jax.errors.JaxRuntimeError as e:  # E.g. the port was taken since.
    raise UserError(
      f'Cannot join a multi-process run at {address}: {e}. Check'
      ' --coordinator_address and start the processes again.'
    ) from e
  except (ValueError, TypeError) as e:
    names = ('coordinator_address', 'num_processes', 'process_id')
    given = (coordinator_address, num_processes, process_id)
    unset = [f'--{n}' for n, v in zip(names, given, strict=True) if v is None]
    raise UserError(
      f'Cannot join a multi-process run: {e}'
      + (f' Set {", ".join(unset)}' if unset else ' Check the flags')
      + ': every process passes --coordinator_address=<host:port of process'
      ' 0> and --num_processes, and its own --process_id (0 to'
      ' num_processes - 1). JAX detects them itself only on Slurm, Open MPI'
      ' and Cloud TPU.'
    ) from e
  finally:
    unjoined.cancel()
  peer_watch.start(heartbeat_timeout_seconds)  # Before any exit: see there.
  owners = [d.process_index for d in jax.devices()]  # pmap needs equal ones.
  counts = {p: owners.count(p) for p in sorted(set(owners))}
  if len(set(counts.values())) > 1:
    raise UserError(
      'The processes have different numbers of devices: {process: devices}'
      f' {counts}. Give each the same (e.g. CUDA_VISIBLE_DEVICES, XLA_FLAGS).'
    )
  with errors_shared():  # Process 0's count is the run's: a typo trains on.
    if num_processes is not None and num_processes != jax.process_count():
      raise UserError(
        f'--num_processes={num_processes}, but process 0 started a run of'
        f' {jax.process_count()} at {address}: give every process the same.'
      )


def _unjoined(address: str, timeout: float, num_processes: int) -> None:
  """Ends this process, stuck in jaxlib's wait for the others: one line."""
  message = UNJOINED % (address, timeout, num_processes)
  print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
  os._exit(2)  # pylint: disable=protected-access


def all_failed(timeout: float) -> bool | Exception:
  """Whether every process came here, failed too, within `timeout` seconds.

  Returns:
    True or False; the exception when the JAX coordination service cannot be
    reached (it runs in process 0).
  """
  client = peer_watch.coordination_client()
  try:
    client.wait_at_barrier(_FAILED_BARRIER, int(timeout * 1000))
  except Exception as e:  # pylint: disable=broad-except
    return False if 'DEADLINE_EXCEEDED' in str(e) else e
  return True


def stop_after_failure(
  error: BaseException, heartbeat_timeout_seconds: float
) -> None:
  """Ends this process of a multi-process run that failed with `error`.

  A process that dies leaves the others failing in a collective, or waiting
  in one (a frozen process). `peer_watch` ends them within about
  `heartbeat_timeout_seconds`, naming it, with one line and status 1. Here a
  failed process waits that long (and some) for the others: when every one
  fails alike (e.g. a bad config), this returns, for the caller to re-raise
  `error`, and they all leave through the normal exit; else it exits with
  status 1 (interrupted: at once, with one line and status 130, or 143 for a
  SIGTERM, as `entry.run_main` ends one process). It returns at once in a
  single-process run.

  Args:
    error: what stopped this process.
    heartbeat_timeout_seconds: as given to `setup_distributed`.
  """
  if jax.process_count() == 1:
    return
  me, count = jax.process_index(), jax.process_count()
  status, last_line = 1, None
  interrupted = isinstance(error, KeyboardInterrupt)
  if interrupted:  # One line and a signal's status, as entry.run_main's.
    term = isinstance(error, entry.Terminated)
    status = 128 + (signal.SIGTERM if term else signal.SIGINT)
    last_line = 'terminated (SIGTERM).' if term else 'interrupted (Ctrl-C).'
    message = (
      f'Process {me} of {count} interrupted; the others stop when the'
      ' coordination service misses its heartbeats.'
    )
  else:
    # Long enough for the service to declare a dead peer dead.
    wait = heartbeat_timeout_seconds + 10
    logging.error(
      'Process %d of %d stopped: %s: %s. Waiting for the others (at most %s'
      ' s): a process that was lost is named when the JAX coordination'
      ' service misses its heartbeats.',
      *(me, count, type(error).__name__, error, wait),
    )
    failed = all_failed(wait)
    if failed is True:
      return  # All failed alike: re-raise everywhere, leave together.
    if failed is False:
      message = (
        f'Process {me} of {count} failed alone while the others still run;'
        ' stopping it, which stops them.'
      )
    else:
      message = (
        f'Lost process 0 of {count}: the JAX coordination service it runs is'
        f' unreachable ({failed}). Process {me} stops.'
      )
  logging.error(
    '%s Start all %d processes again with the same flags to resume from the'
    ' latest checkpoint.',
    message,
    count,
    exc_info=None if interrupted else error,
  )
  if last_line:
    print(f'{os.path.basename(sys.argv[0])}: {last_line}', file=sys.stderr)
  for stream in (logging, sys.stdout, sys.stderr):
    stream.flush()
  # Not sys.exit: the interpreter's exit waits for every process (in
  # `peer_watch`) and joins orbax's and the collectives' threads, which may
  # wait forever for a dead peer. Finished checkpoints are complete on disk;
  # a save cut short leaves a temporary directory that the next start
  # removes.
  os._exit(status)  # pylint: disable=protected-access


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
    open(path, 'w').close()
  multihost_utils.sync_global_devices('flax_fm: workdir check file written')
  seen = allgather(np.int32(os.path.exists(path)))
  if jax.process_index() == 0:
    os.remove(path)
  if blind := [i for i, ok in enumerate(seen.tolist()) if not ok]:
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


def assert_same_config(flat: dict[str, Any]) -> None:
  """Raises a UserError on every process unless all have the same config.

  Other learning rates or seeds train apart on overlapping data; another
  number of epochs leaves the processes waiting in other collectives.

  Args:
    flat: the config, `{dotted key: JSON value}` (`workdir.flatten`).
  """
  if jax.process_count() == 1:
    return
  shared = {k: v for k, v in flat.items() if k not in workdir_lib.HOST_KEYS}
  differ = _differences(gather_text(json.dumps(shared, sort_keys=True)))
  if differ:
    raise UserError(
      'The processes were started with different configs: '
      + '; '.join(f'config.{d}' for d in differ)
      + '. Start every process with the same --config and flags (only '
      + ', '.join(f'config.{k}' for k in workdir_lib.HOST_KEYS)
      + ' may differ).'
    )


def assert_same_data(dataset: Any) -> None:
  """Raises a UserError on every process unless all loaded the same data.

  Compares the data files' digests, the fields, the splits' sizes and label
  counts, and digests of the vocabularies and each split's ends: hosts
  reading other files (a host's own `config.dataset.path`) would train apart.

  Args:
    dataset: the `data.Dataset` this process loaded.
  """
  if jax.process_count() == 1:
    return
  differ = _differences(gather_text(json.dumps(_fingerprint(dataset))))
  if differ:
    raise UserError(
      'The processes loaded different data: '
      + '; '.join(differ)
      + '. Give every process the same file at config.dataset.path (and'
      ' the same config).'
    )


def _fingerprint(dataset: Any) -> dict[str, Any]:
  """What `assert_same_data` compares, as JSON values."""

  def digest(*arrays) -> str:
    h = hashlib.sha256()
    for x in arrays:
      h.update(b'' if x is None else np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:12]

  out = {
    'sources': dataset.sources,  # Size and SHA-256 of each file, by role.
    'fields': [
      list(dataset.field_names),
      list(dataset.field_dims),
      list(dataset.multi_field_names),
      list(dataset.multi_field_dims),
      list(dataset.dense_names),
    ],
    'vocabularies': digest(
      *(dataset.vocabulary or ()), *(dataset.multi_vocabulary or ())
    ),
  }
  for name in ('train', 'valid', 'test'):
    split = getattr(dataset, name)
    ends = [
      x if x is None else x[i]
      for x in (split.ids, split.labels, split.multi_ids, split.dense)
      for i in (slice(1024), slice(-1024, None))
    ]
    positives = int(np.sum(split.labels, dtype=np.float64))
    out[name] = [len(split), positives, digest(*ends)]
  return out


def _differences(texts: list[str]) -> list[str]:
  """`key: 0: value, 1: value` for each key of the JSON `texts` that differ."""
  trees = [json.loads(t) for t in texts]
  differ = []
  for key in sorted(set().union(*trees)):
    values = [json.dumps(t.get(key)) for t in trees]
    if len(set(values)) > 1:
      shown = ', '.join(f'{i}: {v}' for i, v in enumerate(values))
      differ.append(f'{key}: {shown}')
  return differ


def gather_text(text: str) -> list[str]:
  """Every process's `text`, in process order (a collective)."""
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = allgather(np.int32(len(data)))
  padded = np.pad(data, (0, max(int(lengths.max()), 1) - len(data)))
  rows = allgather(padded).reshape(len(lengths), -1)
  return [r[:n].tobytes().decode() for r, n in zip(rows, lengths, strict=True)]


def allgather(x: np.ndarray) -> np.ndarray:
  """Every process's `x` end to end, as a flat host array `[processes * n]`."""
  if jax.process_count() == 1:
    return np.asarray(x).reshape(-1)
  return np.asarray(multihost_utils.process_allgather(x)).reshape(-1)


@contextlib.contextmanager
def errors_shared() -> Iterator[None]:
  """Raises on every process an error that one raised in the block.

  For what one process checks or writes alone (process 0's lock and records,
  a host's own paths), which the others would wait for in their next
  collective; they name it, as a UserError or (any other error) a
  RuntimeError, so that all leave alike. The block must hold no collective.
  """
  try:
    yield
  except Exception as e:  # Tells the others: 'U' or 'E', then the text.
    user = isinstance(e, UserError)
    gather_text(f'U{e}' if user else f'E{type(e).__name__}: {e}')
    raise
  for process, text in enumerate(gather_text('')):
    if text:
      kind = UserError if text[0] == 'U' else RuntimeError
      raise kind(f'Process {process}: {text[1:]}')


def lock_workdir(workdir: str, is_main: bool) -> lock.Lock:
  """Process 0 locks the workdir; every process raises if it was refused."""
  with errors_shared():
    return lock.acquire(workdir, enabled=is_main)
