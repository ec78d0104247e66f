"""Faults injected into whole runs: each ends in bounded time with a clear
status and message, and what was saved stays usable.

In-process runs damage checkpoints and splits; `python main.py`
subprocesses (every one bounded by `TIMEOUT`) meet a full disk, a directory
that turns read-only, a failing background thread, a thread that never
ends, bad configs and workdirs; and a stress test SIGKILLs runs at random
moments of every phase and checks that the restarts end with the
uninterrupted run's metrics.
"""

import asyncio
from concurrent import futures
import errno
import json
import logging as std_logging
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import unittest
from unittest import mock

from absl import logging
from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import orbax.checkpoint as ocp
import script_runs
import tensorstore

import best_reader
import checkpoints
from configs import fm
from datasets import csv
import encoder
import lock
import metrics
import orbax_logs
import sources
import step_files
import train
import utils
import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # Seconds any subprocess may take; none should come near it.


def _write_csv(path, n, seed, positive_rate=None):
  """A CTR file: three categorical fields and a label that depends on them."""
  rng = np.random.default_rng(seed)
  user, item, ctx = (rng.integers(0, d, n) for d in (50, 40, 5))
  logit = np.sin(user) + np.cos(item * 0.7) + 0.3 * ctx - 0.6
  if positive_rate is None:
    label = rng.random(n) < 1 / (1 + np.exp(-2 * logit))
  else:
    label = rng.random(n) < positive_rate
  with open(path, 'w') as f:
    f.write('user,item,ctx,label\n')
    for row in zip(user, item, ctx, label.astype(int), strict=True):
      f.write('u{},i{},c{},{}\n'.format(*row))
  return path


# The run of every test: 3 epochs of 50 steps on 3200 training examples.
SETTINGS = {
  'dataset.name': 'csv',
  'dataset.csv.label_column': 'label',
  'model.embed_dim': 4,
  'batch_size': 64,
  'eval_batch_size': 256,
  'num_epochs': 3,
  'patience': 10,
  'progress_bar': False,
}


def _config(data_dir, **overrides):
  config = fm.get_config('smoke')
  settings = {
    **SETTINGS,
    'dataset.path': os.path.join(data_dir, 'clicks.csv'),
    'dataset.cache_dir': os.path.join(data_dir, 'cache'),
    **overrides,
  }
  for key, value in settings.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def _flags(workdir, data_dir, **overrides):
  settings = {
    **SETTINGS,
    'dataset.path': os.path.join(data_dir, 'clicks.csv'),
    'dataset.cache_dir': os.path.join(data_dir, 'cache'),
    **overrides,
  }
  return [
    'main.py',
    '--config=configs/fm.py:smoke',
    f'--workdir={workdir}',
    *(f'--config.{k}={v}' for k, v in settings.items()),
  ]


def _metrics(workdir):
  """metrics.jsonl without what depends on the clock."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  for record in records:
    record.pop('wall_time')
    record.pop('time')
    record.pop('examples_per_sec', None)
  return records


class _Case(parameterized.TestCase):
  def assertSameMetrics(self, got, want):
    def keys(records):
      return [
        (r['split'], r['epoch'], r['step'], r.get('num_examples'))
        for r in records
      ]

    self.assertEqual(keys(got), keys(want))
    for a, b in zip(got, want, strict=True):
      for key in ('loss', 'auc', 'logloss'):
        if key in b:
          self.assertAlmostEqual(a[key], b[key], delta=1e-6, msg=(a, b))


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


def _files(directory):
  """`{path: bytes}` of the files under `directory` but the lock's."""
  return {
    os.path.relpath(os.path.join(root, name), directory): _read(
      os.path.join(root, name)
    )
    for root, _, names in os.walk(directory)
    for name in names
    if name != workdir_lib.LOCK_FILE
  }


def _largest_file(directory):
  files = [
    os.path.join(root, name)
    for root, _, names in os.walk(directory)
    for name in names
    if name != step_files.CHECKSUMS
  ]
  return max(files, key=os.path.getsize)


