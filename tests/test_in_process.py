"""The library called many times in one process (a notebook, a sweep)."""

import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock
import weakref

from absl.testing import absltest
import jax
import ml_collections
import numpy as np

from configs import default
import predict
import programs
import train
import utils


def _config(**overrides):
  config = default.get_config('smoke')
  config.model = ml_collections.ConfigDict(dict(embed_dim=4))
  config.update(overrides)
  return config


class ImportTest(absltest.TestCase):
  def test_importing_train_and_predict_changes_no_process_state(self):
    # Beyond JAX's threefry lowering on CPU (train.py says so): jax config
    # flags, environment, signal handlers, logging, absl flags, hooks and
    # the working directory are as the user left them.
    changed = subprocess.run(
      [sys.executable, '-c', _STATE_AROUND_IMPORT, 'train', 'predict'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.splitlines()[-1]
    self.assertEqual(
      json.loads(changed),
      {
        'jax': [],
        'env': [],
        'signals': False,
        'levels': False,
        'handlers': False,
        'absl': False,
        'hooks': False,
        'cwd': False,
      },
    )


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a notebook may rely on, before and after importing `modules`: the
# state of the process that the libraries they import leave alone.
_STATE_AROUND_IMPORT = """
import json, logging, os, signal, sys, warnings
import absl.logging, jax, flax, optax, orbax.checkpoint, pandas
from absl import flags
jax.devices()

def state():
  return {
    'jax': {k: repr(v) for k, v in jax.config.values.items()},
    'env': dict(os.environ),
    'signals': [repr(signal.getsignal(s)) for s in (2, 15)],
    'levels': [logging.getLogger(n).level for n in ('', 'absl', 'jax')],
    'handlers': [len(logging.getLogger(n).handlers) for n in ('', 'absl')],
    'absl': [absl.logging.get_verbosity(), flags.FLAGS.is_parsed()],
    'hooks': [repr(sys.excepthook), repr(sys.unraisablehook)],
    'cwd': os.getcwd(),
  }

# Writes are recorded too: this process inherits what its parent, which
# imported the modules, wrote into the environment or set to SIG_IGN.
written = {'env': set(), 'signals': set()}
putenv, unsetenv, set_signal = os.putenv, os.unsetenv, signal.signal
os.putenv = lambda k, v: written['env'].add(os.fsdecode(k)) or putenv(k, v)
os.unsetenv = lambda k: written['env'].add(os.fsdecode(k)) or unsetenv(k)
signal.signal = lambda s, h: written['signals'].add(s) or set_signal(s, h)
before = state()
for module in sys.argv[1:]:
  __import__(module)
after = state()
changed = {
  group: sorted(k for k in set(before[group]) | set(after[group])
                if before[group].get(k) != after[group].get(k))
  if isinstance(before[group], dict) else before[group] != after[group]
  for group in before
}
changed['env'] = sorted(set(changed['env']) | written['env'])
changed['signals'] |= bool(written['signals'])
print(json.dumps(changed))
"""


def _train_lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  return [line['epoch'] for line in lines if line['split'] == 'train']


class RunsInOneProcessTest(absltest.TestCase):
  """`train_and_evaluate` and `predict.load` as a notebook calls them."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.workdir = os.path.join(cls.tmp.name, 'fm')
    cls.test = train.train_and_evaluate(cls.config(num_epochs=1), cls.workdir)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  @classmethod
  def config(cls, **overrides):
    config = _config(progress_bar=False, **overrides)
    config.dataset.cache_dir = os.path.join(cls.tmp.name, 'cache')
    return config

  def test_errors_leave_the_process_usable_and_the_run_resumable(self):
    # A notebook's failed call must leave no thread, no held lock and no
    # half-written checkpoint: the next call in the process goes on.
    threads = set(threading.enumerate())
    workdir = os.path.join(self.tmp.name, 'interrupted')
    bad = self.config(num_epochs=2)
    bad.model.embed_dm = 4
    with self.assertRaisesRegex(utils.UserError, 'config.model.embed_dm'):
      train.train_and_evaluate(bad, workdir)
    epochs = []

    def interrupted(*args, **kwargs):  # A Ctrl-C in the second epoch.
      epochs.append(args[4])
      if len(epochs) == 2:
        raise KeyboardInterrupt
      return train_epoch(*args, **kwargs)

    train_epoch = train.train_epoch
    with (
      mock.patch.object(train, 'train_epoch', interrupted),
      self.assertRaises(KeyboardInterrupt),
    ):
      train.train_and_evaluate(self.config(num_epochs=2), workdir)
    self.assertEqual(epochs, [0, 1])
    self.assertEqual(set(threading.enumerate()), threads)
    with open(os.path.join(workdir, 'run.lock')) as f:
      self.assertTrue(json.load(f)['released'])
    self.assertEqual(
      os.listdir(os.path.join(workdir, 'checkpoints', 'latest')), ['1']
    )
    test = train.train_and_evaluate(self.config(num_epochs=2), workdir)
    self.assertEqual(_train_lines(workdir), [1, 2])  # Epoch 1 not redone.
    self.assertBetween(test['auc'], 0.6, 1.0)
    self.assertEqual(set(threading.enumerate()), threads)

  def test_an_error_before_training_waits_for_the_compile_threads(self):
    # The programs compile on threads while the state initialises; an error
    # there (here an init_from that cannot be read) returned at once and
    # left them compiling, for seconds, in the caller's process. They are
    # held until the error, then take 0.5 s more.
    threads = set(threading.enumerate())
    failed = threading.Event()
    compile_ = programs.OptionedProgram.compile

    def slow(program, *args):
      failed.wait(30)
      time.sleep(0.5)
      return compile_(program, *args)

    def unreadable(state, workdir):
      failed.set()
      raise utils.UserError(f'{workdir}: unreadable')

    config = self.config(num_epochs=1, init_from=self.workdir)
    with (
      mock.patch.object(programs.OptionedProgram, 'compile', slow),
      mock.patch.object(train, 'warm_start', unreadable),
      self.assertRaisesRegex(utils.UserError, 'unreadable'),
    ):
      train.train_and_evaluate(config, os.path.join(self.tmp.name, 'warm'))
    self.assertTrue(failed.is_set())
    self.assertEqual(set(threading.enumerate()), threads)

  def test_a_frozen_config_trains_as_its_config_dict_and_a_dict_is_refused(
    self,
  ):
    # A FrozenConfigDict failed after the workdir was locked (an
    # AttributeError from resolve_optimizer), a dict with a traceback.
    config = self.config(num_epochs=1)
    with self.assertRaisesRegex(utils.UserError, 'is a dict, not an ml_coll'):
      train.train_and_evaluate(config.to_dict(), self.tmp.name)
    frozen = ml_collections.FrozenConfigDict(config)
    workdir = os.path.join(self.tmp.name, 'frozen')
    self.assertEqual(train.train_and_evaluate(frozen, workdir), self.test)

  def test_predictors_loaded_again_are_freed_and_threads_score_exactly(self):
    first = predict.load(self.workdir)
    rng = np.random.default_rng(0)
    dims = first.encoder.field_dims
    ids = np.stack([rng.integers(0, d, 3000) for d in dims], 1)
    # The reference: the model applied at once, on one device.
    want = np.asarray(
      jax.jit(predict.probabilities, static_argnums=0)(
        first.model, first.variables, ids
      )
    )
    loaded = [weakref.ref(first)]
    del first
    for _ in range(2):
      loaded.append(weakref.ref(predict.load(self.workdir)))
    gc.collect()
    self.assertEqual([p() for p in loaded], [None] * 3)
    predictor = predict.load(self.workdir, batch_size=256)
    got, errors = {}, []

    def score(k):  # Sizes that pad to different shapes, in two threads.
      try:
        for start in range(k, 3000, 701):
          rows = slice(start, start + 50 + 97 * k + start % 300)
          got[k, start] = (rows, predictor.predict_ids(ids[rows]))
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)

    workers = [threading.Thread(target=score, args=(k,)) for k in (0, 1)]
    for worker in workers:
      worker.start()
    for worker in workers:
      worker.join()
    self.assertEqual(errors, [])
    self.assertLen(got, 10)
    for rows, probabilities in got.values():
      np.testing.assert_allclose(probabilities, want[rows], rtol=1e-5)


if __name__ == '__main__':
  absltest.main()
