"""Tests of train.py: metrics, the model factory, the pmap steps on 2 devices,
padded evaluation, and a whole run that resumes."""

import contextlib
import functools
import importlib
import itertools
import json
import os
import shutil
import tempfile
import tracemalloc
from unittest import mock
import warnings

from absl.testing import absltest
from absl.testing import parameterized
from flax import jax_utils
import jax
import ml_collections
import numpy as np

import batching
import best_reader
import config_check
from configs import default
from configs import finalmlp
import data
import event_files
import metrics
import models
import programs
import train
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _brute_force_auc(labels, scores):
  pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
  neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
  wins = sum(
    1.0 if p > n else 0.5 if p == n else 0.0
    for p, n in itertools.product(pos, neg)
  )
  return wins / (len(pos) * len(neg))


def _numpy_logloss(labels, logits):
  """Mean of -y log p - (1 - y) log(1 - p), p = sigmoid(logits), in float64.

  -log p = log(1 + e^-z) and -log(1 - p) = log(1 + e^z), exact for any z.
  """
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels, np.float64)
  return np.mean(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z))


def _config(**overrides):
  config = default.get_config('smoke')
  config.model = ml_collections.ConfigDict(dict(embed_dim=4))
  config.update(overrides)
  return config


def _dataset(n=1000, seed=0, field_dims=(13, 17)):
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.integers(0, d, n) for d in field_dims], 1)
  logits = np.sin(ids[:, 0]) + np.cos(ids[:, 1] * 0.7)
  labels = (rng.random(n) < 1 / (1 + np.exp(-2 * logits))).astype(np.float32)
  return data.Split(ids.astype(np.int32), labels)


def _tensorboard(workdir):
  """{tag: {step: value}} as TensorBoard reads the event files of `workdir`
  (the last value of a step wins, as in its plots)."""
  from tensorboard.backend.event_processing import event_accumulator

  events = event_accumulator.EventAccumulator(workdir)
  events.Reload()
  return {
    tag: {e.step: e.value for e in events.Scalars(tag)}
    for tag in events.Tags()['scalars']
  }


