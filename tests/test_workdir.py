"""Tests of workdir.py: the directory checks, the lock, the config record."""

import contextlib
import errno
import functools
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
from unittest import mock

from absl.testing import absltest
import ml_collections
import pytest

import best_reader
from configs import deepfm
from configs import fm
from configs import nfm
import lock as lock_lib
import optim
import sources
import utils
import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 60  # Seconds any subprocess may take; none should come near it.

# Waits for `<dir>/go`, takes the lock, says so, holds it until `<dir>/release`.
_CONTENDER = textwrap.dedent(
  """
  import os, sys, time
  sys.path.insert(0, {root!r})
  import utils, workdir
  path, signals = sys.argv[1], sys.argv[2]
  open(os.path.join(signals, f'ready-{{os.getpid()}}'), 'w').close()
  deadline = time.time() + {timeout}
  while not os.path.exists(os.path.join(signals, 'go')):
    if time.time() > deadline:
      sys.exit(4)
    time.sleep(0.001)
  try:
    lock = workdir.acquire(path)
  except utils.UserError as e:
    print('REFUSED', e, flush=True)
    sys.exit(3)
  print('WON', os.getpid(), flush=True)
  while not os.path.exists(os.path.join(signals, 'release')):
    if time.time() > deadline:
      sys.exit(5)
    time.sleep(0.01)
  lock.release()
  """
).format(root=ROOT, timeout=TIMEOUT)


def _start(path, signals, **kwargs):
  return subprocess.Popen(
    [sys.executable, '-c', _CONTENDER, path, signals],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kwargs,
  )


def _wait_until(predicate, what):
  deadline = time.monotonic() + TIMEOUT
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(f'Timed out waiting for {what}.')
    time.sleep(0.01)


def _read_line(proc):
  ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
  if not ready:
    proc.kill()
    raise AssertionError('The lock holder said nothing.')
  return proc.stdout.readline().strip()


@contextlib.contextmanager
def _read_only(path):
  """Makes directory `path` unwritable for this process, even as root.

  Root ignores modes, so as root the directory is made immutable (as
  `chattr +i`, which the issue's reproduction used).
  """
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    try:
      yield
    finally:
      os.chmod(path, 0o755)
    return
  if subprocess.run(['chattr', '+i', path], capture_output=True).returncode:
    raise unittest.SkipTest('chattr +i is not available here.')
  try:
    yield
  finally:
    subprocess.run(['chattr', '-i', path], check=True)


class PrepareTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()

  def test_creates_missing_directories(self):
    path = os.path.join(self.tmp, 'a', 'b')
    self.assertEqual(workdir.prepare(path), path)
    self.assertTrue(os.path.isdir(path))

  def test_file_is_refused_by_path(self):
    path = os.path.join(self.tmp, 'file')
    with open(path, 'w'):
      pass
    with self.assertRaisesRegex(
      utils.UserError, f'workdir {path} exists and is not a directory'
    ):
      workdir.prepare(path)

  def test_a_pathlib_path_is_a_workdir(self):
    path = os.path.join(self.tmp, 'p')
    self.assertEqual(workdir.prepare(pathlib.Path(path)), path)

  def test_an_empty_workdir_is_not_the_current_directory(self):
    before = os.listdir(os.getcwd())
    for path in ('', '  '):
      with self.assertRaisesRegex(utils.UserError, '^The workdir is empty'):
        workdir.prepare(path)
    self.assertEqual(os.listdir(os.getcwd()), before)

  def test_directory_under_a_file_names_the_file(self):
    parent = os.path.join(self.tmp, 'file')
    with open(parent, 'w'):
      pass
    with self.assertRaisesRegex(
      utils.UserError, f'cannot be created: {parent} is a file'
    ):
      workdir.prepare(os.path.join(parent, 'run'))

  def _message(self, path):
    with self.assertRaises(utils.UserError) as cm:
      workdir.prepare(path)
    return str(cm.exception)

  def test_unwritable_directory_is_refused(self):
    path = os.path.join(self.tmp, 'ro')
    os.mkdir(path)
    with _read_only(path):
      message = self._message(path)
    self.assertIn(f'workdir {path} is not writable', message)

  def test_uncreatable_directory_names_the_parent(self):
    parent = os.path.join(self.tmp, 'ro')
    os.mkdir(parent)
    with _read_only(parent):
      message = self._message(os.path.join(parent, 'x', 'run'))
    self.assertIn(f'cannot be created in {parent} (', message)

  def test_unwritable_checkpoints_are_named(self):
    path = os.path.join(self.tmp, 'run')
    checkpoints = os.path.join(path, 'checkpoints')
    os.makedirs(os.path.join(checkpoints, 'latest', '3'))
    with _read_only(checkpoints):
      message = self._message(path)
    self.assertIn(f'cannot write: {checkpoints}', message)

  def test_unwritable_encoder_and_metrics_are_named(self):
    # A run replaces the encoder's files and rewrites metrics.jsonl.
    path = os.path.join(self.tmp, 'run')
    encoder = os.path.join(path, 'encoder')
    metrics = os.path.join(path, 'metrics.jsonl')
    os.makedirs(encoder)
    open(metrics, 'w').close()
    for stuck in (encoder, metrics):
      with self.subTest(stuck), _read_only(stuck):
        self.assertIn(f'cannot write: {stuck}', self._message(path))


class LockTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.path = workdir.prepare(os.path.join(self.tmp, 'run'))

  def test_processes_started_together_exactly_one_wins(self):
    for round_ in range(5):
      signals = tempfile.mkdtemp(dir=self.tmp)
      procs = [_start(self.path, signals) for _ in range(2)]
      try:
        _wait_until(
          lambda s=signals: len(os.listdir(s)) == 2, 'both contenders ready'
        )
        open(os.path.join(signals, 'go'), 'w').close()
        _wait_until(
          lambda p=procs: any(x.poll() is not None for x in p),
          'one contender to be refused',
        )
        [loser] = [p for p in procs if p.poll() is not None]
        [winner] = [p for p in procs if p is not loser]
        out, err = loser.communicate(timeout=TIMEOUT)
        self.assertEqual(loser.returncode, 3, f'round {round_}: {out} {err}')
        self.assertIn(f'pid {winner.pid} on host {socket.gethostname()}', out)
        self.assertIn('started', out)
        open(os.path.join(signals, 'release'), 'w').close()
        out, err = winner.communicate(timeout=TIMEOUT)
        self.assertEqual(winner.returncode, 0, err)
        self.assertEqual(out.split(), ['WON', str(winner.pid)])
      finally:
        for p in procs:
          if p.poll() is None:
            p.kill()
            p.communicate()
    with open(os.path.join(self.path, workdir.LOCK_FILE)) as f:
      self.assertTrue(json.load(f)['released'])

  def test_live_holder_refuses_then_sigkilled_holder_is_taken_over(self):
    signals = tempfile.mkdtemp(dir=self.tmp)
    open(os.path.join(signals, 'go'), 'w').close()
    holder = _start(self.path, signals)
    try:
      self.assertEqual(_read_line(holder), f'WON {holder.pid}')
      with self.assertRaises(utils.UserError) as cm:
        workdir.acquire(self.path)
      message = str(cm.exception)
      self.assertIn(f'{self.path} is in use by pid {holder.pid}', message)
      self.assertIn(f'on host {socket.gethostname()}', message)
      # When it started and what it runs, from its record.
      with open(os.path.join(self.path, workdir.LOCK_FILE)) as f:
        record = json.load(f)
      self.assertRegex(record['start_time'], r'^\d{4}-\d\d-\d\dT')
      self.assertIn(f'started {record["start_time"]}, command: -c ', message)
    finally:
      os.kill(holder.pid, signal.SIGKILL)
      holder.communicate(timeout=TIMEOUT)
    with self.assertLogs(level='WARNING') as logs:
      lock = workdir.acquire(self.path)
    with lock:
      self.assertEqual(lock.taken_over_from['pid'], holder.pid)
      self.assertIn(f'Taking over workdir {self.path}', logs.output[0])
      self.assertIn(f'pid {holder.pid}', logs.output[0])
    # A released lock is not a dead run's: no takeover next time.
    with workdir.acquire(self.path) as lock:
      self.assertIsNone(lock.taken_over_from)

  def test_a_live_run_is_seen_by_a_reader_that_takes_no_lock(self):
    # predict.py, export.py and init_from read the best checkpoint of a run
    # that may still train: they now say so, without a lock of their own
    # (which would refuse a run starting at that moment).
    self.assertEqual(lock_lib.running(self.path), '')  # No lock file yet.
    self.assertFalse(lock_lib.may_be_held(self.path))
    signals = tempfile.mkdtemp(dir=self.tmp)
    open(os.path.join(signals, 'go'), 'w').close()
    holder = _start(self.path, signals)
    try:
      self.assertEqual(_read_line(holder), f'WON {holder.pid}')
      said = lock_lib.running(self.path)
      self.assertIn(f'pid {holder.pid} on host {socket.gethostname()}', said)
      self.assertTrue(lock_lib.may_be_held(self.path))
      with self.assertLogs(level='WARNING') as logs:
        with self.assertRaisesRegex(utils.UserError, 'No best checkpoint'):
          best_reader.load_best(self.path)
      self.assertIn(f'is still training (pid {holder.pid} ', logs.output[0])
      # Reading took no lock: the holder still has it, and a run is refused.
      with self.assertRaisesRegex(utils.UserError, 'is in use by'):
        workdir.acquire(self.path)
    finally:
      os.kill(holder.pid, signal.SIGKILL)
      holder.communicate(timeout=TIMEOUT)
    self.assertEqual(lock_lib.running(self.path), '')  # Its pid is gone.
    self.assertFalse(lock_lib.may_be_held(self.path))
    with workdir.acquire(self.path):
      self.assertEqual(
        lock_lib.running(self.path), f'this process, pid {os.getpid()}'
      )
      self.assertTrue(lock_lib.may_be_held(self.path))
    self.assertEqual(lock_lib.running(self.path), '')  # Released.
    self.assertFalse(lock_lib.may_be_held(self.path))

  def test_a_record_of_another_host_or_half_written_may_be_held(self):
    # A run elsewhere (a shared file system), or one writing its record as
    # it starts, may write in the workdir: best_reader waits for it.
    path = os.path.join(self.path, workdir.LOCK_FILE)
    for record, held in (
      ({'host': 'elsewhere', 'pid': 4242, 'released': False}, True),
      ({'host': 'elsewhere', 'pid': 4242, 'released': True}, False),
      ({'host': socket.gethostname(), 'pid': os.getpid()}, True),
      ('', True),
      ('{"host": "elsew', True),
    ):
      with self.subTest(record=record):
        with open(path, 'w') as f:
          f.write(record if isinstance(record, str) else json.dumps(record))
        self.assertEqual(lock_lib.may_be_held(self.path), held)

  def test_without_lock_support_a_live_pid_refuses(self):
    signals = tempfile.mkdtemp(dir=self.tmp)
    open(os.path.join(signals, 'go'), 'w').close()
    holder = _start(self.path, signals)

    def no_locks(fd, operation):
      del fd, operation
      raise OSError(errno.ENOLCK, 'No locks available')

    try:
      self.assertEqual(_read_line(holder), f'WON {holder.pid}')
      with mock.patch.object(lock_lib.fcntl, 'flock', no_locks):
        with self.assertRaisesRegex(
          utils.UserError, f'pid {holder.pid} .*Its process still exists'
        ):
          workdir.acquire(self.path)
    finally:
      os.kill(holder.pid, signal.SIGKILL)
      holder.communicate(timeout=TIMEOUT)
    with mock.patch.object(lock_lib.fcntl, 'flock', no_locks):
      with workdir.acquire(self.path) as lock:
        self.assertEqual(lock.taken_over_from['pid'], holder.pid)

  def test_same_process_cannot_lock_twice(self):
    with workdir.acquire(self.path):
      with self.assertRaisesRegex(utils.UserError, 'by this process'):
        workdir.acquire(self.path)
    workdir.acquire(self.path).release()

  def test_disabled_lock_holds_nothing(self):
    with workdir.acquire(self.path, enabled=False) as lock:
      self.assertIsNone(lock.path)
      workdir.acquire(self.path).release()

  def _fake_holder(self, beats):
    """A run on another host, on a file system whose locks do not reach it.

    It writes its record `beats` times, a beat every 0.02 s, into a lock
    file that it does not lock.
    """
    path = os.path.join(self.path, workdir.LOCK_FILE)

    def write(beat):
      record = {
        'host': 'elsewhere',
        'pid': 4242,
        'start_time': 'yesterday',
        'heartbeat': beat,
        'heartbeat_seconds': 0.1,
        'released': False,
      }
      with open(path, 'w') as f:
        json.dump(record, f)

    write(0)
    stop = threading.Event()

    def run():
      for beat in range(1, beats + 1):
        if stop.wait(0.02):
          return
        write(beat)

    thread = threading.Thread(target=run)
    thread.start()
    self.addCleanup(thread.join)
    self.addCleanup(stop.set)

  def test_other_host_whose_heartbeat_moves_refuses(self):
    self._fake_holder(beats=500)
    with self.assertRaisesRegex(
      utils.UserError, 'pid 4242 on host elsewhere.*heartbeat.*still moves'
    ):
      workdir.acquire(self.path)

  def test_other_host_whose_heartbeat_stopped_is_taken_over(self):
    self._fake_holder(beats=0)
    with self.assertLogs(level='WARNING') as logs:
      lock = workdir.acquire(self.path)
    with lock:
      self.assertEqual(lock.taken_over_from['host'], 'elsewhere')
    self.assertRegex(logs.output[0], r'watching its heartbeat for 0\.\d s')
    self.assertIn('Taking over', logs.output[1])

  def test_a_live_pid_of_a_holder_whose_lock_is_free_is_taken_over(self):
    # With the lock got, the kernel says the holder is gone: its pid, alive,
    # is another process's now (a reboot, or pids that wrapped around).
    with open(os.path.join(self.path, workdir.LOCK_FILE), 'w') as f:
      json.dump(
        {'host': socket.gethostname(), 'pid': os.getppid(), 'released': False},
        f,
      )
    with self.assertLogs(level='WARNING'), workdir.acquire(self.path) as lock:
      self.assertEqual(lock.taken_over_from['pid'], os.getppid())

  def test_a_release_ends_the_watch_of_another_hosts_holder(self):
    path = os.path.join(self.path, workdir.LOCK_FILE)
    record = {'host': 'elsewhere', 'pid': 4242, 'heartbeat': 1.0}
    with open(path, 'w') as f:  # Watched for 2.5 beats of 4 s: 10 s.
      json.dump(record | {'heartbeat_seconds': 4, 'released': False}, f)

    def release():
      with open(path, 'w') as f:
        json.dump(record | {'heartbeat_seconds': 4, 'released': True}, f)

    timer, live_reason = threading.Timer(0.2, release), lock_lib._live_reason

    def watched(*args):
      timer.start()  # Released while watched.
      return live_reason(*args)

    start = time.monotonic()
    with (
      mock.patch.object(lock_lib, '_live_reason', watched),
      self.assertLogs(level='WARNING'),
      workdir.acquire(self.path),
    ):
      self.assertLess(time.monotonic() - start, 5.0)
    timer.join()

  def test_holder_rewrites_its_heartbeat(self):
    with workdir.acquire(self.path, heartbeat_seconds=0.05):
      lock_file = os.path.join(self.path, workdir.LOCK_FILE)

      def heartbeat():
        with open(lock_file) as f:
          try:
            return json.load(f)['heartbeat']
          except json.JSONDecodeError:
            return None  # Caught mid-rewrite.

      first = heartbeat() or 0.0
      _wait_until(lambda: (heartbeat() or 0.0) > first, 'a new heartbeat')
      with open(lock_file) as f:
        record = json.load(f)
      self.assertEqual(record['pid'], os.getpid())
      self.assertFalse(record['released'])


