"""Tests of data.py and batching.py: splits, cache, vocabulary, batches."""

import errno
import fcntl
import gzip
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from dataset_testing import DatasetTestCase
from dataset_testing import all_rows
from dataset_testing import avazu_rows
from dataset_testing import criteo_rows
from dataset_testing import write_lines
from dataset_testing import write_text
import numpy as np

import batching
from configs import fm
import data
import data_checks
from datasets import cache
from datasets import core
from datasets import criteo
from datasets import encode
from datasets import movielens
from datasets import streaming
import train
import utils


class SplitTest(DatasetTestCase):
  def test_random_split_is_split_indices_in_file_order(self):
    rows = criteo_rows(500, seed=1)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    whole = data.load_dataset(self.config('criteo', path, split=(1.0, 0, 0)))
    ids, labels = all_rows(whole)
    config = self.config('criteo', path, split=(0.7, 0.2, 0.1), seed=5)
    dataset = data.load_dataset(config)
    parts = data.split_indices(500, (0.7, 0.2, 0.1), 5)
    for split, part in zip(('train', 'valid', 'test'), parts, strict=True):
      rows_ = np.sort(part)
      np.testing.assert_array_equal(getattr(dataset, split).ids, ids[rows_])
      np.testing.assert_array_equal(
        getattr(dataset, split).labels, labels[rows_]
      )
    # One permutation: numpy's, drawn in int32 to halve its memory.
    perm = np.random.default_rng(5).permutation(500)
    np.testing.assert_array_equal(np.concatenate(parts), perm)

  def test_movielens_splits_keep_the_order_of_the_permutation(self):
    path = write_text(
      os.path.join(self.tmp, 'ml', 'ratings.csv'),
      'userId,movieId,rating,timestamp\n'
      + ''.join(f'{u * 3},{u % 11},{u % 5 + 1},0\n' for u in range(300)),
    )
    dataset = data.load_dataset(self.config('ml-20m', path, seed=4))
    frame = movielens.read_movielens(path, 'ml-20m')
    ids, vocabulary = movielens.encode_columns(
      [frame['user'].to_numpy(), frame['item'].to_numpy()]
    )
    labels = (frame['rating'].to_numpy() > 3).astype(np.float32)
    parts = data.split_indices(300, (0.8, 0.1, 0.1), 4)
    for split, part in zip(('train', 'valid', 'test'), parts, strict=True):
      np.testing.assert_array_equal(getattr(dataset, split).ids, ids[part])
      np.testing.assert_array_equal(
        getattr(dataset, split).labels, labels[part]
      )
    # The vocabulary maps ids back to the raw user and item ids.
    for f, column in enumerate(('user', 'item')):
      np.testing.assert_array_equal(dataset.vocabulary[f], vocabulary[f])
      np.testing.assert_array_equal(
        dataset.vocabulary[f][dataset.valid.ids[:, f]],
        frame[column].to_numpy()[parts[1]],
      )

  def test_a_streamed_pass_2_with_more_rows_than_pass_1_is_a_data_error(self):
    # Rows beyond pass 1's count have no split: named, not an IndexError.
    chunk = ('all', np.zeros((6, 1), np.int32), np.zeros(6, np.float32))
    encoded = core.Encoded(
      field_names=('a',),
      field_dims=(3,),
      vocabulary=(np.arange(2),),
      rows={'all': 10},
      chunks=lambda: iter([chunk, chunk]),
    )
    routed = data._routed(encoded, self.config('criteo', ''))
    with self.assertRaisesRegex(
      data.DataError, r'^criteo: more rows than in pass 1 \(changed\?\)'
    ):
      list(routed)

  def test_sizes_round_down_train_and_valid_and_fractions_are_checked(self):
    self.assertEqual(data.split_sizes(10, (0.75, 0.15, 0.1)), (7, 1, 2))
    self.assertEqual(data.split_sizes(7, (1.0, 0.0, 0.0)), (7, 0, 0))
    for bad in ((0.8, 0.3, 0.1), (0.5, 0.5), (1.1, -0.1, 0.0)):
      with self.assertRaisesRegex(data.DataError, 'config.dataset.split'):
        data.split_sizes(10, bad)


