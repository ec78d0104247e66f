"""The watch of a multi-process run's peers, with a fake coordination client.

tests/test_multihost.py runs it for real: a killed or frozen process, and
processes that leave together.
"""

import contextlib
import io
import threading
import time
from unittest import mock

from absl.testing import absltest

import peer_watch


class _Exited(Exception):
  """What the tests' `os._exit` raises instead of ending the process."""


def _client(*answers):
  """A coordination client whose `get_live_nodes` gives `answers` in turn:
  a process list (as {process: incarnation}), an exception to raise, or a
  function to call (which waits, say)."""
  left = list(answers)

  def get_live_nodes(processes):
    answer = left.pop(0)
    if isinstance(answer, Exception):
      raise answer
    if callable(answer):
      return answer()
    return {p: 7 for p in answer}

  client = mock.Mock()
  client.get_live_nodes.side_effect = get_live_nodes
  return client


@contextlib.contextmanager
def _as_process(me, count=2):
  with (
    mock.patch.object(peer_watch.jax, 'process_index', return_value=me),
    mock.patch.object(peer_watch.jax, 'process_count', return_value=count),
    mock.patch.object(peer_watch, 'INTERVAL_SECONDS', 0),
  ):
    yield


class WatchTest(absltest.TestCase):
  def _watch(self, client, me=0, count=3, ending=False):
    """Runs process `me`'s watch over `client` in this thread; returns its
    exit status (None: it returned), its stderr and the watch."""
    stderr = io.StringIO()
    with (
      _as_process(me, count),
      mock.patch.object(peer_watch.os, '_exit', side_effect=_Exited) as exit_,
      mock.patch.object(peer_watch.sys, 'stderr', stderr),
      mock.patch.object(peer_watch.sys, 'argv', ['main.py']),
    ):
      watch = peer_watch.Watch(client, 10)
      if ending:
        watch.ending.set()
      try:
        watch._watch()
      except _Exited:
        pass
    status = exit_.call_args.args[0] if exit_.called else None
    return status, stderr.getvalue(), watch

  def test_a_lost_peer_ends_the_process_in_one_line(self):
    client = _client((0, 1, 2), (0, 1, 2), (0, 2))
    status, stderr, _ = self._watch(client, me=2)
    self.assertEqual(status, 1)
    self.assertEqual(
      stderr,
      'main.py: error: Lost process(es) 1 of 3: no heartbeat for 10 s.'
      ' Process 2 stops. Start all 3 processes again with the same flags to'
      ' resume from the latest checkpoint.\n',
    )
    self.assertEqual(client.get_live_nodes.call_args.args, ([0, 1, 2],))
    status, stderr, _ = self._watch(_client((2,)), me=2)
    self.assertRegex(stderr, r'Lost process\(es\) 0, 1 of 3: ')

  def test_a_process_that_lost_a_peer_leaves_the_service(self):
    # Process 0's end would abort the others before they learnt of the loss
    # (the service's answer to their question went with it).
    client = _client((0, 1, 2), (0, 1))
    status, stderr, _ = self._watch(client, me=1)
    self.assertEqual(status, 1)
    self.assertRegex(stderr, r'^main.py: error: Lost process\(es\) 2 of 3: ')
    client.shutdown.assert_called_once_with()
    # Process 0 stays until the others left it.
    client = _client((0, 1, 2), (0, 1), (0, 1), (0,), (0,))
    status, stderr, _ = self._watch(client, me=0)
    self.assertEqual(status, 1)
    self.assertRegex(stderr, r'Lost process\(es\) 2 of 3: .* Process 0 stops')
    self.assertEqual(client.get_live_nodes.call_count, 4)
    client.shutdown.assert_not_called()
    # Not longer than LEAVE_SECONDS.
    release = threading.Event()
    self.addCleanup(release.set)
    client = _client((0, 1, 2), (0, 2), lambda: release.wait(10))
    started = time.monotonic()
    with mock.patch.object(peer_watch, 'LEAVE_SECONDS', 0.3):
      self.assertEqual(self._watch(client, me=0)[0], 1)
    self.assertLess(time.monotonic() - started, 3)

  def test_an_unreachable_service_is_process_0_lost(self):
    gone = RuntimeError('UNAVAILABLE: Failed to send RPC\nmore')
    client = _client((0, 1, 2), gone)
    status, stderr, _ = self._watch(client, me=1)
    self.assertEqual(status, 1)
    self.assertTrue(
      stderr.startswith(
        'main.py: error: Lost process 0 of 3: the JAX coordination service it'
        ' runs is unreachable (UNAVAILABLE: Failed to send RPC). Process 1'
        ' stops.'
      ),
      stderr,
    )
    client.shutdown.assert_not_called()  # Nothing to leave.

  def test_at_the_end_process_0_waits_until_the_others_left(self):
    # They leave one by one: no process is lost.
    status, stderr, watch = self._watch(
      _client((0, 1, 2), (0, 2), (0,)), ending=True
    )
    self.assertEqual((status, stderr), (None, ''))
    self.assertTrue(watch.alone.is_set())
    # A question cut short by the end is no loss either.
    status, _, watch = self._watch(_client(RuntimeError('closed')), ending=True)
    self.assertIsNone(status)
    self.assertFalse(watch.alone.is_set())

  def test_at_the_end_the_others_stop_asking(self):
    client = _client()
    self.assertIsNone(self._watch(client, me=1, ending=True)[0])
    client.get_live_nodes.assert_not_called()

  def test_end_waits_for_every_process_then_process_0_for_their_leave(self):
    for me, waited in ((0, True), (1, False)):
      client = mock.Mock()
      with _as_process(me):
        watch = peer_watch.Watch(client, 10)
        watch.alone = mock.Mock()
        watch.end()
      client.wait_at_barrier.assert_called_once_with(
        'flax_fm: every process ends', 300_000
      )
      self.assertTrue(watch.ending.is_set())
      self.assertEqual(
        watch.alone.wait.call_args_list, [mock.call(20)] * waited
      )
    # A peer that does not come (lost: the watch ends the process; or stuck)
    # leaves the watch on.
    client.wait_at_barrier.side_effect = RuntimeError('DEADLINE_EXCEEDED')
    with _as_process(0), self.assertLogs('absl', 'ERROR'):
      watch = peer_watch.Watch(client, 10)
      watch.end()
    self.assertFalse(watch.ending.is_set())

  def test_end_returns_once_the_watch_left_its_call_to_the_service(self):
    # The interpreter's end would cut a call still under way, and jaxlib
    # aborts the process on that ('FATAL: exception not rethrown').
    inside, release = threading.Event(), threading.Event()

    def slow():
      inside.set()
      release.wait(5)
      return {0: 7, 1: 7}

    client = _client(slow)
    with _as_process(1):
      watch = peer_watch.Watch(client, 10)
      watch.thread.start()
      self.assertTrue(inside.wait(5))
      ended = threading.Thread(target=watch.end)
      ended.start()
      ended.join(0.5)
      self.assertTrue(ended.is_alive())  # Waits for the call under way.
      release.set()
      ended.join(5)
    self.assertFalse(ended.is_alive())
    self.assertFalse(watch.thread.is_alive())

  def test_start_watches_only_a_multi_process_run(self):
    client = _client()
    with (
      mock.patch.object(peer_watch.distributed.global_state, 'client', client),
      mock.patch.object(peer_watch.atexit, 'register') as register,
      mock.patch.object(peer_watch.Watch, '_watch') as run,
    ):
      with _as_process(0, 1):
        self.assertIsNone(peer_watch.start(10))
      with _as_process(0, 2):
        watch = peer_watch.start(10)
        watch.thread.join(5)
      with (
        _as_process(0, 2),
        mock.patch.object(peer_watch.distributed.global_state, 'client', None),
      ):
        self.assertIsNone(peer_watch.start(10))  # Not joined.
    run.assert_called_once_with()
    register.assert_called_once_with(watch.end)
    self.assertTrue(watch.thread.daemon)


if __name__ == '__main__':
  absltest.main()