def _changed(config, **values):
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in values.items():
    node = config
    *parents, leaf = key.split('__')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


class CheckResumeTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.path = workdir.prepare(tempfile.mkdtemp())
    self.config = fm.get_config()

  def _history(self):
    path = os.path.join(self.path, workdir.HISTORY_FILE)
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return [json.loads(line) for line in f]

  def _record(self):
    with open(os.path.join(self.path, workdir.CONFIG_FILE)) as f:
      return json.load(f)

  def test_new_run_records_its_config(self):
    self.assertEqual(workdir.check_resume(self.path, self.config), [])
    self.assertEqual(self._record(), json.loads(self.config.to_json()))
    self.assertEqual(
      workdir.check_resume(self.path, self.config, resuming=True), []
    )
    self.assertEqual(self._history(), [])

  def test_changes_to_data_model_or_steps_are_refused_listing_each(self):
    workdir.check_resume(self.path, self.config)
    recorded = self._record()
    changed = _changed(
      self.config,
      dataset__seed=1,
      batch_size=512,
      learning_rate=0.01,
      model__embed_dim=8,
      num_epochs=3,  # Safe: not listed.
    )
    with self.assertRaises(utils.UserError) as cm:
      workdir.check_resume(self.path, changed, resuming=True)
    message = str(cm.exception)
    for difference in (
      'batch_size 2048 -> 512',
      'dataset.seed 0 -> 1',
      'learning_rate 0.001 -> 0.01',
      'model.embed_dim 16 -> 8',
    ):
      self.assertIn(difference, message)
    self.assertNotIn('num_epochs 100', message)
    self.assertIn('use another workdir or delete this one', message)
    self.assertEqual(self._record(), recorded)
    self.assertEqual(self._history(), [])

  def test_column_lists_resume_however_they_are_spelled(self):
    # `--config.dataset.csv.categorical_columns=user,city` records
    # ('user,city',); the config file's tuple names the same columns.
    workdir.check_resume(
      self.path,
      _changed(
        self.config,
        dataset__csv__categorical_columns=('user,city',),
        dataset__side_features=('genres, year',),
      ),
    )
    same = _changed(
      self.config,
      dataset__csv__categorical_columns=('user', 'city'),
      dataset__side_features=('genres', 'year'),
    )
    self.assertEqual(workdir.check_resume(self.path, same, resuming=True), [])
    self.assertEqual(self._history(), [])
    reordered = _changed(
      same, dataset__csv__categorical_columns=('city', 'user')
    )
    with self.assertRaisesRegex(
      utils.UserError,
      r'dataset.csv.categorical_columns \["user", "city"\] -> \["city",'
      r' "user"\]',
    ):
      workdir.check_resume(self.path, reordered, resuming=True)

  def test_another_hosts_paths_resume_but_not_process_0s(self):
    # Process 0 records its own paths; the others read theirs (their data
    # is compared with process 0's by multihost.assert_same_data).
    paths = dict(
      dataset__path='/host0/d.csv',
      dataset__valid_path='/host0/v.csv',
      dataset__test_path='/host0/t.csv',
    )
    workdir.check_resume(self.path, _changed(self.config, **paths))
    other = _changed(
      self.config, **{k: v.replace('host0', 'host1') for k, v in paths.items()}
    )
    self.assertEqual(
      workdir.check_resume(self.path, other, resuming=True, write=False), []
    )
    with self.assertRaisesRegex(utils.UserError, 'dataset.path "/host0/d'):
      workdir.check_resume(self.path, other, resuming=True)

  def test_moved_paths_are_left_to_the_sources_check(self):
    workdir.check_resume(self.path, _changed(self.config, dataset__path='/a'))
    moved = _changed(self.config, dataset__path='/b')
    with self.assertRaisesRegex(utils.UserError, 'dataset.path "/a" -> "/b"'):
      workdir.check_resume(self.path, moved, resuming=True)
    changes = workdir.check_resume(self.path, moved, resuming=True, moved=True)
    self.assertEqual(
      [(c['key'], c['old'], c['new']) for c in changes],
      [('dataset.path', '/a', '/b')],
    )
    with self.assertRaises(utils.UserError) as cm:
      workdir.check_resume(  # Other keys are refused as before.
        self.path, _changed(moved, batch_size=1), resuming=True, moved=True
      )
    self.assertIn(': batch_size 2048 -> 1 (recorded', str(cm.exception))
    digests = {'all': {'size': 3, 'sha256': 'ab' * 32}}
    check = functools.partial(sources.check, self.path, resuming=True)
    with self.assertRaisesRegex(utils.UserError, 'missing or unreadable'):
      check(changes, self.fail)  # Not hashed for it.
    check([], self.fail)  # No record, nothing moved: recorded once loaded.
    sources.record(self.path, digests)
    check(changes, lambda: digests)  # The same bytes.
    check([], lambda: digests)
    sources.check(self.path, changes, self.fail)  # A new run: no checkpoints.
    other = {'all': {'size': 3, 'sha256': 'cd' * 32}}
    for moved, what in (
      (
        changes,
        r'moved: dataset.path "/a" -> "/b"; the'
        ' files there differ',
      ),
      ([], 'changed: they differ'),
    ):
      with self.assertRaisesRegex(
        utils.UserError,
        f'run whose data files {what} from those recorded in [^ ]+'
        r'sources.json \(all sha256 abababababab -> sha256 cdcdcdcdcdcd\).'
        ' Resumed, the run would train and be scored on other rows',
      ):
        check(moved, lambda: other)
    for text in ('[1]', '{"all": "x"}', '{"all": {"size": 3}}'):
      with open(os.path.join(self.path, sources.FILE), 'w') as f:
        f.write(text)  # Damaged: as if missing.
      with self.assertRaisesRegex(utils.UserError, 'missing or unreadable'):
        check(changes, lambda: other)
      check([], self.fail)
      sources.record(self.path, other)  # Rewritten.
      check(changes, lambda: other)

  def test_keys_added_by_a_newer_version_resume_at_their_defaults(self):
    # A record written before `dataset.side_features` existed.
    workdir.check_resume(self.path, self.config)
    record = self._record()
    del record['dataset']['side_features']
    with open(os.path.join(self.path, workdir.CONFIG_FILE), 'w') as f:
      json.dump(record, f)
    self.assertEqual(
      workdir.check_resume(self.path, self.config, resuming=True), []
    )
    changed = _changed(self.config, dataset__side_features=('genres',))
    with self.assertRaises(utils.UserError) as cm:
      workdir.check_resume(self.path, changed, resuming=True)
    self.assertIn(
      'dataset.side_features (absent) -> ["genres"]', str(cm.exception)
    )

  def test_model_arguments_added_by_a_newer_version_resume_at_defaults(self):
    # A record written before a model argument existed (here DeepFM's
    # dropout): the model's own default continues it, another value does
    # not.
    config = deepfm.get_config()
    workdir.check_resume(self.path, config)
    record = self._record()
    del record['model']['dropout']
    with open(os.path.join(self.path, workdir.CONFIG_FILE), 'w') as f:
      json.dump(record, f)
    self.assertEqual(workdir.check_resume(self.path, config, resuming=True), [])
    changed = _changed(config, model__dropout=0.5)
    with self.assertRaises(utils.UserError) as cm:
      workdir.check_resume(self.path, changed, resuming=True)
    self.assertIn('model.dropout (absent) -> 0.5', str(cm.exception))

  def test_initialisers_may_change_on_a_resume(self):
    # A resume restores its parameters: linear_init, like init_from, only
    # starts a run. Old records (before linear_init, or before a config
    # changed it) resume with today's configs, and the history says so.
    config = deepfm.get_config()
    workdir.check_resume(self.path, config)
    changes = workdir.check_resume(
      self.path, _changed(config, model__linear_init='torch'), resuming=True
    )
    self.assertEqual(
      [(c['key'], c['old'], c['new']) for c in changes],
      [('model.linear_init', 'lecun', 'torch')],
    )
    os.remove(os.path.join(self.path, workdir.HISTORY_FILE))
    record = self._record()
    del record['model']['linear_init']
    with open(os.path.join(self.path, workdir.CONFIG_FILE), 'w') as f:
      json.dump(record, f)
    changes = workdir.check_resume(
      self.path, _changed(config, model__linear_init='torch'), resuming=True
    )
    self.assertEqual(
      [(c['key'], c.get('old'), c['new']) for c in changes],
      [('model.linear_init', None, 'torch')],
    )

  def test_another_model_is_refused(self):
    workdir.check_resume(self.path, self.config)
    with self.assertRaises(utils.UserError) as cm:
      workdir.check_resume(self.path, nfm.get_config(), resuming=True)
    message = str(cm.exception)
    self.assertIn('model_name "fm" -> "nfm"', message)
    self.assertIn('model.embed_dim 16 -> 64', message)
    self.assertIn('model.dropouts (absent) -> [0.2, 0.2]', message)

  def test_nested_and_moved_dataset_keys_are_compared(self):
    self.config.dataset.csv = ml_collections.ConfigDict({'sep': ','})
    workdir.check_resume(self.path, self.config)
    moved = _changed(self.config, dataset__csv__sep=';')
    moved.dataset.chunk_rows = 10  # Safe.
    with self.assertRaisesRegex(utils.UserError, 'dataset.csv.sep "," -> ";"'):
      workdir.check_resume(self.path, moved, resuming=True)
    del moved.dataset['csv']
    with self.assertRaisesRegex(
      utils.UserError, r'dataset.csv.sep "," -> \(absent\)'
    ):
      workdir.check_resume(self.path, moved, resuming=True)

  def test_safe_changes_are_appended_to_the_history_once(self):
    workdir.check_resume(self.path, self.config)
    shorter = _changed(self.config, num_epochs=5, patience=4)
    changes = workdir.check_resume(self.path, shorter, resuming=True)
    history = self._history()
    self.assertEqual(changes, history)
    self.assertEqual(
      [(h['key'], h['old'], h['new']) for h in history],
      [('num_epochs', 100, 5), ('patience', 2, 4)],
    )
    for h in history:
      self.assertIn('time', h)
    # Compared with the record as changed by its history: nothing new.
    again = workdir.check_resume(self.path, shorter, resuming=True)
    self.assertEqual(again, [])
    workdir.check_resume(self.path, self.config, resuming=True)
    self.assertEqual(
      [(h['key'], h['old'], h['new']) for h in self._history()[2:]],
      [('num_epochs', 5, 100), ('patience', 4, 2)],
    )
    self.assertEqual(self._record()['num_epochs'], 100)

  def test_a_safe_key_removed_on_a_resume_is_recorded_once(self):
    workdir.check_resume(self.path, self.config)
    without = _changed(self.config)
    del without['device_split_mb']
    changes = workdir.check_resume(self.path, without, resuming=True)
    self.assertEqual(
      [(h['key'], h['old'], 'new' in h) for h in changes],
      [('device_split_mb', self.config.device_split_mb, False)],
    )
    # The record as changed by its history has the key no more.
    self.assertEqual(
      workdir.check_resume(self.path, without, resuming=True), []
    )
    self.assertLen(self._history(), 1)

  def _resumed(self, recorded, optimizer, checkpoints=True):
    self.config.optimizer = recorded
    workdir.check_resume(self.path, self.config)
    if checkpoints:
      os.makedirs(os.path.join(self.path, 'checkpoints', 'latest', '3'))
    config = _changed(self.config, optimizer=optimizer)
    return workdir.resumed_optimizer(self.path, config, optim.NAMES)

  def test_auto_resumes_with_the_recorded_optimizer(self):
    for recorded in ('adam', 'lazy_adam', 'rowwise_adagrad'):
      with self.subTest(recorded):
        self.path = workdir.prepare(tempfile.mkdtemp())
        config = self._resumed(recorded, 'auto')
        self.assertEqual(config.optimizer, recorded)
        self.assertEqual(
          workdir.check_resume(self.path, config, resuming=True), []
        )

  def test_auto_stays_auto_without_checkpoints_or_a_recorded_name(self):
    self.assertEqual(
      self._resumed('adam', 'auto', checkpoints=False).optimizer, 'auto'
    )
    self.path = workdir.prepare(tempfile.mkdtemp())
    self.assertEqual(self._resumed('auto', 'auto').optimizer, 'auto')
    # A name this version does not build: check_resume names the change.
    self.path = workdir.prepare(tempfile.mkdtemp())
    config = self._resumed('sgd', 'auto')
    self.assertEqual(config.optimizer, 'auto')
    with self.assertRaisesRegex(utils.UserError, 'optimizer "sgd" -> "auto"'):
      workdir.check_resume(self.path, config, resuming=True)

  def test_a_named_optimizer_is_not_replaced(self):
    config = self._resumed('adam', 'lazy_adam')
    self.assertEqual(config.optimizer, 'lazy_adam')
    with self.assertRaisesRegex(
      utils.UserError, 'optimizer "adam" -> "lazy_adam"'
    ):
      workdir.check_resume(self.path, config, resuming=True)

  def test_table_learning_rate_may_change_where_the_optimizer_ignores_it(
    self,
  ):
    # Only rowwise_adagrad reads it (tests/test_config_unused.py's
    # NoEffectTest: adam's and lazy_adam's steps are the same without it).
    for optimizer in ('adam', 'lazy_adam', 'auto', 'rowwise_adagrad'):
      with self.subTest(optimizer):
        self.path = workdir.prepare(tempfile.mkdtemp())
        config = _changed(self.config, optimizer=optimizer)
        workdir.check_resume(self.path, config)
        faster = _changed(config, table_learning_rate=0.5)
        if optimizer == 'rowwise_adagrad':
          with self.assertRaisesRegex(
            utils.UserError, 'table_learning_rate 0.05 -> 0.5 '
          ):
            workdir.check_resume(self.path, faster, resuming=True)
          self.assertEqual(self._history(), [])
          continue
        changes = workdir.check_resume(self.path, faster, resuming=True)
        self.assertEqual(
          [(c['key'], c['old'], c['new']) for c in changes],
          [('table_learning_rate', 0.05, 0.5)],
        )
        self.assertEqual(self._history(), changes)
    # A switch to the optimizer that reads it: both changes are named.
    self.path = workdir.prepare(tempfile.mkdtemp())
    workdir.check_resume(self.path, _changed(self.config, optimizer='adam'))
    with self.assertRaisesRegex(
      utils.UserError,
      'optimizer "adam" -> "rowwise_adagrad"; table_learning_rate 0.05 -> 0.1',
    ):
      workdir.check_resume(
        self.path,
        _changed(config, optimizer='rowwise_adagrad', table_learning_rate=0.1),
        resuming=True,
      )

  def test_process_that_does_not_write_checks_only(self):
    workdir.check_resume(self.path, self.config)
    shorter = _changed(self.config, num_epochs=5)
    workdir.check_resume(self.path, shorter, resuming=True, write=False)
    self.assertEqual(self._history(), [])
    with self.assertRaises(utils.UserError):
      workdir.check_resume(
        self.path, _changed(self.config, seed=3), resuming=True, write=False
      )

  def test_run_without_checkpoints_replaces_an_old_record(self):
    workdir.check_resume(self.path, self.config)
    workdir.check_resume(
      self.path, _changed(self.config, num_epochs=5), resuming=True
    )
    other = nfm.get_config()
    self.assertEqual(workdir.check_resume(self.path, other), [])
    self.assertEqual(self._record()['model_name'], 'nfm')
    self.assertEqual(self._history(), [])

  def test_checkpoints_are_found_by_step_directory(self):
    self.assertFalse(workdir.has_checkpoints(self.path))
    latest = os.path.join(self.path, 'checkpoints', 'latest')
    os.makedirs(os.path.join(latest, '3.orbax-checkpoint-tmp-17'))
    self.assertFalse(workdir.has_checkpoints(self.path))
    os.makedirs(os.path.join(self.path, 'checkpoints', 'best', '2'))
    self.assertTrue(workdir.has_checkpoints(self.path))
    workdir.check_resume(self.path, self.config, resuming=False)
    with self.assertRaisesRegex(utils.UserError, 'seed 0 -> 1'):
      workdir.check_resume(self.path, _changed(self.config, seed=1))

  def test_a_new_run_refuses_to_overwrite_files_not_of_a_run(self):
    record = os.path.join(self.path, workdir.CONFIG_FILE)
    metrics = os.path.join(self.path, 'metrics.jsonl')
    for name, text, message in (
      (record, '{"mine": 1}\n', 'holds a config.json that is not the record'),
      (record, 'notes\n', 'holds a config.json that is not the record'),
      (metrics, 'my log\n', 'metrics.jsonl:1: not a metrics line of a run'),
      (metrics, '{"split": "train"}\n[1]\n{"spl', 'metrics.jsonl:2: not a'),
      # Only the last line may be cut short: a run appends after none.
      (metrics, '{"spl\n{"split": "train"}\n', 'metrics.jsonl:1: not a'),
    ):
      with open(name, 'w') as f:
        f.write(text)
      with self.assertRaisesRegex(utils.UserError, message):
        workdir.check_resume(self.path, self.config, resuming=False)
      with open(name) as f:
        self.assertEqual(f.read(), text)
      os.remove(name)
    # A run's own leftovers: its record, its metrics cut short by a kill.
    workdir.check_resume(self.path, self.config)
    with open(metrics, 'w') as f:
      f.write('{"split": "train", "epoch": 1}\n{"split": "va')
    workdir.check_resume(self.path, _changed(self.config, seed=1))
    self.assertEqual(self._record()['seed'], 1)

  def test_unreadable_record_is_refused_by_name(self):
    with open(os.path.join(self.path, workdir.CONFIG_FILE), 'w') as f:
      f.write('{"model_name": "fm", ')
    with self.assertRaisesRegex(
      utils.UserError, f'Cannot read {self.path}/config.json'
    ):
      workdir.check_resume(self.path, self.config, resuming=True)

  def test_checkpoints_without_record_record_this_config(self):
    with self.assertLogs(level='WARNING'):
      workdir.check_resume(self.path, self.config, resuming=True)
    self.assertEqual(self._record()['model_name'], 'fm')

  def test_safe_list_covers_only_what_cannot_change_a_resumed_run(self):
    flat = workdir.flatten(fm.get_config())
    safe = sorted(k for k in flat if workdir.is_safe(k))
    self.assertEqual(
      safe,
      [
        'dataset.cache_dir',
        'dataset.chunk_rows',
        'dataset.parse_workers',
        'dataset.url',
        'device_split_mb',
        'eval_batch_size',
        'init_from',
        'log_every_steps',
        'num_epochs',
        'patience',
        'progress_bar',
        'steps_per_dispatch',
      ],
    )
    self.assertFalse(workdir.is_safe('some_key_added_later'))
    self.assertTrue(workdir.is_safe('model.linear_init'))
    self.assertFalse(workdir.is_safe('model.embed_dim'))


