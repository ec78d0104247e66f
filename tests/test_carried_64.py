"""Tests of small fixes: errors raised once, hashes counted, caches kept.

Each test runs in-process on tiny inputs; each fails without its fix.
"""

import os
import tempfile
from unittest import mock

from absl.testing import absltest
from dataset_testing import DatasetTestCase
from flax import linen as nn
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd

from configs import default
from datasets import cache
from datasets import csv as csv_source
from models import fm
import multihost
import sources
import sparse
import train
import utils
from utils import UserError
import workdir as workdir_lib


class _OneTable(nn.Module):
  """Reads one declared table, then the caller's loss may fail."""

  @nn.compact
  def __call__(self, rows):
    t = self.param('t', nn.initializers.normal(1.0), (5, 2))
    return jnp.sum(fm.take_rows(t, rows, self, 't'), axis=-1)


class SparseErrorTest(absltest.TestCase):
  def test_a_model_error_after_the_lookups_is_raised_once(self):
    # The error comes from the gradient's trace; tracing the model again
    # to name the tables read raises it again, which must not chain onto
    # (and repeat) the first.
    model = _OneTable()
    rows = np.array([0, 3, 4], np.int32)
    params = {'t': np.ones((5, 2), np.float32)}
    calls = []

    def fun(params, perturbations):
      variables = {'params': params}
      if perturbations:
        variables[sparse.PERTURBATIONS] = perturbations
      model.apply(variables, rows, mutable=[sparse.ROWS])
      calls.append(perturbations is not None)
      raise TypeError('the model failed')

    with self.assertRaisesRegex(TypeError, '^the model failed$') as cm:
      sparse.value_and_grad(fun, params, frozenset({('t',)}))
    self.assertIsNone(cm.exception.__context__)
    self.assertIsNone(cm.exception.__cause__)
    # The gradient's trace, then the whole trace that names the reads.
    self.assertEqual(calls, [True, False])


class _Loaded(Exception):
  """Stops `train._run` once its dataset is loaded."""


class ResumeHashTest(DatasetTestCase):
  def test_a_resume_hashes_a_small_source_once_and_checks_it_first(self):
    # The check of a resume's files and the cache's key share one hash
    # (files under digests.MIN_BYTES are hashed on every call).
    path = os.path.join(self.tmp, 'train.csv')
    rows = [f'{i % 2},u{i % 7},i{i % 5}' for i in range(60)]
    with open(path, 'w') as f:
      f.write('\n'.join(['click,user,item', *rows]) + '\n')
    config = default.get_config()
    config.dataset = self.config('csv', path, csv={'label_column': 'click'})
    workdir = workdir_lib.prepare(os.path.join(self.tmp, 'run'))
    workdir_lib.check_resume(workdir, config)  # The run's record,
    os.makedirs(os.path.join(workdir, 'checkpoints', 'state', '1'))
    sources.record(workdir, {'all': cache.fingerprint(path)})  # its files.
    scan = self.enter_context(
      mock.patch.object(cache, '_scan', wraps=cache._scan)
    )
    self.enter_context(
      mock.patch.object(multihost, 'assert_same_data', side_effect=_Loaded)
    )

    def hashes():
      count = [c.args[0] for c in scan.call_args_list].count(path)
      scan.reset_mock()
      return count

    with self.assertRaises(_Loaded):
      train._run(config, workdir, True)
    self.assertEqual(hashes(), 1)
    self.assertLen(self.encoded(), 1)
    with open(path, 'a') as f:  # Other bytes: refused before encoding.
      f.write('1,u1,i1\n')
    with self.assertRaisesRegex(UserError, 'differ from those recorded'):
      train._run(config, workdir, True)
    self.assertEqual(hashes(), 1)
    self.assertLen(self.encoded(), 1)


class TextLabelTest(DatasetTestCase):
  def test_true_false_labels_are_read_once_and_as_their_numbers(self):
    # pandas' `to_csv` of a bool label column: a chunk that starts with a
    # word is read once, as text; one that starts with a number tries the
    # typed read first. Either way each cell is its number (-1: 0).
    cells = ['True', 'False', ' true', 'FALSE ', '1', '0', '-1', 'tRuE']
    expected = [1, 0, 1, 0, 1, 0, 0, 1]
    path = os.path.join(self.tmp, 'train.csv')
    with open(path, 'w') as f:
      f.write('click,user\n')
    options = dict(csv_source.DEFAULTS, label_column='click')
    table = csv_source.reader(ml_collections.ConfigDict(options), path)

    def bad(where, reason):
      raise AssertionError(f'{where}: {reason}')

    for order in (cells, cells[4:] + cells[:4]):
      lines = [f'{c},u{i}\n'.encode() for i, c in enumerate(order)]
      want = expected if order is cells else expected[4:] + expected[:4]
      with mock.patch.object(pd, 'read_csv', wraps=pd.read_csv) as read:
        _, got = table.parse(lines, 2, str, bad)
      with self.subTest(first=order[0]):
        np.testing.assert_array_equal(got, np.array(want, np.float32))
        self.assertEqual(read.call_count, 1 if order is cells else 2)


class CompilationCacheDirTest(absltest.TestCase):
  def test_a_directory_set_by_a_caller_is_kept_and_ours_replaced(self):
    names = (
      'jax_compilation_cache_dir',
      'jax_persistent_cache_min_entry_size_bytes',
      'jax_persistent_cache_min_compile_time_secs',
      'jax_persistent_cache_enable_xla_caches',
    )
    before = {name: getattr(jax.config, name) for name in names}
    env = {k: v for k, v in os.environ.items() if k != names[0].upper()}
    with (
      tempfile.TemporaryDirectory() as tmp,
      mock.patch.dict(os.environ, env, clear=True),
    ):
      try:
        mine = os.path.join(tmp, 'mine')
        jax.config.update(names[0], mine)  # A library user's.
        utils.enable_compilation_cache(os.path.join(tmp, 'data'))
        self.assertEqual(jax.config.jax_compilation_cache_dir, mine)
        self.assertFalse(os.path.exists(os.path.join(tmp, 'data')))
        # One that enable_compilation_cache set follows the next call's.
        jax.config.update(names[0], None)
        for data in ('a', 'b'):
          utils.enable_compilation_cache(os.path.join(tmp, data))
          self.assertEqual(
            jax.config.jax_compilation_cache_dir, os.path.join(tmp, data, 'jax')
          )
      finally:
        for name, value in before.items():
          jax.config.update(name, value)
        compilation_cache.reset_cache()


if __name__ == '__main__':
  absltest.main()
