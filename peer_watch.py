"""Watches the peers of a multi-process run: a lost one ends this process.

JAX's coordination service declares a process dead once it misses its
heartbeats for `--heartbeat_timeout_seconds`. By default it then aborts
every other process (status 134, a C++ stack). `multihost.setup_distributed`
makes the run recoverable (`jax_enable_recoverability`), so that the others
live on; `start` then runs a thread that asks the service which processes
are alive and, when one is lost, ends this process with one line and
status `LOST_STATUS`, whatever its main thread waits for (a collective with
a frozen peer never returns). Process 0 runs the service: when it dies,
jaxlib still aborts the others, at once.

A recoverable run's processes no longer wait for each other when they end
(JAX's shutdown barrier): `start` registers an exit that does, and process 0
stops the service only once the others have left it.
"""

import atexit
import os
import sys
import threading
import time
from typing import Any

from absl import logging
import jax
from jax._src import distributed  # No public API: `coordination_client`.

# The exit status of a process that lost a peer, as of any failed run: the
# scheduler reruns it, the processes resume from the latest checkpoint.
LOST_STATUS = 1
# How long a process that ends waits for the others to end too (JAX's own
# shutdown barrier's default).
EXIT_TIMEOUT_SECONDS = 300
# Seconds between two questions to the service.
INTERVAL_SECONDS = 0.5
# At most how long a process that lost a peer takes to leave the service,
# and process 0 waits for the others to (they learn of it from the service).
LEAVE_SECONDS = 10

_EXIT_BARRIER = 'flax_fm: every process ends'


class Watch:
  """A daemon thread that ends this process once a peer is lost."""

  def __init__(self, client, heartbeat_timeout_seconds: float):
    self.client = client
    self.me, self.count = jax.process_index(), jax.process_count()
    self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
    self.ending = threading.Event()  # Every process came to its end.
    self.alone = threading.Event()  # Process 0: the others have left.
    self.thread = threading.Thread(
      target=self._watch, name='peer_watch', daemon=True
    )

  def _watch(self) -> None:
    everyone = list(range(self.count))
    while not (self.ending.is_set() and self.me != 0):
      try:
        # A barrier among the live processes' watches: it answers once each
        # asked, or once the service declares the silent ones dead.
        live = set(self.client.get_live_nodes(everyone))
      except Exception as e:  # pylint: disable=broad-except
        if self.ending.is_set():
          return
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        self._lost(
          f'Lost process 0 of {self.count}: the JAX coordination service it'
          f' runs is unreachable ({reason}).',
          leave=False,
        )
      if self.ending.is_set():
        if live == {self.me}:
          self.alone.set()
          return
      elif missing := sorted(set(everyone) - live):
        self._lost(
          f'Lost process(es) {", ".join(map(str, missing))} of {self.count}:'
          f' no heartbeat for {self.heartbeat_timeout_seconds} s.'
        )
      time.sleep(INTERVAL_SECONDS)

  def _lost(self, message: str, leave: bool = True) -> None:
    """Ends this process: `message` (a lost peer) as one line, status 1.

    The others learn of the loss at the same moment, from the service in
    process 0: it stays until they left it (at most `LEAVE_SECONDS`), or
    its end would abort them. They leave it first (`leave`; not where it
    is unreachable).
    """
    logging.flush()
    sys.stdout.flush()
    print(
      f'{os.path.basename(sys.argv[0])}: error: {message} Process'
      f' {self.me} stops. Start all {self.count} processes again with the'
      ' same flags to resume from the latest checkpoint.',
      file=sys.stderr,
      flush=True,
    )
    if self.me == 0:
      everyone = list(range(self.count))
      deadline = time.monotonic() + LEAVE_SECONDS
      while (left := deadline - time.monotonic()) > 0:
        live, _ = _within(left, self.client.get_live_nodes, everyone)
        if live is None or set(live) == {0}:
          break
        time.sleep(min(INTERVAL_SECONDS, left))
    elif leave:
      _within(LEAVE_SECONDS, self.client.shutdown)
    # Not sys.exit: from this thread it would end only the thread, and the
    # main thread may wait in a collective forever. Finished checkpoints are
    # complete on disk; a save cut short leaves a temporary directory that
    # the next start removes.
    os._exit(LOST_STATUS)  # pylint: disable=protected-access

  def end(self) -> None:
    """At exit: waits for every process, then (process 0) for their leave."""
    try:
      self.client.wait_at_barrier(_EXIT_BARRIER, EXIT_TIMEOUT_SECONDS * 1000)
    except Exception as e:  # pylint: disable=broad-except
      # A peer died meanwhile (the watch ends this process) or hangs.
      logging.error('Not every process came to its end: %s', e)
      return
    self.ending.set()
    if self.me == 0:  # Else the others lose the service while they leave.
      self.alone.wait(self.heartbeat_timeout_seconds + 10)
    # The watch may be in a call to the service, which the interpreter's end
    # would cut (a daemon thread taking the GIL back is stopped), and jaxlib
    # aborts on that (status -6, 'FATAL: exception not rethrown').
    if self.thread.is_alive():
      self.thread.join(LEAVE_SECONDS)


def _within(seconds: float, function, *args) -> tuple[Any, bool]:
  """`function(*args)` in a daemon thread, waited for at most `seconds`.

  Returns:
    What it returned (None if it raised or did not end), and whether it
    ended.
  """
  answer = []

  def call():
    try:
      answer.append(function(*args))
    except Exception:  # pylint: disable=broad-except
      answer.append(None)

  thread = threading.Thread(target=call, daemon=True)
  thread.start()
  thread.join(seconds)
  return (answer or [None])[0], bool(answer)


def coordination_client() -> Any:
  """This process's client of JAX's coordination service; None: not joined.

  The one use of JAX's private API here: jax 0.10 has no public handle on
  the client (`jax.experimental.multihost_utils` reads the same
  `global_state`). A recoverable run needs its `get_live_nodes`, its
  `wait_at_barrier` with a timeout and its `shutdown`; the public
  `multihost_utils.live_devices` wraps the first alone, with no timeout.
  """
  return distributed.global_state.client


def start(heartbeat_timeout_seconds: float) -> Watch | None:
  """Watches the peers of this multi-process run (none: returns None)."""
  client = coordination_client()
  if client is None or jax.process_count() == 1:
    return None
  watch = Watch(client, heartbeat_timeout_seconds)
  watch.thread.start()
  # Before JAX's own exit (registered at its import), which leaves the run.
  atexit.register(watch.end)
  return watch