def _tensorboard_points(workdir, server=False):
  """{tag: [(step, value)]} as TensorBoard reads them, every point of a
  step; `server`: as its server's Python loader, one tag's list."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.backend.event_processing import plugin_event_accumulator
  from tensorboard.util import tensor_util

  if server:
    events = plugin_event_accumulator.EventAccumulator(workdir)
    events.Reload()
    return [
      (e.step, tensor_util.make_ndarray(e.tensor_proto).item())
      for e in events.Tensors('train/loss')
    ]
  events = event_accumulator.EventAccumulator(workdir)
  events.Reload()
  return {
    tag: [(e.step, e.value) for e in events.Scalars(tag)]
    for tag in events.Tags()['scalars']
  }


def _tensorboard_fast(workdir):
  """{tag: [(step, value)]} as TensorBoard's fast loader reads them: every
  event of the files in the order of their names, SessionLog START
  ignored, the last value at a step kept."""
  from tensorboard.backend.event_processing import event_file_loader

  points = {}
  for name in sorted(os.listdir(workdir)):
    if name.startswith('events.out.tfevents.'):
      path = os.path.join(workdir, name)
      for e in event_file_loader.LegacyEventFileLoader(path).Load():
        for value in e.summary.value:
          points.setdefault(value.tag, {})[e.step] = value.simple_value
  return {tag: sorted(steps.items()) for tag, steps in points.items()}


def _metrics_lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  for record in records:
    record.pop('wall_time')
    record.pop('time')
  return records


class MetricsTest(parameterized.TestCase):
  @parameterized.parameters(0, 1, 2, 3)
  def test_auc_matches_all_pairs_count_with_ties(self, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    # Few distinct scores: many ties inside and across classes.
    scores = rng.integers(0, 7, 200).astype(np.float32)
    self.assertAlmostEqual(
      metrics.roc_auc(labels, scores), _brute_force_auc(labels, scores), 12
    )

  def test_auc_and_logloss_in_blocks_match_brute_force(self):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(-3, 4, 300).astype(np.float32)  # Many ties.
    with mock.patch.object(metrics, 'BLOCK_ROWS', 7):
      self.assertAlmostEqual(
        metrics.roc_auc(labels, scores), _brute_force_auc(labels, scores), 12
      )
      self.assertAlmostEqual(
        metrics.logit_log_loss(labels, scores),
        _numpy_logloss(labels, scores),
        12,
      )

  def test_auc_and_logloss_of_many_rows_hold_little_beyond_them(self):
    # predict.py scores a whole file's logits (4 bytes a row) and labels (1)
    # at its end: ranks in float64 took 79 bytes a row more (3.6 GB for
    # Kaggle Criteo's 45M lines), the logloss 40.
    n = 1 << 21
    rng = np.random.default_rng(0)
    logits = rng.normal(size=n).astype(np.float32)
    labels = (rng.random(n) < 0.3).astype(np.uint8)
    self.enter_context(
      mock.patch.object(metrics, 'BLOCK_ROWS', 1 << 16, create=True)
    )
    for score in (metrics.roc_auc, metrics.logit_log_loss):
      tracemalloc.start()
      try:
        score(labels, logits)
        peak = tracemalloc.get_traced_memory()[1]
      finally:
        tracemalloc.stop()
      self.assertLess(peak / n, 10, score.__name__)  # Bytes a row.

  def test_auc_extremes_and_one_class(self):
    self.assertEqual(metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]), 1.0)
    self.assertEqual(metrics.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]), 0.0)
    self.assertEqual(metrics.roc_auc([0, 1], [0.5, 0.5]), 0.5)
    self.assertTrue(np.isnan(metrics.roc_auc([1, 1], [0.1, 0.2])))

  def test_auc_of_one_class_is_nan_without_a_numpy_warning(self):
    # A validation split of positives only divided 0 by 0: 'RuntimeWarning:
    # invalid value encountered' in the log of every epoch.
    for labels in ([1, 1, 1], [0, 0, 0]):
      with warnings.catch_warnings():
        warnings.simplefilter('error')
        self.assertTrue(np.isnan(metrics.roc_auc(labels, [0.1, 0.2, 0.2])))

  def test_json_line_writes_non_finite_numbers_at_any_depth_as_null(self):
    record = {
      'a': [1.5, float('nan')],
      'b': (float('inf'), {'c': -float('inf')}),
      'd': {'e': [float('nan')], 'f': 2},
    }
    line = metrics.json_line(record)
    self.assertEqual(
      line,
      '{"a": [1.5, null], "b": [null, {"c": null}],'
      ' "d": {"e": [null], "f": 2}}\n',
    )

  def test_auc_of_nan_scores_is_nan(self):
    # Sorted, NaNs kept their positions: an AUC of the rows' order.
    self.assertTrue(np.isnan(metrics.roc_auc([0, 1], [np.nan, np.nan])))
    self.assertTrue(np.isnan(metrics.roc_auc([1, 0, 1], [0.2, 0.1, np.nan])))

  def test_a_resume_cuts_the_file_in_place(self):
    # A rewrite gave the file a new inode: `tail -f` followed the old one
    # and went silent, `tail -F` printed every line again.
    with tempfile.TemporaryDirectory() as workdir:
      path = os.path.join(workdir, 'metrics.jsonl')
      writer = metrics.MetricsWriter(workdir, enabled=True)
      for epoch in (1, 2, 3):
        writer.write(split='train', epoch=epoch, loss=0.5)
        writer.write(split='valid', epoch=epoch, auc=0.7)
      writer.write(split='test', epoch=2, auc=0.7)
      with open(path) as f:
        lines = f.readlines()
      with open(path, 'a') as f:
        f.write('{"split": "tra')  # Cut short by a kill.
      inode = os.stat(path).st_ino
      writer.truncate(3)
      self.assertEqual(os.stat(path).st_ino, inode)
      with open(path) as f:
        self.assertEqual(f.readlines(), lines[:6])
      mtime = os.stat(path).st_mtime_ns
      writer.truncate(3)  # Nothing to drop: left alone.
      self.assertEqual(os.stat(path).st_mtime_ns, mtime)
      writer.truncate(1)
      writer.write(split='train', epoch=2, loss=0.4)
      self.assertEqual(os.stat(path).st_ino, inode)
      with open(path) as f:
        got = f.readlines()
      self.assertEqual(got[:2], lines[:2])
      self.assertEqual(json.loads(got[2])['loss'], 0.4)
      writer.truncate(0)  # From the first line on: cut there too.
      self.assertEqual(os.stat(path).st_ino, inode)
      self.assertEqual(os.path.getsize(path), 0)

  def test_an_edited_line_is_kept_but_not_plotted_where_it_cannot_be(self):
    # A step that is not an integer has no place on TensorBoard's axis; a
    # value that is not a number is not a scalar.
    with tempfile.TemporaryDirectory() as workdir:
      lines = [
        {'split': 'train', 'epoch': 1, 'step': 'ten', 'loss': 0.5},
        {'split': 'train', 'epoch': 1, 'step': None, 'loss': 0.6},
        {'split': 'train', 'epoch': 1, 'step': 10, 'loss': 0.25},
        {'split': 'valid', 'epoch': 1, 'step': 10, 'auc': 0.5, 'note': 'x'},
        {'split': 'test', 'epoch': 1, 'step': 10, 'time': 'noon', 'auc': 1},
      ]
      with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
        f.writelines(metrics.json_line(line) for line in lines)
      metrics.MetricsWriter(workdir, enabled=True).truncate(2)
      self.assertEqual(_metrics_lines(workdir), lines[:4])
      self.assertEqual(
        _tensorboard(workdir),
        {'train/loss': {10: 0.25}, 'valid/auc': {10: 0.5}},
      )
      # A time that is not a number (an edited line) is the time of writing.
      writer = event_files.EventWriter(workdir)
      writer.write(lines[4])
      self.assertEqual(_tensorboard(workdir)['test/auc'], {10: 1.0})

  def test_lines_kept_after_a_dropped_one_stay(self):
    # An edited file: a test line amid the epochs that a resume keeps.
    with tempfile.TemporaryDirectory() as workdir:
      path = os.path.join(workdir, 'metrics.jsonl')
      writer = metrics.MetricsWriter(workdir, enabled=True)
      writer.write(split='train', epoch=1, loss=0.5)
      writer.write(split='test', epoch=1, auc=0.6)
      writer.write(split='valid', epoch=2, auc=0.7)
      writer.write(split='train', epoch=3, loss=0.3)
      with open(path) as f:
        lines = f.readlines()
      writer.truncate(2)
      with open(path) as f:
        self.assertEqual(f.readlines(), [lines[0], lines[2]])

  def test_a_writer_not_enabled_leaves_the_file_alone(self):
    # Processes other than 0: only process 0 writes (and cuts) the file.
    with tempfile.TemporaryDirectory() as workdir:
      path = os.path.join(workdir, 'metrics.jsonl')
      metrics.MetricsWriter(workdir, enabled=True).write(
        split='train', epoch=2, loss=0.5
      )
      with open(path) as f:
        lines = f.readlines()
      writer = metrics.MetricsWriter(workdir, enabled=False)
      writer.truncate(1)
      writer.write(split='train', epoch=2, loss=0.4)
      with open(path) as f:
        self.assertEqual(f.readlines(), lines)

  def test_the_events_a_resume_writes_again_keep_their_time(self):
    # TensorBoard's relative and wall-time axes read each event's time.
    from tensorboard.backend.event_processing import event_accumulator

    with tempfile.TemporaryDirectory() as workdir:
      with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
        for epoch, at in ((1, 1000.25), (2, 2000.5)):
          f.write(
            metrics.json_line(
              dict(split='train', epoch=epoch, step=epoch, loss=0.5, time=at)
            )
          )
      metrics.MetricsWriter(workdir, enabled=True).truncate(1)
      events = event_accumulator.EventAccumulator(workdir)
      events.Reload()
      self.assertEqual(
        [(e.wall_time, e.step) for e in events.Scalars('train/loss')],
        [(1000.25, 1)],
      )

  def test_wall_time_goes_on_from_the_offset_a_resume_restores(self):
    # A resumed run's lines go on from the saved wall time, so that its
    # curves against wall-clock time continue the first run's.
    with (
      tempfile.TemporaryDirectory() as workdir,
      mock.patch.object(
        metrics.time, 'perf_counter', side_effect=[1000.0, 1003.5]
      ),
    ):
      writer = metrics.MetricsWriter(workdir, True, wall_time_offset=120.0)
      writer.write(split='train', epoch=3, step=30, loss=0.5)
      with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        self.assertEqual(json.loads(f.read())['wall_time'], 123.5)

  def test_a_metrics_file_that_cannot_be_read_is_one_line(self):
    # A resume met a traceback (IsADirectoryError) reading it.
    with tempfile.TemporaryDirectory() as workdir:
      os.makedirs(os.path.join(workdir, 'metrics.jsonl'))
      writer = metrics.MetricsWriter(workdir, enabled=True)
      with self.assertRaisesRegex(
        UserError,
        r'^Cannot read \S+/metrics.jsonl: Is a directory \(EISDIR, .*\)\.'
        r' Make it a readable file again',
      ):
        writer.truncate(1)

  def test_crc32c_of_the_event_files(self):
    # RFC 3720's check value and its 32 bytes of zeros and of 0xff.
    self.assertEqual(event_files.crc32c(b'123456789'), 0xE3069283)
    self.assertEqual(event_files.crc32c(bytes(32)), 0x8A9136AA)
    self.assertEqual(event_files.crc32c(b'\xff' * 32), 0x62A8AB43)

  def test_large_steps_and_long_tags_reach_tensorboard_as_written(self):
    # Varints of more than one byte: a real run's steps pass 127 in its
    # first epoch, and a tag of 128 bytes or more takes a two-byte length.
    from tensorboard.compat.proto import event_pb2

    tag = 'x' * 200
    with tempfile.TemporaryDirectory() as workdir:
      writer = event_files.EventWriter(workdir)
      for step in (128, 300, 16_384, 2**40 + 5):
        writer.write({'split': 'valid', 'step': step, tag: step % 1000})
      want = {128: 128.0, 300: 300.0, 16_384: 384.0, 2**40 + 5: 781.0}
      self.assertEqual(_tensorboard(workdir), {f'valid/{tag}': want})
      # Each file opens with its version, then a SessionLog START.
      from tensorboard.backend.event_processing import event_file_loader

      (name,) = [n for n in os.listdir(workdir) if 'tfevents' in n]
      path = os.path.join(workdir, name)
      first = list(event_file_loader.LegacyEventFileLoader(path).Load())[:2]
      self.assertEqual(first[0].file_version, 'brain.Event:2')
      self.assertEqual(first[1].session_log.status, 1)  # START
    parsed = event_pb2.Event.FromString(
      event_files.event(2**63 - 1, 1.5, scalars={tag: 0.25})
    )
    self.assertEqual(parsed.step, 2**63 - 1)
    self.assertEqual(parsed.wall_time, 1.5)
    self.assertEqual(parsed.summary.value[0].tag, tag)
    self.assertEqual(parsed.summary.value[0].simple_value, 0.25)

  def test_resumes_leave_two_event_files_the_older_one_empty(self):
    # Each resume emptied the file before it and left the older ones: a
    # run resumed a hundred times left a hundred files behind.
    with tempfile.TemporaryDirectory() as workdir:
      for resumed in range(5):
        writer = metrics.MetricsWriter(workdir, enabled=True)
        writer.truncate(resumed)
        writer.write(split='train', epoch=resumed + 1, step=resumed, loss=1)
      names = sorted(n for n in os.listdir(workdir) if 'tfevents' in n)
      sizes = [os.path.getsize(os.path.join(workdir, n)) for n in names]
      self.assertLen(sizes, 2)
      self.assertEqual(sizes[0], 0)
      want = {step: 1.0 for step in range(5)}
      self.assertEqual(_tensorboard(workdir), {'train/loss': want})

  def test_tensorboard_drops_the_events_a_resume_redoes(self):
    with tempfile.TemporaryDirectory() as workdir:
      writer = metrics.MetricsWriter(workdir, enabled=True)
      for epoch in (1, 2, 3):
        writer.write(split='train', epoch=epoch, step=10 * epoch, loss=epoch)
        writer.write(split='valid', epoch=epoch, step=10 * epoch, auc=0.5)
      # Killed before epoch 3's checkpoint: a new process redoes it.
      writer = metrics.MetricsWriter(workdir, enabled=True)
      writer.truncate(2)
      writer.write(split='train', epoch=3, step=30, loss=0.25)
      self.assertEqual(
        _tensorboard(workdir),
        {
          'train/loss': {10: 1.0, 20: 2.0, 30: 0.25},
          'valid/auc': {10: 0.5, 20: 0.5},
        },
      )

  def test_tensorboard_shows_the_test_line_that_metrics_jsonl_keeps(self):
    # A resume drops the test line, at the best epoch's step, before the
    # last step kept: TensorBoard kept its point, beside the new one or
    # twice at the same step. Its fast loader (tensorboard-data-server, the
    # default) ignores SessionLog START: it kept the point while the earlier
    # files were there. A loader running across the resumes reads on.
    from tensorboard.backend.event_processing import event_accumulator

    with tempfile.TemporaryDirectory() as workdir:
      running = event_accumulator.EventAccumulator(workdir)
      runs = ((0, (1, 2), 1), (2, (3,), 1), (3, (4,), 4))
      for resumed, epochs, best in runs:  # Each resumes the one before.
        writer = metrics.MetricsWriter(workdir, enabled=True)
        writer.truncate(resumed)
        for epoch in epochs:
          for split in ('train', 'valid'):
            writer.write(split=split, epoch=epoch, step=10 * epoch, auc=epoch)
        writer.write(split='test', epoch=best, step=10 * best, auc=resumed)
        running.Reload()
      steps = [(10 * epoch, epoch) for epoch in (1, 2, 3, 4)]
      want = {'train/auc': steps, 'valid/auc': steps, 'test/auc': [(40, 3)]}
      self.assertEqual(_tensorboard_points(workdir), want)
      self.assertEqual(_tensorboard_fast(workdir), want)
      self.assertEqual(
        [(e.step, e.value) for e in running.Scalars('test/auc')], [(40, 3)]
      )

  def test_a_resume_of_a_run_without_event_files_writes_all_it_keeps(self):
    # Versions before the event files wrote metrics.jsonl alone: a resume
    # wrote the lines from its restart on, so TensorBoard lost the epochs
    # before the best one.
    with tempfile.TemporaryDirectory() as workdir:
      writer = metrics.MetricsWriter(workdir, enabled=True)
      for epoch in (1, 2, 3):
        writer.write(split='train', epoch=epoch, step=10 * epoch, loss=epoch)
      writer.write(split='test', epoch=2, step=20, auc=0.5)
      for name in os.listdir(workdir):
        if name.startswith('events.out.tfevents.'):
          os.remove(os.path.join(workdir, name))
      writer = metrics.MetricsWriter(workdir, enabled=True)
      writer.truncate(2)
      writer.write(split='train', epoch=3, step=30, loss=0.25)
      self.assertEqual(
        _tensorboard(workdir),
        {'train/loss': {10: 1.0, 20: 2.0, 30: 0.25}},
      )

  def test_the_tensorboard_server_drops_the_events_a_resume_redoes(self):
    # Its loader (`--load_fast=false`, or without tensorboard-data-server)
    # took the first resume's SessionLog START for the run's start.
    with tempfile.TemporaryDirectory() as workdir:
      for resumed, epochs in ((0, (1, 2, 3)), (2, (3,))):
        writer = metrics.MetricsWriter(workdir, enabled=True)
        writer.truncate(resumed)
        for epoch in epochs:
          writer.write(split='train', epoch=epoch, step=epoch, loss=resumed)
      want = [(1, 0), (2, 0), (3, 2)]
      self.assertEqual(_tensorboard_points(workdir, server=True), want)

  def test_the_event_files_of_a_process_sort_as_written(self):
    # TensorBoard reads a run's files in the order of their names: a
    # process's tenth file came before its ninth.
    with tempfile.TemporaryDirectory() as workdir:
      # Counted from 0 (as in a new process): the 10th file passes 9.
      with mock.patch.object(event_files, '_FILES_OPENED', [0]):
        for n in range(12):
          writer = event_files.EventWriter(workdir)
          writer.write({'split': 'train', 'step': 1, 'loss': n})
      self.assertEqual(_tensorboard(workdir), {'train/loss': {1: 11.0}})

  @parameterized.parameters('replace', 'listdir')
  def test_a_rewrite_the_disk_refuses_leaves_the_event_files_as_they_were(
    self, refused
  ):
    # A refused listing of the old files raised, and stopped the run.
    with tempfile.TemporaryDirectory() as workdir:
      writer = metrics.MetricsWriter(workdir, enabled=True)
      for epoch in (1, 2):
        writer.write(split='train', epoch=epoch, step=epoch, loss=epoch)
      before = _tensorboard_points(workdir)
      writer = metrics.MetricsWriter(workdir, enabled=True)
      full = OSError(28, 'No space left on device')
      with (
        mock.patch.object(os, refused, side_effect=full),
        self.assertLogs(level='WARNING') as logs,
      ):
        writer.truncate(1)
      self.assertIn('No more TensorBoard events', logs.output[0])
      self.assertEqual(_tensorboard_points(workdir), before)
      names = sorted(os.listdir(workdir))
      self.assertLen(names, 2)  # No temporary file left behind.
      self.assertEqual(names[1], 'metrics.jsonl')
      self.assertLen(_metrics(workdir), 1)

  def test_an_event_file_the_disk_refuses_leaves_metrics_jsonl_going(self):
    with tempfile.TemporaryDirectory() as workdir:
      writer = metrics.MetricsWriter(workdir, enabled=True)
      full = OSError(28, 'No space left on device')
      with (
        mock.patch('builtins.open', side_effect=full) as opened,
        self.assertLogs(level='WARNING') as logs,
      ):
        writer.write(split='train', epoch=1, step=5, loss=0.5)
        writer.write(split='train', epoch=2, step=10, loss=0.4)
      self.assertEqual(opened.call_count, 1)  # Tried once.
      self.assertIn('No more TensorBoard events', logs.output[0])
      self.assertLen(_metrics(workdir), 2)

  def test_non_finite_metrics_are_written_as_null(self):
    with tempfile.TemporaryDirectory() as workdir:
      path = os.path.join(workdir, 'metrics.jsonl')
      with open(path, 'w') as f:  # As written before: not JSON.
        f.write('{"split": "valid", "epoch": 1, "logloss": NaN}\n')
      writer = metrics.MetricsWriter(workdir, enabled=True)
      writer.truncate(1)
      writer.write(split='train', epoch=2, loss=float('nan'), rate=np.inf)
      with open(path) as f:
        records = [json.loads(line, parse_constant=self.fail) for line in f]
    self.assertEqual(
      [
        {k: r[k] for k in ('epoch', 'logloss', 'loss', 'rate') if k in r}
        for r in records
      ],
      [{'epoch': 1, 'logloss': None}, {'epoch': 2, 'loss': None, 'rate': None}],
    )


class CreateModelTest(absltest.TestCase):
  def test_every_configured_model_builds_from_its_file(self):
    names = models.names()
    self.assertContainsSubset({'lr', 'fm', 'ffm', 'afm', 'ncf'}, names)
    for name in names:
      if not os.path.exists(os.path.join(ROOT, 'configs', f'{name}.py')):
        continue  # A model file whose config is still to come.
      config = importlib.import_module(f'configs.{name}').get_config('smoke')
      model = train.create_model(config, (13, 17))
      self.assertEqual(config.model_name, name)
      self.assertEqual(type(model).__module__, f'models.{name}')

  def test_unknown_model_lists_the_model_files(self):
    with self.assertRaisesRegex(ValueError, 'config.model_name.*nope') as e:
      train.create_model(_config(model_name='nope'), (13, 17))
    for name in models.names():
      self.assertIn(name, str(e.exception))


class WarmStartTest(absltest.TestCase):
  def test_only_parameters_of_the_same_path_and_shape_are_copied(self):
    config = _config()
    model = train.create_model(config, (13, 17))
    state = train.state_initializer(config, model)(jax.random.key(0))
    params = jax.device_get(state.params)
    # Another run's FM: linear weights of the same shapes, embeddings of 8.
    source = jax.tree.map(lambda x: np.asarray(x) + 1.0, params)
    source['FeaturesEmbedding_0']['embedding'] = np.ones((30, 8), np.float32)
    source['Other_0'] = {'kernel': np.ones((2,), np.float32)}
    with mock.patch.object(
      train.best_reader,
      'load_best',
      return_value=({'params': source}, {'epoch': 1}),
    ):
      with self.assertLogs(level='WARNING') as logs:
        warm = jax.device_get(train.warm_start(state, '/runs/fm'))
    # The embedding a user expected copied is named with both shapes.
    self.assertRegex(
      logs.output[0], r'not copied.*embed_dim.*FeaturesEmbedding_0.*\(30, 8\)'
    )
    jax.tree.map(
      np.testing.assert_array_equal,
      warm.params,
      {
        'FeaturesLinear_0': source['FeaturesLinear_0'],
        'FeaturesEmbedding_0': params['FeaturesEmbedding_0'],
      },
    )


class PmapStepTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.assertEqual(jax.local_device_count(), 2, 'conftest sets 2 devices')
    self.config = _config()
    self.model = train.create_model(self.config, (13, 17), axis_name=train.AXIS)
    self.state = train.state_initializer(self.config, self.model)(
      jax.random.key(0)
    )
    split = _dataset(64)
    self.batch = {'ids': split.ids, 'label': split.labels}

  def _step(self, devices, model=None, config=None, state=None):
    """One step of `self`'s model (or `model`) on `devices`."""
    model, config = model or self.model, config or self.config
    p_step = jax.pmap(
      functools.partial(train.train_step, model=model, config=config),
      axis_name=train.AXIS,
      devices=devices,
    )
    state = jax_utils.replicate(state or self.state, devices=devices)
    hyper = jax_utils.replicate(train.hyperparameters(config), devices=devices)
    state, loss = p_step(state, batching.shard(self.batch, len(devices)), hyper)
    return state, loss

  def test_replicas_identical_after_a_step(self):
    state, loss = self._step(jax.local_devices())
    self.assertEqual(float(loss[0]), float(loss[1]))
    for leaf in jax.tree.leaves(state.params):
      np.testing.assert_array_equal(leaf[0], leaf[1])
    # And the step moved the parameters.
    moved = jax.tree.map(
      lambda a, b: np.abs(np.asarray(a[0]) - np.asarray(b)).max(),
      state.params,
      self.state.params,
    )
    self.assertGreater(max(jax.tree.leaves(moved)), 0)

  def test_two_devices_equal_one_device_on_the_same_global_batch(self):
    two, loss2 = self._step(jax.local_devices())
    one, loss1 = self._step(jax.local_devices()[:1])
    np.testing.assert_allclose(loss2[0], loss1[0], rtol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-7),
      two.params,
      one.params,
    )

  @parameterized.named_parameters(
    (
      'dcnv2_no_batch_norm',
      'dcnv2',
      dict(
        embed_dim=3,
        mlp_dims=(4,),
        num_cross_layers=1,
        num_experts=2,
        dropout=0.0,
      ),
    ),
    (
      'finalmlp_no_batch_norm',
      'finalmlp',
      dict(
        embed_dim=3,
        mlp1_dims=(4,),
        mlp2_dims=(4,),
        fs_dims=(4,),
        dropouts=(0.0, 0.0),
      ),
    ),
  )
  def test_a_config_without_batch_norm_steps_on_two_devices_as_on_one(
    self, name, small
  ):
    # As the config builds it (Linear with bias -> ReLU -> Dropout, no
    # batch_stats), smaller and without dropout, whose keys differ by device.
    config = importlib.import_module(f'configs.{name}').get_config('smoke')
    self.assertIs(config.model.batch_norm, False)
    config.model.update(small)
    model = train.create_model(config, (13, 17), axis_name=train.AXIS)
    config = train.resolve_optimizer(config, model)
    state = train.state_initializer(config, model)(jax.random.key(0))
    self.assertEqual(jax.tree.leaves(state.batch_stats), [])
    two, loss2 = self._step(jax.local_devices(), model, config, state)
    one, loss1 = self._step(jax.local_devices()[:1], model, config, state)
    np.testing.assert_allclose(loss2[0], loss1[0], rtol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-7),
      two.params,
      one.params,
    )
    # The step moved every parameter, the hidden layers' biases among them.
    moved = jax.tree.map(
      lambda a, b: np.abs(np.asarray(a[0]) - np.asarray(b)).max(),
      two.params,
      state.params,
    )
    self.assertGreater(min(jax.tree.leaves(moved)), 0)

  def test_batch_norm_statistics_are_the_global_batchs(self):
    # Each device normalises its half with the global batch's statistics
    # (BatchNorm's axis_name): the running averages after a step are those
    # of the whole batch on one device.
    config = _config(model_name='deepfm')
    config.model = ml_collections.ConfigDict(
      dict(embed_dim=4, mlp_dims=(8,), dropout=0.0)
    )
    model = train.create_model(config, (13, 17), axis_name=train.AXIS)
    state = train.state_initializer(config, model)(jax.random.key(0))
    p_step = jax.pmap(
      functools.partial(train.train_step, model=model, config=config),
      axis_name=train.AXIS,
    )
    new, _ = p_step(
      jax_utils.replicate(state),
      batching.shard(self.batch, 2),
      jax_utils.replicate(train.hyperparameters(config)),
    )
    _, want = train.create_model(config, (13, 17)).apply(
      {'params': state.params, 'batch_stats': state.batch_stats},
      self.batch['ids'],
      train=True,
      mutable=['batch_stats'],
    )
    got = jax_utils.unreplicate(new).batch_stats
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
      got,
      want['batch_stats'],
    )
    moved = jax.tree.map(
      lambda a, b: np.abs(a - b).max(), got, state.batch_stats
    )
    self.assertGreater(min(jax.tree.leaves(moved)), 1e-3)