class CacheTest(DatasetTestCase):
  def setUp(self):
    super().setUp()
    self.path = write_text(
      os.path.join(self.tmp, 'src', 'ratings.csv'),
      'userId,movieId,rating,timestamp\n'
      + ''.join(f'{u},{u % 7},{u % 5 + 1},0\n' for u in range(200)),
    )

  def test_second_load_reads_the_cache_not_the_source(self):
    config = self.config('ml-20m', self.path)
    first = data.load_dataset(config)
    read = mock.patch.object(
      movielens, 'read_movielens', side_effect=AssertionError
    )
    with read:
      second = data.load_dataset(config)
    self.assertIsInstance(second.train.ids, np.memmap)
    np.testing.assert_array_equal(first.train.ids, second.train.ids)

  def test_changed_source_or_option_is_not_served_stale(self):
    config = self.config('ml-20m', self.path)
    before = data.load_dataset(config)
    with open(self.path, 'a') as f:
      f.write('500,3,5,0\n')
    after = data.load_dataset(config)
    self.assertEqual(after.field_dims[0], before.field_dims[0] + 1)
    config.seed = 1
    reseeded = data.load_dataset(config)
    self.assertFalse(np.array_equal(reseeded.train.ids, after.train.ids))
    encoded = os.listdir(os.path.join(config.cache_dir, 'encoded'))
    self.assertLen(encoded, 3)

  def test_runs_started_together_build_the_cache_once(self):
    # A sweep launched at once: each run encoded the file itself (4 x the
    # time and memory of a Criteo pass); the others now wait and read.
    config = self.config('ml-20m', self.path)
    real, builds = data._build, []
    started = threading.Barrier(3)

    def slow(*args):
      builds.append(args[0])
      time.sleep(0.5)  # The others arrive while this one builds.
      return real(*args)

    results = [None] * 3

    def load(i):
      started.wait()
      results[i] = data.load_dataset(config.copy_and_resolve_references())

    with mock.patch.object(data, '_build', slow):
      threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
      for t in threads:
        t.start()
      for t in threads:
        t.join(60)
    self.assertLen(builds, 1)
    for dataset in results:
      np.testing.assert_array_equal(dataset.train.ids, results[0].train.ids)
    self.assertEqual(os.listdir(os.path.join(config.cache_dir, 'locks')), [])

  def test_failed_write_leaves_no_trusted_cache(self):
    config = self.config('ml-20m', self.path)
    full = OSError(errno.ENOSPC, 'No space left on device')
    with mock.patch.object(cache.NpyWriter, 'close', side_effect=full):
      with self.assertRaisesRegex(data.DataError, 'No space left.*cache_dir'):
        data.load_dataset(config)
    encoded = os.path.join(config.cache_dir, 'encoded')
    self.assertEqual(os.listdir(encoded), [])
    self.assertLen(data.load_dataset(config).train, 160)

  def test_a_disk_that_fills_up_mid_write_is_one_data_error(self):
    # The disk takes the first bytes, then refuses the rest: buffered rows
    # that close() flushes are refused again.
    budget = [4096]

    class Full(io.FileIO):
      def write(self, b):
        if len(b) > budget[0]:
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget[0] -= len(b)
        return super().write(b)

    real_open = open

    def full_open(path, mode='r', *args, **kwargs):
      if str(path).endswith('.npy') and mode == 'wb':
        return io.BufferedWriter(Full(path, mode))
      return real_open(path, mode, *args, **kwargs)

    config = self.config('ml-20m', self.path)
    with mock.patch('builtins.open', full_open):
      with self.assertRaisesRegex(
        data.DataError, 'No space left on device.*cache_dir'
      ):
        data.load_dataset(config)
    encoded = os.path.join(config.cache_dir, 'encoded')
    self.assertEqual(os.listdir(encoded), [])  # No copy left behind.
    self.assertLen(data.load_dataset(config).train, 160)

  def test_a_disk_too_small_for_the_cache_stops_before_pass_2(self):
    # Pass 1 knows the cache's size: 10M Criteo lines make 1.5 GB, 45M
    # about 7 GB; a disk without room refuses it at once, not after the
    # minutes of pass 2.
    rows = criteo_rows(300, seed=3)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    config = self.config('criteo', path)
    need = 300 * (39 * 4 + 4)  # At least the ids and the labels.
    # Room for it only in the blocks reserved for root: f_bfree, f_bavail.
    small = os.statvfs_result((1, 1, 10**6, need + 10**5, need - 1) + (0,) * 5)
    for euid, refused in ((1000, True), (0, False)):
      with (
        self.subTest(euid=euid),
        mock.patch.object(os, 'statvfs', return_value=small),
        mock.patch.object(os, 'geteuid', return_value=euid),
      ):
        if not refused:
          self.assertLen(data.load_dataset(config).train, 240)
          continue
        with (
          mock.patch.object(encode, 'encode_ids') as encode_ids,
          self.assertRaisesRegex(
            data.DataError,
            r'No space left on device: the cache needs at least 0\.\d\d MiB,'
            r' 0\.\d\d MiB free.*cache_dir',
          ),
        ):
          data.load_dataset(config)
        encode_ids.assert_not_called()  # Pass 2 never started.
        encoded = os.path.join(config.cache_dir, 'encoded')
        self.assertEqual(os.listdir(encoded), [])

  def test_a_build_hands_its_freed_memory_back_a_cache_hit_has_none(self):
    # The passes' small buffers stayed in the heap while training (310 of
    # 687 MB after 3M Criteo lines, given back by malloc_trim).
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(100, seed=4), '\t'
    )
    config = self.config('criteo', path)
    # A text source's also once pass 1's counts are let go, before pass 2.
    with mock.patch.object(core, 'release_memory') as release:
      data.load_dataset(config)
      self.assertEqual(release.call_count, 2)
      data.load_dataset(config)  # From the cache.
      self.assertEqual(release.call_count, 2)


