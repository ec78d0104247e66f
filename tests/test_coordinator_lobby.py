"""The lobby where process 0 hears every process's id and count.

Each process runs in a thread of this one, on a free port of 127.0.0.1.
tests/test_multihost.py runs it in real processes.
"""

import socket
import threading
import time
from unittest import mock

from absl.testing import absltest

import coordinator
import entry
from utils import UserError


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class LobbyTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    # How long process 0 tells its error to those still on their way.
    patch = mock.patch.object(coordinator, '_LATE_SECONDS', 1.5)
    patch.start()
    self.addCleanup(patch.stop)

  def _run(self, processes, timeout=20.0, extra=None):
    """Runs `check_coordinator` for each (process_id, num_processes[, delay
    in seconds]) in `processes`, process 0 first, each in a thread;
    `extra(address)`, if given, after process 0 started. Returns {index in
    processes: what it raised (None: nothing)} and {index: seconds it took
    from the start}."""
    address = f'127.0.0.1:{_free_port()}'
    results, took, threads = {}, {}, []
    started = time.monotonic()

    def visit(i, process, count, delay=0.0):
      time.sleep(delay)
      try:
        coordinator.check_coordinator(
          address, process, timeout, num_processes=count
        )
        results[i] = None
      except UserError as e:
        results[i] = e
      took[i] = time.monotonic() - started

    for i, args in enumerate(processes):
      thread = threading.Thread(target=visit, args=(i, *args), daemon=True)
      thread.start()
      threads.append(thread)
      if i == 0:
        time.sleep(0.2)  # Process 0 listens; the others come to it.
        if extra:
          extra(address)
    for thread in threads:
      thread.join(timeout + 15)
      self.assertFalse(thread.is_alive())
    return results, took

  def test_every_process_joins_once_all_came(self):
    results, _ = self._run([(0, 3), (2, 3), (1, 3)])
    self.assertEqual(results, {0: None, 1: None, 2: None})
    # A single process holds no lobby.
    self.assertEqual(self._run([(0, 1)])[0], {0: None})

  def test_other_counts_stop_every_process_at_once(self):
    # Process 0's count larger (the others waited out the start-up
    # timeout, 300 s by default) or smaller. Process 0 tells those still on
    # their way for a moment.
    late = coordinator._LATE_SECONDS
    for counts, given in (((3, 2), 2), ((2, 3), 3)):
      results, took = self._run([(0, counts[0]), (1, counts[1])])
      self.assertLess(took[1], 2)
      self.assertLess(took[0], late + 2)
      for i in (0, 1):
        self.assertRegex(
          str(results[i]),
          r'^The processes were given different --num_processes at'
          rf' 127.0.0.1:\d+: {counts[0]} \(process 0\), {given} \(process'
          r' 1\)\. Give every process the same\.$',
        )
    results, took = self._run([(0, 3), (1, 2), (2, 3, 0.7)])
    self.assertLess(took[0], 2)  # Every process has heard it.
    self.assertEqual(str(results[2]), str(results[0]))
    self.assertRegex(str(results[2]), r'2 \(process 1\)\. Give every')

  def test_an_id_given_twice_stops_every_process(self):
    results, took = self._run([(0, 3), (1, 3), (1, 3)])
    self.assertLess(max(took[1], took[2]), 2)
    for i in range(3):
      self.assertRegex(
        str(results[i]),
        r'^Two processes were given --process_id=1 at 127.0.0.1:\d+: give'
        r' each its own, 0 to --num_processes - 1\.$',
      )

  def test_a_process_that_came_again_is_not_taken_twice(self):
    def came_and_left(address):  # E.g. stopped, then started again.
      host, port = address.split(':')
      with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b'flax_fm hello 1 3\n')
        time.sleep(0.3)

    results, _ = self._run([(0, 3), (1, 3), (2, 3)], extra=came_and_left)
    self.assertEqual(results, {0: None, 1: None, 2: None})

  def test_not_all_came_stops_those_that_did(self):
    results, took = self._run([(0, 3), (1, 3)], timeout=1)
    self.assertLess(max(took.values()), 5)
    for i in (0, 1):
      self.assertRegex(
        str(results[i]),
        r'^Not every process joined the run at 127.0.0.1:\d+ within the 1 s'
        r' of --initialization_timeout_seconds: start all 3 with the same',
      )

  def test_what_is_not_a_guest_is_ignored(self):
    def stranger(address):
      host, port = address.split(':')
      for line in (b'GET / HTTP/1.1\r\n', b'flax_fm hello x 2\n', b''):
        with socket.create_connection((host, int(port))) as connection:
          connection.sendall(line)

    results, _ = self._run([(0, 2), (1, 2)], extra=stranger)
    self.assertEqual(results, {0: None, 1: None})

  def test_a_process_that_could_not_start_stops_the_others(self):
    # E.g. a bad flag: they waited for it the whole start-up timeout.
    def report(address, process):
      thread = threading.Thread(
        target=coordinator.report_failure,
        args=(address, process, 3, '--x=y: bad\nflag.'),
        daemon=True,
      )
      thread.start()
      return thread

    results, took = self._run(
      [(0, 3), (1, 3, 0.3)], extra=lambda address: report(address, 2)
    )
    self.assertLess(max(took.values()), 2)
    for i in (0, 1):
      self.assertEqual(str(results[i]), 'Process 2: --x=y: bad flag.')
    # Process 0 holds the lobby to tell them, until all heard it.
    address = f'127.0.0.1:{_free_port()}'
    reporting = report(address, 0)
    time.sleep(0.2)
    for process in (1, 2):
      with self.assertRaisesRegex(UserError, r'^Process 0: --x=y: bad flag\.$'):
        coordinator.check_coordinator(address, process, 20, num_processes=3)
    reporting.join(2)
    self.assertFalse(reporting.is_alive())

  def test_a_failure_that_no_process_hears_ends_in_time(self):
    address = f'127.0.0.1:{_free_port()}'
    with mock.patch.object(coordinator, 'REPORT_SECONDS', 0.5):
      for process in (0, 1):
        started = time.monotonic()
        coordinator.report_failure(address, process, 2, 'bad flag')
        self.assertLess(time.monotonic() - started, 2)
      coordinator.report_failure('no-port', 1, 2, 'bad flag')

  def test_a_process_that_finds_the_run_started_stops(self):
    # JAX's coordination service answers there (a gRPC server): the lobby
    # was over, the others joined without this one.
    with socket.create_server(('127.0.0.1', 0)) as server:
      port = server.getsockname()[1]

      def serve():
        connection = server.accept()[0]
        connection.sendall(b'\x00\x00\x12\x04\x00')  # An HTTP/2 frame.
        time.sleep(0.5)
        connection.close()

      threading.Thread(target=serve, daemon=True).start()
      with self.assertRaisesRegex(
        UserError,
        r"^Process 0 already runs JAX's coordination service at"
        r' 127.0.0.1:\d+: the run started without this process\.',
      ):
        coordinator.check_coordinator(
          f'127.0.0.1:{port}', 1, 5, num_processes=2
        )


