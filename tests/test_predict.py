"""Tests of predict.py: raw rows of a run's test split give back its test AUC.

A tiny FM run is trained on a Criteo-format file (tests/predict_testing.py);
its test split's raw lines go through `predict.py`, whose probabilities must
be `model.apply`'s on the cache's ids, row by row, and give the run's test
AUC. Runs on two emulated devices (tests/conftest.py), so every batch is
split and padded.
"""

import contextlib
import dataclasses
import gzip
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
from unittest import mock
import warnings

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
from dataset_testing import criteo_rows
import jax
import numpy as np
import optax
import pandas as pd
from predict_testing import ROOT
from predict_testing import command_error
from predict_testing import trained_run
from predict_testing import unseen_line

import best_reader
from datasets import criteo
import entry
import metrics
import predict
import predict_output
from utils import UserError


def _write(path, lines):
  with open(path, 'w') as f:
    f.writelines(line + '\n' for line in lines)
  return path


class PredictTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.trained = trained_run()
    cls.predictor = predict.load(cls.trained.workdir, batch_size=64)

  def setUp(self):
    super().setUp()
    self.tmp = self.enter_context(tempfile.TemporaryDirectory())

  def _expected(self, ids):
    return np.asarray(self.trained.probabilities(np.asarray(ids)))

  def test_command_line_reproduces_test_auc_and_model_apply(self):
    test = self.trained.dataset.test
    lines = self.trained.lines['test']
    source = _write(os.path.join(self.tmp, 'test.txt'), lines)
    output = os.path.join(self.tmp, 'out.csv')
    os.symlink(self.trained.workdir, os.path.join(self.tmp, 'run'))
    result = subprocess.run(
      [  # `--flag=~/x` reaches the program unexpanded, as a shell leaves it.
        sys.executable,
        os.path.join(ROOT, 'predict.py'),
        '--workdir=~/run',
        f'--input=~/{os.path.basename(source)}',
        '--output=~/out.csv',
        '--chunk_rows=50',  # Three chunks.
      ],
      check=True,
      cwd=self.tmp,
      capture_output=True,
      text=True,
      env=dict(os.environ, HOME=self.tmp),
    )
    # Nothing to warn about (orbax warned that a read-only restore is so).
    warnings = [
      w for w in result.stderr.splitlines() if w.startswith(('W', 'E'))
    ]
    self.assertEqual(warnings, [])
    out = pd.read_csv(output)
    self.assertEqual(list(out.columns), ['probability', 'label'])
    self.assertLen(out, len(test))
    np.testing.assert_array_equal(out['label'], test.labels)
    probabilities = out['probability'].to_numpy(np.float32)
    np.testing.assert_allclose(
      probabilities, self._expected(test.ids), rtol=0, atol=1e-6
    )
    self.assertAlmostEqual(
      metrics.roc_auc(out['label'], probabilities),
      self.trained.test_metrics['auc'],
      delta=1e-6,
    )
    # The log scores the labelled file as training scored its test split.
    found = re.search(
      r'The (\d+) labelled rows: AUC (\S+), logloss (\S+)', result.stderr
    )
    self.assertEqual(int(found[1]), len(test))
    self.assertAlmostEqual(
      float(found[2]), self.trained.test_metrics['auc'], delta=1e-6
    )
    self.assertAlmostEqual(
      float(found[3]), self.trained.test_metrics['logloss'], delta=1e-5
    )

  def test_an_output_over_the_input_the_run_or_a_directory_is_refused(self):
    lines = list(self.trained.lines['test'][:3])
    source = _write(os.path.join(self.tmp, 'test.txt'), lines)
    workdir = self.trained.workdir
    metrics_file = os.path.join(workdir, 'metrics.jsonl')
    with open(metrics_file) as f:
      kept = f.read()
    for output, message in (
      (source, f'{source} is the --input file; write the probabilities to'),
      (metrics_file, f"{metrics_file} is inside the run's directory"),
      (self.tmp, f'{self.tmp} is a directory, not a file.'),
    ):
      rc, line = command_error(
        'predict.py',
        self.tmp,
        f'--workdir={workdir}',
        f'--input={source}',
        f'--output={output}',
      )
      self.assertEqual(rc, 2)
      self.assertStartsWith(line, f'predict.py: error: --output: {message}')
    with open(source) as f:
      self.assertEqual(f.read().splitlines(), lines)
    with open(metrics_file) as f:
      self.assertEqual(f.read(), kept)

  def test_an_input_that_is_no_file_or_an_extra_argument_is_refused(self):
    # Not the dataset reader's words, which name config.dataset.path.
    missing = os.path.join(self.tmp, 'missing.txt')
    output = os.path.join(self.tmp, 'out.csv')
    self.assertEqual(
      command_error(
        'predict.py',
        self.tmp,
        f'--workdir={self.trained.workdir}',
        f'--input={missing}',
        f'--output={output}',
      ),
      (2, f'predict.py: error: --input: {missing} is not a file.'),
    )
    with self.assertRaisesRegex(UserError, '^Unexpected arguments: extra$'):
      predict.main(['predict.py', 'extra'])
    self.assertFalse(os.path.exists(output))

  def test_an_empty_path_flag_is_refused_by_name(self):
    # `--output=$OUT` with $OUT unset: the output was refused only after
    # every row was scored, as `cannot write  (No such file or
    # directory)`; an empty --workdir read the current directory.
    source = _write(os.path.join(self.tmp, 'test.txt'), ['x'])
    given = {
      'workdir': self.trained.workdir,
      'input': source,
      'output': os.path.join(self.tmp, 'out.csv'),
    }
    for name, what in (
      ('workdir', 'Workdir of a finished training run'),
      ('input', 'Rows to score, in the run format'),
      ('output', 'CSV to write: probability[,label]; - for standard output'),
    ):
      paths = dict(given, **{name: ''})
      self.assertEqual(
        command_error(
          'predict.py', self.tmp, *(f'--{k}={v}' for k, v in paths.items())
        ),
        (
          2,
          f'predict.py: error: --{name} is empty: give the path it takes'
          f' ({what}).',
        ),
      )
    self.assertFalse(os.path.exists(given['output']))

  def test_an_output_beside_the_run_is_not_inside_it(self):
    # A path that only starts with the run's path, /tmp/fm2 for /tmp/fm.
    workdir = self.trained.workdir
    for output in (workdir + '.csv', workdir + '2/out.csv'):
      predict_output.check_output(output, os.path.join(self.tmp, 'x'), workdir)
    with self.assertRaisesRegex(UserError, 'inside the run'):
      predict_output.check_output(workdir + '/out.csv', 'x', workdir)

  def test_an_archive_as_input_is_refused_with_what_to_do(self):
    # Kaggle's dac.tar.gz given as it was downloaded was read as text:
    # "label 'train.txt\x00\x00...' is not 0 or 1".
    inner = _write(
      os.path.join(self.tmp, 'train.txt'), self.trained.lines['test'][:3]
    )
    source = os.path.join(self.tmp, 'dac.tar.gz')
    with tarfile.open(source, 'w:gz') as tar:
      tar.add(inner, arcname='train.txt')
    output = os.path.join(self.tmp, 'out.csv')
    self.assertEqual(
      command_error(
        'predict.py',
        self.tmp,
        f'--workdir={self.trained.workdir}',
        f'--input={source}',
        f'--output={output}',
      ),
      (
        2,
        f'predict.py: error: --input: {source} is an archive; unpack it (tar'
        ' xf, unzip) and name the file it holds.',
      ),
    )
    self.assertFalse(os.path.exists(output))

  def test_an_output_named_for_another_format_is_refused(self):
    # --output=x.parquet wrote CSV under that name, silently.
    source = _write(os.path.join(self.tmp, 'test.txt'), ['x'])
    output = os.path.join(self.tmp, 'x.parquet')
    stem = os.path.join(self.tmp, 'x')
    self.assertEqual(
      command_error(
        'predict.py',
        self.tmp,
        f'--workdir={self.trained.workdir}',
        f'--input={source}',
        f'--output={output}',
      ),
      (
        2,
        f'predict.py: error: --output: {output} names a .parquet file, but'
        f' the output is CSV (probability[,label]): name it {stem}.csv, or'
        f' {stem}.csv.gz to gzip it.',
      ),
    )
    self.assertEqual(os.listdir(self.tmp), ['test.txt'])
    workdir = self.trained.workdir
    for name, suffix, stem in (
      ('x.PQ', '.PQ', 'x'),
      ('x.json.gz', '.json', 'x'),
      ('x.jsonl', '.jsonl', 'x'),
      ('x.feather', '.feather', 'x'),
      ('x.arrow', '.arrow', 'x'),
      ('x.xlsx', '.xlsx', 'x'),
      ('x.npy', '.npy', 'x'),
      ('x.npz', '.npz', 'x'),
      ('x.pkl', '.pkl', 'x'),
      ('x.tsv', '.tsv', 'x'),  # The columns are separated by commas.
      ('x.csv.bz2', '.bz2', 'x'),  # Compressed by gzip alone.
      ('a.b/x.csv.zip', '.zip', 'a.b/x'),
    ):
      with self.subTest(name):
        with self.assertRaisesRegex(
          UserError,
          f'^--output: {re.escape(name)} names a {suffix} file, but the'
          r' output is CSV \(probability\[,label\]\): name it'
          f' {stem}.csv, or {stem}.csv.gz to gzip it.$',
        ):
          predict_output.check_output(name, source, workdir)
    # Other names are CSV as they were, gzipped for .gz.
    for name in ('out', 'out.txt', 'out.csv', 'OUT.CSV', 'out.csv.gz', 'o.GZ'):
      predict_output.check_output(os.path.join(self.tmp, name), source, workdir)
    source = _write(source, self.trained.lines['test'][:3])
    output = os.path.join(self.tmp, 'out.txt')
    rc, line = command_error(
      'predict.py',
      self.tmp,
      f'--workdir={workdir}',
      f'--input={source}',
      f'--output={output}',
    )
    self.assertEqual(rc, 0, line)
    out = pd.read_csv(output)
    self.assertEqual(list(out.columns), ['probability', 'label'])
    np.testing.assert_allclose(
      out['probability'],
      self._expected(self.trained.dataset.test.ids[:3]),
      rtol=0,
      atol=1e-6,
    )

  def test_an_output_that_cannot_be_written_is_one_line(self):
    source = _write(os.path.join(self.tmp, 'test.txt'), ['x'])
    output = os.path.join(self.tmp, 'missing', 'out.csv')
    self.assertEqual(
      command_error(
        'predict.py',
        self.tmp,
        f'--workdir={self.trained.workdir}',
        f'--input={source}',
        f'--output={output}',
      ),
      (
        2,
        f'predict.py: error: --output: cannot write {output} (No such file'
        ' or directory); choose a path in a directory you can write.',
      ),
    )

  def test_an_output_over_the_file_size_limit_says_so(self):
    # A full disk or `ulimit -f` said 'choose a path in a directory you can
    # write', of a directory that could be written.
    source = _write(
      os.path.join(self.tmp, 'test.txt'), self.trained.lines['test']
    )
    output = os.path.join(self.tmp, 'out.csv')
    run = subprocess.run

    def limited(command, **kwargs):  # The output's 1.8 KB is over 1 KB.
      shell = ['bash', '-c', 'ulimit -f 1 && exec "$@"', 'bash']
      return run(shell + command, **kwargs)

    with mock.patch.object(subprocess, 'run', limited):
      got = command_error(
        'predict.py',
        self.tmp,
        f'--workdir={self.trained.workdir}',
        f'--input={source}',
        f'--output={output}',
        real=True,
      )
    self.assertEqual(
      got,
      (
        2,
        f'predict.py: error: --output: cannot write {output} (File too'
        ' large); a file there cannot be that large: write it to another'
        ' disk, or name it .gz to gzip it.',
      ),
    )
    self.assertEqual(sorted(os.listdir(self.tmp)), ['test.txt'])

  def test_two_threads_writing_one_output_each_write_it_whole(self):
    # Both wrote `<output>.tmp-<pid>`: the first to finish renamed the
    # other's copy, which went on writing into the output, then failed.
    lines = self.trained.lines['test']
    first = _write(os.path.join(self.tmp, 'first.txt'), lines[:40])
    second = _write(os.path.join(self.tmp, 'second.txt'), lines[40:50])
    output = os.path.join(self.tmp, 'out.csv')
    paused, go = threading.Event(), threading.Event()

    class Paused:  # Waits after the first chunk of the first file.
      def __getattr__(_, name):
        return getattr(self.predictor, name)

      def score_chunks(_, path, chunk_rows, parse_workers):
        for i, chunk in enumerate(
          self.predictor.score_chunks(path, chunk_rows, parse_workers)
        ):
          if i == 1:
            paused.set()
            go.wait(60)
          yield chunk

    errors = []

    def write_first():
      try:
        predict_output.write_predictions(Paused(), first, output, 8)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)

    thread = threading.Thread(target=write_first)
    thread.start()
    self.assertTrue(paused.wait(60))
    predict_output.write_predictions(self.predictor, second, output)
    self.assertLen(pd.read_csv(output), 10)
    go.set()
    thread.join(60)
    self.assertEqual(errors, [])
    alone = os.path.join(self.tmp, 'alone.csv')
    predict_output.write_predictions(self.predictor, first, alone, 8)
    with open(output) as f, open(alone) as g:
      self.assertEqual(f.read(), g.read())
    self.assertEqual(  # No copy left behind.
      sorted(os.listdir(self.tmp)),
      ['alone.csv', 'first.txt', 'out.csv', 'second.txt'],
    )

  def test_a_file_scored_in_part_leaves_no_thread_or_open_file(self):
    # A caller that took the first chunk left, per call, the prefetch thread
    # blocked on its full queue for ever, and the file open.
    source = _write(
      os.path.join(self.tmp, 'test.txt'), self.trained.lines['test']
    )
    before = threading.active_count()
    for _ in range(3):
      for _ in self.predictor.predict_file(source, chunk_rows=5):
        break
    deadline = time.monotonic() + 30
    while threading.active_count() > before and time.monotonic() < deadline:
      time.sleep(0.01)
    self.assertEqual(threading.active_count(), before)
    fds = '/proc/self/fd'
    if os.path.isdir(fds):
      opened = set()
      for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
          opened.add(os.readlink(os.path.join(fds, fd)))
      self.assertNotIn(os.path.realpath(source), opened)

  def test_predict_file_gives_each_chunk_its_probabilities_and_labels(self):
    lines = self.trained.lines['test'][:12]
    source = _write(os.path.join(self.tmp, 'test.txt'), lines)
    chunks = list(self.predictor.predict_file(source, chunk_rows=5))
    self.assertEqual([len(p) for p, _ in chunks], [5, 5, 2])
    probs, labels = (np.concatenate(a) for a in zip(*chunks, strict=True))
    test = self.trained.dataset.test
    np.testing.assert_array_equal(labels, np.asarray(test.labels)[:12])
    expected = self._expected(np.asarray(test.ids)[:12])
    np.testing.assert_allclose(probs, expected, atol=1e-6)

  def test_an_output_named_gz_is_gzipped(self):
    source = _write(
      os.path.join(self.tmp, 'test.txt'), self.trained.lines['test'][:9]
    )
    plain, packed = (os.path.join(self.tmp, f'out{e}') for e in ('', '.gz'))
    predict_output.write_predictions(self.predictor, source, plain)
    predict_output.write_predictions(self.predictor, source, packed)
    with open(plain, 'rb') as f, gzip.open(packed, 'rb') as g:
      self.assertEqual(g.read(), f.read())

  def test_the_copy_a_killed_write_left_is_removed_not_a_live_ones(self):
    # A SIGKILL mid-way left `<output>.tmp-<pid>-<thread>` (16 MB of a 3M
    # row file after 15 s) for ever: no later run removed it.
    source = _write(
      os.path.join(self.tmp, 'test.txt'), self.trained.lines['test'][:9]
    )
    output = os.path.join(self.tmp, 'out.csv')
    dead = subprocess.Popen([sys.executable, '-c', ''])
    dead.wait()
    host = socket.gethostname()
    orphan = _write(f'{output}.tmp-{dead.pid}@{host}.7', ['0.5'])
    live = _write(f'{output}.tmp-{os.getpid()}@{host}.7', ['0.5'])
    other = _write(f'{output}.tmp-{dead.pid}@not-{host}.7', ['0.5'])
    predict_output.write_predictions(self.predictor, source, output)
    self.assertFalse(os.path.exists(orphan))
    self.assertTrue(os.path.exists(live))  # A thread of this process.
    self.assertTrue(os.path.exists(other))  # Another host's: unknown.
    self.assertLen(pd.read_csv(output), 9)

  def test_a_fifo_output_is_written_into_not_replaced(self):
    # It was written beside and renamed over: the FIFO (so /dev/stdout or,
    # as root, /dev/null) became a regular file, its reader got nothing.
    source = _write(
      os.path.join(self.tmp, 'test.txt'), self.trained.lines['test'][:9]
    )
    plain, fifo = (os.path.join(self.tmp, n) for n in ('out.csv', 'fifo'))
    predict_output.write_predictions(self.predictor, source, plain)
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # 9 rows fit a pipe.
    self.addCleanup(os.close, reader)
    predict_output.write_predictions(self.predictor, source, fifo)
    self.assertTrue(stat.S_ISFIFO(os.stat(fifo).st_mode))
    with open(plain, 'rb') as f:
      self.assertEqual(os.read(reader, 1 << 16), f.read())
    self.assertEqual(
      sorted(os.listdir(self.tmp)), ['fifo', 'out.csv', 'test.txt']
    )

  def test_a_link_to_an_open_file_is_written_through_not_replaced(self):
    # `--output=/dev/stdout > out.csv`: /dev/stdout led to a regular file,
    # so the rows were written to /dev/stdout.tmp-... and renamed over
    # /dev/stdout (as root: the machine's link replaced by a file, the
    # shell's out.csv left empty). Here with a link of our own.
    source = _write(
      os.path.join(self.tmp, 'test.txt'), self.trained.lines['test'][:9]
    )
    plain = os.path.join(self.tmp, 'out.csv')
    predict_output.write_predictions(self.predictor, source, plain)
    shell = self.enter_context(open(os.path.join(self.tmp, 'shell.csv'), 'w'))
    link = os.path.join(self.tmp, 'stdout')
    os.symlink(f'/proc/self/fd/{shell.fileno()}', link)
    self.assertTrue(predict_output.streamed(link))
    self.assertTrue(predict_output.streamed('/dev/stdout'))
    self.assertTrue(predict_output.streamed('/dev/null'))
    predict_output.write_predictions(self.predictor, source, link)
    self.assertTrue(os.path.islink(link))
    with open(plain) as f, open(shell.name) as g:
      self.assertEqual(g.read(), f.read())

  def test_a_link_to_a_file_keeps_and_its_file_gets_the_rows(self):
    # The copy was renamed over the link: the link became a file of its
    # own and the file it led to kept the old rows.
    source = _write(
      os.path.join(self.tmp, 'test.txt'), self.trained.lines['test'][:9]
    )
    plain = os.path.join(self.tmp, 'out.csv')
    predict_output.write_predictions(self.predictor, source, plain)
    shared = os.path.join(self.tmp, 'shared')
    os.mkdir(shared)
    real = _write(os.path.join(shared, 'out.csv'), ['old'])
    link = os.path.join(self.tmp, 'link.csv')
    os.symlink(os.path.join('shared', 'out.csv'), link)
    predict_output.write_predictions(self.predictor, source, link)
    self.assertTrue(os.path.islink(link))
    with open(plain) as f, open(real) as g:
      self.assertEqual(g.read(), f.read())
    self.assertEqual(os.listdir(shared), ['out.csv'])
    dangling = os.path.join(self.tmp, 'dangling.csv')
    os.symlink(os.path.join(self.tmp, 'missing', 'out.csv'), dangling)
    self.assertEqual(
      command_error(
        'predict.py',
        self.tmp,
        f'--workdir={self.trained.workdir}',
        f'--input={source}',
        f'--output={dangling}',
      ),
      (
        2,
        f'predict.py: error: --output: cannot write {dangling} (No such file'
        ' or directory); choose a path in a directory you can write.',
      ),
    )

  def test_an_output_named_dash_is_standard_output(self):
    source = _write(
      os.path.join(self.tmp, 'test.txt'), self.trained.lines['test'][:9]
    )
    plain = os.path.join(self.tmp, 'out.csv')
    predict_output.write_predictions(self.predictor, source, plain)
    self.enter_context(contextlib.chdir(self.tmp))
    stdout = self.enter_context(mock.patch.object(sys, 'stdout', io.StringIO()))
    predict_output.check_output('-', source, self.trained.workdir)
    self.assertEqual(
      predict_output.write_predictions(self.predictor, source, '-'), 9
    )
    with open(plain) as f:
      self.assertEqual(stdout.getvalue(), f.read())
    self.assertEqual(sorted(os.listdir(self.tmp)), ['out.csv', 'test.txt'])

  def test_unlabeled_rows_in_any_chunks(self):
    lines = [line.split('\t', 1)[1] for line in self.trained.lines['valid']]
    source = _write(os.path.join(self.tmp, 'test.txt'), lines)
    output = os.path.join(self.tmp, 'out.csv')
    rows = predict_output.write_predictions(self.predictor, source, output, 7)
    out = pd.read_csv(output)
    self.assertEqual(rows, len(lines))
    self.assertEqual(list(out.columns), ['probability'])
    expected = self._expected(self.trained.dataset.valid.ids)
    np.testing.assert_allclose(out['probability'], expected, atol=1e-6)

  def test_an_empty_file_gets_an_empty_output_and_no_metrics(self):
    # An empty part of a dataset logged 'The 0 labelled rows: AUC nan' after
    # numpy's warnings of a mean of nothing.
    source = _write(os.path.join(self.tmp, 'empty.txt'), [])
    output = os.path.join(self.tmp, 'out.csv')
    with (
      warnings.catch_warnings(),
      self.assertLogs('absl', 'INFO') as logs,
    ):
      warnings.simplefilter('error')
      rows = predict_output.write_predictions(self.predictor, source, output, 7)
    self.assertEqual(rows, 0)
    self.assertEmpty(pd.read_csv(output))
    self.assertNotIn('labelled rows', '\n'.join(logs.output))

  def test_rows_scored_nan_are_warned_of(self):
    # A number far outside training's range can overflow a model (DCN-V2's
    # cross layers: price=1e12 in a run of prices near 10): the output said
    # nan for those rows, and nothing else did.
    lines = self.trained.lines['test'][:12]
    source = _write(os.path.join(self.tmp, 'overflow.txt'), lines)
    output = os.path.join(self.tmp, 'out.csv')

    class Overflowing:  # The first chunk's second row overflows.
      def __getattr__(_, name):
        return getattr(self.predictor, name)

      def score_chunks(_, path, chunk_rows, parse_workers):
        chunks = self.predictor.score_chunks(path, chunk_rows, parse_workers)
        for i, (encoded, probs, logits) in enumerate(chunks):
          probs, logits = np.array(probs), np.array(logits)
          if i == 0:
            probs[1] = logits[1] = np.nan
          yield encoded, probs, logits

    with self.assertLogs('absl', 'INFO') as logs:
      predict_output.write_predictions(Overflowing(), source, output, 5)
    self.assertIn(
      'WARNING:absl:1 of 12 rows scored NaN (nan in the output).', logs.output
    )
    self.assertTrue(np.isnan(pd.read_csv(output)['probability'][1]))
    with self.assertLogs('absl', 'INFO') as logs:  # None: no warning.
      predict_output.write_predictions(self.predictor, source, output, 5)
    self.assertNotIn('NaN', '\n'.join(logs.output))

  def test_rows_of_one_label_log_that_their_auc_is_undefined(self):
    # It logged 'AUC nan', as if the model had diverged.
    test = self.trained.dataset.test
    lines = np.asarray(self.trained.lines['test'])
    for label in (0, 1):
      source = os.path.join(self.tmp, f'label_{label}.txt')
      _write(source, lines[np.asarray(test.labels) == label][:20])
      output = os.path.join(self.tmp, 'out.csv')
      with self.assertLogs('absl', 'INFO') as logs:
        rows = predict_output.write_predictions(
          self.predictor, source, output, 7
        )
      self.assertEqual(rows, 20)
      self.assertIn(
        f'The 20 labelled rows: AUC undefined (all labels {label}), logloss',
        '\n'.join(logs.output),
      )

  @parameterized.parameters(0, 1, 2, 3, 63, 64, 65, 150)
  def test_ids_of_any_count_match_model_apply(self, n):
    ids = np.asarray(self.trained.dataset.test.ids)[:n]
    got = self.predictor.predict_ids(ids)
    self.assertEqual(got.shape, (n,))
    self.assertEqual(got.dtype, np.float32)
    np.testing.assert_allclose(got, self._expected(ids), atol=1e-6)

  def test_an_id_equal_to_its_field_dim_is_refused(self):
    # field_dims[f] is the first id outside field f: the shared table's
    # gather would read the next field's first row, a plausible number.
    ids = np.array(self.trained.dataset.test.ids[:2])
    dims = np.array(self.trained.dataset.field_dims)
    ids[0] = dims - 1  # The last id of every field is one.
    np.testing.assert_allclose(
      self.predictor.predict_ids(ids), self._expected(ids), atol=1e-6
    )
    ids[1, 3] = dims[3]
    with self.assertRaisesRegex(ValueError, r'outside .* field\(s\) \[3\]'):
      self.predictor.predict_ids(ids)

  def test_an_input_the_run_does_not_take_is_refused(self):
    # An ids-only run: extra lists or numbers are not dropped silently.
    ids = np.asarray(self.trained.dataset.test.ids)[:2]
    for name, value in (
      ('multi_ids', np.zeros((2, 1, 1), np.int32)),
      ('dense', np.zeros((2, 1), np.float32)),
    ):
      with self.assertRaisesRegex(
        ValueError, f'^{name}: this run takes ids; got ids, {name}\\.$'
      ):
        self.predictor.predict_ids(ids, **{name: value})

  def test_a_batch_size_below_the_device_count_is_rounded_up(self):
    ids = np.asarray(self.trained.dataset.test.ids)[:5]
    p = self.predictor
    for batch_size, rounded in ((1, 2), (2, 2), (3, 4)):
      predictor = predict.Predictor(p.encoder, p.model, p.variables, batch_size)
      self.assertEqual(predictor.batch_size, rounded)
      np.testing.assert_allclose(
        predictor.predict_ids(ids), self._expected(ids), atol=1e-6
      )

  def test_dataframe_with_unseen_values_gets_oov_ids(self):
    rows = [r[1:] for r in criteo_rows(4, seed=99)]
    rows[1] = ['123456789'] * 13 + ['unseen'] * 26
    frame = pd.DataFrame(rows, columns=criteo.COLUMNS[1:]).replace('', None)
    encoded = self.predictor.encoder.encode(frame)
    oov = np.array(self.predictor.encoder.oov_ids)
    np.testing.assert_array_equal(encoded.ids[1, 13:], oov[13:])
    got = self.predictor(frame)
    np.testing.assert_allclose(got, self._expected(encoded.ids), atol=1e-6)
    self.assertEqual(len(set(got.tolist())), 4)
    # As a dict of columns, or as a list of rows' dicts.
    for given in (frame.to_dict('list'), frame.to_dict('records')):
      np.testing.assert_array_equal(self.predictor(given), got)

  def test_rows_with_values_training_did_not_keep_are_counted(self):
    lines = list(self.trained.lines['test'][:40])
    cells = lines[5].split('\t')
    lines[5] = '\t'.join(cells[:14] + ['unseen'] * 26)  # Every categorical.
    source = _write(os.path.join(self.tmp, 'test.txt'), lines)
    with self.assertLogs('absl', 'INFO') as logs:
      predict_output.write_predictions(
        self.predictor, source, os.path.join(self.tmp, 'out.csv'), 16
      )
    encoded = self.predictor.encoder.encode(source)
    oov = np.array(
      [-1 if i is None else i for i in self.predictor.encoder.oov_ids]
    )
    mask = encoded.ids == oov
    np.testing.assert_array_equal(self.predictor.unseen(encoded.ids), mask)
    self.assertTrue(mask[5, 13:].all())
    names = self.predictor.encoder.field_names
    self.assertIn(unseen_line(names, mask), '\n'.join(logs.output))

  def test_a_field_without_an_oov_id_has_no_unseen_id(self):
    # Its vocabulary fills its dim: id 0 is a kept value, never unseen.
    p = self.predictor
    keys = np.arange(p.encoder.field_dims[0], dtype=np.int64)
    vocabulary = (keys, *p.encoder.vocabulary[1:])
    enc = dataclasses.replace(p.encoder, vocabulary=vocabulary)
    oov = enc.oov_ids
    self.assertEqual(oov, (None,) + p.encoder.oov_ids[1:])
    full = predict.Predictor(enc, p.model, p.variables, 64)
    ids = np.zeros((2, len(oov)), np.int32)
    ids[1, 1:] = oov[1:]
    want = np.zeros(ids.shape, bool)
    want[1, 1:] = True
    np.testing.assert_array_equal(full.unseen(ids), want)

  def test_bad_row_names_file_and_line(self):
    lines = list(self.trained.lines['test'][:5])
    lines[2] = lines[2].rsplit('\t', 1)[0]
    source = _write(os.path.join(self.tmp, 'bad.txt'), lines)
    output = os.path.join(self.tmp, 'out.csv')
    with self.assertRaisesRegex(UserError, r'bad\.txt:3: expected'):
      predict_output.write_predictions(self.predictor, source, output)
    self.assertEqual(os.listdir(self.tmp), ['bad.txt'])  # No partial copy.

  def test_a_row_without_its_label_says_what_to_do(self):
    lines = list(self.trained.lines['test'][:3])
    lines[1] = '\t' + lines[1].split('\t', 1)[1]  # Criteo: label first.
    source = _write(os.path.join(self.tmp, 'empty.txt'), lines)
    message = (
      'missing label: give every row its 0/1 label, or leave the label'
      ' column out to score the rows unlabelled$'
    )
    with self.assertRaisesRegex(UserError, rf'^{source}:2: {message}'):
      predict_output.write_predictions(
        self.predictor, source, os.path.join(self.tmp, 'out.csv')
      )
    columns = criteo.COLUMNS[1:]
    frame = pd.DataFrame({'label': [None]} | {c: ['1'] for c in columns})
    with self.assertRaisesRegex(UserError, f'^DataFrame row 0: {message}'):
      self.predictor(frame)

  def test_a_relative_workdir_loads(self):
    # orbax reads absolute paths only: a relative one was called damaged.
    self.enter_context(contextlib.chdir(self.tmp))
    relative = os.path.relpath(self.trained.workdir)
    self.assertFalse(os.path.isabs(relative))
    predictor = predict.load(relative)
    ids = self.trained.dataset.test.ids[:5]
    np.testing.assert_array_equal(
      predictor.predict_ids(ids), self.predictor.predict_ids(ids)
    )

  def test_batch_stats_of_the_checkpoint_are_kept(self):
    # A BatchNorm model (NFM, DeepFM, ...) reads its running averages.
    load_best = best_reader.load_best
    stats = {'norm': {'mean': np.arange(3.0, dtype=np.float32)}}

    def with_stats(workdir):
      state, meta = load_best(workdir)
      return {**state, 'batch_stats': stats}, meta

    self.enter_context(
      mock.patch.object(best_reader, 'load_best', side_effect=with_stats)
    )
    predictor = predict.load(self.trained.workdir)
    np.testing.assert_array_equal(
      predictor.variables['batch_stats']['norm']['mean'], [0, 1, 2]
    )

  def test_missing_workdir_is_a_user_error(self):
    with self.assertRaisesRegex(UserError, 'no encoder.json'):
      predict.load(self.tmp)
    path = _write(os.path.join(self.tmp, 'rows.csv'), ['1,2'])
    with self.assertRaisesRegex(UserError, f'^{path}: no encoder.json in it'):
      predict.load(path)  # A file given as the workdir.

  def test_an_encoder_of_another_run_is_a_user_error(self):
    # Flax's ScopeParamShapeError, a traceback, at the first batch before.
    workdir = os.path.join(self.tmp, 'mixed')
    shutil.copytree(self.trained.workdir, workdir)
    path = os.path.join(workdir, 'encoder', 'encoder.json')
    with open(path) as f:
      record = json.load(f)
    dim = record['model']['embed_dim']
    record['model']['embed_dim'] = dim + 1
    with open(path, 'w') as f:
      json.dump(record, f)
    with self.assertRaisesRegex(
      UserError,
      rf'^The best checkpoint of {workdir} does not fit its encoder/'
      rf" \(\['\w+'\].*is \(\d+, {dim}\), not \(\d+, {dim + 1}\)\)",
    ):
      predict.load(workdir)

  def test_parse_workers_flag_reaches_the_workers(self):
    # Workers that cannot start: --parse_workers=2 asks for them on a small
    # file (-1 would parse it here), and the error names the flag; 0
    # parses in this process.
    lines = self.trained.lines['test'][:120]
    source = _write(os.path.join(self.tmp, 'test.txt'), lines)
    script = os.path.join(self.tmp, 'no_processes.py')
    with open(script, 'w') as f:
      f.write(
        textwrap.dedent(f"""
        import runpy, sys
        sys.path.insert(0, {ROOT!r})
        from datasets import parallel
        def refused(*args, **kwargs):
          raise OSError(11, 'Resource temporarily unavailable')
        parallel.subprocess.Popen = refused
        sys.argv[0] = {os.path.join(ROOT, 'predict.py')!r}
        runpy.run_path(sys.argv[0], run_name='__main__')
        """)
      )
    flags_ = [
      f'--workdir={self.trained.workdir}',
      f'--input={source}',
      '--chunk_rows=50',
    ]
    outputs = {}
    for workers in (2, 0):
      outputs[workers] = os.path.join(self.tmp, f'out{workers}.csv')
      rc, line = command_error(
        script,
        self.tmp,
        *flags_,
        f'--output={outputs[workers]}',
        f'--parse_workers={workers}',
      )
      if workers:
        self.assertEqual(rc, 2)
        self.assertEqual(
          line,
          'predict.py: error: Could not start the processes that parse the'
          ' data ([Errno 11] Resource temporarily unavailable). Set'
          ' config.dataset.parse_workers=0 (predict.py: --parse_workers=0)'
          ' to parse in this process.',
        )
        self.assertFalse(os.path.exists(outputs[workers]))
      else:
        self.assertEqual(rc, 0, line)
    out = pd.read_csv(outputs[0])
    self.assertLen(out, 120)
    ids = self.trained.dataset.test.ids[:120]
    np.testing.assert_allclose(
      out['probability'], self._expected(ids), rtol=0, atol=1e-6
    )
    # From Python: the same rows, with workers that start.
    got = predict_output.write_predictions(
      self.predictor, source, outputs[2], 50, parse_workers=2
    )
    self.assertEqual(got, 120)
    with open(outputs[0]) as f, open(outputs[2]) as g:
      self.assertEqual(f.read(), g.read())

  def test_chunk_rows_and_batch_size_below_one_name_the_flag(self):
    values = flags.FlagValues()
    predict.define_flags(values)
    paths = ['--workdir=w', '--input=i', '--output=o']
    for flag in ('--chunk_rows=0', '--chunk_rows=-1', '--batch_size=0'):
      argv = ['predict.py', *paths, flag]
      with self.assertRaises(flags.Error) as raised:
        values(argv)
      self.assertEqual(
        entry._flag_error(argv, raised.exception),
        f'flag {flag}: {flag.split("=")[1]} is not a positive integer. Pass'
        ' --helpshort to see the flags.',
      )
    values(['predict.py', *paths, '--chunk_rows=1', '--batch_size=1'])
    self.assertEqual((values.chunk_rows, values.batch_size), (1, 1))
    with self.assertRaisesRegex(ValueError, 'at least 1, got 0'):
      predict.load(self.trained.workdir, batch_size=0)

  def test_log_loss_moves_saturated_probabilities_by_float32_spacing(self):
    # -log(2**-149) for a label 1 at 0, -log(2**-24) for a label 0 at 1,
    # -log(0.5): (149 + 24 + 1) / 3 * log(2).
    got = metrics.log_loss(
      np.array([1, 0, 1]), np.array([0.0, 1.0, 0.5], np.float32)
    )
    self.assertAlmostEqual(got, 58 * np.log(2), places=9)

  def test_saturated_rows_log_the_runs_auc_and_logloss(self):
    # Rows whose probability saturates in float32 (a logit above about 17)
    # tied at 1.0 and had their logloss cut at -log(2**-24): the logged
    # metrics were not the run's, which its evaluation takes from logits.
    test = self.trained.dataset.test
    lines = self.trained.lines['test']
    source = _write(os.path.join(self.tmp, 'test.txt'), lines)
    model = self.predictor.model
    sharp = jax.tree.map(lambda x: np.asarray(x) * 20, self.predictor.variables)
    predictor = predict.Predictor(
      self.predictor.encoder, model, sharp, batch_size=64
    )
    logits = model.apply(sharp, np.asarray(test.ids), train=False)
    logits, labels = np.asarray(logits), np.asarray(test.labels)
    for label in (0, 1):  # Saturated rows of either label.
      self.assertGreater(np.sum((logits > 17) & (labels == label)), 1)
    loss = float(np.mean(optax.sigmoid_binary_cross_entropy(logits, labels)))
    with self.assertLogs('absl', 'INFO') as logs:
      predict_output.write_predictions(
        predictor, source, os.path.join(self.tmp, 'out.csv'), 50
      )
    found = re.search(
      r'labelled rows: AUC (\S+), logloss (\S+)', '\n'.join(logs.output)
    )
    self.assertAlmostEqual(
      float(found[1]), metrics.roc_auc(labels, logits), delta=1e-6
    )
    self.assertAlmostEqual(float(found[2]), loss, delta=1e-5 * loss)

  def test_output_is_parsed_back_exactly(self):
    probs = np.array([1e-8, 0.123456789, 1 - 1e-7, 0.5], np.float32)
    text = 'probability,label\n' + predict_output.csv_lines(probs, np.eye(4)[0])
    back = pd.read_csv(io.StringIO(text))
    got = back['probability'].to_numpy(np.float32)
    np.testing.assert_array_equal(got, probs)
    np.testing.assert_array_equal(back['label'], [1, 0, 0, 0])
    # The shortest text of the float32, not of the float64 it widens to
    # (0.10000000149011612).
    got = predict_output.csv_lines(np.array([0.1, 0.5], np.float32), None)
    self.assertEqual(got, '0.1\n0.5\n')


if __name__ == '__main__':
  absltest.main()