class BuildLockTest(absltest.TestCase):
  """`core.building` against a holder in another process, and how it reads
  a process's state."""

  def _holder(self, directory: str) -> subprocess.Popen:
    """A process that holds the lock of `directory/built`, stops itself
    (SIGSTOP), then writes `directory/done` and lets go once resumed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (
      'import os, signal, sys\n'
      f'sys.path.insert(0, {root!r})\n'
      'from datasets import core\n'
      f'with core.building({directory!r} + "/built", {directory!r}):\n'
      '  print("held", flush=True)\n'
      '  os.kill(os.getpid(), signal.SIGSTOP)\n'
      f'  open({directory!r} + "/done", "w").close()\n'
    )
    holder = subprocess.Popen(
      [sys.executable, '-c', script], stdout=subprocess.PIPE, text=True
    )
    self.addCleanup(holder.wait)
    self.addCleanup(holder.kill)
    self.assertEqual(holder.stdout.readline(), 'held\n')
    return holder

  def _enter(self, directory: str) -> list[str]:
    """Enters `building` as the holder's waiter, in a thread that must get
    in within 30 s: whether `done` was there then, and the warnings."""
    found = []
    with self.assertLogs(level='INFO') as logs:
      thread = threading.Thread(
        target=self._wait_in, args=(directory, found), daemon=True
      )
      thread.start()
      thread.join(30)
    self.assertFalse(thread.is_alive())
    self.assertIn('Waiting for another process to build', logs.output[0])
    return found + [r for r in logs.output if r.startswith('WARNING')]

  def _wait_in(self, directory, found):
    with core.building(f'{directory}/built', directory):
      found.append(str(os.path.exists(f'{directory}/done')))

  @mock.patch.object(core, '_POLL_S', 0.02)
  @mock.patch.object(core, 'HOLDER_STOPPED_S', 0.5)
  def test_a_holder_stopped_for_good_is_not_waited_for(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    holder = self._holder(directory)
    found = self._enter(directory)
    self.assertEqual(found[0], 'False')  # In while the holder still holds.
    self.assertRegex(
      found[1],
      rf'^WARNING:root:Process {holder.pid}, which builds {directory}/built,'
      r' has been stopped for 0 s \(Ctrl-Z\?\): building it here as well\.'
      rf' Resume it \(kill -CONT {holder.pid}\) or end it\.$',
    )
    self.assertLen(found, 2)
    with open(f'{directory}/built.lock') as f:  # Still the holder's.
      self.assertEqual(f.read(), f'{holder.pid}@{socket.gethostname()}')

  @mock.patch.object(core, '_POLL_S', 0.02)
  def test_a_waiter_that_takes_the_lock_names_itself_in_it(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    lock_path = f'{directory}/built.lock'
    with open(lock_path, 'w') as held:  # Held by this test, unnamed.
      fcntl.flock(held, fcntl.LOCK_EX)
      named = []

      def wait():
        with core.building(f'{directory}/built', directory):
          with open(lock_path) as f:
            named.append(f.read())

      waiting = threading.Event()
      with mock.patch.object(core.logging, 'info', lambda *_: waiting.set()):
        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        self.assertTrue(waiting.wait(30))  # Then let go.
    thread.join(30)
    self.assertEqual(named, [core.owner_tag()])

  @mock.patch.object(core, '_POLL_S', 0.02)
  @mock.patch.object(core, 'HOLDER_STOPPED_S', 3.0)
  def test_a_holder_resumed_in_time_is_waited_for(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    holder = self._holder(directory)
    threading.Timer(0.5, os.kill, (holder.pid, signal.SIGCONT)).start()
    self.assertEqual(self._enter(directory), ['True'])  # Once it let go.

  def test_the_state_of_a_process_whose_name_has_parentheses(self):
    # /proc/<pid>/stat is `pid (name) state ...`, and a name may hold
    # `) T (`: the state is after the last `)`.
    directory = self.enter_context(tempfile.TemporaryDirectory())
    name = os.path.join(directory, 'a) T (b')
    os.symlink(sys.executable, name)  # A process's name is its file's.
    process = subprocess.Popen(
      [name, '-S', '-c', 'import time; time.sleep(30)']
    )
    try:
      for signum, want in ((None, 'S'), (signal.SIGSTOP, 'T')):
        if signum:
          os.kill(process.pid, signum)
        deadline = time.monotonic() + 10
        while (
          core.process_state(process.pid) != want
          and time.monotonic() < deadline
        ):
          time.sleep(0.01)
        self.assertEqual(core.process_state(process.pid), want)
    finally:
      process.kill()
      process.wait()
    self.assertIsNone(core.process_state(process.pid))  # Gone: unknown.


class VocabularyTest(DatasetTestCase):
  def test_raw_lines_encode_to_the_cached_ids_with_the_vocabulary(self):
    rows = criteo_rows(600, seed=7)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    config = self.config('criteo', path, min_count=3)
    dataset = data.load_dataset(config)
    # What a predict step does with a raw line: parse it with the source's
    # reader, then look its keys up in the cached vocabulary.
    lines = [('\t'.join(r) + '\n').encode() for r in rows]
    keys, labels = criteo.reader(config.criteo, path).parse(
      lines, 1, str, streaming.BadLines(skip=False)
    )
    ids = encode.encode_ids(dataset.vocabulary, keys)
    parts = data.split_indices(600, config.split, config.seed)
    for split, part in zip(('train', 'valid', 'test'), parts, strict=True):
      got = getattr(dataset, split)
      np.testing.assert_array_equal(got.ids, ids[np.sort(part)])
      np.testing.assert_array_equal(got.labels, labels[np.sort(part)])
    # Every field: its kept keys, sorted, then the one out-of-vocabulary id.
    self.assertEqual(
      tuple(len(v) + 1 for v in dataset.vocabulary), dataset.field_dims
    )
    for keys_f in dataset.vocabulary:
      self.assertTrue(np.all(np.diff(keys_f) > 0))
    # On disk: one int64 array, no pickle, sizes in meta.json.
    [name] = self.encoded()
    directory = os.path.join(self.tmp, 'cache', 'encoded', name)
    with open(os.path.join(directory, 'meta.json')) as f:
      meta = json.load(f)
    vocab = np.load(os.path.join(directory, 'vocab.npy'), allow_pickle=False)
    self.assertEqual(vocab.dtype, np.int64)
    self.assertEqual(
      meta['vocabulary_sizes'], [len(v) for v in dataset.vocabulary]
    )
    np.testing.assert_array_equal(vocab, np.concatenate(dataset.vocabulary))
    self.assertEqual(meta['field_names'], list(dataset.field_names))

  def test_fields_that_kept_no_value_are_warned_by_name(self):
    # Brute force: a field kept no value when none of its keys reaches
    # min_count in the training rows (the whole file, split at random).
    rows = criteo_rows(400, seed=3)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    config = fm.get_config()
    config.batch_size = 64
    for min_count in (100, 10**6):
      config.dataset = self.config('criteo', path, min_count=min_count)
      dataset = data.load_dataset(config.dataset)
      counts = [{} for _ in dataset.field_names]
      for row in rows:
        for f, key in enumerate(row[14:], start=13):  # C1..C26 as written.
          counts[f][key] = counts[f].get(key, 0) + 1
      expected = [
        name
        for f, name in enumerate(dataset.field_names)
        if f >= 13 and max(counts[f].values()) < min_count
      ]
      with self.subTest(min_count=min_count):
        self.assertNotEqual(expected, [])
        with self.assertLogs(level='WARNING') as logs:
          logging.warning('sentinel')
          data_checks.check_splits(dataset, config)
        [said] = [
          r.getMessage()
          for r in logs.records
          if 'kept no value' in r.getMessage()
        ]
        named = said.split(' (')[-1].split(')')[0].split(', ')
        # The integer fields (log-bucketed) are checked by the vocabulary.
        empty_ints = [
          n
          for n, v in zip(
            dataset.field_names[:13], dataset.vocabulary[:13], strict=True
          )
          if not len(v)
        ]
        self.assertEqual(named, empty_ints + expected)
        self.assertIn(
          f'of the 39 categorical fields of criteo kept no value, each seen'
          f' fewer than config.dataset.min_count={min_count} times',
          said,
        )
        # 100: some fields (the skewed draws' rarest), 10**6: every one.
        self.assertLen(named, 39 if min_count == 10**6 else len(named))
        if min_count == 100:
          self.assertBetween(len(expected), 1, 25)


class CacheKeyTest(DatasetTestCase):
  def test_every_option_and_the_source_change_the_key(self):
    path = write_lines(os.path.join(self.tmp, 'a.csv'), avazu_rows(30), ',')

    def key(name='csv', **overrides):
      config = self.config(name, path)
      if name == 'csv':
        config.csv.label_column = 'click'
      config.update(overrides)
      source, config, options = data.resolve(config)
      spec = data.cache_spec(config, options, source.files(config))
      return cache.key(spec)

    changed = [
      key(min_count=2),
      key(csv=dict(log_bucket=False)),
      key(split=(0.7, 0.2, 0.1)),
      key(seed=1),
      key(skip_bad_lines=True),
      key(csv=dict(label_column='hour')),
      key(csv=dict(numeric_columns=('hour',))),
      key(csv=dict(categorical_columns=('C1',))),
      key(csv=dict(sep=';')),
      key('criteo'),
      key('criteo', criteo=dict(log_bucket=False)),
      key('avazu'),
      key('avazu', avazu=dict(hour_features=False)),
      key('avazu', avazu=dict(drop_id=False)),
      key('libfm'),
      key('libfm', libfm=dict(field_dims=(3, 4))),
      key(valid_path=path, test_path=path),
    ]
    base_key = key()
    self.assertEqual(base_key, key(chunk_rows=5))  # Not an output option.
    self.assertEqual(base_key, key(min_count=1))  # The default, spelt out.
    self.assertLen(set(changed + [base_key]), len(changed) + 1)
    # The content, not the modification time, identifies the source.
    os.utime(path, ns=(1, 1))
    self.assertEqual(base_key, key())

  def test_exception_mid_way_leaves_no_trusted_cache_and_old_intact(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(400), '\t'
    )
    old = data.load_dataset(self.config('criteo', path))
    old_ids = np.array(old.train.ids)
    [old_name] = self.encoded()
    real = encode.encode_ids
    calls = []

    def failing(*args):
      calls.append(1)
      if len(calls) == 3:
        raise RuntimeError('injected')
      return real(*args)

    config = self.config('criteo', path, min_count=2)
    with mock.patch.object(encode, 'encode_ids', failing):
      with self.assertRaisesRegex(RuntimeError, 'injected'):
        data.load_dataset(config)
    self.assertEqual(self.encoded(), [old_name])  # No partial, no temp dir.
    np.testing.assert_array_equal(
      data.load_dataset(self.config('criteo', path)).train.ids, old_ids
    )
    fresh = data.load_dataset(config)  # Rebuilt, not a partial one.
    self.assertLen(self.encoded(), 2)
    self.assertLen(fresh.train, 320)
    self.assertEqual(fresh.train.ids.shape[1], 39)

  def test_sigkill_mid_way_leaves_nothing_trusted(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(400), '\t'
    )
    config = self.config('criteo', path, chunk_rows=40)
    encoded = os.path.join(self.tmp, 'cache', 'encoded')
    # A child preprocesses slowly (0.3 s per chunk of pass 2) until killed.
    script = (
      'import sys, time, ml_collections\n'
      f'sys.path.insert(0, {data.ROOT!r})\n'
      'import data\n'
      'from datasets import encode\n'
      'real = encode.encode_ids\n'
      'def slow(*args):\n'
      '  time.sleep(0.3)\n'
      '  return real(*args)\n'
      'encode.encode_ids = slow\n'
      f'data.load_dataset(ml_collections.ConfigDict({config.to_dict()!r}))\n'
    )
    child = subprocess.Popen([sys.executable, '-c', script])
    try:
      deadline = time.monotonic() + 60
      while not any(n.startswith('.tmp-') for n in self.encoded()):
        self.assertIsNone(child.poll(), 'the child ended before the kill')
        self.assertLess(time.monotonic(), deadline)
        time.sleep(0.05)
      time.sleep(0.4)  # Some rows written.
    finally:
      child.kill()
      child.wait()
    [partial] = self.encoded()
    self.assertTrue(partial.startswith('.tmp-criteo-'))
    self.assertTrue(os.listdir(os.path.join(encoded, partial)))
    dataset = data.load_dataset(config)  # Not served from the partial.
    [name] = self.encoded()  # And the partial is gone.
    self.assertFalse(name.startswith('.'))
    self.assertEqual(
      (len(dataset.train), len(dataset.valid), len(dataset.test)), (320, 40, 40)
    )

  def test_killed_runs_temporary_directories_are_removed(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(50), '\t'
    )
    encoded = os.path.join(self.tmp, 'cache', 'encoded')
    dead = subprocess.Popen([sys.executable, '-c', ''])
    dead.wait()
    owners = {
      '.tmp-criteo-dead': dead.pid,  # A run that was killed.
      '.tmp-criteo-alive': os.getpid(),  # A run still writing.
    }
    for name, pid in owners.items():
      os.makedirs(os.path.join(encoded, name))
      with open(os.path.join(encoded, name, 'owner.json'), 'w') as f:
        json.dump({'host': socket.gethostname(), 'pid': pid}, f)
    os.makedirs(os.path.join(encoded, '.tmp-other'))  # No owner: not ours.
    data.load_dataset(self.config('criteo', path))
    left = self.encoded()
    self.assertNotIn('.tmp-criteo-dead', left)
    self.assertIn('.tmp-criteo-alive', left)
    self.assertIn('.tmp-other', left)
    self.assertLen(left, 3)  # And the new cache, without its owner file.
    [new] = [n for n in left if not n.startswith('.')]
    self.assertFalse(os.path.exists(os.path.join(encoded, new, 'owner.json')))


class ProgressTest(DatasetTestCase):
  def test_preprocessing_off_a_terminal_logs_each_pass_as_it_goes(self):
    # A pass over the 45M lines of Criteo takes minutes: a log file (a
    # batch job, nohup) must show it moving, not only its end.
    rows = criteo_rows(400, seed=2)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    with (
      mock.patch.object(utils.ProgressBar, 'LOG_EVERY', 0.0),
      mock.patch.object(sys.stderr, 'isatty', lambda: False),
      self.assertLogs(level='INFO') as logs,
    ):
      data.load_dataset(self.config('criteo', path, chunk_rows=100))
    messages = [r.getMessage() for r in logs.records]
    for number in (1, 2):
      moving = [m for m in messages if f'pass {number}/2' in m and '%, ' in m]
      self.assertLen(moving, 4, messages)  # One a chunk here.
      self.assertIn('lines/s', moving[-1])

  def test_the_bar_draws_on_a_terminal_and_logs_elsewhere_when_due(self):
    for tty, enabled in ((True, True), (False, True), (False, False)):
      with (
        mock.patch.object(sys.stderr, 'isatty', lambda t=tty: t),
        mock.patch.object(sys.stderr, 'write') as write,
        mock.patch.object(utils.logging, 'info') as info,
      ):
        bar = utils.ProgressBar('epoch 1', 10, 'ex', enabled=enabled)
        self.assertEqual(bar.due(), tty and enabled)  # LOG_EVERY to wait.
        bar.last -= utils.ProgressBar.LOG_EVERY
        self.assertEqual(bar.due(), enabled)
        bar.update(5, 100, 'loss 0.5000')
        self.assertFalse(bar.due() and not tty)  # Logged: wait again.
      self.assertEqual(write.called, tty and enabled)
      self.assertEqual(info.called, enabled and not tty)
      if info.called:
        line = info.call_args[0][0] % info.call_args[0][1:]
        self.assertStartsWith(line, 'epoch 1: 50%, 5/10 ')
        self.assertEndsWith(line, 'ex/s loss 0.5000')

  def test_the_line_shows_scaled_amounts_the_rate_and_a_summary(self):
    now = [100.0]
    with (
      mock.patch.object(
        utils, 'time', types.SimpleNamespace(perf_counter=lambda: now[0])
      ),
      mock.patch.object(sys.stderr, 'isatty', lambda: False),
      mock.patch.object(sys.stderr, 'write') as write,
      mock.patch.object(utils.logging, 'info') as info,
    ):
      bar = utils.ProgressBar(
        'count a.txt',
        3 * 2**20,
        'lines',
        scale=2**20,
        scale_unit='MiB',
        log_summary=True,
      )
      now[0] += bar.LOG_EVERY
      bar.update(2**20, 600)
      now[0] += bar.LOG_EVERY
      bar.update(4 * 2**20, 1800)  # A file that grew as it was read.
      bar.update(4 * 2**20, 2025)  # Not due: counted, not logged.
      now[0] += 15.0
      bar.close()
    lines = [c.args[0] % c.args[1:] for c in info.call_args_list]
    self.assertEqual(
      lines,
      [
        'count a.txt: 33%, 1/3 MiB 10 lines/s',
        'count a.txt: 100%, 4/3 MiB 15 lines/s',
        'count a.txt: 2025 lines in 135.0 s (15 lines/s)',
      ],
    )
    write.assert_not_called()  # Off a terminal, nothing but the log.

  def test_the_bar_is_full_at_its_total_and_an_empty_total_draws(self):
    drawn = []
    with (
      mock.patch.object(sys.stderr, 'isatty', lambda: True),
      mock.patch.object(sys.stderr, 'write', drawn.append),
      mock.patch.object(sys.stderr, 'flush'),
    ):
      for total, done in ((10, 15), (0, 0), (10, 5)):
        bar = utils.ProgressBar('epoch 1', total, 'ex')
        bar.update(done, 0)
        bar.close()
    bars = [line.split('[')[1].split(']')[0] for line in drawn[::2]]
    self.assertEqual(bars, ['#' * 30, '.' * 30, '#' * 15 + '.' * 15])
    self.assertEqual(drawn[1::2], ['\n'] * 3)
    self.assertStartsWith(drawn[2], '\repoch 1 [')
    self.assertIn('] 0/1 0 ex/s', drawn[2])


class HostUtilsTest(DatasetTestCase):
  def test_prefetch_runs_at_most_size_items_ahead(self):
    made = []

    def numbers():
      for number in range(10):
        made.append(number)
        yield number

    items = utils.prefetch(numbers(), size=2)
    self.assertEqual(next(items), 0)
    deadline = time.monotonic() + 10
    while len(made) < 4 and time.monotonic() < deadline:
      time.sleep(0.005)
    time.sleep(0.05)
    self.assertEqual(made, [0, 1, 2, 3])  # 1 and 2 queued, 3 put next.
    self.assertEqual(list(items), list(range(1, 10)))

  def test_prefetch_closes_what_it_reads_when_the_consumer_stops(self):
    closed, made = threading.Event(), []

    def lines():  # A file that its reader's close closes.
      try:
        for number in range(100):
          made.append(number)
          yield number
      finally:
        closed.set()

    source = lines()  # Held: not closed as the last reference goes.
    items = utils.prefetch(source, size=2)
    self.assertEqual(next(items), 0)
    deadline = time.monotonic() + 10
    while len(made) < 4 and time.monotonic() < deadline:
      time.sleep(0.005)
    items.close()  # Its thread waits to put the fourth, in a full queue.
    self.assertTrue(closed.wait(5))

  def test_prefetch_raises_an_interrupt_of_the_thread_in_the_consumer(self):
    def interrupted():
      yield 1
      raise KeyboardInterrupt

    got = []

    def consume():
      try:
        got.extend(utils.prefetch(interrupted()))
      except KeyboardInterrupt:
        got.append('interrupted')

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(5)
    self.assertEqual(got, [1, 'interrupted'])

  def test_gzip_is_read_by_its_name_and_bad_bytes_as_replacements(self):
    text = b'u1,\xff\nu2,i2\n'
    plain = os.path.join(self.tmp, 'a.txt')
    with open(plain, 'wb') as f:
      f.write(text)
    packed = os.path.join(self.tmp, 'a.txt.gz')
    with gzip.open(packed, 'wb') as f:
      f.write(text)
    for path in (plain, packed):
      f, raw = utils.open_binary(path)
      with raw, f:
        self.assertEqual(f.read(), text)
        self.assertEqual(raw.tell(), os.path.getsize(path))  # Progress.
      with utils.open_text(path) as f:
        self.assertEqual(f.read(), 'u1,\ufffd\nu2,i2\n')


class MemmapTrainingTest(DatasetTestCase):
  def test_train_batches_permutation_unchanged_and_memmap_equal(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(900), '\t'
    )
    dataset = data.load_dataset(self.config('criteo', path))
    split = dataset.train
    memory = data.Split(np.array(split.ids), np.array(split.labels))
    for process in range(2):
      got = list(
        batching.train_batches(
          split, 100, seed=3, epoch=1, process_index=process, process_count=2
        )
      )
      want = list(
        batching.train_batches(
          memory, 100, seed=3, epoch=1, process_index=process, process_count=2
        )
      )
      perm = np.random.default_rng([3, 1]).permutation(len(memory))
      self.assertLen(got, len(memory) // 100)
      for step, (a, b) in enumerate(zip(got, want, strict=True)):
        rows = np.sort(perm[step * 100 : step * 100 + 100])
        rows = rows[process * 50 : process * 50 + 50]
        np.testing.assert_array_equal(a['ids'], b['ids'])
        np.testing.assert_array_equal(a['ids'], memory.ids[rows])
        np.testing.assert_array_equal(a['label'], memory.labels[rows])

  def test_memmap_training_gives_in_memory_metrics(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(2000), '\t'
    )
    config = fm.get_config('smoke')
    config.dataset = self.config('criteo', path, min_count=2)
    config.batch_size = 256
    config.progress_bar = False
    load = data.load_dataset

    def in_memory(dataset_config, check_sources=None):
      dataset = load(dataset_config, check_sources)
      splits = {
        s: data.Split(
          np.array(getattr(dataset, s).ids),
          np.array(getattr(dataset, s).labels),
        )
        for s in ('train', 'valid', 'test')
      }
      for split in splits.values():
        self.assertNotIsInstance(split.ids, np.memmap)
      return data.Dataset(
        dataset.name, dataset.field_names, dataset.field_dims, **splits
      )

    mapped = train.train_and_evaluate(config, os.path.join(self.tmp, 'a'))
    self.assertIsInstance(load(config.dataset).train.ids, np.memmap)
    with mock.patch.object(data, 'load_dataset', in_memory):
      memory = train.train_and_evaluate(config, os.path.join(self.tmp, 'b'))
    self.assertEqual(mapped, memory)
    self.assertGreater(mapped['auc'], 0.0)
    self.assertEqual(mapped['num_examples'], 200)


class BatchTest(parameterized.TestCase):
  def _split(self, n):
    ids = np.stack([np.arange(n), np.arange(n) % 3], 1).astype(np.int32)
    return data.Split(ids, (np.arange(n) % 2).astype(np.float32))

  def _warnings(self, rows, config, containing):
    """`check_splits`'s warnings that hold `containing`, of `rows` rows."""
    split = self._split(rows)
    dataset = data.Dataset('x', ('a', 'b'), (rows, 3), split, split, split)
    with self.assertLogs(level='WARNING') as logs:
      logging.warning('sentinel')
      data_checks.check_splits(dataset, config)
    said = [r.getMessage() for r in logs.records[1:]]
    return [m for m in said if containing in m]

  def test_a_batch_size_that_leaves_much_of_an_epoch_out_is_warned(self):
    config = fm.get_config()
    # 3,200 rows in batches of 2048: 1,152 (36%) out of each epoch.
    for rows, batch_size, warned in (
      (3200, 2048, '1152 of the 3200 training examples out of each epoch (36%'),
      (3200, 1024, None),  # 128 (4%).
      (2300, 1000, '300 of the 2300'),  # 13%.
      (2200, 1000, None),  # 9%: below a tenth.
    ):
      config.batch_size = batch_size
      with self.subTest(rows=rows, batch_size=batch_size):
        said = self._warnings(rows, config, ' leaves ')
        if warned is None:
          self.assertEqual(said, [])
        else:
          [message] = said
          self.assertIn(
            f'config.batch_size={batch_size} leaves {warned}', message
          )

  def test_fields_without_a_kept_value_are_named_with_the_min_count(self):
    split = self._split(3000)
    config = fm.get_config()
    config.dataset.name = 'criteo'  # min_count -1: criteo's default, 10.
    keys = np.arange(2, dtype=np.int64)
    for vocabulary, multi, named in (
      ((keys, keys), (keys,), None),
      ((keys, keys[:0]), (keys[:0],), 'b, m'),
      ((keys[:0], keys), (keys,), 'a'),
    ):
      dataset = data.Dataset(
        'x',
        ('a', 'b'),
        (3000, 3),
        split,
        split,
        split,
        vocabulary=vocabulary,
        multi_field_names=('m',),
        multi_field_dims=(3,),
        multi_vocabulary=multi,
      )
      with self.subTest(named=named):
        with self.assertLogs(level='WARNING') as logs:
          logging.warning('sentinel')
          data_checks.check_splits(dataset, config)
        said = [
          r.getMessage()
          for r in logs.records
          if 'kept no value' in r.getMessage()
        ]
        if named is None:
          self.assertEqual(said, [])
          continue
        [message] = said
        count = len(named.split(', '))
        self.assertIn(
          f'{count} of the 3 categorical fields of x kept no value, each seen'
          ' fewer than config.dataset.min_count=10 times',
          message,
        )
        self.assertIn(f'nothing ({named}). Lower', message)

  def test_a_batch_above_the_training_rows_names_what_sets_them(self):
    # With valid_path and test_path, config.dataset.split is not used.
    split = self._split(300)
    dataset = data.Dataset('x', ('a', 'b'), (300, 3), split, split, split)
    config = fm.get_config()
    config.batch_size = 512
    for valid, said in (('', 'dataset.split'), ('v.csv', 'dataset.path')):
      config.dataset.valid_path = config.dataset.test_path = valid
      with self.subTest(valid=valid):
        with self.assertRaisesRegex(
          data.DataError,
          rf'^config.batch_size=512 exceeds the 300 .*config.{said}\.$',
        ):
          data_checks.check_splits(dataset, config)

  def test_multi_pooling_on_data_without_multi_hot_fields_is_refused(self):
    # `--config.model.multi_pooling=sum` on MovieLens without side features
    # trained the same model as 'mean', silently.
    split = self._split(300)
    config = fm.get_config()
    for pooling, multi_field_dims, refused in (
      ('sum', (), True),
      ('mean', (), False),
      ('sum', (7,), False),
    ):
      dataset = data.Dataset(
        'x',
        ('a', 'b'),
        (300, 3),
        split,
        split,
        split,
        multi_field_names=('m',) * len(multi_field_dims),
        multi_field_dims=multi_field_dims,
      )
      config.model.multi_pooling = pooling
      with self.subTest(pooling=pooling, multi_field_dims=multi_field_dims):
        if refused:
          with self.assertRaisesRegex(
            data.DataError,
            r"^config.model.multi_pooling='sum' pools the lists of multi-hot"
            r' fields, and x has none here: ',
          ):
            data_checks.check_model_inputs(dataset, config)
          # A run recorded so before this check still resumes.
          data_checks.check_model_inputs(dataset, config, resuming=True)
        else:
          data_checks.check_model_inputs(dataset, config)

  def test_data_whose_every_field_is_one_id_is_refused(self):
    # --config.dataset.min_count=100000 on a 3,000-line CSV left field_dims
    # (1, 1, 1, 1, 1): the run trained to AUC 0.5, silently.
    split = self._split(300)
    config = fm.get_config()
    config.dataset.min_count = 100_000
    for field_dims, multi_field_dims, dense, refused in (
      ((1, 1), (), (), True),
      ((1, 1), (1,), (), True),
      ((1, 2), (), (), False),  # One field keeps a value.
      ((1, 1), (3,), (), False),  # A multi-hot one does.
      ((1, 1), (), ('price',), False),  # A numeric field is not counted.
    ):
      dataset = data.Dataset(
        'x',
        ('a', 'b'),
        field_dims,
        split,
        split,
        split,
        multi_field_names=('m',) * len(multi_field_dims),
        multi_field_dims=multi_field_dims,
        dense_names=dense,
      )
      with self.subTest(field_dims=field_dims, multi=multi_field_dims):
        if refused:
          with self.assertRaisesRegex(
            data.DataError,
            r'^Every field of x holds one id, the out-of-vocabulary one, in'
            r' every row: no value is seen config.dataset.min_count=100000'
            r' times in the training file, .* Lower config.dataset.min_count.$',
          ):
            data_checks.check_model_inputs(dataset, config)
        else:
          data_checks.check_model_inputs(dataset, config)

  def test_the_left_out_rows_of_an_unshuffled_epoch_are_said_never_trained(
    self,
  ):
    # config.shuffle=False reads the split in stored order: the remainder is
    # the same last rows every epoch, not rows drawn anew.
    config = fm.get_config()
    config.batch_size = 2048
    for shuffle, said in ((True, 'drawn anew'), (False, 'never trained on')):
      config.shuffle = shuffle
      with self.subTest(shuffle=shuffle):
        [message] = self._warnings(3200, config, ' leaves ')
        self.assertIn(said, message)
    split = self._split(3200)
    rows = batching.train_rows(split, 2048, seed=0, epoch=0, shuffle=False)
    self.assertEqual(np.concatenate(list(rows)).max(), 2047)

  def test_an_epoch_of_few_steps_is_warned_with_a_batch_size_that_makes_more(
    self,
  ):
    # The Avazu sample's 8,087 lines in batches of 2048 made 3 steps an
    # epoch, and early stopping ended LR after 9 steps at 0.57 test AUC
    # (0.74 in batches of 256).
    config = fm.get_config()
    for rows, batch_size, warned in (
      (8087, 2048, 'makes 3 training steps an epoch of the 8087 examples'),
      (8087, 1024, 'makes 7 training steps'),
      (8087, 800, None),  # 10 steps.
      (20, 4, 'config.batch_size=1 makes 20.'),  # A batch of one at least.
      (20, 16, 'makes 1 training step an epoch of the 20'),  # Not 'steps'.
    ):
      config.batch_size = batch_size
      with self.subTest(rows=rows, batch_size=batch_size):
        said = self._warnings(rows, config, ' training step')
        if warned is None:
          self.assertEqual(said, [])
          continue
        [message] = said
        self.assertIn(warned, message)
        if rows == 8087:
          self.assertIn('config.batch_size=256 makes 31.', message)

  @parameterized.parameters(7, 8, 9, 16, 17)
  def test_train_batches_drop_remainder_and_processes_partition(self, n):
    split = self._split(n)
    whole = list(batching.train_batches(split, 4, seed=3, epoch=1))
    self.assertLen(whole, n // 4)
    seen = np.concatenate([b['ids'][:, 0] for b in whole])
    self.assertLen(np.unique(seen), len(seen))  # No row twice in an epoch.
    parts = [
      list(
        batching.train_batches(
          split, 4, seed=3, epoch=1, process_index=p, process_count=2
        )
      )
      for p in range(2)
    ]
    # Process p takes the rows that one process's device p of 2 takes, so
    # that each device's dropout key masks the same examples either way.
    for step, batch in enumerate(whole):
      union = np.concatenate([parts[0][step]['ids'], parts[1][step]['ids']])
      np.testing.assert_array_equal(union, batch['ids'])
    # Another epoch, another order; the same epoch, the same order.
    other = list(batching.train_batches(split, 4, seed=3, epoch=2))
    again = list(batching.train_batches(split, 4, seed=3, epoch=1))
    np.testing.assert_array_equal(whole[0]['ids'], again[0]['ids'])
    if n >= 16:
      self.assertFalse(
        all(
          np.array_equal(a['ids'], b['ids'])
          for a, b in zip(whole, other, strict=True)
        )
      )

  def test_without_shuffle_every_epoch_reads_the_stored_order(self):
    # pytorch-fm's DataLoader: batch i holds rows [i * B, (i + 1) * B) of
    # the split in every epoch, the remainder dropped; processes split it.
    split = self._split(11)
    for epoch in (0, 1, 5):
      batches = list(
        batching.train_rows(split, 4, seed=3, epoch=epoch, shuffle=False)
      )
      np.testing.assert_array_equal(batches, [[0, 1, 2, 3], [4, 5, 6, 7]])
      halves = [
        list(
          batching.train_rows(
            split,
            4,
            seed=3,
            epoch=epoch,
            shuffle=False,
            process_index=p,
            process_count=2,
          )
        )
        for p in range(2)
      ]
      np.testing.assert_array_equal(halves[0], [[0, 1], [4, 5]])
      np.testing.assert_array_equal(halves[1], [[2, 3], [6, 7]])
    shuffled = list(batching.train_rows(split, 4, seed=3, epoch=0))
    self.assertFalse(np.array_equal(shuffled, batches))

  @parameterized.parameters(
    (7, 1), (7, 2), (8, 2), (9, 2), (3, 4), (17, 3), (0, 2)
  )
  def test_eval_batches_cover_every_row_once_with_a_mask(self, n, processes):
    split = self._split(n)
    per_process = [
      list(
        batching.eval_batches(
          split, 4 * processes, process_index=p, process_count=processes
        )
      )
      for p in range(processes)
    ]
    self.assertLen({len(b) for b in per_process}, 1)  # Same batch count.
    rows = []
    for batches in per_process:
      for b in batches:
        self.assertEqual(b['ids'].shape, (4, 2))
        rows.extend(b['ids'][b['mask'] == 1, 0])
        self.assertTrue(np.all(b['label'][b['mask'] == 0] == 0))
    self.assertEqual(sorted(rows), list(range(n)))
    # As many batches as the longest slice needs, and at least one: an empty
    # split is one masked batch, not none (which `evaluate` cannot score).
    longest = max(-(-n // processes), 1)
    self.assertLen(per_process[0], -(-longest // 4))

  def test_eval_batches_keep_the_rows_in_order_and_pad_as_documented(self):
    # 6 rows in batches of 4: the second batch holds rows 4, 5, then two
    # padding rows of zero ids, empty lists (-1), zero dense and labels.
    n = 6
    ids = np.stack([np.arange(n) + 1, np.arange(n) + 7], 1).astype(np.int32)
    multi = np.arange(n * 2 * 3, dtype=np.int32).reshape(n, 2, 3)
    dense = np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 1
    labels = np.array([1, 0, 1, 1, 0, 1], np.float32)
    split = data.Split(ids, labels, multi_ids=multi, dense=dense)
    batches = list(batching.eval_batches(split, 4))
    self.assertLen(batches, 2)
    np.testing.assert_array_equal(batches[0]['ids'], ids[:4])
    np.testing.assert_array_equal(batches[1]['ids'], [*ids[4:], [0, 0], [0, 0]])
    np.testing.assert_array_equal(batches[1]['multi_ids'][:2], multi[4:])
    np.testing.assert_array_equal(batches[1]['multi_ids'][2:], -1)
    np.testing.assert_array_equal(batches[1]['dense'][:2], dense[4:])
    np.testing.assert_array_equal(batches[1]['dense'][2:], 0)
    np.testing.assert_array_equal(batches[1]['label'], [0, 1, 0, 0])
    np.testing.assert_array_equal(batches[1]['mask'], [1, 1, 0, 0])
    self.assertEqual(batches[1]['multi_ids'].dtype, np.int32)
    self.assertEqual(batches[1]['dense'].dtype, np.float32)

  def test_shard_gives_each_device_a_contiguous_block(self):
    # `evaluate` reads the logits back device after device against the
    # unsharded labels: device d must hold rows [d*B/D, (d+1)*B/D).
    batch = {'ids': np.arange(12, dtype=np.int32).reshape(6, 2)}
    np.testing.assert_array_equal(
      batching.shard(batch, 2)['ids'],
      [[[0, 1], [2, 3], [4, 5]], [[6, 7], [8, 9], [10, 11]]],
    )

  def test_stack_batches_pads_a_short_stack_with_zero_batches(self):
    batches = [{'label': np.full(4, i + 1.0)} for i in range(3)]
    stacks = list(batching.stack_batches(iter(batches), [1, 2], 2))
    np.testing.assert_array_equal(
      stacks[0]['label'], [[[1, 1], [0, 0]], [[1, 1], [0, 0]]]
    )
    np.testing.assert_array_equal(
      stacks[1]['label'], [[[2, 2], [3, 3]], [[2, 2], [3, 3]]]
    )

  def test_batch_sizes_must_split_over_processes(self):
    batching.check_batch_size(8, 4, 'config.batch_size', 'devices')
    for size in (6, 0, -4):
      with self.assertRaisesRegex(
        data.DataError, rf'config.batch_size={size} .* of devices \(4\)'
      ):
        batching.check_batch_size(size, 4, 'config.batch_size', 'devices')
    split = self._split(16)
    with self.assertRaisesRegex(data.DataError, 'config.batch_size=5'):
      next(batching.train_batches(split, 5, seed=0, epoch=0, process_count=2))
    with self.assertRaisesRegex(data.DataError, 'config.eval_batch_size=5'):
      next(batching.eval_batches(split, 5, process_count=2))

  def test_shard_reshapes_and_rejects_uneven_batches(self):
    batch = {'ids': np.zeros((6, 2), np.int32), 'label': np.zeros(6)}
    self.assertEqual(batching.shard(batch, 2)['ids'].shape, (2, 3, 2))
    with self.assertRaisesRegex(data.DataError, 'batch_size'):
      batching.shard(batch, 4)


if __name__ == '__main__':
  absltest.main()