class FailAtStartTest(absltest.TestCase):
  """A process that cannot parse its flags tells the others."""

  def _told(self, *args, env=None, defined=entry._RUN_FLAGS):
    """What `report_failure` got from `_fail_at_start` on argv `args`, with
    the flags `defined` (main.py's)."""
    with (
      mock.patch.object(entry.flags, 'FLAGS', set(defined)),
      mock.patch.object(coordinator, 'report_failure') as report,
      mock.patch.dict(entry.os.environ, env or {}),
      mock.patch.object(entry.sys, 'stderr'),
      self.assertRaises(SystemExit) as exited,
    ):
      entry._fail_at_start(['main.py', *args], 'bad flag')
    self.assertEqual(exited.exception.code, 2)
    return report.call_args and report.call_args.args

  def test_the_run_flags_are_read_as_given(self):
    told = ('h:1', 1, 2, 'bad flag')
    flags = ['--coordinator_address=h:1', '--num_processes=2']
    self.assertEqual(self._told(*flags, '--process_id=1', '--x=y'), told)
    self.assertEqual(self._told('-process_id', '1', *flags), told)
    env = {'JAX_COORDINATOR_ADDRESS': 'h:1'}
    self.assertEqual(
      self._told('--num_processes=2', '--process_id=1', env=env), told
    )
    # Not a multi-process run's, or not readable: no one to tell.
    self.assertIsNone(self._told('--x=y'))
    self.assertIsNone(self._told(*flags, '--process_id=1', defined=()))
    self.assertIsNone(self._told(*flags, '--process_id=one'))
    self.assertIsNone(self._told(*flags, '--process_id'))


if __name__ == '__main__':
  absltest.main()