def _corrupt(step_dir, how):
  path = _largest_file(os.path.join(step_dir, 'state'))
  with open(path, 'rb') as f:
    raw = bytearray(f.read())
  if how == 'truncate':
    raw = raw[: len(raw) // 2]
  else:  # One flipped bit: orbax itself reads the file without complaint.
    raw[len(raw) // 2] ^= 0x01
  with open(path, 'wb') as f:
    f.write(bytes(raw))


def _age(path):
  """Dates `path` and everything under it to 1970: what a killed run left."""
  for root, _, files in os.walk(path):
    for name in [root, *(os.path.join(root, f) for f in files)]:
      os.utime(name, (1, 1))


class CheckpointPolicyTest(absltest.TestCase):
  """Checkpoints on a small pytree, without training."""

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()
    # As a training run does: best_reader waits for a best that a run
    # replaces only while a run may hold the workdir.
    self.enter_context(lock.acquire(self.workdir))
    self.ckpt = checkpoints.Checkpoints(self.workdir)

  def tearDown(self):
    self.ckpt.close()
    super().tearDown()

  def _state(self, epoch):
    return {'w': np.arange(4, dtype=np.float32) + epoch}

  def _meta(self, epoch, best_epoch):
    return {'epoch': epoch, 'best_epoch': best_epoch, 'best_auc': 0.7}

  def test_run_meta_records_the_device_count_and_old_metas_resume_silently(
    self,
  ):
    devices = jax.device_count()
    new = checkpoints.run_meta(None, self.workdir)
    self.assertEqual(new['num_devices'], devices)
    self.assertEqual((new['epoch'], new['best_auc']), (0, -1.0))
    # Saved and restored as the run's meta.
    self.ckpt.save_latest(1, self._state(1), dict(new, epoch=1, best_epoch=1))
    _, saved = self.ckpt.restore_latest(None)
    self.assertEqual(saved['num_devices'], devices)
    old = self._meta(1, 1)  # Saved before the count was recorded.
    for meta in (saved, old):
      with self.assertNoLogs('absl', 'WARNING'):
        resumed = checkpoints.run_meta(meta, self.workdir)
      self.assertEqual(resumed, dict(meta, num_devices=devices))
    with self.assertLogs('absl', 'WARNING') as logs:
      resumed = checkpoints.run_meta(dict(old, num_devices=3), self.workdir)
    self.assertEqual(resumed['num_devices'], devices)
    self.assertLen(logs.output, 1)
    self.assertIn(
      f'Resuming on {devices} devices a run saved on 3', logs.output[0]
    )

  def test_a_checkpoint_directory_that_cannot_be_made_is_refused_at_once(self):
    # Before the first epoch, as one UserError: orbax's own refusal came
    # from a thread, with its traceback, at the end of epoch 1.
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    os.makedirs(os.path.join(workdir, 'checkpoints'))
    open(os.path.join(workdir, 'checkpoints', 'best'), 'w').close()
    closed = []
    close = ocp.CheckpointManager.close

    def closing(mgr):
      closed.append(os.path.basename(str(mgr.directory)))
      close(mgr)

    with (
      mock.patch.object(ocp.CheckpointManager, 'close', closing),
      self.assertRaisesRegex(
        utils.UserError, r'Cannot write checkpoints in .*checkpoints/best'
      ),
    ):
      checkpoints.Checkpoints(workdir)
    self.assertEqual(closed, ['latest'])  # Opened first, closed on the way.

  def test_what_a_killed_save_left_is_gone_when_the_managers_open(self):
    # orbax deletes it on a thread that nothing waited for: a run that
    # stopped at once printed the thread's traceback as Python exited.
    from orbax.checkpoint._src.path import temporary_paths

    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    left = os.path.join(
      workdir, 'checkpoints', 'latest', '3' + step_files.SAVING
    )
    os.makedirs(left)
    cleanup = temporary_paths.cleanup_temporary_paths

    async def slow_cleanup(*args, **kwargs):  # A slow disk.
      await asyncio.sleep(0.5)
      return await cleanup(*args, **kwargs)

    with mock.patch.object(
      temporary_paths, 'cleanup_temporary_paths', slow_cleanup
    ):
      checkpoints.Checkpoints(workdir).close()
    self.assertFalse(os.path.exists(left))

  def test_latest_keeps_the_last_two_and_the_best(self):
    for epoch in range(1, 6):
      self.ckpt.save_latest(epoch, self._state(epoch), self._meta(epoch, 2))
    self.assertEqual(self.ckpt.latest.all_steps(), [2, 4, 5])
    for epoch in (6, 7):
      self.ckpt.save_latest(epoch, self._state(epoch), self._meta(epoch, 7))
    self.assertEqual(self.ckpt.latest.all_steps(), [6, 7])
    state, meta = self.ckpt.restore_latest(None)
    np.testing.assert_array_equal(state['w'], self._state(7)['w'])
    self.assertEqual(meta['epoch'], 7)

  def test_best_keeps_one_and_every_step_records_its_checksums(self):
    for epoch in (1, 3):
      self.ckpt.save_best(epoch, self._state(epoch), self._meta(epoch, epoch))
    self.assertEqual(self.ckpt.best.all_steps(), [3])
    step_dir = os.path.join(self.workdir, 'checkpoints', 'best', '3')
    with open(os.path.join(step_dir, step_files.CHECKSUMS)) as f:
      recorded = json.load(f)['files']
    self.assertEqual(recorded, step_files.checksums(step_dir))
    self.assertIn('_CHECKPOINT_METADATA', recorded)
    self.assertIsNone(step_files.damage(step_dir))

  def test_an_epochs_latest_state_copies_its_best_files(self):
    # Orbax writes a state in about 50 ms however small; an improving
    # epoch's best and latest hold the same state and meta.
    saves, save = [], ocp.CheckpointManager.save

    def counting(mgr, step, *args, **kwargs):
      saves.append(os.path.basename(str(mgr.directory)))
      return save(mgr, step, *args, **kwargs)

    with mock.patch.object(ocp.CheckpointManager, 'save', counting):
      for epoch in (1, 5):  # Copied: the same state and meta.
        state, meta = self._state(epoch), self._meta(epoch, epoch)
        self.ckpt.save_best(epoch, state, meta)
        self.ckpt.save_latest(epoch, state, meta)
        if epoch == 1:  # Written: not the best, another state, other meta.
          self.ckpt.save_latest(2, self._state(2), self._meta(2, 1))
          self.ckpt.save_best(3, self._state(3), self._meta(3, 3))
          self.ckpt.save_latest(3, self._state(3), self._meta(3, 3))
          self.ckpt.save_best(4, state, self._meta(4, 4))
          self.ckpt.save_latest(4, state, dict(self._meta(4, 4), wall=1))
    self.assertEqual(saves, ['best', 'latest'] * 3 + ['best'])
    self.assertEqual(self.ckpt.latest.all_steps(), [4, 5])  # orbax sees 5.
    best = os.path.join(self.workdir, 'checkpoints', 'best', '5')
    copy = os.path.join(self.workdir, 'checkpoints', 'latest', '5')
    self.assertEqual(step_files.checksums(copy), step_files.checksums(best))
    _corrupt(best, 'flip')  # In place: the copy shares no file with it.
    self.assertIsNone(step_files.damage(copy))
    state, meta = self.ckpt.restore_latest(None)
    np.testing.assert_array_equal(state['w'], self._state(5)['w'])
    self.assertEqual(meta, self._meta(5, 5))
    with mock.patch.object(step_files, 'damage', lambda path: 'bad bytes'):
      with self.assertRaisesRegex(ValueError, 'copy of .* damaged: bad bytes'):
        step_files.copy_step(copy, copy + '-again')
    self.assertEqual(sorted(os.listdir(os.path.dirname(copy))), ['4', '5'])

  def test_a_step_without_checksums_is_not_copied(self):
    # A run killed between a step's save and its checksums left one: a copy
    # could not be checked, and would then be trusted as complete.
    self.ckpt.save_best(3, self._state(3), self._meta(3, 3))
    source = os.path.join(self.workdir, 'checkpoints', 'best', '3')
    os.remove(os.path.join(source, step_files.CHECKSUMS))
    target = os.path.join(self.workdir, 'copy')
    with self.assertRaisesRegex(ValueError, 'has no checksums.json'):
      step_files.copy_step(source, target)
    self.assertEqual(
      sorted(os.listdir(self.workdir)), ['checkpoints', lock.LOCK_FILE]
    )

  def test_a_full_disk_stops_the_copy_of_the_best_at_its_first_file(self):
    # Named as a refused orbax write is, not as a list of every file's
    # error (shutil.copytree's), and no partial step is left.
    state, meta = self._state(1), self._meta(1, 1)
    self.ckpt.save_best(1, state, meta)
    refused = []

    def full(source, target):
      refused.append(target)
      raise _no_space(target)

    with (
      mock.patch.object(step_files.shutil, 'copyfile', full),
      self.assertRaisesRegex(
        utils.UserError,
        r'^Cannot save the checkpoint of epoch 1 in \S+/latest: No space left'
        r' on device \(ENOSPC, \S+\)\. Free space',
      ),
    ):
      self.ckpt.save_latest(1, state, meta)
    self.assertLen(refused, 1)
    latest = os.path.join(self.workdir, 'checkpoints', 'latest')
    self.assertEqual(os.listdir(latest), [])

  def test_a_best_recovered_from_latest_is_saved_with_its_epochs_meta(self):
    self.ckpt.save_best(2, self._state(2), self._meta(2, 2))
    for epoch in (2, 3):
      self.ckpt.save_latest(epoch, self._state(epoch), self._meta(epoch, 2))
    shutil.rmtree(os.path.join(self.workdir, 'checkpoints', 'best', '2'))
    with self.assertLogs(level='WARNING'):
      state = self.ckpt.restore_best(self._meta(3, 2), None)
    np.testing.assert_array_equal(state['w'], self._state(2)['w'])
    # As the lost one was saved: epoch 2's, not the epoch that recovers it.
    state, meta = best_reader.load_best(self.workdir)
    np.testing.assert_array_equal(state['w'], self._state(2)['w'])
    self.assertEqual(meta, self._meta(2, 2))

  def test_a_step_another_process_cannot_read_is_read_by_none(self):
    self.ckpt.save_latest(1, self._state(1), self._meta(1, 1))
    with (
      mock.patch.object(
        checkpoints.multihost, 'allgather', lambda x: np.array([x, 1])
      ),
      self.assertRaisesRegex(ValueError, '^another process could not read'),
    ):
      checkpoints.restore(self.ckpt.latest, 1)

  def test_a_process_other_than_0_neither_makes_nor_cleans_the_steps(self):
    # What process 0 is writing may be a temporary step of its save.
    directory = os.path.join(self.workdir, 'other')
    saving = os.path.join(directory, '3' + step_files.SAVING)
    os.makedirs(saving)
    with (
      mock.patch.object(checkpoints.jax, 'process_count', lambda: 2),
      mock.patch.object(checkpoints.jax, 'process_index', lambda: 1),
    ):
      checkpoints.manager(directory).close()
      checkpoints.manager(os.path.join(self.workdir, 'none')).close()
    self.assertTrue(os.path.isdir(saving))
    self.assertEqual(
      sorted(os.listdir(self.workdir)), ['checkpoints', 'other', lock.LOCK_FILE]
    )

  def test_a_lost_best_is_named_with_its_epoch(self):
    self.ckpt.save_latest(3, self._state(3), self._meta(3, 1))
    with self.assertRaisesRegex(
      utils.UserError,
      r'best checkpoint, of epoch 1 \(validation AUC 0.70000\), is lost:'
      r' .*best/1 does not exist; .*latest/1 does not exist',
    ):
      self.ckpt.restore_best(self._meta(3, 1), None)

  def _read_again_with_stat(self, stat, during):
    """load_best cut by `during` (epoch 4's step replaced by epoch 5's),
    with best_reader's `os.stat` replaced by `stat`: it reads the step
    again and returns epoch 5's state."""
    files = types.SimpleNamespace(**vars(os))
    files.stat = stat
    with mock.patch.object(best_reader, 'os', files):
      state, _, calls = self._load_best_cut(
        during, ValueError('FAILED_PRECONDITION: Error reading')
      )
    self.assertEqual(calls, [4, 4])
    np.testing.assert_array_equal(state['w'], self._state(5)['w'])

  def _load_best_refused(self, error, message):
    """`load_best` whose one read fails with `error`: a UserError matching
    `message`, and no second read."""
    with (
      mock.patch.object(checkpoints, 'restore', side_effect=error) as read,
      self.assertRaisesRegex(utils.UserError, message),
    ):
      best_reader.load_best(self.workdir)
    self.assertEqual(read.call_count, 1)

  def _load_best_cut(self, during, error):
    """`load_best` whose first read meets `during()` (the run saving its
    best) and fails with `error`: the state and meta, and the steps read."""
    real, calls = checkpoints.restore, []

    def restore(mgr, step, target=None):
      calls.append(step)
      if len(calls) == 1:
        during()
        raise error
      return real(mgr, step, target)

    with mock.patch.object(checkpoints, 'restore', restore):
      state, meta = best_reader.load_best(self.workdir)
    return state, meta, calls

  def test_a_best_replaced_while_another_process_reads_it(self):
    # predict.py or init_from on a run still training: its new best deletes
    # the step being read, which read as damaged.
    self.ckpt.save_best(3, self._state(3), self._meta(3, 3))
    state, meta, calls = self._load_best_cut(  # Epoch 4's best as we read 3.
      lambda: self.ckpt.save_best(4, self._state(4), self._meta(4, 4)),
      ValueError('NOT_FOUND: Error opening "zarr" driver'),
    )
    self.assertEqual((calls, meta['epoch']), ([3, 4], 4))
    np.testing.assert_array_equal(state['w'], self._state(4)['w'])

    # A resumed run redoes its best epoch: the same step, saved again.
    def save_again():
      self.ckpt.best.delete(4)
      self.ckpt.save_best(4, self._state(5), self._meta(4, 4))

    state, _, calls = self._load_best_cut(
      save_again, ValueError('KeyError: \'Item "meta" was not found\'')
    )
    self.assertEqual(calls, [4, 4])
    np.testing.assert_array_equal(state['w'], self._state(5)['w'])
    # Listed while the run swapped its best: no step seen, then the new one.
    latest_step = checkpoints.ocp.CheckpointManager.latest_step
    answers = iter([None])
    with mock.patch.object(
      checkpoints.ocp.CheckpointManager,
      'latest_step',
      lambda mgr: next(answers, latest_step(mgr)),
    ):
      self.assertEqual(best_reader.load_best(self.workdir)[1]['epoch'], 4)
    # Damage that no newer step, nor a change of late, explains is named,
    # once.
    _age(os.path.join(self.workdir, 'checkpoints', 'best', '4'))
    self._load_best_refused(
      ValueError('bad bytes'),
      r'best checkpoint \S+/best/4 is damaged: bad bytes\. Run training'
      r' again in \S+ with its config',
    )

  def test_a_read_cut_by_a_new_best_drops_its_late_reports(self):
    # tensorstore's failed reads of the step replaced are logged by asyncio
    # as they are collected, a traceback each, after the new one was read.
    self.ckpt.save_best(3, self._state(3), self._meta(3, 3))
    best = os.path.join(self.workdir, 'checkpoints', 'best')
    asyncio_logger = std_logging.getLogger('asyncio')

    def kept():
      error = OSError(f'reading {best}/3/state/d/0 failed')
      return asyncio_logger.filter(
        asyncio_logger.makeRecord(
          'asyncio', 40, 'x.py', 1, 'x', (), (OSError, error, None)
        )
      )

    self.assertTrue(kept())
    _, meta, _ = self._load_best_cut(
      lambda: self.ckpt.save_best(4, self._state(4), self._meta(4, 4)),
      ValueError('NOT_FOUND: Error opening "zarr" driver'),
    )
    self.assertEqual(meta['epoch'], 4)
    self.assertFalse(kept())

  def test_a_best_read_as_a_newer_one_is_saved_before_it_goes(self):
    # The run saves its new best, then deletes the one being read: a read
    # that failed in between, the old step still there as it was, reads
    # the new one.
    self.ckpt.save_best(3, self._state(3), self._meta(3, 3))
    _age(os.path.join(self.workdir, 'checkpoints', 'best'))

    def save_newer():
      checkpoints.save(self.ckpt.best, 4, self._state(4), self._meta(4, 4), set)

    state, meta, calls = self._load_best_cut(
      save_newer, ValueError('NOT_FOUND: Error opening "zarr" driver')
    )
    self.assertEqual((calls, meta['epoch']), ([3, 4], 4))
    np.testing.assert_array_equal(state['w'], self._state(4)['w'])

  def test_a_best_saved_again_long_before_a_slow_read_failed(self):
    # A read of a large state outlasts STALE_S: the step it read was saved
    # again (a resumed run) long before; its files are old, but not its own.
    self.ckpt.save_best(4, self._state(4), self._meta(4, 4))
    best = os.path.join(self.workdir, 'checkpoints', 'best')

    def save_again_long_ago():
      self.ckpt.best.delete(4)
      self.ckpt.save_best(4, self._state(5), self._meta(4, 4))
      _age(best)

    state, _, calls = self._load_best_cut(
      save_again_long_ago, ValueError('FAILED_PRECONDITION: Error reading')
    )
    self.assertEqual(calls, [4, 4])
    np.testing.assert_array_equal(state['w'], self._state(5)['w'])

  def test_a_best_saved_again_differs_by_its_inode_or_its_change_time(self):
    # The new directory may reuse the inode of the one deleted before it,
    # or be made within the tick of a coarse clock: either tells it apart.
    best = os.path.join(self.workdir, 'checkpoints', 'best')
    step = os.path.join(best, '4')
    for field in ('st_ctime_ns', 'st_ino'):
      self.ckpt.save_best(4, self._state(4), self._meta(4, 4))
      saves = [0]

      def stat(path, field=field, saves=saves):
        info = os.stat(path)
        if path != step:
          return info
        identity = {'st_ino': 7, 'st_ctime_ns': 7}
        identity[field] += saves[0]
        return types.SimpleNamespace(st_mtime=info.st_mtime, **identity)

      def save_again(saves=saves):
        self.ckpt.best.delete(4)
        self.ckpt.save_best(4, self._state(5), self._meta(4, 4))
        _age(best)
        saves[0] += 1

      self._read_again_with_stat(stat, save_again)

  def test_a_best_step_gone_between_its_listing_and_its_stat(self):
    # The run deletes the step being read just after the reader listed it:
    # its stat finds nothing, which is a step replaced, not an error.
    self.ckpt.save_best(4, self._state(4), self._meta(4, 4))
    best = os.path.join(self.workdir, 'checkpoints', 'best')
    step = os.path.join(best, '4')
    stats = []

    def stat(path):
      if path == step:
        stats.append(path)
        if len(stats) == 2:  # The check after the failed read.
          raise FileNotFoundError(2, 'No such file or directory', path)
      return os.stat(path)

    def save_again():
      self.ckpt.best.delete(4)
      self.ckpt.save_best(4, self._state(5), self._meta(4, 4))
      _age(best)

    self._read_again_with_stat(stat, save_again)
    self.assertLen(stats, 3)  # Read, the check that failed, read again.

  def test_a_best_deleted_and_saved_again_while_another_process_reads_it(self):
    # A resumed run redoing its best epoch deletes the step, then writes it:
    # a reader in between found no step, and called the best lost.
    self.ckpt.save_best(4, self._state(4), self._meta(4, 4))
    best = os.path.join(self.workdir, 'checkpoints', 'best')
    saving = os.path.join(best, '4' + best_reader.SAVING)

    def finish():
      time.sleep(0.3)
      os.rmdir(saving)
      self.ckpt.save_best(4, self._state(5), self._meta(4, 4))

    def delete_then_save():
      self.ckpt.best.delete(4)
      os.makedirs(saving)
      threading.Thread(target=finish).start()

    state, meta, calls = self._load_best_cut(
      delete_then_save,
      ValueError('FAILED_PRECONDITION: Error reading "w/0.0"'),
    )
    self.assertEqual((calls, meta['epoch']), ([4, 4], 4))
    np.testing.assert_array_equal(state['w'], self._state(5)['w'])
    # What a run killed while saving left is not waited for.
    self.ckpt.best.delete(4)
    os.makedirs(os.path.join(saving, 'state'))
    _age(best)
    with (
      mock.patch.object(best_reader.time, 'sleep') as slept,
      self.assertRaisesRegex(utils.UserError, 'No best checkpoint in'),
    ):
      best_reader.load_best(self.workdir)
    slept.assert_not_called()

  def test_a_best_whose_save_began_long_ago_is_waited_for(self):
    # A large state takes longer than STALE_S to write: the directory of
    # steps changed long ago, the files of the step being saved just now.
    self.ckpt.save_best(4, self._state(4), self._meta(4, 4))
    best = os.path.join(self.workdir, 'checkpoints', 'best')
    saving = os.path.join(best, '4' + best_reader.SAVING)

    def delete_then_save():
      self.ckpt.best.delete(4)
      os.makedirs(saving)
      _age(best)
      with open(os.path.join(saving, 'part'), 'w') as f:
        f.write('being written')

      def finish():
        time.sleep(0.3)
        shutil.rmtree(saving)
        self.ckpt.save_best(4, self._state(5), self._meta(4, 4))

      threading.Thread(target=finish).start()

    state, _, calls = self._load_best_cut(
      delete_then_save, ValueError('FAILED_PRECONDITION: Error reading')
    )
    self.assertEqual(calls, [4, 4])
    np.testing.assert_array_equal(state['w'], self._state(5)['w'])

  def test_a_best_written_in_place_or_renamed_as_it_is_seen_is_waited_for(
    self,
  ):
    # The step being saved changes in its files alone (written in place),
    # or orbax renames it into place as its files are looked at.
    best = os.path.join(self.workdir, 'checkpoints', 'best')
    saving = os.path.join(best, '4' + best_reader.SAVING)
    part = os.path.join(saving, 'state', 'part')
    for how in ('written', 'renamed'):
      self.ckpt.save_best(4, self._state(4), self._meta(4, 4))

      def finish():
        shutil.rmtree(saving)
        self.ckpt.save_best(4, self._state(5), self._meta(4, 4))

      def stat(path, how=how):
        if how == 'renamed' and path == part and os.path.exists(saving):
          finish()
        return os.stat(path)

      def delete_then_save(how=how):
        self.ckpt.best.delete(4)
        os.makedirs(os.path.dirname(part))
        with open(part, 'w') as f:
          f.write('being written')
        _age(best)
        if how == 'written':
          os.utime(part)
          threading.Timer(0.3, finish).start()

      self._read_again_with_stat(stat, delete_then_save)

  def test_a_best_read_as_a_resumed_run_deletes_and_saves_it_again(self):
    # The run deletes the step, then creates its temporary directory (14 ms
    # later with 2 processes, whose save starts with a barrier): a reader
    # that listed no step in between called the best lost, and one that read
    # as the step's files went (its directory still there) called it damaged.
    self.ckpt.save_best(4, self._state(4), self._meta(4, 4))
    best = os.path.join(self.workdir, 'checkpoints', 'best')
    begin = {
      5: lambda: self.ckpt.best.delete(4),
      6: lambda: shutil.rmtree(os.path.join(best, '4', 'meta')),
    }
    for epoch, deleting in begin.items():
      deleting()

      def save_again(epoch=epoch):
        time.sleep(0.3)
        self.ckpt.save_best(4, self._state(epoch), self._meta(4, 4))

      saving = threading.Thread(target=save_again)
      saving.start()
      try:
        with self.assertLogs(level='INFO') as logs:  # Said, once.
          state, meta = best_reader.load_best(self.workdir)
      finally:
        saving.join()
      waiting = [line for line in logs.output if 'A run is saving' in line]
      self.assertLen(waiting, 1)
      self.assertEqual(meta['epoch'], 4)
      np.testing.assert_array_equal(state['w'], self._state(epoch)['w'])

  def _copy_of_this_run(self, record):
    """A copy (`cp -r`) of this workdir whose lock file holds `record`
    (None: no lock file), its files all changed just now."""
    copy = os.path.join(tempfile.mkdtemp(), 'copy')
    self.addCleanup(shutil.rmtree, os.path.dirname(copy))
    shutil.copytree(self.workdir, copy, copy_function=shutil.copy)
    path = os.path.join(copy, lock.LOCK_FILE)
    os.remove(path)
    if record is not None:
      with open(path, 'w') as f:
        json.dump(record, f)
    return copy

  def _load_best_waits(self, workdir):
    """`load_best(workdir)`: what it returns or raises, and the waits it
    began for a run to save its best (it raises at the first)."""
    waits = []

    def wait(directory, attempt):
      waits.append(attempt)
      raise AssertionError('waited for a run to save its best')

    with mock.patch.object(best_reader, '_wait', wait):
      try:
        return best_reader.load_best(workdir), waits
      except (utils.UserError, AssertionError) as e:
        return e, waits

  def test_a_damaged_best_that_no_run_can_replace_is_named_at_once(self):
    # A workdir copied just now (cp -r) whose best is damaged was read again
    # for STALE_S (30 s) as a best that a run replaces, though no run holds
    # the workdir: its lock released, its holder gone, or no lock file.
    self.ckpt.save_best(3, self._state(3), self._meta(3, 3))
    gone = subprocess.Popen(['true'])
    gone.wait()
    here = socket.gethostname()
    for what, record in (
      ('released', {'host': here, 'pid': os.getpid(), 'released': True}),
      ('its process gone', {'host': here, 'pid': gone.pid, 'released': False}),
      ('no lock file', None),
    ):
      with self.subTest(what):
        copy = self._copy_of_this_run(record)
        best = os.path.join(copy, 'checkpoints', 'best')
        _corrupt(os.path.join(best, '3'), 'truncate')
        error, waits = self._load_best_waits(copy)
        self.assertEqual(waits, [])
        self.assertIsInstance(error, utils.UserError)
        self.assertRegex(
          str(error),
          f'^The best checkpoint {re.escape(best)}/3 is damaged: state/.* has'
          r' \d+ bytes, not \d+\. Run training again in',
        )
        # Nor is a best directory emptied just now, a run's best deleted.
        shutil.rmtree(os.path.join(best, '3'))
        error, waits = self._load_best_waits(copy)
        self.assertEqual(waits, [])
        self.assertRegex(str(error), f'^No best checkpoint in {best}\\.')
    # A run of another host (a shared file system) may still write: waited
    # for as before.
    copy = self._copy_of_this_run(
      {'host': 'elsewhere', 'pid': 4242, 'released': False}
    )
    _corrupt(os.path.join(copy, 'checkpoints', 'best', '3'), 'truncate')
    error, waits = self._load_best_waits(copy)
    self.assertEqual(
      (waits, str(error)), ([0], 'waited for a run to save its best')
    )

  def test_a_run_that_starts_as_its_best_is_read_is_waited_for(self):
    # Whether a run may hold the workdir is asked at each failed read.
    self.ckpt.save_best(3, self._state(3), self._meta(3, 3))
    copy = self._copy_of_this_run(None)
    real, calls, held = checkpoints.restore, [], []

    def restore(mgr, step, target=None):
      calls.append(step)
      if len(calls) == 1:  # A run starts in the copy and saves a new best.
        held.append(lock.acquire(copy))
        self.addCleanup(held[0].release)
        with checkpoints.Checkpoints(copy) as ckpt:
          ckpt.save_best(4, self._state(4), self._meta(4, 4))
        raise ValueError('NOT_FOUND: Error opening "zarr" driver')
      return real(mgr, step, target)

    with mock.patch.object(checkpoints, 'restore', restore):
      state, meta = best_reader.load_best(copy)
    self.assertEqual((calls, meta['epoch']), ([3, 4], 4))
    np.testing.assert_array_equal(state['w'], self._state(4)['w'])

  def test_a_workdir_without_a_best_is_refused_at_once(self):
    # predict.py on a run that never ended an epoch: no run writes a best
    # there, so none is waited for.
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    best = os.path.join(workdir, 'checkpoints', 'best')
    waited = AssertionError('waited for a best that no run writes')
    with (
      mock.patch.object(best_reader.time, 'sleep', side_effect=waited),
      self.assertRaisesRegex(
        utils.UserError,
        f'^No best checkpoint in {best}\\. Run training again in {workdir}'
        ' with its config',
      ),
    ):
      best_reader.load_best(workdir)

  def test_a_best_directory_left_empty_long_ago_is_refused_at_once(self):
    # A run killed before its first best: no save of it is waited for.
    best = os.path.join(self.workdir, 'checkpoints', 'best')
    _age(best)
    waited = AssertionError('waited for a best that no run writes')
    with (
      mock.patch.object(best_reader.time, 'sleep', side_effect=waited),
      self.assertRaisesRegex(utils.UserError, f'^No best checkpoint in {best}'),
    ):
      best_reader.load_best(self.workdir)

  def test_a_best_under_the_home_directory_is_read(self):
    self.ckpt.save_best(3, self._state(3), self._meta(3, 3))
    home, run = os.path.split(self.workdir)
    with mock.patch.dict(os.environ, HOME=home):
      state, meta = best_reader.load_best(os.path.join('~', run))
    np.testing.assert_array_equal(state['w'], self._state(3)['w'])
    self.assertEqual(meta, self._meta(3, 3))

  def test_a_best_that_cannot_be_read_is_named_at_once(self):
    # A file the reader may not open is not damage, and no run fixes it.
    self.ckpt.save_best(3, self._state(3), self._meta(3, 3))
    best = os.path.join(self.workdir, 'checkpoints', 'best')
    _age(best)
    path = os.path.join(best, '3', 'state')
    refused = PermissionError(errno.EACCES, 'Permission denied', path)
    self._load_best_refused(
      refused,
      f'^Cannot read the best checkpoint in {best}: .Errno 13. Permission'
      f' denied: .{path}.\\. Run training again in {self.workdir} with',
    )
    # Nor is an error of orbax's before any step is known.
    self.ckpt.best.delete(3)
    _age(best)
    with (
      mock.patch.object(
        checkpoints, 'manager', side_effect=ValueError('no metadata')
      ),
      self.assertRaisesRegex(
        utils.UserError,
        f'^Cannot read the best checkpoint in {best}: no metadata\\. Run',
      ),
    ):
      best_reader.load_best(self.workdir)

  def test_a_failed_read_is_named_by_its_first_error_and_line(self):
    # Today's layout is read first, then the old one (legacy.py): a failure
    # of both names today's, by its first line (orbax's run to many).
    block = {
      'Dense_0': {'kernel': np.ones((3, 2), np.float32)},
      'BatchNorm_0': {'scale': np.ones(2, np.float32)},
    }
    self.ckpt.save_latest(1, {'params': block}, self._meta(1, 1))
    targets = []

    def failing(step, args):
      targets.append(args['state'].item['params']['Dense_0'])
      raise ValueError(f'read {len(targets)} of {step} failed\nat depth')

    with (
      mock.patch.object(self.ckpt.latest, 'restore', failing),
      self.assertRaisesRegex(ValueError, '^ValueError: read 1 of 1 failed$'),
    ):
      checkpoints.restore(self.ckpt.latest, 1, {'params': block})
    self.assertEqual(
      [sorted(t) for t in targets], [['kernel'], ['bias', 'kernel']]
    )

  def _load_best_saved_at(self, finish):
    """`load_best` as the run saves its best from fake time 0 to `finish`
    (None: never): what it returns or raises, and the fake time then."""
    self.ckpt.save_best(4, self._state(4), self._meta(4, 4))
    best = os.path.join(self.workdir, 'checkpoints', 'best')
    self.ckpt.best.delete(4)
    saving = os.path.join(best, '4' + best_reader.SAVING)
    os.makedirs(saving)
    now = [0.0]

    def sleep(seconds):
      now[0] += seconds
      if finish is not None and now[0] >= finish and os.path.exists(saving):
        os.rmdir(saving)
        self.ckpt.save_best(4, self._state(5), self._meta(4, 4))

    clock = types.SimpleNamespace(
      monotonic=lambda: now[0], sleep=sleep, time=time.time
    )
    with mock.patch.object(best_reader, 'time', clock):
      try:
        return best_reader.load_best(self.workdir), now[0]
      except utils.UserError as e:
        return e, now[0]

  def test_a_best_being_saved_is_read_soon_after_and_waited_for_bounded(self):
    # Reads again at 10 ms, doubling to one a second: a state saved in 50 ms
    # is read at once, one of 11 s within a second of its end.
    for finish, by in ((0.05, 0.1), (11.0, 12.0)):
      (state, meta), end = self._load_best_saved_at(finish)
      self.assertBetween(end, finish, by)
      np.testing.assert_array_equal(state['w'], self._state(5)['w'])
      self.assertEqual(meta['epoch'], 4)
    # A save that never ends is given up READ_WAIT_S after the first read.
    with mock.patch.object(best_reader, 'READ_WAIT_S', 5.0):
      error, end = self._load_best_saved_at(None)
    self.assertRegex(str(error), '^No best checkpoint in')
    self.assertBetween(end, 5.0, 6.0)

  def test_a_best_listed_then_deleted_reads_the_step_left(self):
    # A resumed run deletes the steps from the epoch it redoes: the step
    # listed went before it was looked at, an older one is the best now.
    self.ckpt.save_best(3, self._state(3), self._meta(3, 3))
    latest_step = checkpoints.ocp.CheckpointManager.latest_step
    answers = iter([4])
    with mock.patch.object(
      checkpoints.ocp.CheckpointManager,
      'latest_step',
      lambda mgr: next(answers, None) or latest_step(mgr),
    ):
      state, meta = best_reader.load_best(self.workdir)
    self.assertEqual(meta['epoch'], 3)
    np.testing.assert_array_equal(state['w'], self._state(3)['w'])

  def test_a_best_directory_deleted_while_it_is_read_is_named(self):
    # Its workdir removed: a UserError, at READ_WAIT_S at most, not the
    # FileNotFoundError of a listing.
    self.ckpt.save_best(3, self._state(3), self._meta(3, 3))
    best = os.path.join(self.workdir, 'checkpoints', 'best')
    now = [0.0]

    def sleep(seconds):
      now[0] += seconds

    def deleting(mgr, step, target=None):
      shutil.rmtree(best)
      raise ValueError('NOT_FOUND: Error opening "zarr" driver')

    clock = types.SimpleNamespace(
      monotonic=lambda: now[0], sleep=sleep, time=time.time
    )
    with (
      mock.patch.object(best_reader, 'time', clock),
      mock.patch.object(checkpoints, 'restore', deleting),
      self.assertRaisesRegex(
        utils.UserError, f'best checkpoint in {best}[:.].* Run training'
      ),
    ):
      best_reader.load_best(self.workdir)
    self.assertLessEqual(now[0], best_reader.READ_WAIT_S + 1.0)

  def test_every_manager_that_load_best_opens_is_closed(self):
    # One a read: a reader that waits for a best being saved opens several.
    opened, closed = [], []
    manager, close = checkpoints.manager, ocp.CheckpointManager.close

    def opening(*args, **kwargs):
      opened.append(manager(*args, **kwargs))
      return opened[-1]

    def closing(mgr):
      closed.append(mgr)
      close(mgr)

    with (
      mock.patch.object(checkpoints, 'manager', opening),
      mock.patch.object(ocp.CheckpointManager, 'close', closing),
      mock.patch.object(best_reader, 'READ_WAIT_S', 0.5),
    ):
      (state, _), _ = self._load_best_saved_at(0.05)
      self.assertGreater(len(opened), 1)
      error, _ = self._load_best_saved_at(None)
    self.assertIsInstance(error, utils.UserError)
    self.assertEqual(list(map(id, closed)), list(map(id, opened)))
    np.testing.assert_array_equal(state['w'], self._state(5)['w'])

  def test_file_system_faults_in_error_text_are_user_errors(self):
    # Tensorstore reports a full disk in the text of a ValueError.
    full = ValueError(
      'Error writing "params.w" in OCDBT database: [RESOURCE_EXHAUSTED]'
      ' No space left on device'
    )
    with mock.patch.object(self.ckpt.latest, 'save', side_effect=full):
      with self.assertRaisesRegex(
        utils.UserError,
        r'Cannot save the checkpoint of epoch 1 in .*latest: No space left'
        r' on device \(ENOSPC\): Error writing',
      ):
        self.ckpt.save_latest(1, self._state(1), self._meta(1, 1))
    bug = ValueError('shapes (3,) and (4,) do not match')
    with mock.patch.object(self.ckpt.latest, 'save', side_effect=bug):
      with self.assertRaisesRegex(ValueError, 'do not match'):
        self.ckpt.save_latest(1, self._state(1), self._meta(1, 1))

  def test_a_file_over_the_size_limit_is_a_user_error(self):
    # `ulimit -f` (or FAT32's 4 GiB): Python ignores SIGXFSZ, so the write
    # fails with EFBIG, which tensorstore reports in the text of an error.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    rng = np.random.default_rng(0)  # Incompressible: 256 KiB on disk.
    state = {'w': rng.random(1 << 16, np.float32)}
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
      with self.assertRaisesRegex(
        utils.UserError,
        r'Cannot save the checkpoint of epoch 1 in .*latest: File too large'
        r' \(EFBIG\): .*`ulimit -f`.* Free space',
      ):
        self.ckpt.save_latest(1, state, self._meta(1, 1))
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    self.assertEqual(self.ckpt.latest.all_steps(), [])
    self.ckpt.save_latest(1, state, self._meta(1, 1))
    self.assertEqual(self.ckpt.latest.all_steps(), [1])

  def test_background_saves_match_synchronous_ones(self):
    sync_steps = []
    save = checkpoints.save
    gate = threading.Event()

    def gated_save(*args):
      gate.wait(60)  # No background save ends before epoch 2's are queued.
      return save(*args)

    for background in (False, True):
      workdir = tempfile.mkdtemp()
      gate.clear()
      with (
        mock.patch.object(checkpoints, 'save', gated_save),
        checkpoints.Checkpoints(workdir, background=background) as ckpt,
      ):
        if not background:
          gate.set()
        for epoch in range(1, 6):
          state = self._state(epoch)
          meta = self._meta(epoch, 2)
          ckpt.save_latest(epoch, state, meta)
          if epoch == 2:
            ckpt.save_best(epoch, state, dict(meta))
          # The caller goes on with its own objects: the save has copies.
          state['w'] += 100
          meta['best_epoch'] = 5
          if epoch == 2:  # Three saves wait: the next would wait for them.
            gate.set()
        ckpt.wait()
        steps = ckpt.latest.all_steps(), ckpt.best.all_steps()
        restored, meta = ckpt.restore_latest(None)
        best = ckpt.restore_best({'best_epoch': 2, 'best_auc': 0.7}, None)
      np.testing.assert_array_equal(restored['w'], self._state(5)['w'])
      np.testing.assert_array_equal(best['w'], self._state(2)['w'])
      self.assertEqual(meta['best_epoch'], 2)
      sync_steps.append(steps)
    self.assertEqual(sync_steps[0], ([2, 4, 5], [2]))
    self.assertEqual(sync_steps[1], sync_steps[0])

  def test_an_epochs_two_saves_copy_its_state_once(self):
    # A 400 MB state took 850 MB more at the end of an epoch: a copy for
    # the best save and another for the latest.
    gate, save = threading.Event(), checkpoints.save
    copies, tree_map = [], jax.tree.map

    def counting(f, *args, **kwargs):
      if f is np.array:
        copies.append(1)
      return tree_map(f, *args, **kwargs)

    with (
      mock.patch.object(
        checkpoints, 'save', lambda *a: gate.wait(60) and save(*a)
      ),
      checkpoints.Checkpoints(self.workdir, background=True) as ckpt,
    ):
      with mock.patch.object(jax.tree, 'map', counting):  # Saves wait.
        for epoch in (3, 4):
          state = self._state(epoch)
          if epoch == 3:
            ckpt.save_best(epoch, state, self._meta(epoch, 3))
          ckpt.save_latest(epoch, state, self._meta(epoch, 3))
      gate.set()
    self.assertLen(copies, 2)
    best = ckpt.restore_best(self._meta(4, 3), None)
    np.testing.assert_array_equal(best['w'], self._state(3)['w'])

  def test_a_latest_state_other_than_the_best_before_it_is_its_own(self):
    # The copy of an epoch's best state is shared only with the same state.
    with checkpoints.Checkpoints(self.workdir, background=True) as ckpt:
      ckpt.save_best(3, self._state(3), self._meta(3, 3))
      ckpt.save_latest(3, self._state(5), self._meta(3, 3))
      ckpt.wait()
      latest, _ = ckpt.restore_latest(None)
      best = ckpt.restore_best(self._meta(3, 3), None)
    np.testing.assert_array_equal(latest['w'], self._state(5)['w'])
    np.testing.assert_array_equal(best['w'], self._state(3)['w'])

  def test_a_best_is_copied_for_its_own_epoch_and_meta_alone(self):
    # Saved as given (no copy of the state without a background), with the
    # meta as it was: the caller may change its dict in between.
    state, meta = self._state(1), self._meta(1, 1)
    saved, save = [], checkpoints.save

    def recording(mgr, step, state, *args):
      saved.append(state)
      return save(mgr, step, state, *args)

    with mock.patch.object(checkpoints, 'save', recording):
      self.ckpt.save_best(1, state, meta)
      meta['wall'] = 5.0
      self.ckpt.save_latest(1, state, meta)
      self.ckpt.save_best(2, state, meta)
      self.ckpt.save_latest(3, state, meta)  # Another epoch: no best of 3.
    self.assertTrue(all(s is state for s in saved))
    self.assertEqual(self.ckpt.latest.all_steps(), [1, 3])
    _, got = checkpoints.restore(self.ckpt.latest, 1)
    self.assertEqual(got, dict(self._meta(1, 1), wall=5.0))
    restored, got = self.ckpt.restore_latest(None)
    np.testing.assert_array_equal(restored['w'], state['w'])
    self.assertEqual(got, meta)

  def test_a_state_changed_in_place_after_its_epoch_is_saved_changed(self):
    with checkpoints.Checkpoints(self.workdir, background=True) as ckpt:
      state = self._state(1)
      ckpt.save_best(1, state, self._meta(1, 1))
      ckpt.save_latest(1, state, self._meta(1, 1))
      state['w'] += 1  # The caller's own array, now epoch 2's.
      ckpt.save_latest(2, state, self._meta(2, 1))
      ckpt.wait()
      latest, meta = ckpt.restore_latest(None)
    self.assertEqual(meta['epoch'], 2)
    np.testing.assert_array_equal(latest['w'], self._state(2)['w'])

  def test_the_best_is_restored_once_its_background_save_ends(self):
    gate, save = threading.Event(), checkpoints.save
    with (
      mock.patch.object(
        checkpoints, 'save', lambda *a: gate.wait(60) and save(*a)
      ),
      checkpoints.Checkpoints(self.workdir, background=True) as ckpt,
    ):
      ckpt.save_best(3, self._state(3), self._meta(3, 3))
      threading.Timer(0.2, gate.set).start()
      best = ckpt.restore_best(self._meta(3, 3), None)
    np.testing.assert_array_equal(best['w'], self._state(3)['w'])

  def test_a_step_orbax_skips_is_an_error_and_no_step(self):
    with (
      mock.patch.object(self.ckpt.latest, 'save', return_value=False),
      self.assertRaisesRegex(RuntimeError, r'^orbax skipped step 1 in \S+'),
    ):
      self.ckpt.save_latest(1, self._state(1), self._meta(1, 1))
    latest = os.path.join(self.workdir, 'checkpoints', 'latest')
    self.assertEqual(os.listdir(latest), [])

  def test_close_closes_both_managers_when_the_first_fails(self):
    ckpt = checkpoints.Checkpoints(tempfile.mkdtemp())
    closed, close = [], ocp.CheckpointManager.close

    def closing(mgr):
      closed.append(os.path.basename(str(mgr.directory)))
      close(mgr)
      if closed == ['latest']:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with (
      mock.patch.object(ocp.CheckpointManager, 'close', closing),
      self.assertRaises(OSError),
    ):
      ckpt.close()
    self.assertEqual(closed, ['latest', 'best'])

  def _gated_save(self):
    """`checkpoints.save` held until `gate` is set; `started` once called."""
    gate, started = threading.Event(), threading.Event()
    save = checkpoints.save

    def gated_save(*args):
      started.set()
      gate.wait(60)
      return save(*args)

    return gated_save, gate, started

  def test_a_background_save_waits_while_two_wait_to_start(self):
    gated_save, gate, started = self._gated_save()
    ckpt = checkpoints.Checkpoints(tempfile.mkdtemp(), background=True)
    with mock.patch.object(checkpoints, 'save', gated_save), ckpt:
      ckpt.save_latest(1, self._state(1), self._meta(1, 1))  # Written.
      self.assertTrue(started.wait(60))
      for epoch in (2, 3):  # Wait to start: the caller goes on.
        ckpt.save_latest(epoch, self._state(epoch), self._meta(epoch, 1))
      fourth = threading.Thread(
        target=ckpt.save_latest, args=(4, self._state(4), self._meta(4, 1))
      )
      fourth.start()
      fourth.join(0.5)
      try:
        self.assertTrue(fourth.is_alive())  # Holds no third copy of a state.
      finally:
        gate.set()
      fourth.join(60)
      self.assertFalse(fourth.is_alive())
    self.assertEqual(ckpt.latest.all_steps(), [1, 3, 4])

  def test_a_second_interrupt_finishes_the_save_being_written(self):
    # Ctrl-C twice: the second landed in the exit's wait, which closed the
    # managers under the save being written; the interpreter's shutdown
    # then broke it (orbax's traceback, `cannot schedule new futures after
    # interpreter shutdown`) and left a `.orbax-checkpoint-tmp` step.
    gated_save, gate, started = self._gated_save()
    workdir = tempfile.mkdtemp()
    ckpt = checkpoints.Checkpoints(workdir, background=True)
    wait, waits = ckpt.wait, []

    def interrupted_once():
      waits.append(1)
      if len(waits) == 1:  # The second Ctrl-C, as epoch 1 is written.
        threading.Timer(0.5, gate.set).start()
        raise KeyboardInterrupt
      wait()

    self.addCleanup(gate.set)
    with (
      mock.patch.object(checkpoints, 'save', gated_save),
      mock.patch.object(ckpt, 'wait', interrupted_once),
      self.assertRaises(KeyboardInterrupt),
      self.assertLogs('absl', 'WARNING') as logs,
      ckpt,
    ):
      ckpt.save_latest(1, self._state(1), self._meta(1, 1))  # Written.
      self.assertTrue(started.wait(60))
      for epoch in (2, 3):  # Not started: skipped.
        ckpt.save_latest(epoch, self._state(epoch), self._meta(epoch, 1))
      raise KeyboardInterrupt  # The first Ctrl-C.
    self.assertTrue(gate.is_set())  # The exit waited for epoch 1's save.
    self.assertIn('skipping the 2 not started', '\n'.join(logs.output))
    with checkpoints.Checkpoints(workdir) as reopened:
      self.assertEqual(reopened.latest.all_steps(), [1])
      state, _ = reopened.restore_latest(None)
    np.testing.assert_array_equal(state['w'], self._state(1)['w'])

  def _failing_at(self, ckpt, bad_epoch):
    """Makes the orbax save of `bad_epoch` in `ckpt.latest` find a full disk."""
    real = ckpt.latest.save

    def save(step, *args, **kwargs):
      if step == bad_epoch:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), 'w.npy')
      return real(step, *args, **kwargs)

    return mock.patch.object(ckpt.latest, 'save', side_effect=save)

  def test_a_failed_background_save_raises_once_and_stops_the_rest(self):
    ckpt = checkpoints.Checkpoints(tempfile.mkdtemp(), background=True)
    raised = []
    with self._failing_at(ckpt, 2):
      ckpt.save_latest(1, self._state(1), self._meta(1, 1))
      for epoch in (2, 3, 4):
        try:  # Raises at the next save, or at the wait: whichever comes.
          ckpt.save_latest(epoch, self._state(epoch), self._meta(epoch, 1))
        except utils.UserError as e:
          raised.append(str(e))
      try:
        ckpt.wait()
      except utils.UserError as e:
        raised.append(str(e))
    self.assertLen(raised, 1)
    self.assertRegex(
      raised[0], 'Cannot save the checkpoint of epoch 2 .*No space left'
    )
    # The saves after the failed one were skipped: the disk holds what a
    # run killed at epoch 2's save holds.
    self.assertEqual(ckpt.latest.all_steps(), [1])
    state, meta = ckpt.restore_latest(None)
    np.testing.assert_array_equal(state['w'], self._state(1)['w'])
    ckpt.close()

  def test_a_failed_background_save_raises_at_the_next_save(self):
    # The run stops at its next epoch, not after every epoch left.
    ckpt = checkpoints.Checkpoints(tempfile.mkdtemp(), background=True)
    with self._failing_at(ckpt, 1):
      ckpt.save_latest(1, self._state(1), self._meta(1, 1))
      deadline = time.monotonic() + 60  # The save thread ends as it fails.
      while any(t.name == 'ckpt-save' for t in threading.enumerate()):
        self.assertLess(time.monotonic(), deadline)
        time.sleep(0.01)
      with self.assertRaisesRegex(
        utils.UserError, 'checkpoint of epoch 1 .*No space left'
      ):
        ckpt.save_latest(2, self._state(2), self._meta(2, 1))
      ckpt.wait()  # Raised once.
    self.assertEqual(ckpt.latest.all_steps(), [])
    ckpt.close()

  def test_leaving_on_another_error_logs_a_failed_save(self):
    with self.assertLogs('absl', 'ERROR') as logs:
      with self.assertRaisesRegex(KeyError, 'the first error'):
        ckpt = checkpoints.Checkpoints(tempfile.mkdtemp(), background=True)
        with self._failing_at(ckpt, 1), ckpt:
          ckpt.save_latest(1, self._state(1), self._meta(1, 1))
          raise KeyError('the first error')
    self.assertIn('A checkpoint save failed too', '\n'.join(logs.output))
    self.assertIn('No space left on device', '\n'.join(logs.output))

  def _save_failing_with(self, error, reported):
    """Saves epoch 1 while tensorstore's writes raise `error`.

    What reaches `sys.unraisablehook` goes to `reported`: tensorstore's
    callbacks meet a closed event loop after a failed write, and another
    problem is reported too.
    """

    async def failing_open(*args, **kwargs):
      del args, kwargs
      for message in ('Event loop is closed', 'another problem'):
        sys.unraisablehook(
          types.SimpleNamespace(
            exc_type=RuntimeError,
            exc_value=RuntimeError(message),
            exc_traceback=None,
            err_msg=None,
            object=None,
          )
        )
      raise error

    with (
      mock.patch.object(
        sys, 'unraisablehook', lambda u: reported.append(str(u.exc_value))
      ),
      mock.patch.object(tensorstore, 'open', failing_open),
    ):
      self.ckpt.save_best(1, self._state(1), self._meta(1, 1))

  def test_a_save_the_disk_refuses_is_one_error_without_orbax_logs(self):
    reported = []
    with (
      self.assertNoLogs('absl', 'ERROR'),
      self.assertRaisesRegex(
        utils.UserError,
        r'^Cannot save the checkpoint of epoch 1 in .*best: No space left on'
        r' device \(ENOSPC\)\. Free space',
      ),
    ):
      self._save_failing_with(_no_space(), reported)
    self.assertEqual(reported, ['another problem'])
    self.assertEqual(self.ckpt.best.all_steps(), [])
    # A save that fails otherwise is a bug: orbax's logs say where.
    with (
      self.assertLogs('absl', 'ERROR') as logs,
      self.assertRaisesRegex(RuntimeError, 'a bug'),
    ):
      self._save_failing_with(RuntimeError('a bug'), [])
    self.assertIn('_SignalingThread.run() raised', '\n'.join(logs.output))

  def test_orbax_threads_that_outlive_a_refused_save_are_not_logged(self):
    # One item refused (its meta) while the state's thread still wrote: that
    # thread then found the interpreter shut down, and its traceback came
    # after the run's one-line error.
    logger = logging.get_absl_logger()
    orbax = '/site-packages/orbax/checkpoint/_src/futures/future.py'
    late = RuntimeError(
      'cannot schedule new futures after interpreter shutdown'
    )

    def kept(path, error):
      return logger.filter(
        logger.makeRecord(
          'absl',
          logging.converter.STANDARD_ERROR,
          path,
          1,
          'x',
          (),
          (RuntimeError, error, None),
        )
      )

    with self.assertRaises(utils.UserError), orbax_logs.quiet_if_refused():
      raise utils.UserError('Cannot save the checkpoint')
    self.assertFalse(kept(orbax, late))
    self.assertTrue(kept(orbax, RuntimeError('a bug')))
    self.assertTrue(kept('/work/train.py', late))

  def test_orbax_info_lines_are_dropped_without_app_run_too(self):
    # A script or notebook never attaches absl's handler: the filter is on
    # absl's logger as well.
    orbax_logs.quiet_info()
    logger = logging.get_absl_logger()
    orbax = '/site-packages/orbax/checkpoint/manager.py'

    def kept(level, path):
      return logger.filter(
        logger.makeRecord('absl', level, path, 1, 'x', (), None)
      )

    self.assertFalse(kept(logging.converter.STANDARD_INFO, orbax))
    self.assertTrue(kept(logging.converter.STANDARD_WARNING, orbax))
    self.assertTrue(kept(logging.converter.STANDARD_INFO, '/work/train.py'))

  def test_without_drops_one_level_and_prefix_while_it_lasts(self):
    logger = logging.get_absl_logger()
    warning = logging.converter.STANDARD_WARNING
    error = logging.converter.STANDARD_ERROR

    def kept(level, message):
      return logger.filter(
        logger.makeRecord('absl', level, 'x.py', 1, message, (), None)
      )

    with orbax_logs.without(warning, 'Given directory'):
      self.assertFalse(kept(warning, 'Given directory is read only'))
      self.assertTrue(kept(error, 'Given directory is read only'))
      self.assertTrue(kept(warning, 'Another directory'))
    self.assertTrue(kept(warning, 'Given directory is read only'))

  def test_a_save_holds_orbax_errors_alone_and_only_while_it_runs(self):
    # Other errors pass at once; tensorstore's closed event loops are
    # dropped during the save, reported after it (no save refused yet).
    logger = logging.get_absl_logger()
    orbax = '/site-packages/orbax/checkpoint/manager.py'
    reported = []

    def kept(path):
      return logger.filter(
        logger.makeRecord(
          'absl', logging.converter.STANDARD_ERROR, path, 1, 'x', (), None
        )
      )

    with (
      mock.patch.dict(orbax_logs._saves, running=0, refused=False, cut=set()),
      mock.patch.object(
        sys, 'unraisablehook', lambda u: reported.append(str(u.exc_value))
      ),
      self.assertLogs('absl', 'ERROR') as logs,
    ):
      with orbax_logs.quiet_if_refused():
        self.assertFalse(kept(orbax))
        self.assertTrue(kept('/work/train.py'))
        sys.unraisablehook(_closed_loop())
      self.assertEqual(reported, [])
      sys.unraisablehook(_closed_loop())
    self.assertEqual(reported, ['Event loop is closed'])
    self.assertEqual([r.pathname for r in logs.records], [orbax])

  def test_a_cut_read_drops_its_own_late_reports_alone(self):
    directory = os.path.join(tempfile.gettempdir(), 'cut-read-test', 'best')
    asyncio_logger = std_logging.getLogger('asyncio')

    def kept(message):
      error = OSError(message)
      return asyncio_logger.filter(
        asyncio_logger.makeRecord(
          'asyncio', 40, 'x.py', 1, 'x', (), (OSError, error, None)
        )
      )

    reported = []
    with (
      mock.patch.dict(orbax_logs._saves, running=0, refused=False, cut=set()),
      mock.patch.object(
        sys, 'unraisablehook', lambda u: reported.append(str(u.exc_value))
      ),
    ):
      orbax_logs.quiet_cut_reads(directory)
      self.assertFalse(kept(f'reading {directory}/3/state failed'))
      self.assertTrue(kept('reading /elsewhere/3/state failed'))
      sys.unraisablehook(_closed_loop())
    self.assertEqual(reported, [])

  def test_a_damaged_latest_step_falls_back_with_a_warning(self):
    for epoch in (1, 2):
      self.ckpt.save_latest(epoch, self._state(epoch), self._meta(epoch, 1))
    step_dir = os.path.join(self.workdir, 'checkpoints', 'latest', '2')
    meta_file = os.path.join(step_dir, 'meta', 'metadata')
    with open(meta_file, 'a') as f:
      f.write(' ')  # Same JSON, one more byte: only the checksums notice.
    self.assertIn('meta/metadata has', step_files.damage(step_dir))
    with self.assertLogs('absl', 'WARNING') as logs:
      state, meta = self.ckpt.restore_latest(None)
    self.assertEqual(meta['epoch'], 1)
    np.testing.assert_array_equal(state['w'], self._state(1)['w'])
    self.assertIn('latest/2 is damaged', '\n'.join(logs.output))


