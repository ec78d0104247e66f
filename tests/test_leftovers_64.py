"""A failed library call leaves nothing behind; predict's bad rows."""

import functools
import gc
import os
import pickle
import signal
import tempfile
import threading
import time
from unittest import mock

from absl import flags
from absl.testing import absltest
from dataset_testing import criteo_rows
from dataset_testing import write_lines
import jax
import numpy as np
import predict_testing

import bad_rows
import checkpoints
import data
from datasets import core
from datasets import parallel
from datasets import side
import encoder
import metrics
import predict
import predict_output
import programs
import train
import utils


@functools.cache
def _tiny() -> tuple[str, list[str]]:
  """A directory holding a Criteo file of 200 rows, and the file's lines."""
  tmp = tempfile.mkdtemp()
  rows = criteo_rows(200, 3)
  write_lines(os.path.join(tmp, 'a.txt'), rows, '\t')
  return tmp, ['\t'.join(row) for row in rows]


def _read(path: str) -> list[str]:
  with open(path) as f:
    return f.readlines()


def _tiny_config():
  tmp, _ = _tiny()
  path = os.path.join(tmp, 'a.txt')
  return predict_testing.criteo_config(path, os.path.join(tmp, 'cache'))


def _open_files(directory: str) -> list[str]:
  """The files under `directory` that this process holds open."""
  found = []
  for fd in os.listdir('/proc/self/fd'):
    try:
      path = os.readlink(f'/proc/self/fd/{fd}')
    except OSError:  # The listing's own descriptor, closed since.
      continue
    if path.startswith(directory + os.sep):
      found.append(path)
  return found


def _refused_once():
  """`Encoder.encode_parsed` refusing the third row of the first chunk of
  more than 2 rows (`side.OutOfRange`, as a value beyond float32)."""
  encode, raised = encoder.Encoder.encode_parsed, []

  def out_of_range(encoder_, keys, *args):
    if not raised and len(keys) > 2:
      raised.append(side.OutOfRange('numeric field x: 1e39 is beyond', 2))
      raise raised[0]
    return encode(encoder_, keys, *args)

  return mock.patch.object(encoder.Encoder, 'encode_parsed', out_of_range)


class EarlyErrorTest(absltest.TestCase):
  def test_an_error_after_the_managers_open_closes_them(self):
    # A damaged latest checkpoint fails the run after the checkpoint
    # managers open and before training: they were left open (no `with`
    # around them yet).
    config = _tiny_config()
    workdir = os.path.join(tempfile.mkdtemp(), 'run')
    step = os.path.join(workdir, 'checkpoints', 'latest', '1')
    os.makedirs(step)
    with open(os.path.join(step, 'junk'), 'w') as f:
      f.write('not a checkpoint')
    opened, closed = [], []
    manager = checkpoints.manager

    def tracked(*args, **kwargs):
      mgr = manager(*args, **kwargs)
      opened.append(mgr)
      close = mgr.close
      mgr.close = lambda: closed.append(mgr) or close()
      return mgr

    threads = set(threading.enumerate())
    with (
      mock.patch.object(checkpoints, 'manager', tracked),
      # Not compiled ahead: the error comes before any step runs.
      mock.patch.object(
        programs, 'compile_train_and_eval', lambda *a: lambda traced=False: None
      ),
      self.assertRaisesRegex(utils.UserError, 'No checkpoint in .* can be'),
    ):
      train.train_and_evaluate(config, workdir)
    self.assertLen(opened, 2)  # latest and best.
    self.assertEqual(closed, opened)
    self.assertEqual(set(threading.enumerate()), threads)
    self.assertEqual(_open_files(workdir), [])