class DropoutKeyTest(absltest.TestCase):
  def test_each_device_and_step_draws_its_own_dropout_masks(self):
    # The same half batch on both devices: only their masks differ. The
    # step's loss is the mean of the devices' losses, each under the key
    # of its step and device.
    config = _config(model_name='afm', weight_decay=0.0)
    config.model = ml_collections.ConfigDict(
      dict(embed_dim=4, attn_size=3, dropouts=(0.5, 0.5))
    )
    model = train.create_model(config, (13, 17), axis_name=train.AXIS)
    state = train.state_initializer(config, model)(jax.random.key(0))
    split = _dataset(16)
    half = {'ids': split.ids, 'label': split.labels}
    batch = jax.tree.map(lambda x: np.stack([x, x]), half)
    p_step = jax.pmap(
      functools.partial(train.train_step, model=model, config=config),
      axis_name=train.AXIS,
    )
    hyper = train.hyperparameters(config)
    replicated = jax_utils.replicate(state)
    seed = jax.random.key(hyper['seed'])
    for step in range(2):
      losses = [
        float(
          train.loss_fn(
            state.params,
            state.batch_stats,
            half,
            jax.random.fold_in(jax.random.fold_in(seed, step), device),
            model=model,
          )[0]
        )
        for device in range(2)
      ]
      self.assertGreater(abs(losses[0] - losses[1]), 1e-4)
      replicated, loss = p_step(replicated, batch, jax_utils.replicate(hyper))
      self.assertAlmostEqual(float(loss[0]), np.mean(losses), places=5)
      state = jax_utils.unreplicate(replicated)