def _closed_loop():
  """What tensorstore's callbacks report to `sys.unraisablehook`."""
  return types.SimpleNamespace(
    exc_type=RuntimeError,
    exc_value=RuntimeError('Event loop is closed'),
    exc_traceback=None,
    err_msg=None,
    object=None,
  )


def _no_space(path=None):
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


class RecordWriteFaultTest(absltest.TestCase):
  """metrics.jsonl and config.json on a full disk: a UserError, and the
  files as they were."""

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()
    self.path = os.path.join(self.workdir, 'metrics.jsonl')
    self.lines = '{"split": "train", "epoch": 1, "step": 5, "loss": 0.5}\n'
    with open(self.path, 'w') as f:
      f.write(self.lines)
    self.writer = metrics.MetricsWriter(self.workdir, enabled=True)

  def assertUnchanged(self):
    with open(self.path) as f:
      self.assertEqual(f.read(), self.lines)
    self.assertEqual(os.listdir(self.workdir), ['metrics.jsonl'])

  def _refused(self):
    return self.assertRaisesRegex(
      utils.UserError,
      f'^Cannot write metrics.jsonl in {self.workdir}: No space left on'
      r' device \(ENOSPC[^)]*\). Free space or restore write access there, then'
      ' start the run again',
    )

  def test_a_line_the_disk_takes_part_of_is_taken_back(self):
    write = os.write
    calls = []

    def full(fd, data):
      calls.append(len(data))
      if len(calls) > 1:
        raise _no_space()
      return write(fd, data[:10])  # The disk takes 10 bytes, then no more.

    with self._refused(), mock.patch.object(metrics.os, 'write', full):
      self.writer.write(split='train', epoch=2, step=10, loss=0.4)
    self.assertLen(calls, 2)
    self.assertUnchanged()
    self.writer.write(split='train', epoch=2, step=10, loss=0.4)
    with open(self.path) as f:
      first, second = f.readlines()
    self.assertEqual(first, self.lines)
    self.assertEqual(json.loads(second)['loss'], 0.4)

  def test_a_rewrite_that_fails_leaves_the_file_and_no_copy(self):
    # A line to drop before one to keep (an edited file) takes a rewrite;
    # the lines that a resume drops end the file and are cut in place.
    self.lines = '{"split": "test", "epoch": 1, "auc": 0.5}\n' + self.lines
    with open(self.path, 'w') as f:
      f.write(self.lines)
    real_open = open

    def full_open(path, mode='r', *args, **kwargs):
      f = real_open(path, mode, *args, **kwargs)
      if 'w' in mode:
        f.write('{"split": ')
        f.close()
        raise _no_space(path)
      return f

    with self._refused(), mock.patch('builtins.open', full_open):
      self.writer.truncate(1)
    self.assertUnchanged()

  def test_a_config_record_that_cannot_be_written(self):
    workdir = workdir_lib.prepare(os.path.join(self.workdir, 'run'))
    with (
      mock.patch.object(workdir_lib.os, 'fsync', side_effect=_no_space()),
      self.assertRaisesRegex(
        utils.UserError,
        f'^Cannot write config.json in {workdir}: No space left on device',
      ),
    ):
      workdir_lib.check_resume(workdir, fm.get_config('smoke'))
    self.assertEqual(os.listdir(workdir), [])

  def test_a_disk_fault_an_error_was_raised_in_is_named(self):
    # An error raised while handling one (no `from`) keeps it as context.
    try:
      try:
        raise OSError(errno.ENOSPC, 'No space left on device', 'a.npy')
      except OSError:
        raise RuntimeError('the save failed')  # noqa: B904
    except RuntimeError as e:
      error = e
    self.assertEqual(
      utils.os_problem(error), 'No space left on device (ENOSPC, a.npy)'
    )

  def test_each_file_system_fault_in_the_text_of_an_error_is_named(self):
    codes = 'ENOSPC', 'EDQUOT', 'EFBIG', 'EACCES', 'EPERM', 'EROFS'
    for name in codes:
      text = os.strerror(getattr(errno, name))
      error = ValueError(f'Error writing "w": [UNKNOWN] {text}')
      self.assertStartsWith(
        utils.os_problem(error), f'{text} ({name}): Error writing "w"'
      )
    self.assertIsNone(utils.os_problem(ValueError('shapes do not match')))

  def test_a_short_write_a_size_limit_and_a_bare_cause_are_named(self):
    short = OSError('10 requested and 5 written')
    said = '10 requested and 5 written (a short write: is the disk full?)'
    self.assertEqual(utils.os_problem(short), said)
    error = RuntimeError('the save failed')
    error.__cause__ = short  # Given outside a handler: no context.
    self.assertEqual(utils.os_problem(error), said)
    big = OSError(errno.EFBIG, os.strerror(errno.EFBIG), 'w.npy')
    self.assertEqual(
      utils.os_problem(big),
      'File too large (EFBIG, w.npy); a file outgrew the size limit of one'
      ' file (`ulimit -f`, or the largest file the file system holds):'
      ' raise it or write elsewhere',
    )
    first, second = RuntimeError('first'), RuntimeError('second')
    first.__context__, second.__context__ = second, first
    found = []
    looking = threading.Thread(
      target=lambda: found.append(utils.os_problem(first)), daemon=True
    )
    looking.start()
    looking.join(5)
    self.assertEqual(found, [None])  # A chain that loops ends.

  def test_copies_left_where_a_write_failed_go_in_any_directory(self):
    # A directory named like a glob; a copy that cannot be removed does
    # not hide the fault.
    directory = os.path.join(self.workdir, 'run[1]')
    os.makedirs(directory)
    refused = mock.Mock(side_effect=PermissionError())
    for remove, left in ((os.remove, []), (refused, ['a.json.tmp-1'])):
      with (
        mock.patch.object(utils.os, 'remove', remove),
        self.assertRaisesRegex(
          utils.UserError,
          f'^Cannot write a.json in {re.escape(directory)}: No space left',
        ),
        utils.writing('a.json', directory, 'a.json.tmp-*'),
      ):
        open(os.path.join(directory, 'a.json.tmp-1'), 'w').close()
        raise _no_space()
      self.assertEqual(os.listdir(directory), left)