def _watched(tmp_path, record):
  """Acquires `tmp_path` over an unreleased record of another host, on a
  fake clock that each sleep moves on; the sleeps and the log lines."""
  (tmp_path / workdir.LOCK_FILE).write_text(json.dumps(record))
  clock, sleeps = [0.0], []

  def sleep(seconds):
    sleeps.append(seconds)
    clock[0] += seconds

  with (
    mock.patch.object(lock_lib.time, 'monotonic', lambda: clock[0]),
    mock.patch.object(lock_lib.time, 'sleep', sleep),
    mock.patch.object(lock_lib.logging, 'warning') as warning,
  ):
    lock_lib.acquire(str(tmp_path)).release()
  return sleeps, [args[0] % args[1:] for args, _ in warning.call_args_list]


def test_a_record_of_an_older_version_is_watched_for_25_s(tmp_path):
  # Without heartbeat_seconds: 2.5 beats of the default 10 s, in 1 s steps.
  record = {'host': 'elsewhere', 'pid': 4242, 'heartbeat': 1.0}
  sleeps, logged = _watched(tmp_path, record | {'released': False})
  assert sleeps == [1.0] * 25
  assert 'watching its heartbeat for 25.0 s' in logged[0]
  assert logged[1].startswith(f'Taking over workdir {tmp_path} from pid 4242')