class HyperparametersTest(absltest.TestCase):
  """The seed and the rates are the train program's arguments, not constants:
  a sweep over them compiles one program (and finds it in the cache)."""

  def _config(self, **overrides):
    config = _config(
      model_name='deepfm', optimizer='rowwise_adagrad', batch_size=16
    )
    config.model = ml_collections.ConfigDict(
      dict(embed_dim=4, mlp_dims=(8,), dropout=0.5)
    )
    config.update(overrides)
    return config

  def _program(self, config):
    model = train.create_model(config, (13, 17), axis_name=train.AXIS)
    state = train.state_initializer(config, model)(jax.random.key(0))
    p_train, _ = train.pmapped_steps(model, config)
    # One batch: one step, whose Adam update is -lr * g / (|g| + eps).
    _, stacks = programs.epoch_stacks(_dataset(16), config, 0)
    args = (train.replicate(state), next(stacks))
    return p_train, state, args

  def test_the_program_does_not_change_with_the_seed_or_the_rates(self):
    texts = []
    for overrides in (
      {},
      dict(
        seed=7, learning_rate=0.02, weight_decay=0.1, table_learning_rate=0.3
      ),
    ):
      config = self._config(**overrides)
      p_train, _, args = self._program(config)
      hyper = train.replicate(train.hyperparameters(config))
      texts.append(p_train.lower(*args, hyper).as_text())
    self.assertEqual(texts[0], texts[1])
    # A change that matters does change it.
    p_train, _, args = self._program(self._config(optimizer='adam'))
    hyper = train.replicate(train.hyperparameters(self._config()))
    self.assertNotEqual(p_train.lower(*args, hyper).as_text(), texts[0])

  def test_the_step_takes_them_from_its_arguments(self):
    config = self._config(optimizer='adam', weight_decay=0.0)
    p_train, state, args = self._program(config)
    moves = {}
    for name, overrides in [
      ('base', {}),
      ('seed', {'seed': 3}),
      ('lr', {'learning_rate': 2 * config.learning_rate}),
    ]:
      hyper = train.hyperparameters(self._config(**overrides))
      new, _ = p_train(*args, train.replicate(hyper))
      moves[name] = jax.tree.map(
        lambda a, b: np.asarray(a[0], np.float64) - np.asarray(b),
        new.params,
        state.params,
      )
    kernel = lambda tree: tree['MultiLayerPerceptron_0']['Dense_0']['kernel']  # noqa: E731
    # Another seed drops other units: other steps.
    self.assertGreater(
      np.abs(kernel(moves['seed']) - kernel(moves['base'])).max(), 1e-4
    )
    # Twice Adam's rate: every step twice as long (the moments are the same).
    for got, base in zip(
      jax.tree.leaves(moves['lr']), jax.tree.leaves(moves['base']), strict=True
    ):
      np.testing.assert_allclose(got, 2 * base, rtol=1e-4, atol=1e-9)
    self.assertGreater(np.abs(kernel(moves['base'])).max(), 1e-4)

  def test_a_seed_past_32_bits_keeps_its_low_bits(self):
    # As jax.random.key does (without jax_enable_x64); numpy's uint32
    # refused such a seed, which the config accepts.
    # Bit 31 set: all 32 low bits, not 31.
    seed = 2**32 + 2**31 + 5
    hyper = train.hyperparameters(self._config(seed=seed))
    self.assertEqual(hyper['seed'].dtype, np.uint32)
    self.assertEqual(hyper['seed'], 2**31 + 5)
    np.testing.assert_array_equal(
      jax.random.key_data(jax.random.key(hyper['seed'])),
      jax.random.key_data(jax.random.key(seed)),
    )