class TrainingFaultTest(_Case):
  """Whole runs in this process, on a copy of one finished reference run."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    _write_csv(os.path.join(cls.tmp, 'clicks.csv'), 4000, seed=0)
    cls.reference = os.path.join(cls.tmp, 'reference')
    cls.test_metrics = train.train_and_evaluate(_config(cls.tmp), cls.reference)
    cls.lines = _metrics(cls.reference)

  def _copy(self):
    workdir = os.path.join(tempfile.mkdtemp(dir=self.tmp), 'run')
    shutil.copytree(self.reference, workdir)
    return workdir

  def _best_epoch(self):
    return self.lines[-1]['epoch']

  def test_reference_run_keeps_two_latest_and_the_best(self):
    root = os.path.join(self.reference, 'checkpoints')
    best = self._best_epoch()
    self.assertEqual(
      sorted(os.listdir(os.path.join(root, 'best'))), [str(best)]
    )
    self.assertEqual(
      sorted(map(int, os.listdir(os.path.join(root, 'latest')))),
      sorted({2, 3, best}),
    )
    # The best epoch's two saves write its state once: latest copies best.
    copy, step = (os.path.join(root, n, str(best)) for n in ('latest', 'best'))
    self.assertEqual(step_files.checksums(copy), step_files.checksums(step))
    with open(os.path.join(self.reference, workdir_lib.CONFIG_FILE)) as f:
      self.assertEqual(json.load(f)['num_epochs'], 3)
    self.assertGreater(self.test_metrics['auc'], 0.7)

  @parameterized.parameters('truncate', 'flip')
  def test_damaged_newest_checkpoint_falls_back_to_the_previous(self, how):
    workdir = self._copy()
    newest = os.path.join(workdir, 'checkpoints', 'latest', '3')
    _corrupt(newest, how)
    with self.assertLogs('absl', 'WARNING') as logs:
      test = train.train_and_evaluate(_config(self.tmp), workdir)
    self.assertRegex('\n'.join(logs.output), 'latest/3 is damaged')
    self.assertSameMetrics(_metrics(workdir), self.lines)
    self.assertAlmostEqual(test['auc'], self.test_metrics['auc'], delta=1e-6)
    self.assertIsNone(step_files.damage(newest))  # Saved again, whole.

  def test_every_latest_checkpoint_damaged_is_refused_by_name(self):
    workdir = self._copy()
    latest = os.path.join(workdir, 'checkpoints', 'latest')
    for step in os.listdir(latest):
      _corrupt(os.path.join(latest, step), 'flip')
    with self.assertRaisesRegex(
      utils.UserError,
      r'No checkpoint in .*latest can be read: epoch 3: .*SHA-256 mismatch.*'
      r' delete .*checkpoints to train this run again',
    ):
      train.train_and_evaluate(_config(self.tmp), workdir)

  def test_deleted_best_is_recovered_from_latest(self):
    workdir = self._copy()
    best_dir = os.path.join(workdir, 'checkpoints', 'best')
    shutil.rmtree(best_dir)
    with self.assertLogs('absl', 'WARNING') as logs:
      test = train.train_and_evaluate(_config(self.tmp), workdir)
    self.assertIn('recovered epoch', '\n'.join(logs.output))
    self.assertAlmostEqual(test['auc'], self.test_metrics['auc'], delta=1e-6)
    self.assertSameMetrics(_metrics(workdir), self.lines)
    step_dir = os.path.join(best_dir, str(self._best_epoch()))
    self.assertIsNone(step_files.damage(step_dir))
    self.assertTrue(
      os.path.exists(os.path.join(step_dir, 'commit_success.txt'))
    )

  def test_a_full_disk_while_writing_the_encoder(self):
    workdir = self._copy()
    directory = os.path.join(workdir, 'encoder')
    before = {
      n: _read(os.path.join(directory, n)) for n in os.listdir(directory)
    }

    def short_write(f, array, **kwargs):
      del array, kwargs
      f.write(b'\x93NUMPY')
      raise OSError('10334 requested and 5104 written')  # As numpy says.

    with (
      mock.patch.object(encoder.np, 'save', short_write),
      self.assertRaisesRegex(
        utils.UserError,
        f'^Cannot write the encoder in {directory}: 10334 requested and 5104'
        r' written \(a short write: is the disk full\?\). Free space',
      ),
    ):
      train.train_and_evaluate(_config(self.tmp), workdir)
    after = {
      n: _read(os.path.join(directory, n)) for n in os.listdir(directory)
    }
    self.assertEqual(after, before)  # No temporary file, nothing changed.

  def test_changed_data_is_refused_before_the_encoder_is_replaced(self):
    # A resume re-encoded the file and rewrote encoder/ first: rows then got
    # other ids than the checkpoints were trained with, silently when the
    # sizes held, and predict.py refused the workdir when they did not.
    data_dir = tempfile.mkdtemp(dir=self.tmp)
    path = _write_csv(os.path.join(data_dir, 'clicks.csv'), 600, seed=0)
    workdir = os.path.join(data_dir, 'run')
    config = _config(data_dir, num_epochs=1)
    train.train_and_evaluate(config, workdir)
    directory = os.path.join(workdir, 'encoder')
    before = {
      n: _read(os.path.join(directory, n)) for n in os.listdir(directory)
    }
    train.train_and_evaluate(config, workdir)  # The same data resume.
    with open(path) as f:
      text = f.read()
    header, *rows = text.splitlines(keepends=True)
    record = os.path.join(workdir, sources.FILE)
    kept = _read(record)
    longer = _config(data_dir, num_epochs=2)  # A change a resume may make.
    history = os.path.join(workdir, workdir_lib.HISTORY_FILE)
    for edited, refusal in (
      # The rows reversed: the same ids, but other rows in each split, on
      # which the run resumed (before sources.json), silently.
      (
        header + ''.join(rows[::-1]),
        'workdir [^ ]+ holds checkpoints of a run whose data files changed:'
        r' they differ from those recorded in [^ ]+sources.json \(all',
      ),
      # u1 renamed: as many users, other ids. Without sources.json (a run
      # begun before it), the encoder's check refuses it.
      (
        text.replace('\nu1,', '\nu99,'),
        r'The data differ from those of the checkpoints \(the user'
        r' vocabulary changed\)',
      ),
    ):
      with open(path, 'w') as f:
        f.write(edited)
      if refusal.startswith('The data'):
        os.remove(record)
      with self.assertRaisesRegex(utils.UserError, f'^{refusal}'):
        train.train_and_evaluate(longer, workdir)
      after = {
        n: _read(os.path.join(directory, n)) for n in os.listdir(directory)
      }
      self.assertEqual(after, before)
      # Nor did the refused resume record its change (it did before the
      # data were compared): it is recorded when the run resumes with it.
      self.assertFalse(os.path.exists(history))
    with open(record, 'wb') as f:
      f.write(kept)
    with open(path, 'w') as f:
      f.write(text)
    train.train_and_evaluate(longer, workdir)
    with open(history) as f:
      changes = [json.loads(line) for line in f]
    self.assertEqual(
      [(c['key'], c['old'], c['new']) for c in changes], [('num_epochs', 1, 2)]
    )

  def test_moved_data_resumes_and_other_bytes_at_a_new_path_do_not(self):
    # The path was compared as a string: the same file moved blocked the
    # resume, though the cache knew it by its content.
    data_dir = tempfile.mkdtemp(dir=self.tmp)
    path = _write_csv(os.path.join(data_dir, 'clicks.csv'), 600, seed=0)
    workdir = os.path.join(data_dir, 'run')
    train.train_and_evaluate(_config(data_dir, num_epochs=1), workdir)
    record = os.path.join(workdir, sources.FILE)
    self.assertEqual(list(json.loads(_read(record))), ['all'])
    moved = shutil.copy(path, os.path.join(data_dir, 'moved.csv'))
    shuffled = os.path.join(data_dir, 'shuffled.csv')
    with open(path) as f:
      header, *rows = f.readlines()
    with open(shuffled, 'w') as f:  # The same ids, in another split.
      f.write(header + ''.join(rows[::-1]))
    before = _files(workdir)
    for other, why in (
      (
        shuffled,
        'the files there differ from those recorded in [^ ]+'
        r'sources.json \(all sha256 \w{12} -> sha256 \w{12}\)',
      ),
      (
        moved,
        r'[^ ]+sources.json is missing or unreadable \(a run begun before it'
        r' was written: a resume at the recorded paths writes it\), so the'
        ' files cannot be compared',
      ),
    ):
      if other == moved:  # A run begun before the record.
        os.rename(record, record + '.kept')
        before = _files(workdir)
      with (
        self.assertRaisesRegex(
          utils.UserError,
          '^workdir [^ ]+ holds checkpoints of a run whose data files moved:'
          f' dataset.path "{re.escape(path)}" -> "{re.escape(other)}"; {why}.',
        ),
        # Refused before the data is encoded (long for a big file).
        mock.patch.object(csv, 'build', side_effect=AssertionError),
        self.assertLogs(level='INFO') as logs,
      ):
        train.train_and_evaluate(
          _config(data_dir, num_epochs=2, **{'dataset.path': other}), workdir
        )
      self.assertEqual(_files(workdir), before)  # Nothing written.
      # Nor said to resume with the change it refused (it was logged).
      self.assertNotIn('Resumed with', '\n'.join(logs.output))
    os.rename(record + '.kept', record)
    with self.assertLogs(level='INFO') as logs:
      train.train_and_evaluate(
        _config(data_dir, num_epochs=2, **{'dataset.path': moved}), workdir
      )
    said = [m.split(':', 2)[-1] for m in logs.output if 'Resumed' in m]
    self.assertEqual(
      said,
      [
        f'Resumed with dataset.path "{path}" -> "{moved}": the same files,'
        ' by their SHA-256.',
        'Resumed with num_epochs 1 -> 2',
        f'Resumed from epoch 1 of {workdir}',
      ],
    )
    history = os.path.join(workdir, workdir_lib.HISTORY_FILE)
    with open(history) as f:
      changes = [json.loads(line) for line in f]
    self.assertEqual(
      [(c['key'], c['old'], c['new']) for c in changes],
      [('dataset.path', path, moved), ('num_epochs', 1, 2)],
    )
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines = [json.loads(line) for line in f]
    # Resumed: epoch 1 once, then epoch 2.
    self.assertEqual(
      [m['epoch'] for m in lines if m['split'] == 'valid'], [1, 2]
    )

  def test_changed_split_seed_is_refused_before_the_data(self):
    workdir = self._copy()
    config = _config(self.tmp, **{'dataset.seed': 1})
    config.dataset.cache_dir = os.path.join(workdir, 'no-cache')
    with self.assertRaisesRegex(utils.UserError, r'dataset.seed 0 -> 1'):
      train.train_and_evaluate(config, workdir)
    self.assertFalse(os.path.exists(config.dataset.cache_dir))

  def test_live_workdir_is_refused_before_the_data(self):
    workdir = os.path.join(self.tmp, 'locked')
    config = _config(self.tmp)
    config.dataset.cache_dir = os.path.join(workdir, 'no-cache')
    with workdir_lib.acquire(workdir_lib.prepare(workdir)):
      with self.assertRaisesRegex(utils.UserError, 'in use by this process'):
        train.train_and_evaluate(config, workdir)
    self.assertFalse(os.path.exists(config.dataset.cache_dir))


class SplitCheckTest(_Case):
  """Splits that cannot train or be scored stop the run before training."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    _write_csv(os.path.join(cls.tmp, 'clicks.csv'), 400, seed=0)
    _write_csv(os.path.join(cls.tmp, 'train.csv'), 400, seed=1)
    _write_csv(os.path.join(cls.tmp, 'mixed.csv'), 50, seed=2)
    _write_csv(os.path.join(cls.tmp, 'zeros.csv'), 60, seed=3, positive_rate=0)

  def _refused(self, pattern, **overrides):
    workdir = tempfile.mkdtemp(dir=self.tmp)
    with self.assertRaisesRegex(utils.UserError, pattern):
      train.train_and_evaluate(_config(self.tmp, **overrides), workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'checkpoints')))

  def test_empty_validation_split(self):
    self._refused(
      r'The validation split of csv has no examples: its AUC, which early'
      r' stopping needs, is undefined .* config.dataset.split \(now'
      r' \(0.999, 0.0005, 0.0005\)\)',
      **{'dataset.split': (0.999, 0.0005, 0.0005)},
    )

  @parameterized.parameters(('validation', 'valid'), ('test', 'test'))
  def test_split_with_one_class(self, name, key):
    # A predefined file: the advice names it, not config.dataset.split and
    # seed, which draw nothing then.
    files = {'valid': 'mixed.csv', 'test': 'mixed.csv', key: 'zeros.csv'}
    zeros = os.path.join(self.tmp, 'zeros.csv')
    self._refused(
      f'^The {name} split of csv has 0 positive and 60 negative examples:'
      f' its AUC, .* is undefined without both classes. Give'
      f' config.dataset.{key}_path \\(now {re.escape(zeros)}\\) a file that'
      ' holds both labels.$',
      **{
        'dataset.path': os.path.join(self.tmp, 'train.csv'),
        'dataset.valid_path': os.path.join(self.tmp, files['valid']),
        'dataset.test_path': os.path.join(self.tmp, files['test']),
      },
    )

  def test_batch_larger_than_the_training_split(self):
    self._refused(
      r'config.batch_size=512 exceeds the 320 training examples',
      batch_size=512,
    )