class InterruptTest(absltest.TestCase):
  def test_a_ctrl_c_in_a_gc_callback_stops_a_library_call(self):
    # CPython drops an exception raised in a gc callback, JAX's among them
    # (entry.keep_interrupts guards the programs only): a Ctrl-C that came
    # during a collection went unheard by data.load_dataset, which returned.
    # Sent here as a worker parses, from a callback of the collection.
    self.addCleanup(signal.signal, signal.SIGINT, signal.getsignal(2))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = tempfile.mkdtemp()
    config = predict_testing.criteo_config(
      write_lines(os.path.join(tmp, 'a.txt'), criteo_rows(300, 4), '\t'),
      os.path.join(tmp, 'cache'),
    ).dataset
    config.update(chunk_rows=20, parse_workers=1)
    armed, sent, workers = [], [], []

    def collecting(phase, info):
      del info
      if phase == 'start' and armed and not sent:
        sent.append(os.kill(os.getpid(), signal.SIGINT))
        sum(range(10_000))  # The handler runs here, in the callback.

    def result(worker, *args):
      workers.append(worker)
      armed.append(True)
      gc.collect()
      return parse_result(worker, *args)

    parse_result = parallel._result
    threads = set(threading.enumerate())
    gc.callbacks.append(collecting)
    self.addCleanup(gc.callbacks.remove, collecting)
    with (
      mock.patch.object(parallel, '_result', result),
      self.assertRaises(KeyboardInterrupt),
    ):
      data.load_dataset(config)
    self.assertLen(sent, 1)
    self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)
    self.assertNotEmpty(workers)
    self.assertTrue(all(w.process.poll() is not None for w in workers))
    for thread in set(threading.enumerate()) - threads:
      thread.join(5)  # The signal sent again, and the workers' watch.
    self.assertEqual(set(threading.enumerate()), threads)


class BadRowsTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # The encoder of the tiny file and an untrained FM: no run needed.
    config, tmp = _tiny_config(), tempfile.mkdtemp()
    dataset = data.load_dataset(config.dataset)
    encoder.save(tmp, dataset, config)
    model = train.create_model(config, dataset.field_dims)
    ids = np.zeros((1, len(dataset.field_dims)), np.int32)
    variables = model.init(jax.random.key(0), ids, train=False)
    cls.predictor = predict.Predictor(encoder.load(tmp), model, variables, 4)

  def setUp(self):
    super().setUp()
    self.tmp = self.enter_context(tempfile.TemporaryDirectory())

  def refused_then_without(self, source, rest, chunk_rows):
    """The warnings and output lines of `source` under `_refused_once` with
    --bad_rows=nan, and the output lines of `rest` (the good rows alone)."""
    outputs = [os.path.join(self.tmp, f'{name}.csv') for name in ('nan', 'ok')]
    with _refused_once(), self.assertLogs('absl', 'WARNING') as logs:
      predict_output.write_predictions(
        self.predictor, source, outputs[0], chunk_rows, 0, 'nan'
      )
    predict_output.write_predictions(
      self.predictor, rest, outputs[1], chunk_rows, 0
    )
    return logs.output, *(_read(o) for o in outputs)

  def write(self, name, lines):
    path = os.path.join(self.tmp, name)
    with open(path, 'w') as f:
      f.writelines(line + '\n' for line in lines)
    return path

  def test_rows_that_cannot_be_encoded_are_scored_nan_in_their_place(self):
    lines = _tiny()[1][:45]
    cells = lines[7].split('\t')
    bad = {
      2: lines[2].rsplit('\t', 1)[0],  # A column short.
      7: '\t'.join([cells[0], 'x', *cells[2:]]),  # An integer that is not.
      8: '\t' + lines[8].split('\t', 1)[1],  # No label.
      10: 'garbage',  # The first line of the second chunk of 10.
      44: lines[44] + '\tz',  # The last line, a column too many.
    }
    blank = {14: '   ', 15: ''}  # Blank lines carry no row.
    given = [bad.get(i, blank.get(i, line)) for i, line in enumerate(lines)]
    source = self.write('bad.txt', given)
    clean = self.write(
      'clean.txt', [g for i, g in enumerate(given) if i not in bad]
    )
    outputs = [os.path.join(self.tmp, f'{name}.csv') for name in ('nan', 'ok')]
    with self.assertLogs('absl', 'INFO') as logs:
      rows = predict_output.write_predictions(
        self.predictor, source, outputs[0], 10, 0, 'nan'
      )
    self.assertEqual(rows, 43)
    warnings = [line for line in logs.output if line.startswith('WARNING')]
    self.assertLen(warnings, 1)
    self.assertRegex(
      warnings[0],
      f'^WARNING:absl:5 of 43 rows could not be encoded and were scored nan'
      rf' \(--bad_rows=nan\); the first, {source}:3: expected 40 columns',
    )
    # The metrics are of the rows scored (the bad ones' labels are unread).
    self.assertIn('The 38 labelled rows: AUC', '\n'.join(logs.output))
    predict_output.write_predictions(self.predictor, clean, outputs[1], 10, 0)
    got, want = (_read(o) for o in outputs)
    # The good rows' lines as a file without the bad ones gives them: the
    # same float32 values, written exactly.
    places = [i - (i > 15) - (i > 14) for i in sorted(bad)]
    self.assertEqual([got[1 + i] for i in places], ['nan,\n'] * 5)
    self.assertEqual(
      [g for i, g in enumerate(got) if i - 1 not in places], want
    )
    self.assertNotIn('nan', ''.join(want))
    with self.assertRaisesRegex(core.DataError, rf'{source}:3: expected 40'):
      predict_output.write_predictions(self.predictor, source, outputs[1], 10)

  def test_a_row_beyond_float32_once_standardised_is_scored_nan(self):
    # What the reader takes and the encoder refuses: side.OutOfRange, here
    # for the third row of the first chunk.
    lines = _tiny()[1][:12]
    source = self.write('all.txt', lines)
    rest = self.write('rest.txt', lines[:2] + lines[3:])
    logs, got, want = self.refused_then_without(source, rest, 5)
    self.assertIn(f'the first, {source}:3: numeric field x', logs[0])
    self.assertEqual(got[3], 'nan,\n')
    self.assertEqual(got[:3] + got[4:], want)

  def test_a_row_the_encoder_refuses_is_named_by_its_line_in_line_order(self):
    # A row that parses and that the encoder refuses (side.OutOfRange) was
    # named by its row number, and logged after its chunk's parse errors:
    # here, line 4 (the third row: lines 2 and 7 are blank) before line 6.
    lines = _tiny()[1][:11]
    given = [lines[0], '', *lines[1:4], 'garbage', '', *lines[4:]]
    source = self.write('all.txt', given)
    rest = self.write('rest.txt', [lines[0], lines[1], *lines[3:]])
    logs, got, want = self.refused_then_without(source, rest, 10)
    self.assertRegex(
      logs[0], rf'2 of 12 rows .* the first, {source}:4: numeric field x: 1e39'
    )
    self.assertEqual([got[3], got[5]], ['nan,\n'] * 2)
    self.assertEqual([g for i, g in enumerate(got) if i not in (3, 5)], want)

  def test_predict_file_scores_bad_rows_nan_as_the_command_line_does(self):
    # Predictor.predict_file had no bad_rows: a caller from Python could
    # only stop at a bad row.
    lines = _tiny()[1][:25]
    bad = {3: 'garbage', 22: lines[20] + '\tz'}  # Lines 4 and 23.
    given = [*lines[:3], bad[3], *lines[3:12], '', *lines[12:20], bad[22]]
    given += lines[21:]
    source = self.write('bad.txt', given)
    clean = self.write('clean.txt', [g for g in given if g not in bad.values()])
    with self.assertLogs('absl', 'WARNING') as logs:
      chunks = list(self.predictor.predict_file(source, 10, 0, 'nan'))
    self.assertLen(logs.output, 1)
    self.assertRegex(
      logs.output[0],
      rf'^WARNING:absl:2 of 26 rows could not be encoded and were scored nan'
      rf' \(--bad_rows=nan\); the first, {source}:4: expected 40 columns',
    )
    output = os.path.join(self.tmp, 'out.csv')
    with self.assertLogs('absl', 'WARNING') as written:  # The same line.
      predict_output.write_predictions(
        self.predictor, source, output, 10, 0, 'nan'
      )
    self.assertEqual(written.output, logs.output)
    probs, labels = (np.concatenate(a) for a in zip(*chunks, strict=True))
    want = list(self.predictor.predict_file(clean, 10, 0))
    want, want_labels = (np.concatenate(a) for a in zip(*want, strict=True))
    places = [3, 21]  # Line 13 is blank: no row.
    self.assertTrue(np.isnan(probs[places]).all())
    self.assertTrue(np.isnan(labels[places]).all())
    np.testing.assert_array_equal(  # The same float32 bits.
      np.delete(probs, places).view(np.uint32), want.view(np.uint32)
    )
    np.testing.assert_array_equal(np.delete(labels, places), want_labels)
    with self.assertRaisesRegex(core.DataError, rf'{source}:4: expected 40'):
      list(self.predictor.predict_file(source, 10, 0))
    with self.assertRaisesRegex(ValueError, 'must be error or nan, got .skip'):
      next(self.predictor.predict_file(source, bad_rows='skip'))

  def test_a_ctrl_c_in_a_gc_callback_stops_predict_calls(self):
    # As data.load_dataset's: a Ctrl-C sent during a collection was lost by
    # predict.load, write_predictions and predict_file (a generator, which
    # a decorator does not cover), which went on. Here sent from a gc
    # callback in a function that each call runs, then sleeps: the signal
    # sent again 10 ms later ends the sleep.
    self.addCleanup(signal.signal, signal.SIGINT, signal.getsignal(2))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    armed, sent = [], []

    def collecting(phase, info):
      del info
      if phase == 'start' and armed:
        armed.clear()
        sent.append(True)
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(10_000))  # The handler runs here, in the callback.

    def interrupted(*args, **kwargs):
      del args, kwargs
      armed.append(True)
      gc.collect()
      time.sleep(2)
      raise RuntimeError('the Ctrl-C was lost')

    gc.callbacks.append(collecting)
    self.addCleanup(gc.callbacks.remove, collecting)
    source = self.write('a.txt', _tiny()[1][:12])
    output = os.path.join(self.tmp, 'out.csv')
    calls = {  # What each runs after its guard is on: where it stops.
      'load': (encoder, 'load', lambda: predict.load(self.tmp)),
      'write_predictions': (
        metrics,  # After the chunks: the decorator's alone.
        'roc_auc',
        lambda: predict_output.write_predictions(
          self.predictor, source, output, 5, 0
        ),
      ),
      'predict_file': (
        predict.Predictor,
        'score_ids',
        lambda: list(self.predictor.predict_file(source, 5, 0)),
      ),
    }
    threads = set(threading.enumerate())
    for name, (owner, function, call) in calls.items():
      with (
        self.subTest(name),
        mock.patch.object(owner, function, interrupted),
        self.assertRaises(KeyboardInterrupt),
      ):
        call()
      self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)
    self.assertLen(sent, 3)
    for thread in set(threading.enumerate()) - threads:
      thread.join(5)  # The signal sent again; predict_file's prefetch.
    self.assertEqual(set(threading.enumerate()), threads)

  def test_the_placing_reader_travels_to_the_parse_workers(self):
    reader = bad_rows._Placing(
      self.predictor.encoder.reader(_tiny_config().dataset.path)
    )
    self.assertTrue(parallel.picklable(reader))
    again = pickle.loads(pickle.dumps(reader))
    lines = [line.encode() + b'\n' for line in _tiny()[1][:4]]
    lines[1] = b'x\n'
    issues = []
    keys, _, found = again.parse(lines, 1, str, lambda *i: issues.append(i))
    found = pickle.loads(pickle.dumps(found))  # As a worker returns it.
    self.assertEqual(found.bad.tolist(), [1])
    self.assertEqual(len(keys), 3)
    self.assertEqual(issues, [])  # Returned, for chunks to report in order.
    self.assertEqual([i[:2] for i in found.issues], [(1, '2')])
    self.assertEqual(found.name(2), '3')

  def test_the_flag_takes_error_or_nan(self):
    values = flags.FlagValues()
    predict.define_flags(values)
    values(['predict.py', '--workdir=w', '--input=i', '--output=o'])
    self.assertEqual(values.bad_rows, 'error')
    values(['predict.py', '--bad_rows=nan'])
    self.assertEqual(values.bad_rows, 'nan')
    with self.assertRaises(flags.IllegalFlagValueError):
      values(['predict.py', '--bad_rows=skip'])


class GuardAcrossThreadsTest(absltest.TestCase):
  def test_a_guarded_generator_closed_on_another_thread_raises_nothing(self):
    # Predictor.score_chunks guards its loop: a caller's thread (or the gc)
    # may close it. signal.signal there raised ValueError ('signal only
    # works in main thread of the main interpreter').
    def chunks():
      with utils.interrupts_heard():
        yield 1
        yield 2

    self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)
    self.addCleanup(signal.signal, signal.SIGINT, signal.default_int_handler)
    generator = chunks()
    self.assertEqual(next(generator), 1)
    errors = []

    def close():
      try:
        generator.close()
      except Exception as e:  # pylint: disable=broad-exception-caught
        errors.append(e)

    thread = threading.Thread(target=close)
    thread.start()
    thread.join()
    self.assertEqual(errors, [])
    self.assertIs(signal.getsignal(signal.SIGINT), utils._interrupt)  # Left.
    # On the main thread it puts Python's handler back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    generator = chunks()
    next(generator)
    self.assertIs(signal.getsignal(signal.SIGINT), utils._interrupt)
    generator.close()
    self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)


if __name__ == '__main__':
  absltest.main()