class TrainStepLossTest(absltest.TestCase):
  """The loss that train_step returns and descends: BCE plus sown penalties."""

  def _afm_step(self, attn_l2):
    config = _config(model_name='afm', weight_decay=0.0)
    config.model = ml_collections.ConfigDict(
      dict(embed_dim=4, attn_size=3, dropouts=(0.0, 0.0), attn_l2=attn_l2)
    )
    model = train.create_model(config, (13, 17), axis_name=train.AXIS)
    state = train.state_initializer(config, model)(jax.random.key(0))
    split = _dataset(64)
    batch = {'ids': split.ids, 'label': split.labels}
    p_step = jax.pmap(
      functools.partial(train.train_step, model=model, config=config),
      axis_name=train.AXIS,
    )
    new, loss = p_step(
      jax_utils.replicate(state),
      batching.shard(batch, 2),
      jax_utils.replicate(train.hyperparameters(config)),
    )
    logits = train.create_model(config, (13, 17)).apply(
      {'params': state.params}, batch['ids'], train=False
    )
    bce = _numpy_logloss(batch['label'], logits)
    return state, jax_utils.unreplicate(new), float(loss[0]), bce

  def _attention_kernel(self, params):
    (kernel,) = [
      np.asarray(v, np.float64)
      for p, v in jax.tree_util.tree_leaves_with_path(params)
      if 'attention' in jax.tree_util.keystr(p)
      and 'kernel' in jax.tree_util.keystr(p)
    ]
    return kernel

  def test_sown_penalty_is_in_the_loss_and_its_gradient(self):
    state, new, loss, bce = self._afm_step(attn_l2=0.5)
    kernel = self._attention_kernel(state.params)
    penalty = 0.5 * np.sum(kernel**2)
    self.assertGreater(penalty, 0.05)
    self.assertAlmostEqual(loss, bce + penalty, places=5)

    state, plain, plain_loss, plain_bce = self._afm_step(attn_l2=0.0)
    self.assertAlmostEqual(plain_bce, bce, places=12)
    self.assertAlmostEqual(plain_loss, bce, places=5)
    # Two fields make one pair, whose attention weight is 1 whatever the
    # attention network computes: the BCE gradient of its kernel is zero and
    # (without weight decay) only the penalty moves it.
    np.testing.assert_array_equal(self._attention_kernel(plain.params), kernel)
    moved = np.abs(self._attention_kernel(new.params) - kernel)
    self.assertGreater(moved.min(), 0)