# Runs main.py after injecting the fault named by $FAULT (see `_apply`).
_ENTRY = textwrap.dedent(
  """
  import builtins, errno, os, sys, threading
  sys.path.insert(0, {root!r})
  import batching, checkpoints, entry, main, train, utils

  fault = os.environ['FAULT']
  main.EXIT_GRACE_SECONDS = 3.0
  armed = []  # Non-empty from the first save of epoch 2 on.
  save = checkpoints.save

  def save_armed(manager, step, *args, **kwargs):
    if step >= 2:
      armed.append(step)
    return save(manager, step, *args, **kwargs)

  checkpoints.save = save_armed

  def checkpoint_path(path):
    return armed and '/checkpoints/' in os.fspath(path)

  if fault == 'read_only':
    makedirs = os.makedirs

    def refuse(path, *args, **kwargs):
      if checkpoint_path(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
      return makedirs(path, *args, **kwargs)

    os.makedirs = refuse

  if fault == 'disk_full':
    real_open = builtins.open

    def full_open(path, mode='r', *args, **kwargs):
      if checkpoint_path(path) and any(c in mode for c in 'wax+'):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
      return real_open(path, mode, *args, **kwargs)

    builtins.open = full_open

  if fault in ('stuck_thread', 'stuck_thread_user_error'):
    # A thread that never ends, as orbax's did after a failed save.
    threading.Thread(target=threading.Event().wait).start()
    evaluate = train.evaluate
    calls = []

    def failing_evaluate(*args, **kwargs):
      calls.append(1)
      if fault == 'stuck_thread_user_error':
        raise utils.UserError('injected user error')
      if len(calls) == 2:
        raise RuntimeError('injected failure in epoch 2')
      return evaluate(*args, **kwargs)

    train.evaluate = failing_evaluate

  if fault == 'prefetch':
    # The rows of a batch: host-fed and device-resident training read them.
    train_rows = batching.train_rows

    def failing_rows(*args, **kwargs):
      for i, rows in enumerate(train_rows(*args, **kwargs)):
        if i == 3:
          raise OSError(errno.EIO, 'Input/output error', 'injected.npy')
        yield rows

    batching.train_rows = failing_rows

  sys.argv = sys.argv[1:]
  entry.run_main(main.main)
  """
).format(root=ROOT)


