"""datasets/parallel.py: chunks parsed by worker processes, as by this one."""

import contextlib
import gzip
import os
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import dataset_testing
import ml_collections
import numpy as np

from configs import default
import data
from datasets import avazu
from datasets import cache
from datasets import core
from datasets import encode
from datasets import parallel
import encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _running(pid: int) -> bool:
  """Whether process `pid` exists and is not a zombie."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def _wait_gone(pids, seconds=10.0) -> set[int]:
  """The processes of `pids` still running after `seconds`."""
  deadline = time.monotonic() + seconds
  while (left := {p for p in pids if _running(p)}) and (
    time.monotonic() < deadline
  ):
    time.sleep(0.05)
  return left


class PidReader:
  """Parses a chunk into the worker's pid; `die`, `hang`, `fail`, `leave`
  (`sys.exit`), `killed` or `stop` (SIGSTOP) at given lines, printing to
  stdout as it parses."""

  def __init__(
    self, die=(), hang=(), fail=(), leave=(), killed=(), stop=()
  ):  # fmt: skip
    self.die, self.hang, self.fail = set(die), set(hang), set(fail)
    self.leave, self.killed, self.stop = set(leave), set(killed), set(stop)

  def parse(self, lines, first, where, bad):
    print('parsing', first, flush=True)  # Not among the replies.
    if first in self.die:
      print('out of luck', file=sys.stderr, flush=True)
      os._exit(3)
    if first in self.killed:  # As by the kernel, out of memory.
      os.kill(os.getpid(), signal.SIGKILL)
    if first in self.stop:  # Until a SIGCONT, if any.
      os.kill(os.getpid(), signal.SIGSTOP)
    if first in self.hang:
      time.sleep(600)
    if first in self.leave:
      sys.exit('gave up')
    bad(where(first), f'{len(lines)} lines')
    if first in self.fail:
      raise ValueError(f'line {first}')
    return os.getpid()


class EchoReader:
  """Parses a chunk into its lines, as the worker received them."""

  def parse(self, lines, first, where, bad):
    return lines


class CappedReader(PidReader):
  """A `PidReader` that, at line 1, caps the worker's address space near its
  size (as `ulimit -v`): a larger chunk then finds no memory."""

  def parse(self, lines, first, where, bad):
    if first == 1:
      with open('/proc/self/statm') as f:
        size = int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')
      cap = (size + (32 << 20), resource.RLIM_INFINITY)
      resource.setrlimit(resource.RLIMIT_AS, cap)
    return super().parse(lines, first, where, bad)


class BigReader(PidReader):
  """A `PidReader` whose setup fills a pipe many times over."""

  def __init__(self):
    super().__init__()
    self.ballast = b'x' * (4 << 20)


class Refused(Exception):
  """An error of other arguments than its message: it pickles, but cannot
  be unpickled (`Refused(message)` lacks `why`)."""

  def __init__(self, line, why):
    super().__init__(f'line {line}: {why}')


class RefusingReader:
  """Raises a `Refused`, or returns one (`give`)."""

  def __init__(self, give=False):
    self.give = give

  def parse(self, lines, first, where, bad):
    if self.give:
      return Refused(first, 'no')
    raise Refused(first, 'no')


def _chunks(count, size=2):
  return [([b'x\n'] * size, 1 + i * size, i) for i in range(count)]


class SameCacheTest(dataset_testing.DatasetTestCase):
  def _build(self, config, workers, sent=parallel.MAX_SENT_BYTES):
    config.cache_dir = os.path.join(self.tmp, f'cache{workers}_{sent}')
    config.parse_workers = workers
    with (
      self.assertLogs(level='WARNING') as logs,
      mock.patch.object(parallel, 'parsed', wraps=parallel.parsed) as spy,
      mock.patch.object(parallel, 'MAX_SENT_BYTES', sent),
      mock.patch.object(encode, 'encode_ids', wraps=encode.encode_ids) as ids,
    ):
      dataset = data.load_dataset(config)
    self.assertEqual(spy.call_count, 2 if workers else 0)  # Passes 1 and 2.
    # The keys are looked up in the workers if the vocabulary may go there.
    self.assertEqual(ids.call_count > 0, not workers or not sent)
    root = os.path.join(config.cache_dir, 'encoded')
    files = {}
    for directory, _, names in os.walk(root):
      for name in names:
        path = os.path.join(directory, name)
        with open(path, 'rb') as f:
          files[os.path.relpath(path, root)] = f.read()
    skipped = [r.getMessage() for r in logs.records if 'Skipping' in r.msg]
    return dataset, files, skipped

  @parameterized.parameters('criteo', 'csv', 'avazu', 'libfm')
  def test_workers_build_the_cache_of_this_process_byte_for_byte(self, name):
    rows = dataset_testing.criteo_rows(1500, seed=4)
    if name == 'avazu':
      rows = dataset_testing.avazu_rows(1500, seed=4)
    elif name == 'libfm':  # The k-th feature of a line is field k.
      rows = [
        [r[0]] + [f'{int(v or "7", 16) % 50}:1' for v in r[14:20]] for r in rows
      ]
    for i in (5, 250, 251, 990, 1499):  # Bad lines in several chunks.
      rows[i] = rows[i][:-3]
    path = os.path.join(self.tmp, 'train.txt')
    overrides = dict(skip_bad_lines=True)
    header, sep = None, {'csv': ',', 'avazu': ',', 'libfm': ' '}.get(name, '\t')
    if name == 'csv':
      header = ['clicked'] + [f'c{i}' for i in range(39)]
      for r, row in enumerate(rows):
        row[1] = f'{r % 7}.5' if r % 3 else ''  # A float column.
        row[2] = '|'.join(row[14 : 14 + r % 4])  # A multi-hot column.
      overrides['csv'] = dict(
        label_column='clicked',
        float_columns=('c0',),
        multi_hot_columns=('c1',),
      )
    if name == 'avazu':
      header = list(avazu.COLUMNS)
    dataset_testing.write_lines(path, rows, sep, header)
    config = self.config(name, path, **overrides)
    one, one_files, one_skipped = self._build(config, 0)
    two, two_files, two_skipped = self._build(config, 2)
    _, here_files, _ = self._build(config, 2, sent=0)  # Looked up here.
    self.assertEqual(one_files.keys(), two_files.keys())
    self.assertEqual(one_files.keys(), here_files.keys())
    self.assertGreater(len(one_files), 5)
    for file, content in one_files.items():
      self.assertEqual(content, two_files[file], file)
      self.assertEqual(content, here_files[file], file)
    self.assertLen(one_skipped, 5)  # The first five are logged, in order.
    line = 7 if header else 6  # Row 5, after the header if any.
    self.assertIn(f'{path}:{line}:', one_skipped[0])
    self.assertEqual(one_skipped, two_skipped)
    self.assertEqual(one.field_dims, two.field_dims)
    self.assertEqual(len(one.train) + len(one.valid) + len(one.test), 1495)
    if name == 'csv':
      self.assertIsNotNone(two.train.multi_ids)
      self.assertIsNotNone(two.train.dense)

  @parameterized.parameters(
    (encode.Counts, 'add_counted'),  # Pass 1's consumer, here.
    (cache, 'ids_problem'),  # Pass 2's, the cache's writer.
  )
  def test_an_interrupted_build_ends_its_workers_at_once(self, where, name):
    path = dataset_testing.write_lines(
      os.path.join(self.tmp, 'train.txt'),
      dataset_testing.criteo_rows(1000, seed=8),
      '\t',
    )
    config = self.config('criteo', path, parse_workers=2)
    calls = []
    # Children of this worker that are not the pass's (tests/script_runs.py
    # keeps a server), so the order of the tests does not matter.
    before = _children(os.getpid())

    def interrupted(*args):
      calls.append(_children(os.getpid()) - before)  # The workers, at work.
      raise KeyboardInterrupt

    with mock.patch.object(where, name, side_effect=interrupted):
      try:
        data.load_dataset(config)
      except KeyboardInterrupt as e:
        kept = e.__traceback__  # As a notebook keeps the last one.
    self.assertLen(calls, 1)
    self.assertLen(calls[0], 2)  # The pass's two workers.
    self.assertEqual(_wait_gone(calls[0], seconds=5), set())
    del kept

  def test_the_first_bad_line_stops_the_build_as_in_this_process(self):
    rows = dataset_testing.criteo_rows(1000, seed=5)
    rows[700][3] = 'x'  # Line 701, the 8th chunk of 97 lines.
    rows[900] = rows[900][:5]
    path = dataset_testing.write_lines(
      os.path.join(self.tmp, 'train.txt'), rows, '\t'
    )
    messages = []
    for workers in (0, 2):
      config = self.config('criteo', path, parse_workers=workers)
      config.cache_dir = os.path.join(self.tmp, f'cache{workers}')
      with self.assertRaises(core.DataError) as raised:
        data.load_dataset(config)
      messages.append(str(raised.exception))
    self.assertIn(f'{path}:701: integer column I3', messages[0])
    self.assertEqual(messages[0], messages[1])


class PredictTest(dataset_testing.DatasetTestCase):
  def test_an_encoder_reads_large_files_with_workers_as_without(self):
    rows = dataset_testing.criteo_rows(600, seed=6)
    path = dataset_testing.write_lines(
      os.path.join(self.tmp, 'train.txt'), rows, '\t'
    )
    config = default.get_config()
    config.dataset = self.config('criteo', path, split=(1.0, 0.0, 0.0))
    config.model = ml_collections.ConfigDict({'embed_dim': 3})
    dataset = data.load_dataset(config.dataset)
    workdir = os.path.join(self.tmp, 'run')
    encoder.save(workdir, dataset, config)
    enc = encoder.load(workdir)
    rows[400][5] = 'x'
    bad = dataset_testing.write_lines(
      os.path.join(self.tmp, 'bad.txt'), rows, '\t'
    )
    messages = []
    for large in (False, True):  # The default: workers for large files.
      with (
        mock.patch.object(parallel, 'AUTO_MIN_BYTES', 0 if large else 2**40),
        mock.patch.object(parallel, 'parsed', wraps=parallel.parsed) as spy,
      ):
        chunks = list(enc.chunks(path, chunk_rows=64))
        with self.assertRaises(core.DataError) as raised:
          list(enc.chunks(bad, chunk_rows=64))
      self.assertEqual(spy.call_count, 2 * large)
      self.assertLen(chunks, 10)
      got = np.concatenate([c.ids for c in chunks])
      np.testing.assert_array_equal(got, dataset.train.ids)
      got = np.concatenate([c.labels for c in chunks])
      np.testing.assert_array_equal(got, dataset.train.labels)
      messages.append(str(raised.exception))
    self.assertIn(f'{bad}:401: integer column I5', messages[0])
    self.assertEqual(messages[0], messages[1])


class ParsedTest(absltest.TestCase):
  def test_results_come_in_order_with_their_bad_lines_first(self):
    reported, taken, results = [], [], []

    def chunks():
      for chunk in _chunks(9):
        taken.append(chunk[2])
        yield chunk

    for result in parallel.parsed(
      PidReader(),
      chunks(),
      'f:{}'.format,
      lambda where, reason: reported.append((where, reason)),
      workers=3,
    ):
      # Chunks are read ahead by one beside each worker's, no further.
      self.assertEqual(len(taken), min(9, len(results) + 4))
      results.append(result)
    self.assertEqual([tag for _, tag in results], list(range(9)))
    want = [(f'f:{1 + 2 * i}', '2 lines') for i in range(9)]
    self.assertEqual(reported, want)
    pids = {pid for pid, _ in results}
    self.assertNotIn(os.getpid(), pids)
    self.assertLessEqual(len(pids), 3)
    self.assertEqual(_wait_gone(pids), set())

  def test_lines_reach_the_workers_as_they_were_read(self):
    chunks = [
      ([b'a\rb\n', b'\n', b'\r\n', b'c\x00\xff\n'], 1, 0),  # \r ends none.
      ([b'\n'] * 3, 5, 1),
      ([b'last line, no newline'], 8, 2),
    ]
    got = list(parallel.parsed(EchoReader(), chunks, str, print, workers=2))
    self.assertEqual(got, [(lines, tag) for lines, _, tag in chunks])

  def test_a_bad_line_that_raises_stops_the_workers(self):
    def bad(where, reason):
      if where == 'f:7':
        raise core.DataError(f'{where}: {reason}')

    got = []
    with self.assertRaisesRegex(core.DataError, '^f:7: 2 lines$'):
      for pid, _ in parallel.parsed(
        PidReader(hang={11}), _chunks(9), 'f:{}'.format, bad, workers=2
      ):
        got.append(pid)
    self.assertLen(got, 3)  # Chunks 0-2; chunk 3 holds line 7.
    self.assertEqual(_wait_gone(set(got), seconds=5), set())

  def test_a_dead_worker_is_one_error_not_a_hang(self):
    with self.assertRaisesRegex(
      core.DataError,
      r'^A worker process parsing the data died \(exit status 3\) \(its last'
      r' words: out of luck\)\. Set config',
    ):
      for _ in parallel.parsed(
        PidReader(die={5}), _chunks(6), str, lambda *_: None, workers=2
      ):
        pass

  def test_a_killed_worker_is_said_to_be_out_of_memory(self):
    with self.assertRaisesRegex(
      core.DataError,
      r'^A worker process parsing the data was killed \(signal 9\): out of'
      r' memory\? Lower config.dataset.parse_workers \(0 parses in this'
      r' process\) or config.dataset.chunk_rows \(predict.py:'
      r' --parse_workers, --chunk_rows\)\.$',
    ):
      list(parallel.parsed(PidReader(killed={3}), _chunks(3), str, print, 2))

  def test_a_worker_gone_after_its_last_result_loses_nothing(self):
    send = parallel._Worker.send

    def gone_at_the_end(worker, message):
      if message == parallel._END:  # As if it had died since.
        raise core.DataError('died')
      send(worker, message)

    with mock.patch.object(parallel._Worker, 'send', gone_at_the_end):
      got = list(parallel.parsed(PidReader(), _chunks(3), str, print, 2))
    self.assertEqual([tag for _, tag in got], [0, 1, 2])
    self.assertEqual(_wait_gone({pid for pid, _ in got}), set())

  def test_an_error_of_the_reader_is_raised_here_after_its_bad_lines(self):
    reported = []
    with self.assertRaisesRegex(ValueError, '^line 7$'):
      for _ in parallel.parsed(
        PidReader(fail={7}), _chunks(6), str, lambda w, _: reported.append(w), 2
      ):
        pass
    self.assertEqual(reported, ['1', '3', '5', '7'])

  def test_a_worker_that_exits_by_an_exception_says_which(self):
    with self.assertRaisesRegex(
      core.DataError,
      r'^A worker process parsing the data died \(exit status 1\) \(its last'
      r' words: SystemExit: gave up\)\. Set config',
    ):
      list(parallel.parsed(PidReader(leave={3}), _chunks(3), str, print, 1))

  def test_a_chunk_that_a_worker_has_no_memory_for_is_one_error(self):
    chunks = [*_chunks(2), ([b'x' * (128 << 20)], 5, 2)]
    pids, raised = [], []

    def parse():  # In a thread: a worker that stops reading hangs it.
      try:
        for pid, _ in parallel.parsed(CappedReader(), chunks, str, print, 1):
          pids.append(pid)
      except core.DataError as e:
        raised.append(str(e))

    thread = threading.Thread(target=parse, daemon=True)
    thread.start()
    thread.join(60)
    hung = thread.is_alive()
    if hung:
      os.kill(pids[0], signal.SIGKILL)
      thread.join()
    self.assertFalse(hung)
    self.assertLen(pids, 1)  # The large chunk goes before the 2nd result.
    self.assertRegex(
      raised[0],
      r'^A worker process parsing the data died \(exit status 1\) \(its last'
      r' words: MemoryError\)\. Set config',
    )
    self.assertEqual(_wait_gone(set(pids), seconds=5), set())

  def test_an_error_that_cannot_be_unpickled_is_one_error(self):
    with self.assertRaisesRegex(core.DataError, r'^Refused: line 1: no$'):
      list(parallel.parsed(RefusingReader(), _chunks(2), str, print, 1))

  def test_a_result_that_cannot_be_unpickled_is_one_error(self):
    pids = _children(os.getpid())
    with self.assertRaisesRegex(
      core.DataError,
      r'^A worker process parsed the data into what this process cannot load'
      r' \(TypeError: .*missing 1 required positional argument.*\)\. Set'
      r' config.dataset.parse_workers=0 \(predict.py: --parse_workers=0\)',
    ):
      list(
        parallel.parsed(RefusingReader(give=True), _chunks(4), str, print, 2)
      )
    workers = _children(os.getpid()) - pids
    self.assertEqual(_wait_gone(workers, seconds=5), set())

  def _parse_in_thread(self, reader, chunks, seconds=60):
    """`parsed` of `chunks` by 2 workers in a thread that must end within
    `seconds`: (pids of its results, its DataError's message or None)."""
    pids, raised = [], []

    def parse():
      try:
        for pid, _ in parallel.parsed(reader, chunks, str, print, 2):
          pids.append(pid)
      except core.DataError as e:
        raised.append(str(e))

    before = _children(os.getpid())
    thread = threading.Thread(target=parse, daemon=True)
    thread.start()
    thread.join(seconds)
    workers = _children(os.getpid()) - before
    hung = thread.is_alive()
    if hung:  # A failure: not left stopped for the tests that follow.
      for pid in workers:
        os.kill(pid, signal.SIGKILL)
      thread.join()
    self.assertFalse(hung)
    self.assertEqual(_wait_gone(workers | set(pids), seconds=5), set())
    return pids, raised[0] if raised else None

  @mock.patch.object(parallel, '_CHECK_S', 0.05)
  @mock.patch.object(parallel, 'STOPPED_S', 1.0)
  def test_a_worker_stopped_for_good_is_ended_not_waited_for(self):
    pids, raised = self._parse_in_thread(PidReader(stop={3}), _chunks(6))
    self.assertLen(pids, 1)  # Chunk 1's result; chunk 2 stopped its worker.
    self.assertRegex(
      raised,
      r'^A worker process parsing the data \(pid \d+\) stayed stopped'
      r' \(SIGSTOP\) for 1 s, so this run ended it; resume \(SIGCONT\) a'
      r' worker paused on purpose sooner\. Set config.dataset.parse_workers=0',
    )

  @mock.patch.object(parallel, '_CHECK_S', 0.05)
  @mock.patch.object(parallel, 'STOPPED_S', 3.0)
  def test_a_worker_resumed_in_time_finishes_its_work(self):
    def resume():  # The stopped worker, 0.5 s after it stops.
      deadline = time.monotonic() + 30
      while time.monotonic() < deadline:
        for pid in _children(os.getpid()):
          if core.process_state(pid) == 'T':
            time.sleep(0.5)
            os.kill(pid, signal.SIGCONT)
            return
        time.sleep(0.02)

    threading.Thread(target=resume, daemon=True).start()
    pids, raised = self._parse_in_thread(PidReader(stop={3}), _chunks(6))
    self.assertIsNone(raised)
    self.assertLen(pids, 6)

  @mock.patch.object(parallel, '_CHECK_S', 0.05)
  @mock.patch.object(parallel, 'STOPPED_S', 1.0)
  def test_a_worker_stopped_before_it_takes_its_setup_is_ended(self):
    # Its setup (the reader, a vocabulary: up to MAX_SENT_BYTES) fills the
    # pipe: this process waits in the send, and the worker is watched then.
    send, stopped = parallel._Worker.send, set()

    def stop_first(worker, message):
      if worker not in stopped:
        stopped.add(worker)
        os.kill(worker.process.pid, signal.SIGSTOP)
      send(worker, message)

    with mock.patch.object(parallel._Worker, 'send', stop_first):
      pids, raised = self._parse_in_thread(BigReader(), _chunks(4), 10)
    self.assertEqual(pids, [])
    self.assertRegex(
      raised,
      r'^A worker process parsing the data \(pid \d+\)'
      r' stayed stopped \(SIGSTOP\) for 1 s, so this run ended',
    )

  def test_a_reader_the_workers_cannot_import_is_one_error(self):
    module = types.ModuleType('only_here')
    module.PidReader = type('PidReader', (PidReader,), {})
    module.PidReader.__module__ = 'only_here'
    with (
      mock.patch.dict(sys.modules, only_here=module),
      self.assertRaisesRegex(
        core.DataError,
        r'^A worker process could not load the reader of the data \(No'
        r" module named 'only_here'\)\. Set config.dataset.parse_workers=0",
      ),
    ):
      list(parallel.parsed(module.PidReader(), _chunks(3), str, print, 2))

  def test_processes_that_cannot_start_are_one_error(self):
    refused = BlockingIOError(11, 'Resource temporarily unavailable')
    full = OSError(28, 'No space left on device')  # For their stderr.
    for target, error, said in [
      (subprocess, refused, r'\[Errno 11\] Resource temporarily unavailable'),
      (tempfile, full, r'\[Errno 28\] No space left on device'),
    ]:
      name = 'Popen' if target is subprocess else 'TemporaryFile'
      with (
        mock.patch.object(target, name, side_effect=error),
        self.assertRaisesRegex(
          core.DataError,
          rf'^Could not start the processes that parse the data \({said}\)\.'
          r' Set config.dataset.parse_workers=0 \(predict.py:'
          r' --parse_workers=0\) to parse in this process\.$',
        ),
      ):
        list(parallel.parsed(PidReader(), _chunks(3), str, print, workers=2))

  def test_the_working_directory_does_not_shadow_the_workers_modules(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    with open(os.path.join(directory, 'queue.py'), 'w') as f:
      f.write("raise ImportError('not the queue module')\n")
    # As `python main.py` run there: its modules are not this process's.
    self.enter_context(contextlib.chdir(directory))
    got = list(parallel.parsed(PidReader(), _chunks(3), str, print, 2))
    self.assertEqual([tag for _, tag in got], [0, 1, 2])

  def test_the_workers_import_from_this_process_path_from_their_start(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    os.mkdir(os.path.join(directory, 'numpy'))
    with open(os.path.join(directory, 'numpy', '__init__.py'), 'w') as f:
      f.write("raise ImportError('not the numpy of this process')\n")
    # As a notebook's or a launcher's `sys.path`, not the environment's.
    self.enter_context(mock.patch.dict(os.environ, PYTHONPATH=directory))
    got = list(parallel.parsed(PidReader(), _chunks(3), str, print, 2))
    self.assertEqual([tag for _, tag in got], [0, 1, 2])

  def test_what_prints_as_python_starts_is_not_a_reply(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    with open(os.path.join(directory, 'sitecustomize.py'), 'w') as f:
      f.write("print('hello from a site, long enough for a length')\n")
    self.enter_context(mock.patch.dict(os.environ, PYTHONPATH=directory))
    got = []
    thread = threading.Thread(  # A bogus length could wait for ever.
      target=lambda: got.extend(
        parallel.parsed(PidReader(), _chunks(3), str, print, 2)
      ),
      daemon=True,
    )
    thread.start()
    thread.join(60)
    self.assertEqual([tag for _, tag in got], [0, 1, 2])

  def test_stopping_early_ends_the_workers_at_once(self):
    parts = parallel.parsed(
      PidReader(hang={3}), _chunks(4), str, lambda *_: None, workers=2
    )
    pid, _ = next(parts)
    start = time.monotonic()
    parts.close()  # As a Ctrl-C or an error of the caller.
    self.assertLess(time.monotonic() - start, 5)  # Not the hang's 600 s.
    self.assertEqual(_wait_gone({pid}, seconds=5), set())

  def _parent(self, body: str) -> str:
    """A script that runs `body` (this module as `t`, `parallel`, `signal`
    imported) as its main program; its path."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = '\n'.join(
      [
        'import signal, sys',
        f'sys.path[:0] = [{ROOT!r}, {here!r}]',
        'from datasets import parallel',
        'import test_data_parallel as t',
        "if __name__ == '__main__':",
        textwrap.indent(textwrap.dedent(body), '  '),
      ]
    )
    directory = self.enter_context(tempfile.TemporaryDirectory())
    path = os.path.join(directory, 'parent.py')
    with open(path, 'w') as f:
      f.write(script)
    return path

  def test_workers_end_when_their_parent_is_killed(self):
    path = self._parent("""
      reader = t.PidReader(hang={5, 7, 9})
      for pid, _ in parallel.parsed(reader, t._chunks(5), str, print, 2):
        print('pid', pid, flush=True)
    """)
    parent = subprocess.Popen(
      [sys.executable, path], stdout=subprocess.PIPE, text=True
    )
    try:
      pids = set()
      for line in parent.stdout:
        if line.startswith('pid '):
          pids.add(int(line.split()[1]))
          break  # Chunks 2-4 now hang in both workers (or wait for one).
      self.assertLen(pids, 1)
      time.sleep(1)
      workers = _children(parent.pid)
      self.assertLen(workers, 2)
      self.assertLessEqual(pids, workers)
    finally:
      parent.send_signal(signal.SIGKILL)
      parent.wait()
    self.assertEqual(_wait_gone(workers, seconds=5), set())

  def test_a_script_that_loads_as_it_is_imported_uses_the_workers(self):
    rows = dataset_testing.criteo_rows(300, seed=7)
    directory = self.enter_context(tempfile.TemporaryDirectory())
    source = dataset_testing.write_lines(
      os.path.join(directory, 'train.txt'), rows, '\t'
    )
    script = os.path.join(directory, 'unguarded.py')
    with open(script, 'w') as f:
      f.write(
        textwrap.dedent(f"""
          import sys
          sys.path.insert(0, {ROOT!r})
          import data
          from configs import default
          from datasets import parallel
          workers, parsed = [], parallel.parsed
          parallel.parsed = lambda *a: workers.append(a[4]) or parsed(*a)
          config = default.get_config().dataset
          config.update(name='criteo', path={source!r}, chunk_rows=50,
                        cache_dir={directory!r}, parse_workers=2)
          dataset = data.load_dataset(config)  # No main guard.
          print(workers, dataset.field_dims)
        """)
      )
    result = subprocess.run(
      [sys.executable, script], capture_output=True, text=True, timeout=120
    )
    self.assertEqual(result.returncode, 0, result.stderr)
    config = default.get_config().dataset
    config.update(name='criteo', path=source, chunk_rows=50, parse_workers=0)
    config.cache_dir = os.path.join(directory, 'here')
    here = data.load_dataset(config).field_dims
    self.assertEqual(result.stdout.split(']')[-1].strip(), str(here))
    self.assertEqual(result.stdout.split(']')[0], '[2, 2')  # Passes 1, 2.

  def test_ctrl_c_stops_the_parent_and_its_workers_quietly(self):
    path = self._parent("""
      signal.signal(signal.SIGINT, signal.default_int_handler)
      try:
        reader = t.PidReader(hang={3})  # One worker hangs, one waits.
        quiet = lambda *_: None
        for pid, _ in parallel.parsed(reader, t._chunks(3), str, quiet, 2):
          print('pid', pid, flush=True)
      except KeyboardInterrupt:
        print('interrupted', flush=True)
    """)
    parent = subprocess.Popen(
      [sys.executable, path],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,  # Its own group: a terminal's Ctrl-C.
    )
    try:
      self.assertTrue(parent.stdout.readline().startswith('pid '))
      time.sleep(1)
      workers = _children(parent.pid)
      self.assertLen(workers, 2)
      os.killpg(parent.pid, signal.SIGINT)
      out, err = parent.communicate(timeout=30)
    finally:
      if parent.poll() is None:
        os.killpg(parent.pid, signal.SIGKILL)
    self.assertEqual(out.split(), ['interrupted'])
    self.assertNotIn('Traceback', err)
    self.assertEqual(_wait_gone(workers, seconds=10), set())


def _children(pid: int) -> set[int]:
  """The running child processes of `pid`."""
  found = set()
  for p in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{p}/stat') as f:
        state, ppid = f.read().rsplit(')', 1)[1].split()[:2]
    except OSError:
      continue
    if int(ppid) == pid and state != 'Z':
      found.add(int(p))
  return found


class WatchTest(absltest.TestCase):
  """`_watch` ends a worker that stays stopped, and ends with `parsed`."""

  def _kills(self, states: str) -> list[int]:
    """`_watch` of one worker whose checks find `states`, one a check: the
    checks after which it was killed (STOPPED_S: 3 checks)."""
    worker = mock.Mock(stopped=False)
    worker.process.pid = 12345
    seen, kills = [], []
    worker.process.kill.side_effect = lambda: kills.append(len(seen))

    def state(pid):
      self.assertEqual(pid, 12345)
      seen.append(states[len(seen)])
      return seen[-1]

    done = mock.Mock()
    done.wait.side_effect = [False] * len(states) + [True]
    with (
      mock.patch.object(core, 'process_state', state),
      mock.patch.object(parallel, '_CHECK_S', 1.0),
      mock.patch.object(parallel, 'STOPPED_S', 3.0),
    ):
      parallel._watch([worker], done)
    done.wait.assert_called_with(1.0)
    self.assertEqual(len(seen), len(states))
    self.assertEqual(worker.stopped, bool(kills))
    return kills

  def test_a_worker_is_ended_after_stopped_s_of_checks_in_a_row(self):
    self.assertEqual(self._kills('TTT'), [3])  # 3 s: ended, at once.
    self.assertEqual(self._kills('STTTTTT'), [4])  # Once, then a zombie.
    # Stopped 2 s at a time, twice or more, is no stop of 3 s.
    self.assertEqual(self._kills('TTSTTRTTZ'), [])
    self.assertEqual(self._kills('TT'), [])

  def test_the_watch_ends_with_the_parse_however_it_ends(self):
    threads, watch = [], parallel._watch

    def recorded(pool, done):
      threads.append(threading.current_thread())
      watch(pool, done)

    self.enter_context(mock.patch.object(parallel, '_watch', recorded))
    self.enter_context(mock.patch.object(parallel, '_CHECK_S', 0.01))
    self.assertLen(
      list(parallel.parsed(PidReader(), _chunks(3), str, print, 2)), 3
    )
    with self.assertRaises(core.DataError):
      list(parallel.parsed(RefusingReader(), _chunks(2), str, print, 1))
    chunks = parallel.parsed(PidReader(), _chunks(3), str, print, 2)
    next(chunks)
    chunks.close()  # The caller stops early.
    self.assertLen(threads, 3)
    for thread in threads:
      thread.join(5)
      self.assertFalse(thread.is_alive())


class WorkersForTest(absltest.TestCase):
  def test_auto_takes_a_worker_per_core_for_large_files_only(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    path = os.path.join(directory, 'train.txt')
    with open(path, 'w') as f:
      f.write('x' * 1000)
    cases = [  # (setting, cores, AUTO_MIN_BYTES, workers)
      (-1, 8, 1001, 0),  # A small file: none.
      (-1, 8, 1000, 4),  # At most AUTO_MAX_WORKERS.
      (-1, 3, 1000, 3),
      (-1, 1, 1000, 0),  # One core: this process alone.
      (0, 8, 0, 0),
      (2, 1, 10**9, 2),  # A number is taken as it is.
    ]
    for setting, cores, threshold, want in cases:
      with (
        mock.patch.object(parallel, 'AUTO_MIN_BYTES', threshold),
        mock.patch.object(os, 'sched_getaffinity', lambda _, n=cores: range(n)),
      ):
        self.assertEqual(parallel.workers_for(setting, path), want)

  def test_auto_judges_a_gz_file_by_its_text(self):
    # 1M Criteo lines: 96 MB gzip'ed, 250 MB of text; parsed here (41 s),
    # not by 2 workers (21 s), when judged by the 96 MB.
    directory = self.enter_context(tempfile.TemporaryDirectory())
    packed = os.path.join(directory, 'train.txt.gz')
    with gzip.open(packed, 'wb') as f:
      f.write(b'1\tx\n' * 1000)  # 4000 bytes of text.
    self.assertLess(os.path.getsize(packed), 1000)
    empty = os.path.join(directory, 'empty.gz')  # No trailer to read.
    open(empty, 'wb').close()
    self.enter_context(
      mock.patch.object(os, 'sched_getaffinity', lambda _: range(2))
    )
    for threshold, path, want in [
      (4000, packed, 2),
      (4001, packed, 0),
      (1, empty, 0),
    ]:
      with mock.patch.object(parallel, 'AUTO_MIN_BYTES', threshold):
        self.assertEqual(parallel.workers_for(-1, path), want)

  def test_auto_parses_here_where_the_executable_is_not_this_python(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    path = os.path.join(directory, 'train.txt')
    with open(path, 'w') as f:
      f.write('x' * 1000)
    other = os.path.join(directory, 'app')  # Runs, but says another version.
    with open(other, 'w') as f:
      f.write('#!/bin/sh\necho 50859248\n')
    os.chmod(other, 0o755)
    self.enter_context(mock.patch.object(parallel, 'AUTO_MIN_BYTES', 1000))
    self.enter_context(
      mock.patch.object(os, 'sched_getaffinity', lambda _: range(2))
    )
    for executable, want in [
      (sys.executable, 2),
      (other, 0),
      ('/bin/true', 0),  # Says nothing.
      (os.path.join(directory, 'missing'), 0),
      ('', 0),  # Python embedded without a path to itself.
    ]:
      parallel._startable.cache_clear()
      with mock.patch.object(sys, 'executable', executable):
        if want:
          self.assertEqual(parallel.workers_for(-1, path), want)
        else:
          with self.assertLogs(level='INFO') as logs:
            self.assertEqual(parallel.workers_for(-1, path), 0)
          self.assertIn(f'{executable!r} is not this Python', logs.output[0])
        self.assertEqual(parallel.workers_for(3, path), 3)  # As asked.
    parallel._startable.cache_clear()

  def test_the_probe_gives_the_executable_no_input_to_wait_for(self):
    # An embedding application may read its stdin; the probe closes it. The
    # probing process here has an open pipe for stdin, as a server might.
    directory = self.enter_context(tempfile.TemporaryDirectory())
    app = os.path.join(directory, 'app')
    with open(app, 'w') as f:
      f.write(
        '#!/bin/sh\n[ "$(readlink /proc/$$/fd/0)" = /dev/null ]'
        f' && echo {sys.hexversion}\n'
      )
    os.chmod(app, 0o755)
    probe = subprocess.run(
      [
        sys.executable,
        '-c',
        'import sys; from datasets import parallel;'
        ' print(parallel._startable(sys.argv[1]))',
        app,
      ],
      stdin=subprocess.PIPE,
      capture_output=True,
      text=True,
      cwd=ROOT,
      timeout=120,
      check=True,
    )
    self.assertEqual(probe.stdout.strip(), 'True', probe.stderr)

  def test_an_executable_that_does_not_answer_is_probed_once(self):
    parallel._startable.cache_clear()
    self.addCleanup(parallel._startable.cache_clear)
    with mock.patch.object(
      parallel.subprocess,
      'run',
      side_effect=subprocess.TimeoutExpired('app', 60),
    ) as run:
      self.assertFalse(parallel._startable('/opt/app'))
      self.assertFalse(parallel._startable('/opt/app'))  # Not asked again.
    run.assert_called_once()

  def test_a_reader_that_cannot_travel_is_parsed_here(self):
    self.assertTrue(parallel.picklable(PidReader()))
    self.assertFalse(parallel.picklable(lambda: None))
    main = type('MainReader', (PidReader,), {'__module__': '__main__'})
    with mock.patch.object(
      sys.modules['__main__'], 'MainReader', main, create=True
    ):  # The workers do not import the main program.
      self.assertFalse(parallel.picklable(main()))


if __name__ == '__main__':
  absltest.main()