def test_a_slow_heartbeat_is_watched_for_at_most_150_s(tmp_path):
  record = {'host': 'elsewhere', 'pid': 4242, 'heartbeat': 1.0}
  record |= {'heartbeat_seconds': 3600, 'released': False}
  sleeps, logged = _watched(tmp_path, record)
  assert sleeps == [1.0] * 150  # 2.5 beats of 60 s, not of an hour.
  assert 'watching its heartbeat for 150.0 s' in logged[0]


def test_a_user_without_a_passwd_entry_is_named_by_uid():
  with mock.patch.object(lock_lib.getpass, 'getuser', side_effect=KeyError):
    assert lock_lib.user() == f'uid {os.getuid()}'


def test_a_heartbeat_that_cannot_be_written_is_warned_once(tmp_path):
  with mock.patch.object(lock_lib.logging, 'warning') as warning:
    lock = lock_lib.acquire(str(tmp_path), heartbeat_seconds=0.005)
    beats = threading.Semaphore(0)

    def full(fd, record):
      del fd, record
      beats.release()
      raise OSError(errno.ENOSPC, 'No space left on device')

    with mock.patch.object(lock_lib, '_write_record', full):
      for _ in range(5):  # Five failed beats.
        assert beats.acquire(timeout=TIMEOUT)
      lock.release()
  messages = [args[0] for args, _ in warning.call_args_list]
  assert messages == [
    'Cannot update the lock file %s: %s',
    'Cannot mark %s released: %s',
  ]


