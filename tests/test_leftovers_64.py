"""A failed library call leaves nothing behind; predict's bad rows."""

import gc
import os
import signal
import tempfile
import threading
from unittest import mock

from absl.testing import absltest
from dataset_testing import criteo_rows
from dataset_testing import write_lines
import predict_testing

import checkpoints
import data
from datasets import parallel
import programs
import train
import utils


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


class EarlyErrorTest(absltest.TestCase):
  def test_an_error_after_the_managers_open_closes_them(self):
    # A damaged latest checkpoint fails the run after the checkpoint
    # managers open and before training: they were left open (no `with`
    # around them yet).
    tmp = tempfile.mkdtemp()
    path = write_lines(os.path.join(tmp, 'a.txt'), criteo_rows(200, 3), '\t')
    config = predict_testing.criteo_config(path, os.path.join(tmp, 'cache'))
    workdir = os.path.join(tmp, 'run')
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
        programs, 'compile_train_and_eval', lambda *a: lambda: None
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


if __name__ == '__main__':
  absltest.main()