class EvaluateTest(parameterized.TestCase):
  # Batch 16 on 2 devices: one, several and part batches; larger logits.
  @parameterized.parameters(
    (101, 1.0), (16, 1.0), (15, 1.0), (17, 1.0), (1, 1.0), (101, 2.0)
  )
  def test_padded_evaluation_equals_unpadded_numpy(self, n, scale):
    config = _config()
    model = train.create_model(config, (13, 17), axis_name=train.AXIS)
    state = train.state_initializer(config, model)(jax.random.key(1))
    # Non-trivial parameters, so that scores differ between rows.
    state = state.replace(
      params=jax.tree.map(
        lambda x: (
          np.random.default_rng(2)
          .normal(scale=scale, size=x.shape)
          .astype(np.float32)
        ),
        state.params,
      )
    )
    split = _dataset(n, seed=3)
    p_eval = jax.pmap(
      functools.partial(train.eval_step, model=model), axis_name=train.AXIS
    )
    metrics = train.evaluate(p_eval, train.replicate(state), split, 16)
    logits = np.asarray(
      train.create_model(config, (13, 17)).apply(
        {'params': state.params}, split.ids, train=False
      )
    )
    self.assertEqual(metrics['num_examples'], n)
    self.assertAlmostEqual(
      metrics['logloss'], _numpy_logloss(split.labels, logits), 5
    )
    if 0 < split.labels.sum() < n:
      self.assertAlmostEqual(
        metrics['auc'], _brute_force_auc(split.labels, logits), 6
      )