def test_a_process_the_run_starts_does_not_inherit_the_lock(tmp_path):
  # Else a child outliving a killed run would keep its workdir locked.
  with lock_lib.acquire(str(tmp_path)):
    child = subprocess.run(  # As os.fork and exec would: every open fd.
      ['ls', '-l', '/proc/self/fd/'],
      capture_output=True,
      text=True,
      close_fds=False,
    )
  assert 'pipe:' in child.stdout  # The listing of its descriptors.
  assert workdir.LOCK_FILE not in child.stdout


def test_a_record_that_is_not_an_object_is_no_holder(tmp_path):
  for text in ('[1, 2]', '"run"', '7', 'null', '{"pid": '):
    (tmp_path / workdir.LOCK_FILE).write_text(text)
    with lock_lib.acquire(str(tmp_path)) as lock:
      assert lock.taken_over_from is None


def test_only_an_integer_pid_that_exists_or_is_not_ours_is_alive():
  assert lock_lib._pid_alive(os.getpid())
  for pid in (None, str(os.getpid()), float(os.getpid())):
    assert not lock_lib._pid_alive(pid)
  with mock.patch.object(lock_lib.os, 'kill', side_effect=PermissionError):
    assert lock_lib._pid_alive(4242)  # Another user's process.
  with mock.patch.object(lock_lib.os, 'kill', side_effect=ProcessLookupError):
    assert not lock_lib._pid_alive(4242)


def test_a_refusal_or_an_unwritable_lock_file_leaves_no_descriptor(tmp_path):
  def descriptors():
    return len(os.listdir('/proc/self/fd'))

  before = descriptors()
  (tmp_path / workdir.LOCK_FILE).write_text(
    json.dumps({'host': 'elsewhere', 'pid': 4242, 'released': False})
  )
  busy = BlockingIOError(errno.EAGAIN, 'Resource temporarily unavailable')
  with mock.patch.object(lock_lib.fcntl, 'flock', side_effect=busy):
    with pytest.raises(utils.UserError, match='in use by pid 4242 on host'):
      lock_lib.acquire(str(tmp_path))
  assert descriptors() == before
  # A directory where the lock file should be: not a traceback.
  (tmp_path / workdir.LOCK_FILE).unlink()
  (tmp_path / workdir.LOCK_FILE).mkdir()
  with pytest.raises(
    utils.UserError,
    match=rf'^Cannot write the lock file {tmp_path}/run.lock \(Is a'
    r' directory\)\. Make it writable by (user|uid) ',
  ):
    lock_lib.acquire(str(tmp_path))
  assert descriptors() == before


if __name__ == '__main__':
  absltest.main()