def _run(argv, env=None, **kwargs):
  return subprocess.run(
    [sys.executable, *argv],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    env={**os.environ, **(env or {})},
    **kwargs,
  )


class MainFaultTest(_Case):
  """`python main.py` as a user runs it, with faults injected."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    _write_csv(os.path.join(cls.tmp, 'clicks.csv'), 4000, seed=0)
    cls.script = os.path.join(cls.tmp, 'inject.py')
    with open(cls.script, 'w') as f:
      f.write(_ENTRY)

  def _workdir(self):
    return os.path.join(tempfile.mkdtemp(dir=self.tmp), 'run')

  def _inject(self, fault, workdir):
    return _run([self.script, *_flags(workdir, self.tmp)], env={'FAULT': fault})

  def assertUserError(self, result, *parts):
    """Status 2 and one line, `main.py: error: ...`, with no traceback."""
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    self.assertNotIn('Traceback', result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    self.assertRegex(last, r'^(main|inject)\.py: error: ')
    for part in parts:
      self.assertIn(part, last)

  @parameterized.parameters(
    ('disk_full', 'No space left on device (ENOSPC'),
    ('read_only', 'Permission denied (EACCES'),
  )
  def test_failed_save_exits_and_keeps_what_was_saved(self, fault, reason):
    workdir = self._workdir()
    result = self._inject(fault, workdir)
    self.assertUserError(
      result, 'Cannot save the checkpoint of epoch 2', reason, 'resumes'
    )
    # Epoch 1 is intact: the run resumes from it and ends as one that never
    # failed.
    result = _run(_flags(workdir, self.tmp))
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('Resumed from epoch 1', result.stderr)
    self.assertSameMetrics(_metrics(workdir), self._straight())

  def _straight(self):
    """The metrics of the run without a fault."""
    cls = type(self)
    if not hasattr(cls, 'straight'):
      workdir = self._workdir()
      result = _run(_flags(workdir, self.tmp))
      self.assertEqual(result.returncode, 0, result.stderr[-3000:])
      cls.straight = _metrics(workdir)
    return cls.straight

  def test_thread_that_never_ends_cannot_hold_a_failed_run(self):
    result = self._inject('stuck_thread', self._workdir())
    self.assertEqual(result.returncode, 1, result.stderr[-3000:])
    self.assertIn('RuntimeError: injected failure in epoch 2', result.stderr)
    self.assertIn('exiting now', result.stderr)
    # A user's error keeps its status 2 when the grace period ends the run.
    result = self._inject('stuck_thread_user_error', self._workdir())
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    self.assertIn('error: injected user error', result.stderr)
    self.assertIn('exiting now', result.stderr)

  def test_error_in_the_prefetch_thread_surfaces(self):
    workdir = self._workdir()
    result = self._inject('prefetch', workdir)
    self.assertEqual(result.returncode, 1, result.stderr[-3000:])
    self.assertIn('Traceback', result.stderr)
    self.assertIn('Input/output error', result.stderr)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'metrics.jsonl')))

  def test_bad_values_are_named_before_any_data_work(self):
    cache = os.path.join(self.tmp, 'never-made')
    bad = {
      'log_every_steps': 0,
      'model.embed_dim': -4,
      'learning_rate': -1,
      'patience': 0,
      'dataset.cache_dir': cache,
    }
    result = script_runs.run(_flags(self._workdir(), self.tmp, **bad))
    self.assertUserError(
      result,
      '4 bad config values',
      'config.log_every_steps=0 must be an integer >= 1',
      'config.model.embed_dim=-4 must be an integer >= 1',
      'config.learning_rate=-1.0 must be a number > 0',
      'config.patience=0 must be an integer >= 1',
    )
    self.assertFalse(os.path.exists(cache))
    result = script_runs.run(
      _flags(self._workdir(), self.tmp, **{'model.embed_dim': 0})
    )
    self.assertUserError(result, 'config.model.embed_dim=0 must be')

  def test_workdir_that_is_a_file(self):
    path = os.path.join(self.tmp, 'a-file')
    with open(path, 'w'):
      pass
    result = script_runs.run(_flags(path, self.tmp))
    self.assertUserError(result, f'workdir {path} exists and is not a dir')

  def test_unwritable_workdir(self):
    workdir = self._workdir()
    os.makedirs(workdir)
    if os.geteuid() != 0:
      os.chmod(workdir, 0o555)
      undo = ['chmod', '755', workdir]
    elif subprocess.run(
      ['chattr', '+i', workdir], capture_output=True
    ).returncode:
      raise unittest.SkipTest('chattr +i is not available here.')
    else:
      undo = ['chattr', '-i', workdir]
    try:
      result = script_runs.run(_flags(workdir, self.tmp))
    finally:
      subprocess.run(undo, check=True)
    self.assertUserError(result, f'workdir {workdir} is not writable')

  def test_workdir_in_use_names_its_holder(self):
    workdir = workdir_lib.prepare(self._workdir())
    with workdir_lib.acquire(workdir):
      result = script_runs.run(_flags(workdir, self.tmp))
    self.assertUserError(result, f'is in use by pid {os.getpid()} on host')


class KillRestartStressTest(_Case):
  """SIGKILL at random moments of every phase, then restart: 6 kills.

  Two chains of runs go side by side, each in its own workdir and cache. A
  kill waits for the log line that starts its phase (for the phases of an
  epoch, in a random one of the epochs left), then a random part of that
  phase's duration in an uninterrupted reference run; a preprocessing kill
  first deletes its chain's cache. Phases take turns; a run whose epochs
  are all trained is finished when an epoch's turn comes. Every run that
  finishes must end with the reference's metrics, every line of them; the
  next kill then goes to a fresh workdir.
  """

  KILLS = 6  # Each of the five phases once, the preprocessing twice.
  CHAINS = 2
  # Phase: (the log line that starts it, the line that ends it).
  PHASES = {
    'preprocess': ('JAX process', 'Dataset csv'),
    'train': ('parameters', 'Saved the checkpoint of epoch 3'),
    'evaluate': ('split=train', 'split=valid'),
    'save': ('split=valid', 'Saved the checkpoint'),
    'test': ('on the test split', 'split=test'),
  }
  EPOCH_PHASES = ('train', 'evaluate', 'save')

  def _start(self, workdir, cache, env):
    flags = _flags(workdir, self.tmp, **{'dataset.cache_dir': cache})
    return subprocess.Popen(
      [sys.executable, *flags],
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )

  def _watch(self, proc, marker=None, count=1, delay=0.0):
    """Reads the log; SIGKILLs `delay` s after the `count`th `marker` line.

    Returns:
      The log lines with the time each was read.
    """
    lines, seen = [], threading.Event()

    def read():
      for line in proc.stderr:
        lines.append((time.monotonic(), line))
        if marker and sum(marker in s for _, s in lines) >= count:
          seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + TIMEOUT
    try:
      while marker and proc.poll() is None and not seen.wait(0.01):
        self.assertLess(time.monotonic(), deadline, 'the run hung')
      if marker and seen.is_set():
        end = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < end:
          time.sleep(0.002)
        if proc.poll() is None:
          proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
      if proc.poll() is None:  # The run hung: end it with the test.
        proc.kill()
        proc.wait()
    reader.join(timeout=TIMEOUT)
    return lines

  def _finish(self, workdir, cache, env):
    proc = self._start(workdir, cache, env)
    lines = self._watch(proc)
    self.assertEqual(proc.returncode, 0, ''.join(s for _, s in lines)[-3000:])
    return lines

  def _epochs_left(self, workdir):
    latest = os.path.join(workdir, 'checkpoints', 'latest')
    steps = os.listdir(latest) if os.path.isdir(latest) else []
    done = max((int(s) for s in steps if s.isdigit()), default=0)
    return SETTINGS['num_epochs'] - done

  def _unchecked(self, workdir):
    """Step directories without checksums: a save cut short leaves one."""
    found = set()
    for manager in ('latest', 'best'):
      directory = os.path.join(workdir, 'checkpoints', manager)
      for name in os.listdir(directory) if os.path.isdir(directory) else []:
        step = os.path.join(directory, name)
        if not os.path.exists(os.path.join(step, step_files.CHECKSUMS)):
          found.add(step)
    return found

  def _chain(self, index, kills, windows, expected, env):
    """`kills` kills and restarts; returns the phases that were killed."""
    rng = random.Random(index)
    cache = os.path.join(self.tmp, f'cache{index}')
    order = list(self.PHASES)
    runs, killed = 0, []
    workdir = os.path.join(self.tmp, f'chain{index}-run{runs}')
    while len(killed) < kills:
      self.assertLess(runs, kills, 'the kills keep missing the runs')
      # Chain i starts where chain i - 1's kills end: every phase is hit.
      phase = order[(index * kills + len(killed)) % len(order)]
      left = self._epochs_left(workdir)
      if phase in self.EPOCH_PHASES and not left:
        # Every epoch is trained: finish this run, start another.
        self._finish(workdir, cache, env)
        self.assertSameMetrics(_metrics(workdir), expected)
        runs += 1
        workdir = os.path.join(self.tmp, f'chain{index}-run{runs}')
        left = self._epochs_left(workdir)
      marker, count, window = self.PHASES[phase][0], 1, windows[phase]
      if phase == 'train':
        window *= left / SETTINGS['num_epochs']
      elif phase in self.EPOCH_PHASES:
        count = rng.randint(1, left)
      if phase == 'preprocess':
        shutil.rmtree(cache, ignore_errors=True)
      before = self._unchecked(workdir)
      proc = self._start(workdir, cache, env)
      lines = self._watch(proc, marker, count, rng.uniform(0, window))
      if proc.returncode == -signal.SIGKILL:
        cut = self._unchecked(workdir) - before
        killed.append(phase + ' (a save cut short)' * bool(cut))
        continue
      log = ''.join(s for _, s in lines)[-3000:]
      self.assertEqual(proc.returncode, 0, log)
      self.assertSameMetrics(_metrics(workdir), expected)
      runs += 1
      workdir = os.path.join(self.tmp, f'chain{index}-run{runs}')
    self._finish(workdir, cache, env)
    self.assertSameMetrics(_metrics(workdir), expected)
    return killed

  def test_sigkill_anywhere_then_restart_ends_as_the_uninterrupted_run(self):
    self.tmp = tempfile.mkdtemp()
    _write_csv(os.path.join(self.tmp, 'clicks.csv'), 4000, seed=0)
    # The reference run caches the compiled programs on disk, and the
    # others only read them: the restarts spend their time on the run.
    env = {
      **os.environ,
      'JAX_COMPILATION_CACHE_DIR': os.path.join(self.tmp, 'jax-cache'),
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
    }
    reference = os.path.join(self.tmp, 'reference')
    lines = self._finish(reference, os.path.join(self.tmp, 'cache'), env)
    expected = _metrics(reference)
    windows = {}
    for phase, (start, end) in self.PHASES.items():
      begin = next(t for t, s in lines if start in s)
      windows[phase] = next(t for t, s in lines if end in s and t >= begin)
      windows[phase] -= begin

    kills = self.KILLS // self.CHAINS
    with futures.ThreadPoolExecutor(self.CHAINS) as pool:
      chains = [
        pool.submit(self._chain, i, kills, windows, expected, env)
        for i in range(self.CHAINS)
      ]
      killed = [phase for chain in chains for phase in chain.result()]
    self.assertLen(killed, self.KILLS)
    self.assertEqual({p.split(' ')[0] for p in killed}, set(self.PHASES))
    logging.info('Killed in: %s', {p: killed.count(p) for p in set(killed)})


if __name__ == '__main__':
  absltest.main()