class TrainAndEvaluateTest(absltest.TestCase):
  def test_fm_learns_and_resumes_without_retraining(self):
    config = _config(num_epochs=2)
    with tempfile.TemporaryDirectory() as workdir:
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      test = train.train_and_evaluate(config, workdir)
      self.assertGreater(test['auc'], 0.75)
      lines = _metrics(workdir)
      plotted = {}  # metrics.jsonl's numbers, as TensorBoard plots them.
      for line in lines:
        for k in ('loss', 'examples_per_sec', 'auc', 'logloss'):
          if k in line:
            tag = plotted.setdefault(f'{line["split"]}/{k}', {})
            tag[line['step']] = np.float32(line[k])
      self.assertLen(plotted['valid/auc'], 2)
      self.assertEqual(_tensorboard(workdir), plotted)
      # A finished run started again trains nothing and ends the same: it
      # scores its best state again, and keeps the test line as it was.
      with open(os.path.join(workdir, 'metrics.jsonl'), 'rb') as f:
        written = f.read()
      again = train.train_and_evaluate(config, workdir)
      with open(os.path.join(workdir, 'metrics.jsonl'), 'rb') as f:
        self.assertEqual(f.read(), written)
      self.assertEqual(_tensorboard(workdir), plotted)
      self.assertEqual(again, test)

      # Stopped before it scores, it loses nothing: the test line stayed.
      def stopped(p_eval_step, state, split, batch_size):
        raise KeyboardInterrupt

      with (
        mock.patch.object(train, 'evaluate', stopped),
        self.assertRaises(KeyboardInterrupt),
      ):
        train.train_and_evaluate(config, workdir)
      with open(os.path.join(workdir, 'metrics.jsonl'), 'rb') as f:
        self.assertEqual(f.read(), written)
      self.assertEqual(_tensorboard(workdir), plotted)

  def _scripted(self, aucs, steps):
    """Epochs that only count their steps, evaluations that return the next
    of `aucs` and append the step of the state they score to `steps`."""

    def evaluate(p_eval_step, state, split, batch_size):
      del p_eval_step, batch_size
      steps.append(int(np.asarray(state.step)[0]))
      return {'auc': next(aucs), 'logloss': 0.5, 'num_examples': len(split)}

    def train_epoch(p_train_step, state, split, config, epoch, resident):
      del p_train_step, epoch, resident
      n = batching.num_train_steps(split, config.batch_size)
      return state.replace(step=state.step + n), 0.5, 1.0

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(train, 'evaluate', evaluate))
    stack.enter_context(mock.patch.object(train, 'train_epoch', train_epoch))
    return stack

  def _rates(self, aucs, rates):
    """`_scripted(aucs, [])`, each epoch appending its `(learning_rate,
    table_learning_rate)` to `rates`."""
    stack = self._scripted(aucs, [])
    scripted_epoch = train.train_epoch

    def train_epoch(p_train_step, state, split, config, *args):
      rates.append((config.learning_rate, config.table_learning_rate))
      return scripted_epoch(p_train_step, state, split, config, *args)

    stack.enter_context(mock.patch.object(train, 'train_epoch', train_epoch))
    return stack

  def test_early_stopping_counts_the_epochs_without_a_better_auc(self):
    # Scripted validation AUCs, then the test AUC. A tie is no better:
    # with patience 2, epochs 3 (a tie) and 4 end the run after the best,
    # epoch 2, whose state the test split scores. Each line names the step
    # of the state it scores, or of the epoch's end.
    aucs = itertools.chain([0.6, 0.7, 0.7, 0.65, 0.8], itertools.repeat(0.5))
    steps = []
    with (
      tempfile.TemporaryDirectory() as workdir,
      self._scripted(aucs, steps),
    ):
      config = _config(num_epochs=10, patience=2)
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      test = train.train_and_evaluate(config, workdir)
      lines = _metrics(workdir)
      best = os.path.join(workdir, 'checkpoints', 'best')
      self.assertEqual(os.listdir(best), ['2'])
    self.assertEqual(
      [(r['split'], r['epoch'], r.get('auc')) for r in lines],
      [('train', 1, None), ('valid', 1, 0.6), ('train', 2, None)]
      + [('valid', 2, 0.7), ('train', 3, None), ('valid', 3, 0.7)]
      + [('train', 4, None), ('valid', 4, 0.65), ('test', 2, 0.8)],
    )
    self.assertEqual(test['auc'], 0.8)
    n = steps[0]  # The steps of an epoch.
    self.assertGreater(n, 1)
    self.assertEqual(steps, [n, 2 * n, 3 * n, 4 * n, 2 * n])
    self.assertEqual([r['step'] for r in lines if r['split'] != 'train'], steps)
    self.assertEqual(
      [r['step'] for r in lines if r['split'] == 'train'], steps[:4]
    )

  def test_plateaus_reduce_the_learning_rates_and_a_resume_keeps_them(self):
    # Epochs 3 and 5 are no better: the next epoch trains at a tenth of the
    # rates (Adam's and the tables'), down to 1e-6 only; epoch 6 is the
    # second bad one in a row and stops the run (nothing follows it).
    rates = []
    aucs = [0.6, 0.7, 0.65, 0.8, 0.75, 0.74]
    with tempfile.TemporaryDirectory() as workdir:
      config = _config(
        num_epochs=3,
        patience=2,
        lr_plateau_factor=0.1,
        learning_rate=1e-3,
        table_learning_rate=2e-6,
      )
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      with self._rates(iter(aucs[:3] + [0.5]), rates):
        train.train_and_evaluate(config, workdir)
      config.num_epochs = 10  # Resumed after the plateau of epoch 3.
      with (
        self._rates(iter(aucs[3:] + [0.5]), rates),
        self.assertLogs(level='INFO') as logs,
      ):
        train.train_and_evaluate(config, workdir)
      lines = _metrics(workdir)
    self.assertIn(
      f'Resumed from epoch 3 of {workdir} at x0.1 the learning rates',
      '\n'.join(logs.output),
    )
    np.testing.assert_allclose(
      rates,
      [(1e-3, 2e-6)] * 3 + [(1e-4, 1e-6)] * 2 + [(1e-5, 1e-6)],
      rtol=1e-6,
    )
    self.assertEqual(
      [r['epoch'] for r in lines if r['split'] != 'train'],
      [1, 2, 3, 4, 5, 6, 4],
    )
    with tempfile.TemporaryDirectory() as workdir:  # 1: pytorch-fm's.
      config = _config(num_epochs=3, patience=3, learning_rate=1e-3)
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      with self._rates(iter([0.6, 0.5, 0.4, 0.5]), rates):
        train.train_and_evaluate(config, workdir)
    self.assertEqual([r[0] for r in rates[6:]], [1e-3] * 3)

  def test_a_plateau_that_stops_the_run_reduces_the_rates_of_a_resume(self):
    # Epoch 2, no better, stops a run of patience 1. Resumed with patience
    # 2, epoch 3 trains at the rate of a run begun so: halved (it kept the
    # full rate, as no reduction was recorded at the stop).
    rates = []
    with tempfile.TemporaryDirectory() as workdir:
      config = _config(num_epochs=5, lr_plateau_factor=0.5, learning_rate=1e-3)
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      for aucs, patience in (([0.7, 0.6, 0.5], 1), ([0.55, 0.5], 2)):
        config.patience = patience
        with self._rates(iter(aucs), rates):
          train.train_and_evaluate(config, workdir)
    np.testing.assert_allclose(
      [r[0] for r in rates], [1e-3, 1e-3, 5e-4], rtol=1e-6
    )

  def test_a_resume_goes_on_from_the_saved_wall_time(self):
    # The checkpoints keep the wall time of their epoch's end; a resumed
    # run's lines go on from it.
    with (
      tempfile.TemporaryDirectory() as workdir,
      self._scripted(itertools.repeat(0.7), []),
    ):
      config = _config(num_epochs=1)
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      train.train_and_evaluate(config, workdir)
      _, meta = best_reader.load_best(workdir)
      config.num_epochs = 2
      train.train_and_evaluate(config, workdir)
      with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        times = [json.loads(line)['wall_time'] for line in f]
    # Train and valid of epoch 1 (its test line is dropped), of epoch 2,
    # then test.
    self.assertLen(times, 5)
    self.assertBetween(meta['wall_time'], times[1], times[2])
    self.assertEqual(times, sorted(times))

  def test_auto_resumes_with_the_optimizer_of_the_checkpoints(self):
    # A run trained with another optimizer than 'auto' picks here (named,
    # or recorded before 'auto' was the default) goes on with it when
    # restarted with 'auto', as if never stopped.
    with tempfile.TemporaryDirectory() as root:

      def run(name, **overrides):
        config = _config(**overrides)
        config.dataset.cache_dir = os.path.join(root, 'cache')
        return train.train_and_evaluate(config, os.path.join(root, name))

      lazy = run('lazy', num_epochs=2, optimizer='lazy_adam')
      run('resumed', num_epochs=1, optimizer='lazy_adam')
      self.assertEqual(run('resumed', num_epochs=2, optimizer='auto'), lazy)
      # 'auto' alone is Adam on these small tables.
      adam = run('auto', num_epochs=2, optimizer='auto')
      self.assertNotEqual(adam, lazy)
      # A run of 'auto' goes on with what it became, named or not.
      run('auto_named', num_epochs=1, optimizer='auto')
      self.assertEqual(run('auto_named', num_epochs=2, optimizer='adam'), adam)
      run('auto_again', num_epochs=1, optimizer='auto')
      self.assertEqual(run('auto_again', num_epochs=2, optimizer='auto'), adam)

  def test_divergence_in_the_last_step_of_an_epoch_saves_nothing(self):
    # One step per epoch: its loss is of the initial state, finite, but the
    # step leaves parameters of 1e30 whose logits are NaN. That state was
    # scored an AUC (of NaNs) and saved as the best.
    with tempfile.TemporaryDirectory() as workdir:
      config = _config(num_epochs=2, learning_rate=1e30, batch_size=65536)
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      with self.assertRaisesRegex(
        UserError,
        r'^Validation scores are not finite at epoch 1 \(loss 0\.\d+,'
        r' validation AUC nan, logloss nan\): the run diverged in its last'
        r' step, or validation rows hold inputs far outside',
      ):
        train.train_and_evaluate(config, workdir)
      for kind in ('latest', 'best'):
        directory = os.path.join(workdir, 'checkpoints', kind)
        self.assertEqual(os.listdir(directory), [])
      valid = _metrics(workdir)[-1]
      self.assertEqual((valid['split'], valid['auc']), ('valid', None))

  def test_test_scores_that_are_not_finite_are_warned_of(self):
    # Rows that overflow the model (a number far outside training's range)
    # score NaN: metrics.jsonl records null, and the log now says why.
    real, calls = train.evaluate, []

    def nan_on_test(*args):
      scores = real(*args)
      calls.append(args[2])
      if len(calls) == 2:  # Epoch 1's validation, then the test split.
        scores.update(auc=float('nan'), logloss=float('nan'))
      return scores

    with tempfile.TemporaryDirectory() as workdir:
      config = _config(num_epochs=1)
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      with (
        mock.patch.object(train, 'evaluate', nan_on_test),
        self.assertLogs(level='WARNING') as logs,
      ):
        train.train_and_evaluate(config, workdir)
      warned = [x for x in logs.output if 'The test split scored NaN' in x]
      self.assertLen(warned, 1)
      self.assertIn('AUC nan, logloss nan; null in metrics.jsonl', warned[0])
      test = _metrics(workdir)[-1]
      self.assertEqual((test['split'], test['auc']), ('test', None))

  def test_divergence_stops_with_a_user_error_and_keeps_the_checkpoints(self):
    real = train.train_epoch

    def diverge_in_epoch_2(*args):
      state, loss, rate = real(*args)
      return state, float('nan') if args[4] == 1 else loss, rate

    with tempfile.TemporaryDirectory() as workdir:
      config = _config(num_epochs=2)
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      with (
        mock.patch.object(train, 'train_epoch', diverge_in_epoch_2),
        self.assertRaisesRegex(
          UserError,
          r'^Training diverged at epoch 2: loss nan, validation AUC 0\.\d+,'
          r' logloss 0\.\d+\. Lower config.learning_rate and train again',
        ),
      ):
        train.train_and_evaluate(config, workdir)
      for kind in ('latest', 'best'):
        directory = os.path.join(workdir, 'checkpoints', kind)
        self.assertEqual(os.listdir(directory), ['1'])
      with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        lines = [json.loads(line, parse_constant=self.fail) for line in f]
      self.assertEqual(
        [(r['split'], r['epoch'], r.get('loss', 0) is None) for r in lines],
        [('train', 1, False), ('valid', 1, False), ('train', 2, True)]
        + [('valid', 2, False)],
      )
      # Epoch 1 is kept: the run resumes from it.
      before = _metrics(workdir)
      self.assertGreater(train.train_and_evaluate(config, workdir)['auc'], 0.7)
      self.assertEqual(_metrics(workdir)[:2], before[:2])

  def test_a_model_that_refuses_its_arguments_is_a_user_error(self):
    # A check across arguments (or of the data) that only the model makes:
    # one line, before the encoder is written; the fixed config then runs.
    with tempfile.TemporaryDirectory() as workdir:
      config = finalmlp.get_config('smoke')
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      config.model.update(
        mlp1_dims=(8,), mlp2_dims=(6,), fs_dims=(8,), num_heads=3
      )
      with self.assertRaisesRegex(
        UserError, r'^models/finalmlp\.py: num_heads=3 must divide both'
      ):
        train.train_and_evaluate(config, workdir)
      self.assertNotIn('encoder', os.listdir(workdir))
      config.model.num_heads = 2
      config.num_epochs = 1
      self.assertGreater(train.train_and_evaluate(config, workdir)['auc'], 0.6)

  def test_a_resume_does_not_read_init_from(self):
    # The checkpoints of a warm-started run hold its weights: it resumes
    # after the run it started from is gone.
    with tempfile.TemporaryDirectory() as root:
      base, warm = os.path.join(root, 'base'), os.path.join(root, 'warm')
      config = _config(num_epochs=1)
      config.dataset.cache_dir = os.path.join(root, 'cache')
      train.train_and_evaluate(config, base)
      config.init_from = base
      with self.assertLogs('absl', 'INFO') as logs:
        train.train_and_evaluate(config, warm)
      self.assertIn(f'Warm start from {base}', '\n'.join(logs.output))
      shutil.rmtree(base)
      config.num_epochs = 2
      with self.assertLogs('absl', 'INFO') as logs:
        train.train_and_evaluate(config, warm)
      self.assertIn('Resumed from epoch 1', '\n'.join(logs.output))
      self.assertNotIn('Warm start', '\n'.join(logs.output))
      self.assertEqual(
        [(r['split'], r['epoch']) for r in _metrics(warm)],
        [('train', 1), ('valid', 1), ('train', 2), ('valid', 2), ('test', 2)],
      )
      # From scratch, init_from is read and must exist.
      with self.assertRaisesRegex(
        config_check.ConfigError, f'config.init_from={base!r} must be'
      ):
        train.train_and_evaluate(config, os.path.join(root, 'new'))


if __name__ == '__main__':
  absltest.main()
