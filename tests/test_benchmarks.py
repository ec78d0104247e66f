"""The benchmark scripts in their tiny modes, so that they cannot rot.

Each runs for seconds on tiny data; the torchfm side runs only where torch
and torchfm are installed (dev-only) and is skipped cleanly elsewhere. The
numbers are checked against what they must be (rates from their own timings,
AUCs against a brute-force count, field_dims against the raw file), never
against timing thresholds.
"""

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import types
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np
import pandas as pd
import pytest

from benchmarks import ab
from benchmarks import bandwidth
from benchmarks import common
from benchmarks import counts
from benchmarks import plot
from benchmarks import predict as predict_benchmark
from benchmarks import preprocess
from benchmarks import profile
from benchmarks import quality
from benchmarks import seeds
from benchmarks import synthetic
from benchmarks import throughput
from benchmarks import time_to_auc
from datasets import movielens
import optim

HAS_TORCH = common.torch_available()


def _read_json(path):
  with open(path) as f:
    return json.load(f)


class _TempDirs:
  """`create_tempdir` that works under pytest without absl flags."""

  def create_tempdir(self):
    path = tempfile.mkdtemp(prefix='test_benchmarks-')
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return types.SimpleNamespace(full_path=path)


class WorkdirOrTempTest(_TempDirs, absltest.TestCase):
  def test_a_given_workdir_is_kept(self):
    work = self.create_tempdir().full_path
    with common.workdir_or_temp(work, 'x-') as path:
      self.assertEqual(path, work)
      open(os.path.join(path, 'run'), 'w').close()
    self.assertTrue(os.path.exists(os.path.join(work, 'run')))

  def test_a_temporary_one_is_removed_even_after_an_error(self):
    with common.workdir_or_temp('', 'flax_fm_test-') as path:
      self.assertTrue(os.path.basename(path).startswith('flax_fm_test-'))
      open(os.path.join(path, 'run'), 'w').close()
    self.assertFalse(os.path.exists(path))
    with self.assertRaises(ValueError):
      with common.workdir_or_temp('', 'flax_fm_test-') as path:
        raise ValueError
    self.assertFalse(os.path.exists(path))

  def test_parsing_the_flags_creates_nothing(self):
    for module in (seeds, quality, time_to_auc):
      self.assertEqual(module.parse_args([]).workdir, '')


class CommandLineTest(absltest.TestCase):
  def test_the_line_runs_what_it_names_in_a_shell(self):
    argv = [
      '--model=fm',
      '--set=model.mlp_dims=(8, 8)',
      "--b=optimizer='adam'",
      '--out_dir=/tmp/a b',
    ]
    line = common.command_line('ab', argv)
    self.assertEqual(
      shlex.split(line), ['python', '-m', 'benchmarks.ab', *argv]
    )
    # Plain arguments stay as they were typed.
    self.assertEqual(
      common.command_line('seeds', ['--models=fm', '--seeds=0-9']),
      'python -m benchmarks.seeds --models=fm --seeds=0-9',
    )

  def test_a_refused_flag_or_file_ends_the_command_in_one_line(self):
    # As main.py: status 2 and one line on stderr, whether the tool, a
    # user_errors main or argparse refused it (each before any run).
    for argv, message in (
      (['plot', '/no/such'], '/no/such: no such metrics file'),
      (['plot', '--nope', 'x'], 'unrecognized arguments: --nope'),
      (['throughput', '--models=nope'], '--models: unknown model(s) nope;'),
    ):
      with self.subTest(argv=argv):
        done = subprocess.run(
          [sys.executable, '-m', f'benchmarks.{argv[0]}', *argv[1:]],
          cwd=common.ROOT,
          capture_output=True,
          text=True,
          timeout=120,
        )
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertEqual(done.stdout, '')
        self.assertStartsWith(
          done.stderr, f'python -m benchmarks.{argv[0]}: error: {message}'
        )
        self.assertEqual(done.stderr.count('\n'), 1, done.stderr)
        self.assertTrue(done.stderr.endswith('\n'))

  def test_run_ends_a_user_error_in_one_line_and_lets_others_through(self):
    import utils  # pylint: disable=g-import-not-at-top

    def plain():
      raise utils.UserError('config.batch_size=0: set --config.<key>=<value>')

    for name, main, want in (
      ('plain', plain, 'set --config.<key>=<value>'),
      (
        'user_errors',
        common.user_errors('--set')(plain),
        'set --set=<key>=<value>',
      ),
    ):
      with self.subTest(name):
        stderr = io.StringIO()
        with (
          contextlib.redirect_stderr(stderr),
          self.assertRaises(SystemExit) as raised,
        ):
          common.run(main)
        self.assertEqual(raised.exception.code, 2)
        self.assertRegex(
          stderr.getvalue(),
          rf'^[^\n]+: error: config\.batch_size=0: {re.escape(want)}\n\Z',
        )
    # A bug keeps its traceback; --help's status stays.
    with self.assertRaises(ZeroDivisionError):
      common.run(lambda: 1 / 0)
    with self.assertRaises(SystemExit) as raised:
      common.run(lambda: sys.exit(0))
    self.assertEqual(raised.exception.code, 0)


class OutDirTest(_TempDirs, absltest.TestCase):
  def test_a_file_for_a_directory_stops_before_anything_runs(self):
    tmp = self.create_tempdir().full_path
    path = os.path.join(tmp, 'results.md')
    open(path, 'w').close()
    for module in (seeds, quality, throughput, profile, time_to_auc):
      for flags, message in (
        ([f'--out_dir={path}'], f'--out_dir={path}: is a file'),
        ([f'--out_dir={path}/x'], f'cannot be made: {path} is a file'),
      ):
        with self.subTest(module=module.__name__, flags=flags):
          with self.assertRaisesRegex(SystemExit, message):
            module.parse_args(flags)
    for module in (seeds, quality, time_to_auc):
      with self.assertRaisesRegex(SystemExit, f'--workdir={path}: is a'):
        module.parse_args([f'--workdir={path}'])
    with self.assertRaisesRegex(SystemExit, f'--out_dir={path}: is a file'):
      ab.main(['--model=fm', f'--out_dir={path}'])
    # A directory to be made is fine, and made only by the run.
    args = seeds.parse_args([f'--out_dir={tmp}/new/out'])
    self.assertEqual(args.out_dir, f'{tmp}/new/out')
    self.assertFalse(os.path.exists(f'{tmp}/new'))


class AbTest(_TempDirs, absltest.TestCase):
  def test_two_variants_alternate_and_train_what_they_time(self):
    out = self.create_tempdir().full_path
    (r,) = ab.main(
      [
        '--model=fm',
        '--set=batch_size=512',
        '--set=model.embed_dim=4',
        '--a=steps_per_dispatch=2',
        '--b=steps_per_dispatch=3',
        '--b=optimizer=rowwise_adagrad',
        '--rounds=3',
        '--dispatches=2',
        f'--out_dir={out}',
        '--out_name=t',
      ]
    )
    self.assertEqual(r['a_overrides'], {'steps_per_dispatch': 2})
    self.assertEqual(
      r['b_overrides'],
      {'steps_per_dispatch': 3, 'optimizer': 'rowwise_adagrad'},
    )
    self.assertEqual(r['set'], {'batch_size': 512, 'model.embed_dim': 4})
    for v, steps in (('a', 2), ('b', 3)):
      self.assertEqual(r[f'{v}_steps_per_dispatch'], steps)
      # The warm-up dispatch, then 3 rounds of 2: every one trained.
      self.assertEqual(r[f'{v}_trained_steps'], (1 + 3 * 2) * steps)
      self.assertLen(r[f'{v}_rounds'], 3)
      self.assertAlmostEqual(
        r[f'{v}_ex_per_s'], float(np.median(r[f'{v}_rounds']))
      )
    self.assertAlmostEqual(r['b_over_a'], r['b_ex_per_s'] / r['a_ex_per_s'])
    saved = _read_json(os.path.join(out, 't.json'))['results']
    self.assertEqual(saved[0]['b_trained_steps'], 21)
    with open(os.path.join(out, 't.md')) as f:
      self.assertIn("optimizer='rowwise_adagrad'", f.read())

  def test_tiny(self):
    out = self.create_tempdir().full_path
    (r,) = ab.main(['--model=fm', '--tiny', f'--out_dir={out}'])
    self.assertEqual((r['rounds'], r['dispatches']), (2, 1))
    self.assertEqual(r['set'], {'batch_size': 256})
    steps = r['a_steps_per_dispatch']
    self.assertEqual(r['a_trained_steps'], 3 * steps)
    self.assertTrue(os.path.exists(os.path.join(out, 'ab.md')))

  def test_tiny_changes_only_the_flags_not_given(self):
    out = self.create_tempdir().full_path

    class Variant:  # No compilation, no training: what main asks of it.
      def __init__(self, config, xla_options=None):
        del xla_options
        self.steps, self.examples = 1, config.batch_size

      def dispatch(self, n):
        time.sleep(0.001 * n)

      def trained_steps(self):
        return 0

    flags = ['--model=fm', '--tiny', f'--out_dir={out}']
    with mock.patch.object(ab, 'Variant', Variant):
      (r,) = ab.main([*flags, '--rounds=5', '--set=batch_size=512'])
      self.assertEqual((r['rounds'], r['dispatches']), (5, 1))
      self.assertLen(r['a_rounds'], 5)
      self.assertEqual(r['set'], {'batch_size': 512})
      # A value equal to the default, given explicitly, is kept too.
      (r,) = ab.main([*flags, '--rounds=12', '--dispatches=3'])
      self.assertEqual((r['rounds'], r['dispatches']), (12, 3))
      self.assertEqual(r['set'], {'batch_size': 256})

  def test_xla_options_compile_one_variant(self):
    out = self.create_tempdir().full_path
    flags = ['--model=fm', '--tiny', f'--out_dir={out}']
    option = 'xla_backend_optimization_level'  # A long-standing one.
    (r,) = ab.main([*flags, f'--b_xla={option}=1'])
    self.assertEqual((r['a_xla'], r['b_xla']), ({}, {option: '1'}))
    self.assertEqual(r['b_trained_steps'], 3 * r['b_steps_per_dispatch'])
    with open(os.path.join(out, 'ab.md')) as f:
      self.assertIn(f"XLA {option}='1'", f.read())
    # The option reaches XLA: a value it does not know stops the run.
    with self.assertRaisesRegex(SystemExit, f'--b_xla: .*{option}'):
      ab.main([*flags, f'--b_xla={option}=nonsense'])
    with self.assertRaisesRegex(SystemExit, "--a_xla: 'fast' is not xla_"):
      ab.main([*flags, '--a_xla=fast'])

  def test_too_few_rounds_or_dispatches_stop_as_in_the_other_tools(self):
    out = self.create_tempdir().full_path
    for flag, message in (
      ('--rounds=0', r'^--rounds=0: give at least 1\.$'),
      ('--dispatches=-2', r'^--dispatches=-2: give at least 1\.$'),
    ):
      with self.subTest(flag=flag):
        with mock.patch.object(ab, 'Variant') as variant:
          with self.assertRaisesRegex(SystemExit, message):
            ab.main(['--model=fm', flag, f'--out_dir={out}'])
        variant.assert_not_called()
    self.assertEqual(os.listdir(out), [])

  def test_a_string_for_a_tuple_is_a_list_as_main_takes_it(self):
    overrides = common.parse_overrides(
      ['dataset.side_features=genres, year', 'model.mlp_dims=(8,)'], '--set'
    )
    config = common.get_config('deepfm', None, overrides)
    self.assertEqual(config.dataset.side_features, ('genres', 'year'))
    self.assertEqual(config.model.mlp_dims, (8,))
    config = common.get_config('fm', None, {'optimizer': 'lazy_adam'})
    self.assertEqual(config.optimizer, 'lazy_adam')

  def test_bad_overrides_name_themselves(self):
    with self.assertRaisesRegex(SystemExit, "--a: 'lr' is not key=value"):
      ab.main(['--model=fm', '--a=lr'])
    with self.assertRaisesRegex(SystemExit, 'no_such_key'):
      ab.main(['--model=fm', '--b=model.no_such_key.x=1'])
    with self.assertRaisesRegex(SystemExit, "unknown 'nope'"):
      ab.main(['--model=nope'])


class UserErrorsTest(_TempDirs, absltest.TestCase):
  def test_an_override_the_config_cannot_take_names_its_flag(self):
    for overrides, message in (
      (
        {'learning_rat': 0.1},
        '--set=learning_rat=0.1: the config has no key'
        " 'learning_rat'. Did you mean 'learning_rate'?",
      ),
      ({'dataset.nme': 'x'}, "no key 'dataset.nme'"),
      (
        {'modell.embed_dim': 4},
        "--set=modell.embed_dim=4: the config has no key 'modell'.",
      ),
      ({'model.embed_dim.x': 1}, 'model.embed_dim is a value'),
      # Checked as a run checks it, with the benchmark's flag as advice.
      (
        {'model.embed_dimm': 4},
        r'--set: .*models/fm.py has no such argument'
        r'.* or with --set=<key>=<value>\.$',
      ),
      ({'optimizer': 'adamm'}, "config.optimizer='adamm' must be one of"),
    ):
      with self.subTest(overrides=overrides):
        with self.assertRaisesRegex(SystemExit, message):
          common.get_config('fm', None, overrides)
    # A model's argument that its config does not list is one to add.
    config = common.get_config('deepfm', None, {'model.linear_init': 'torch'})
    self.assertEqual(config.model.linear_init, 'torch')
    with self.assertRaisesRegex(SystemExit, r'^--set or --b: .*adamm'):
      common.get_config(
        'fm', None, {'seed': 1}, {'optimizer': 'adamm'}, flags=('--set', '--b')
      )

  def test_a_config_key_a_flag_sets_is_named_as_the_flag(self):
    import utils  # pylint: disable=g-import-not-at-top

    @common.user_errors(keys={'config.dataset.cache_dir': '--cache_dir'})
    def main(message):
      raise utils.UserError(message)

    for message, expected in (
      (
        'Free some space or set config.dataset.cache_dir to a writable'
        ' directory.',
        'Free some space or set --cache_dir to a writable directory.',
      ),
      ('--config.dataset.cache_dir=/x: no.', '--cache_dir=/x: no.'),
      ('Set config.dataset.cache_dir.', 'Set --cache_dir.'),
      # Other keys, and keys that only start with it, are left as they are.
      ('config.dataset.cache_dirs=1', 'config.dataset.cache_dirs=1'),
      ('config.dataset.cache_dir.x', 'config.dataset.cache_dir.x'),
      ('myconfig.dataset.cache_dir', 'myconfig.dataset.cache_dir'),
      ('config.dataset.path', 'config.dataset.path'),
    ):
      with self.subTest(message=message):
        with self.assertRaises(SystemExit) as raised:
          main(message)
        self.assertEqual(str(raised.exception), f'error: {expected}')

  def test_ab_stops_on_a_bad_variant_before_it_trains(self):
    out = self.create_tempdir().full_path
    flags = ['--model=fm', '--tiny', f'--out_dir={out}']
    with self.assertRaisesRegex(SystemExit, '--a: .*embed_dimm'):
      ab.main([*flags, '--a=model.embed_dimm=4'])
    # Data that cannot train: the data's message, not a ZeroDivisionError.
    with self.assertRaisesRegex(SystemExit, 'batch_size=100000000 exceeds'):
      ab.main([*flags, '--b=batch_size=100000000'])
    self.assertEmpty(os.listdir(out))

  def test_a_user_error_of_a_run_is_one_line(self):
    import utils  # pylint: disable=g-import-not-at-top

    out = self.create_tempdir().full_path
    work = self.create_tempdir().full_path

    def train_and_evaluate(config, workdir):
      del workdir
      raise utils.UserError(
        f'config.dataset.path: {config.dataset.path} does not exist. Fix it'
        ' in the config file or with --config.<key>=<value>.'
      )

    args = ['--models=fm', '--seeds=0', '--no_torch', f'--workdir={work}']
    args += [f'--out_dir={out}', '--set=dataset.path=/no/such/file']
    with mock.patch('train.train_and_evaluate', train_and_evaluate):
      with self.assertRaisesRegex(
        SystemExit,
        '^error: config.dataset.path: /no/such/file does not exist. Fix it'
        r' in the config file or with --set=<key>=<value>\.$',
      ):
        seeds.main(args)
      # A --set that one of the models cannot take stops before any runs.
      with self.assertRaisesRegex(SystemExit, 'models/lr.py has no such'):
        seeds.main([*args[1:], '--models=fm,lr', '--set=model.embed_dim=4'])
      with self.assertRaisesRegex(
        SystemExit,
        r'^error: .* in the config'
        r' file\.$',
      ):
        quality.main(
          ['--models=fm', '--no_torch', f'--workdir={work}', f'--out_dir={out}']
        )

  def test_a_cache_error_of_a_run_names_the_cache_flag(self):
    import utils  # pylint: disable=g-import-not-at-top

    out = self.create_tempdir().full_path
    work = self.create_tempdir().full_path

    def train_and_evaluate(config, workdir):
      del workdir
      raise utils.UserError(
        f'Could not write the dataset cache {config.dataset.cache_dir}.'
        ' Free some space or set config.dataset.cache_dir to a writable'
        ' directory.'
      )

    flags = ['--models=fm', '--no_torch', f'--workdir={work}']
    flags += [f'--out_dir={out}', '--cache_dir=/full']
    message = (
      r'^error: Could not write the dataset cache /full\. Free some space or'
      r' set --cache_dir to a writable directory\.$'
    )
    with mock.patch('train.train_and_evaluate', train_and_evaluate):
      for module, more in ((seeds, ['--seeds=0']), (quality, [])):
        with self.subTest(module=module.__name__):
          with self.assertRaisesRegex(SystemExit, message):
            module.main([*flags, *more])


class CountsTest(absltest.TestCase):
  def test_measure_counts_the_distinct_keys_and_their_memory(self):
    chunks = counts.key_chunks(5, 2000, seed=3)
    result = counts.measure(chunks)
    self.assertEqual(result['keys'], 10_000)
    distinct = len(np.unique(np.concatenate(chunks)))
    self.assertEqual(result['distinct'], distinct)
    # The totals: an int64 key and an int32 count per distinct key.
    self.assertAlmostEqual(result['totals_mib'], distinct * 12 / 2**20, 2)
    self.assertGreater(result['peak_mib'], result['totals_mib'])

  def test_a_merge_holds_the_totals_about_twice(self):
    # Long-tailed keys, merged often: at peak the old totals and the grown
    # ones (24 bytes a distinct key); one sort of the totals and the
    # waiting keys held four arrays of both (40 bytes).
    chunks = counts.key_chunks(40, 5000, seed=0)
    with mock.patch.object(counts.encode.Counts, 'MIN_MERGE', 1000):
      result = counts.measure(chunks)
    peak = result['peak_mib'] * 2**20 / result['distinct']
    self.assertBetween(peak, 12, 28)


class SyntheticTest(_TempDirs, absltest.TestCase):
  def _draws(self, column, lines):
    return lines * (1 - synthetic.CRITEO_CAT_MISSING[column])

  def test_kaggle_laws_hold_the_real_file_s_values_over_its_lines(self):
    lines = synthetic.KAGGLE_LINES
    for c, (exponent, vocab) in enumerate(synthetic.CRITEO_KAGGLE):
      distinct, kept = synthetic.expected_values(
        vocab, exponent, self._draws(c, lines)
      )
      real = synthetic.CRITEO_CARDINALITIES[c]
      self.assertAlmostEqual(distinct / real, 1, delta=1e-3, msg=f'C{c + 1}')
      if c + 1 not in (6, 14, 22):  # No power law leaves their rare values.
        real = synthetic.CRITEO_KEPT[c]
        self.assertAlmostEqual(kept / real, 1, delta=0.02, msg=f'C{c + 1}')
    # The default's single exponent draws a fraction (C3: 3.2M of 10.1M).
    distinct, _ = synthetic.expected_values(
      synthetic.CRITEO_CARDINALITIES[2], 1.1, self._draws(2, lines)
    )
    self.assertLess(distinct, 0.35 * synthetic.CRITEO_CARDINALITIES[2])
    # The constants are what `fit` finds.
    got = synthetic.fit(142_572, 45_570, self._draws(25, lines))
    self.assertEqual(got, synthetic.CRITEO_KAGGLE[25])

  def test_a_kaggle_file_draws_the_values_its_laws_expect(self):
    tmp = self.create_tempdir().full_path
    lines = 20_000
    path = os.path.join(tmp, 'train.txt')
    synthetic.write('criteo', lines, path, cardinality='kaggle')
    frame = pd.read_csv(path, sep='\t', header=None, dtype=str)
    self.assertEqual(frame.shape, (lines, 40))
    for c, (exponent, vocab) in enumerate(synthetic.CRITEO_KAGGLE):
      counts = frame[14 + c].dropna().value_counts()
      expected, _ = synthetic.expected_values(
        vocab, exponent, counts.sum(), min_count=10
      )
      # Within 4 standard deviations (the count's is below sqrt(expected)).
      self.assertLess(
        abs(len(counts) - expected), 4 * math.sqrt(expected) + 1, f'C{c + 1}'
      )
      if c == 2:  # C3: most values rare (seen once), as min_count drops.
        self.assertGreater((counts == 1).mean(), 0.85)
    with self.assertRaisesRegex(ValueError, 'Criteo only'):
      synthetic.write('avazu', 10, path, cardinality='kaggle')

  def test_flags_it_cannot_write_are_errors_before_it_writes(self):
    out = self.create_tempdir().full_path
    for flags in (
      ['--format=avazu', '--cardinality=kaggle', f'--out={out}/a.txt'],
      ['--format=criteo', '--lines=0', f'--out={out}/c.txt'],
      ['--format=criteo', f'--out={out}'],  # A directory.
    ):
      with self.subTest(flags=flags):
        with mock.patch('sys.stderr'):  # argparse's usage.
          with self.assertRaises(SystemExit):
            synthetic.main(['--lines=10', *flags])
    self.assertEmpty(os.listdir(out))
    self.assertFalse(os.path.exists(f'{out}.partial'))


class BandwidthTest(absltest.TestCase):
  def test_compiled_cost_counts_operations_and_bytes(self):
    x, w, b = np.ones((8, 16)), np.ones((16, 4)), np.ones(4)
    # f32 (JAX's default): the operands read and the result written.
    self.assertEqual(
      bandwidth.compiled_cost(lambda x, w: x @ w, x, w),
      {'flops': 2 * 8 * 16 * 4, 'bytes': 4 * (8 * 16 + 16 * 4 + 8 * 4)},
    )
    cost = bandwidth.compiled_cost(lambda x, w, b: x @ w + b, x, w, b)
    self.assertEqual(cost['flops'], 2 * 8 * 16 * 4 + 8 * 4)
    # At least the inputs and the output, each once.
    self.assertGreaterEqual(cost['bytes'], 4 * (8 * 16 + 16 * 4 + 4 + 8 * 4))
    # A jitted function is analysed through its own `lower`, whose
    # compilation its calls share: no second `jax.jit`.
    jitted = jax.jit(lambda x, w: x @ w)
    jitted(x, w)
    with mock.patch.object(jax, 'jit', side_effect=AssertionError('jit')):
      self.assertEqual(
        bandwidth.compiled_cost(jitted, x, w)['flops'], 2 * 8 * 16 * 4
      )

  def test_its_command_line_takes_help_and_no_other_flag(self):
    # --help and a flag it does not have measure nothing (seconds each).
    with mock.patch.object(bandwidth, 'copy_bandwidth') as copy:
      for argv in (['--help'], ['--mib=32']):
        with contextlib.redirect_stdout(io.StringIO()):
          with contextlib.redirect_stderr(io.StringIO()):
            with self.assertRaises(SystemExit):
              bandwidth.main(argv)
      copy.assert_not_called()

  def test_matmul_rate_is_the_operations_over_the_median_time(self):
    times = iter([0.0, 1.0, 1.0, 3.0, 3.0, 7.0, 7.0, 8.0])  # 1, 2, 4, 1 s.
    with mock.patch.object(
      bandwidth, '_clock', side_effect=lambda: next(times)
    ):
      rate = bandwidth.matmul_rate(size=16, repeats=4)
    self.assertEqual(rate, 2 * 16**3 / 1.5)


class ThroughputTest(_TempDirs, absltest.TestCase):
  def _run(self, *flags):
    out = self.create_tempdir().full_path
    records = throughput.main(['--tiny', f'--out_dir={out}', *flags])
    return out, records

  @staticmethod
  def _spec(**changes):
    """A runner's spec: FM on the tiny synthetic ids, batches of 256."""
    return (
      dict(
        model='fm',
        data='synthetic',
        field_dims=throughput.TINY_FIELD_DIMS,
        batch_size=256,
        eval_batch_size=512,
        eval_batches=8,
        pool_batches=3,
        devices=None,
        seed=0,
        cache_dir='',
        steps_per_dispatch=None,
        optimizer='adam',
      )
      | changes
    )

  def test_evaluation_counts_rows_not_padding(self):
    # 3 batches of 256 in evaluation batches of 512: the second is padded.
    spec = self._spec()
    self.assertEqual(throughput._JaxRunner(spec).evaluate()[1], 768)
    if HAS_TORCH:
      self.assertEqual(throughput._TorchRunner(spec).evaluate()[1], 768)

  def test_tiny_flax_only(self):
    out, records = self._run('--models=fm,ffm', '--no_torch')
    self.assertEqual([r['model'] for r in records], ['fm', 'ffm'])
    for r in records:
      self.assertEqual(r['data'], 'synthetic')
      self.assertEqual(r['field_dims'], list(throughput.TINY_FIELD_DIMS))
      for key in ('flax_train_ex_per_s', 'flax_eval_ex_per_s'):
        self.assertTrue(math.isfinite(r[key]) and r[key] > 0, (key, r))
      # The median of the per-round rates.
      self.assertAlmostEqual(
        float(np.median(r['flax_train_rounds'])),
        r['flax_train_ex_per_s'],
        delta=1.0,
      )
      self.assertGreater(r['flax_peak_rss_mib'], 50)
      self.assertAlmostEqual(
        r['flax_step_ms'], 256 * 1e3 / r['flax_train_ex_per_s']
      )
      for key in ('flax_forward_backward_ms', 'flax_optimizer_ms'):
        self.assertTrue(math.isfinite(r[key]) and r[key] > 0, (key, r))
      self.assertTrue(math.isfinite(r['flax_final_loss']))
      # A whole batch's operations: each of the 2 devices counts its share.
      for key in ('flax_forward_backward_gflop', 'flax_optimizer_gflop'):
        self.assertGreater(r[key], 0, key)
      self.assertAlmostEqual(
        r['flax_step_gflop'],
        2 * (r['flax_forward_backward_gflop'] + r['flax_optimizer_gflop']),
      )
      self.assertAlmostEqual(
        r['flax_compute_bound_ex_per_s'],
        256 * r['matmul_gflop_per_s'] / r['flax_step_gflop'],
        places=3,
      )
      self.assertAlmostEqual(
        r['flax_compiled_step_mib'],
        2
        * (
          r['flax_forward_backward_compiled_mib']
          + r['flax_optimizer_compiled_mib']
        ),
      )
      self.assertAlmostEqual(
        r['flax_compiled_traffic_bound_ex_per_s'],
        256
        * 1e9
        * r['bandwidth_gb_per_s']
        / (2**20 * r['flax_compiled_step_mib']),
        places=3,
      )
      # Warm-up compiled the steps; the timed rounds must not recompile.
      self.assertEqual(r['flax_compiles_after_warmup'], 0)
      # conftest.py's two emulated devices reach the worker.
      self.assertEqual(r['flax_info']['devices'], 2)
      self.assertNotIn('torchfm_train_ex_per_s', r)
    saved = _read_json(os.path.join(out, 'throughput.json'))
    self.assertEqual(saved['results'], json.loads(json.dumps(records)))
    self.assertEqual(saved['machine']['cores'], os.cpu_count())
    csv = pd.read_csv(os.path.join(out, 'throughput.csv'))
    np.testing.assert_allclose(
      csv['flax_train_ex_per_s'], [r['flax_train_ex_per_s'] for r in records]
    )
    with open(os.path.join(out, 'throughput.md')) as f:
      md = f.read()
    self.assertIn('| fm | synthetic |', md)
    self.assertIn(f'{os.cpu_count()} cores', md)

  def test_auto_and_config_are_measured_as_what_they_resolve_to(self):
    spec = self._spec(optimizer='auto', eval_batches=2, pool_batches=2)
    rows = sum(throughput.TINY_FIELD_DIMS)
    for threshold, want in [(rows, 'lazy_adam'), (rows + 1, 'adam')]:
      with mock.patch.object(optim, 'AUTO_SPARSE_ROWS', threshold):
        runner = throughput._JaxRunner(spec)
      self.assertEqual(runner.config.optimizer, want)
    # 'config': the config's own, 'auto' but for LR's and FiBiNET's 'adam'.
    spec.update(optimizer='config')
    with mock.patch.object(optim, 'AUTO_SPARSE_ROWS', rows):
      self.assertEqual(
        throughput._JaxRunner(spec).config.optimizer, 'lazy_adam'
      )
      spec.update(model='lr')
      self.assertEqual(throughput._JaxRunner(spec).config.optimizer, 'adam')
    out, records = self._run(
      '--models=lr', '--no_torch', '--optimizers=auto,config'
    )
    self.assertEqual([r['optimizer'] for r in records], ['auto', 'config'])
    self.assertEqual([r['resolved_optimizer'] for r in records], ['adam'] * 2)
    with open(os.path.join(out, 'throughput.md')) as f:
      md = f.read()
    self.assertIn('| lr | synthetic | auto (adam) |', md)
    self.assertIn('| lr | synthetic | config (adam) |', md)

  def test_devices_flag(self):
    _, records = self._run('--models=lr', '--no_torch', '--devices=1')
    self.assertEqual(records[0]['flax_info']['devices'], 1)

  def test_flags_a_worker_cannot_run_are_errors(self):
    for flags in (
      ['--warmup=0'],
      ['--pool_batches=0'],
      ['--eval_batches=0'],
      ['--devices=0'],
      ['--devices=3', '--batch_size=256'],
      ['--devices=2', '--batch_size=256', '--eval_batch_size=511'],
    ):
      with self.subTest(flags=flags):
        with self.assertRaises(SystemExit):
          throughput.parse_args(flags)
    args = throughput.parse_args(['--devices=2', '--batch_size=256'])
    self.assertEqual((args.devices, args.warmup), (2, 5))

  def test_tiny_changes_only_the_flags_not_given(self):
    args = throughput.parse_args(
      ['--tiny', '--steps=7', '--rounds=3', '--batch_size=128']
      + ['--models=lr', '--data=criteo', '--optimizers=lazy_adam']
    )
    self.assertEqual(
      (args.steps, args.rounds, args.batch_size, args.models),
      (7, 3, 128, 'lr'),
    )
    self.assertEqual((args.data, args.optimizers), (['criteo'], ['lazy_adam']))
    # The others are --tiny's.
    self.assertEqual(
      (args.warmup, args.eval_batch_size, args.eval_batches, args.pool_batches),
      (2, 512, 2, 4),
    )
    self.assertEqual(args.field_dims, throughput.TINY_FIELD_DIMS)
    # A value equal to the default, given explicitly, is kept too.
    args = throughput.parse_args(['--tiny', '--models=all'])
    self.assertEqual((args.models, args.data), ('all', ['synthetic']))
    args = throughput.parse_args([])
    self.assertEqual((args.steps, args.data), (50, list(throughput.DATA)))
    self.assertEqual(args.optimizers, list(throughput.OPTIMIZERS))

  def test_unknown_model_is_an_error(self):
    with self.assertRaisesRegex(SystemExit, 'unknown model.*nope'):
      self._run('--models=nope')

  def test_a_user_error_in_a_worker_is_one_line(self):
    # The data's cache cannot be written: the worker's DataError (a
    # UserError) stops the run in one line, and no worker is left running.
    blocked = os.path.join(self.create_tempdir().full_path, 'a_file')
    open(blocked, 'w').close()
    with self.assertRaisesRegex(
      SystemExit,
      r'^error: Could not write the dataset cache [^\n]* set --cache_dir to a'
      r' writable directory\.$',  # The flag, not config.dataset.cache_dir.
    ):
      self._run('--data=embedded', '--no_torch', f'--cache_dir={blocked}/x')
    self.assertEqual(multiprocessing.active_children(), [])

  @pytest.mark.skipif(not HAS_TORCH, reason='torch/torchfm not installed')
  def test_tiny_with_torchfm(self):
    _, records = self._run('--models=fm')
    r = records[0]
    self.assertGreater(r['torchfm_train_ex_per_s'], 0)
    self.assertEqual(r['torchfm_compiles_after_warmup'], 0)
    self.assertAlmostEqual(
      r['train_speedup'],
      r['flax_train_ex_per_s'] / r['torchfm_train_ex_per_s'],
    )
    self.assertAlmostEqual(
      r['eval_speedup'], r['flax_eval_ex_per_s'] / r['torchfm_eval_ex_per_s']
    )

  def test_skips_torchfm_when_missing(self):
    original = common.torch_available
    common.torch_available = lambda: False
    try:
      _, records = self._run('--models=lr')
    finally:
      common.torch_available = original
    self.assertNotIn('torchfm_train_ex_per_s', records[0])
    self.assertNotIn('train_speedup', records[0])

  def test_a_model_torchfm_lacks_is_measured_on_our_side_only(self):
    # With torch at hand, FwFM (not in torchfm) must not start its worker.
    with mock.patch.object(common, 'torch_available', lambda: True):
      _, records = self._run('--models=fwfm')
    self.assertGreater(records[0]['flax_train_ex_per_s'], 0)
    self.assertNotIn('torchfm_train_ex_per_s', records[0])

  def test_zipf_ids_follow_the_rank_law(self):
    rng = np.random.default_rng(0)
    n, size = 50, 200_000
    ids = throughput.zipf_ids(rng, size, n, exponent=1.0)
    self.assertEqual(ids.dtype, np.int32)
    self.assertTrue(((ids >= 0) & (ids < n)).all())
    counts = np.sort(np.bincount(ids, minlength=n))[::-1]
    expected = size / np.arange(1, n + 1) / np.sum(1 / np.arange(1, n + 1))
    np.testing.assert_allclose(counts[:5], expected[:5], rtol=0.05)


class ProfileTest(_TempDirs, absltest.TestCase):
  def test_op_names_and_parts_read_the_hlo_metadata(self):
    body = 'jit(_fun)/shard_map/while/body/closed_call'
    text = '\n'.join(
      [
        'ENTRY %main.9 (p: f32[4]) -> f32[4] {',
        '  %add_fusion.2 = f32[4]{0} fusion(%p), kind=kLoop, calls=%f,'
        f' metadata={{op_name="{body}/jvp(FM)/Dense_0/add" stack_frame_id=3}}',
        '  %dot.7 = f32[4]{0} dot(%p, %p),'
        ' metadata={op_name="jit(_fun)/transpose(jvp(FM))/dot_general"}',
        '  ROOT %wrapped_scatter.1 = f32[4]{0} fusion(%p),'
        ' metadata={op_name="jit(_fun)/scatter-add"}',
        '  %copy.3 = f32[4]{0} copy(%p)',
        '  %cond.2.clone.9 = (f32[4]{0}, s32[]) conditional(%p, %p, %p),'
        ' branch_computations={%a, %b}, metadata={op_name="jit(_fun)/cond"}',
        '  %while.7 = (s32[], f32[4]{0}) while(%t), condition=%c, body=%b',
        '}',
      ]
    )
    names = profile.op_names(text)
    self.assertEqual(
      names,
      {
        'add_fusion.2': f'{body}/jvp(FM)/Dense_0/add',
        'dot.7': 'jit(_fun)/transpose(jvp(FM))/dot_general',
        'wrapped_scatter.1': 'jit(_fun)/scatter-add',
        'cond.2.clone.9': 'jit(_fun)/cond',
      },
    )
    # Every instruction, with metadata or not, but loops and branches.
    self.assertEqual(
      profile.operations(text),
      {'add_fusion.2', 'dot.7', 'wrapped_scatter.1', 'copy.3'},
    )
    self.assertEqual(
      [profile.part_of(n) for n in names.values()],
      ['forward', 'backward', 'update', 'update'],
    )
    self.assertEqual(profile.part_of(''), 'unnamed')
    self.assertEqual(
      profile._NOISE.sub('', names['add_fusion.2']), 'jvp(FM)/Dense_0/add'
    )

  def test_tiny_counts_each_operation_of_the_step(self):
    out = self.create_tempdir().full_path
    records = profile.main(['--model=fnn', '--tiny', f'--out_dir={out}'])
    run = records[0]
    self.assertEqual(
      (run['program'], run['data'], run['batch_size']),
      ('train', 'synthetic', 256),
    )
    self.assertEqual(run['steps'] % 2, 0)  # Two whole dispatches.
    self.assertEqual([r['rank'] for r in records], list(range(len(records))))
    times = [r['ms'] for r in records]
    self.assertEqual(times, sorted(times, reverse=True))
    self.assertTrue(all(t > 0 for t in times))
    by_name = {r['op_name']: r for r in records}
    # The first hidden layer's product runs once a step; no loop is counted
    # as an operation of its own (its body's operations are).
    dense = by_name[
      'jvp(FactorizationSupportedNeuralNetwork)/MultiLayerPerceptron_0/'
      'Dense_0/dot_general'
    ]
    self.assertEqual((dense['runs'], dense['part']), (1.0, 'forward'))
    self.assertFalse([r for r in records if r['op'].startswith('while')])
    self.assertLessEqual(
      {'forward', 'backward', 'update'}, {r['part'] for r in records}
    )
    self.assertLessEqual(
      {r['part'] for r in records},
      {'forward', 'backward', 'update', 'unnamed'},
    )
    for r in records:  # Only what XLA named after nothing is unnamed.
      self.assertEqual(r['part'] == 'unnamed', not r['op_name'])
    with open(os.path.join(out, 'profile.md')) as f:
      text = f.read()
    total = sum(r['ms'] for r in records)
    self.assertIn(f'its {len(records)} operations {total:.2f} ms', text)
    self.assertIn(f'`{records[0]["op"]}`', text)
    saved = _read_json(os.path.join(out, 'profile.json'))['results']
    self.assertLen(saved, len(records))

  def test_tiny_evaluation_counts_each_operation_of_a_batch(self):
    out = self.create_tempdir().full_path
    records = profile.main(
      ['--model=fnn', '--tiny', '--program=eval', f'--out_dir={out}']
    )
    run = records[0]
    self.assertEqual((run['program'], run['batch_size']), ('eval', 256))
    self.assertEqual(run['steps'], 2)  # Two passes over one batch.
    self.assertEqual({r['part'] for r in records}, {'forward'})
    (dense,) = [
      r
      for r in records
      if r['op_name'].endswith('MultiLayerPerceptron_0/Dense_0/dot_general')
    ]
    self.assertEqual(dense['runs'], 1.0)
    # Nothing of training: no gradient, no update.
    self.assertFalse([r for r in records if 'jvp(' in r['op_name']])
    with open(os.path.join(out, 'profile.md')) as f:
      text = f.read()
    self.assertIn('an evaluation batch (256 rows)', text)
    self.assertIn('| operation | ms / batch |', text)

  def test_tiny_changes_only_the_flags_not_given(self):
    args = profile.parse_args(
      ['--tiny', '--dispatches=3', '--batch_size=64', '--data=criteo']
    )
    self.assertEqual(
      (args.dispatches, args.batch_size, args.data), (3, 64, 'criteo')
    )
    self.assertEqual(args.spec['batch_size'], 64)
    self.assertEqual(args.spec['field_dims'], throughput.CRITEO_FIELD_DIMS)
    args = profile.parse_args(['--tiny', '--program=eval'])
    self.assertEqual(
      (args.dispatches, args.batch_size, args.data), (2, 256, 'synthetic')
    )
    self.assertEqual(args.spec['field_dims'], throughput.TINY_FIELD_DIMS)

  def test_bad_flags_stop_before_anything_runs(self):
    with self.assertRaises(SystemExit):
      profile.main(['--model=nosuch'])
    with self.assertRaises(SystemExit):
      profile.main(['--dispatches=0'])
    # One model: `all` and lists are the other scripts' --models.
    for value in ('all', 'fm,ffm'):
      with self.assertRaises(SystemExit):
        profile.parse_args([f'--model={value}'])


class MasterModelsTest(_TempDirs, absltest.TestCase):
  """HOFM's reference is pytorch-fm's master, found by $PYTORCH_FM_SRC."""

  def _checkout(self):
    src = self.create_tempdir().full_path
    os.makedirs(os.path.join(src, 'torchfm', 'model'))
    with open(os.path.join(src, 'torchfm', 'layer.py'), 'w') as f:
      f.write('SOURCE = "master"\n')
    with open(os.path.join(src, 'torchfm', 'model', 'hofm.py'), 'w') as f:
      f.write(
        'from torchfm.layer import SOURCE\n'
        'class HighOrderFactorizationMachineModel:\n'
        '  def __init__(self, field_dims, order, embed_dim):\n'
        '    self.args = (field_dims, order, embed_dim, SOURCE)\n'
      )
    return src

  def test_hofm_has_a_reference_only_with_a_checkout(self):
    with mock.patch.dict(os.environ, {'PYTORCH_FM_SRC': ''}):
      self.assertFalse(common.has_torchfm('hofm'))
      with self.assertRaisesRegex(SystemExit, 'PYTORCH_FM_SRC'):
        common.torchfm_model('hofm', {'order': 3, 'embed_dim': 16}, (3, 4))
    with mock.patch.dict(os.environ, {'PYTORCH_FM_SRC': self._checkout()}):
      self.assertTrue(common.has_torchfm('hofm'))
      self.assertFalse(common.has_torchfm('fwfm'))
    self.assertTrue(common.has_torchfm('fm'))

  def test_a_path_that_is_no_checkout_stops(self):
    # Not a silent "torchfm n/a" for HOFM: a mistyped path is named.
    src = self.create_tempdir().full_path
    with mock.patch.dict(os.environ, {'PYTORCH_FM_SRC': src}):
      self.assertTrue(common.has_torchfm('fm'))  # torchfm 0.7.0's.
      message = f'PYTORCH_FM_SRC={re.escape(src)} .*torchfm/layer.py'
      with self.assertRaisesRegex(SystemExit, message):
        common.has_torchfm('hofm')
      with self.assertRaisesRegex(SystemExit, message):
        common.machine_info()
      out = self.create_tempdir().full_path
      with self.assertRaisesRegex(SystemExit, message):
        throughput.main(['--tiny', '--models=hofm', f'--out_dir={out}'])
      self.assertEqual(os.listdir(out), [])

  def test_the_machine_line_names_the_checkout(self):
    with mock.patch.dict(os.environ, {'PYTORCH_FM_SRC': ''}):
      self.assertNotIn('pytorch-fm master', common.machine_info()['versions'])
    src = self._checkout()
    with mock.patch.dict(os.environ, {'PYTORCH_FM_SRC': src}):
      line = common.machine_line(common.machine_info())
    self.assertIn(f'pytorch-fm master {src};', line)

  def test_the_checkout_s_model_and_layers_are_built(self):
    before = 'torchfm.layer' in sys.modules
    with mock.patch.dict(os.environ, {'PYTORCH_FM_SRC': self._checkout()}):
      model = common.torchfm_model(
        'hofm', {'order': 3, 'embed_dim': 16, 'seed': 1}, (3, 4)
      )
    self.assertEqual(model.args, ([3, 4], 3, 16, 'master'))
    # The checkout's layers were imported for the model only.
    self.assertEqual('torchfm.layer' in sys.modules, before)


class QualityTest(_TempDirs, absltest.TestCase):
  @mock.patch.dict(os.environ, {'PYTORCH_FM_SRC': ''})
  def test_a_model_torchfm_lacks_trains_alone(self):
    # Every run was asked of torchfm too: KeyError at the first such model.
    out = self.create_tempdir().full_path
    (r,) = quality.main(
      [
        '--tiny',
        '--models=hofm',
        f'--out_dir={out}',
        f'--workdir={self.create_tempdir().full_path}',
        f'--runs={",".join(quality.RUNS)}',
      ]
    )
    self.assertEqual(
      sorted(os.listdir(os.path.join(out, 'quality', 'hofm'))), ['flax']
    )
    self.assertGreater(r['flax_test_auc'], 0.5)
    self.assertFalse([k for k in r if k.startswith('torchfm')], r)

  def test_tiny(self):
    out = self.create_tempdir().full_path
    cache = self.create_tempdir().full_path
    runs = quality.RUNS if HAS_TORCH else ('flax',)
    records = quality.main(
      [
        '--tiny',
        f'--out_dir={out}',
        f'--cache_dir={cache}',
        f'--workdir={self.create_tempdir().full_path}',
        f'--runs={",".join(runs)}',
      ]
    )
    (r,) = records
    self.assertEqual(r['model'], 'fm')
    for run in runs:
      lines = quality.read_metrics(
        os.path.join(out, 'quality', 'fm', run, 'metrics.jsonl')
      )
      valid = [x for x in lines if x['split'] == 'valid']
      self.assertLen(valid, r[f'{run}_epochs'])
      self.assertEqual(r[f'{run}_best_valid_auc'], max(x['auc'] for x in valid))
      self.assertEqual(lines[-1]['split'], 'test')
      self.assertEqual(r[f'{run}_test_auc'], lines[-1]['auc'])
      times = [x['wall_time'] for x in lines if x['split'] != 'test']
      self.assertEqual(times, sorted(times))
      self.assertGreater(times[0], 0)
      self.assertEqual(lines[-1]['num_examples'], 10085)
    # Two smoke epochs of our FM on MovieLens are far above chance.
    self.assertBetween(r['flax_best_valid_auc'], 0.7, 1.0)
    self.assertEqual(r['flax_epochs'], 2)
    if HAS_TORCH:
      # Raw ids as torchfm's loader: max + 1 of the raw columns.
      frame = movielens.read_movielens(movielens.EMBEDDED, 'ml-latest-small')
      self.assertEqual(
        r['torchfm_raw_field_dims'],
        [int(frame['user'].max()) + 1, int(frame['item'].max()) + 1],
      )
      # Our dense ids: 610 users and 9,724 movies, plus each field's OOV id.
      self.assertEqual(r['torchfm_dense_field_dims'], [611, 9725])
      flax_lines = quality.read_metrics(
        os.path.join(out, 'quality', 'fm', 'flax', 'metrics.jsonl')
      )
      for run in runs[1:]:
        self.assertEqual(
          r[f'flax_time_to_{run}_best'],
          quality.time_to_reach(flax_lines, r[f'{run}_best_valid_auc']),
        )
        self.assertAlmostEqual(
          r[f'test_auc_minus_{run}'],
          r['flax_test_auc'] - r[f'{run}_test_auc'],
        )
    saved = _read_json(os.path.join(out, 'quality.json'))
    self.assertEqual(saved['results'], json.loads(json.dumps(records)))
    with open(os.path.join(out, 'quality.md')) as f:
      self.assertIn(f'| fm | {r["flax_best_valid_auc"]:.4f} |', f.read())

  def test_tiny_changes_only_the_flags_not_given(self):
    out = f'--out_dir={self.create_tempdir().full_path}'
    args = quality.parse_args(['--tiny', out])
    self.assertEqual((args.models, args.max_steps), ('fm', 10))
    # Values equal to the defaults, given explicitly, are kept too.
    args = quality.parse_args(['--tiny', '--models=all', '--max_steps=0', out])
    self.assertEqual((args.models, args.max_steps), ('all', 0))
    args = quality.parse_args(['--tiny', '--models=lr', '--max_steps=3', out])
    self.assertEqual((args.models, args.max_steps), ('lr', 3))
    args = quality.parse_args([out])
    self.assertEqual((args.models, args.max_steps), ('all', 0))

  def test_runs_that_leave_nothing_to_run_stop_before_any_result(self):
    out = self.create_tempdir().full_path
    flags = ['--tiny', f'--out_dir={out}']
    with self.assertRaisesRegex(SystemExit, 'nothing to run for fm'):
      quality.main([*flags, '--runs=torchfm_raw', '--no_torch'])
    with (  # Whether or not torch is installed (it is not needed).
      mock.patch.object(quality.common, 'torch_available', lambda: True),
      self.assertRaisesRegex(SystemExit, 'torchfm has no such model'),
    ):
      quality.main([*flags, '--models=fwfm', '--runs=torchfm_dense'])
    for bad in ('--runs=,', '--num_epochs=-1', '--max_steps=-1'):
      with self.assertRaises(SystemExit):
        quality.parse_args([*flags, bad])
    # No results file whose table has no runs.
    self.assertEmpty(os.listdir(out))

  def test_time_to_reach_and_summarize(self):
    lines = [
      {'split': 'train', 'epoch': 1, 'loss': 0.7, 'examples_per_sec': 10.0},
      {'split': 'valid', 'epoch': 1, 'auc': 0.70, 'wall_time': 1.0},
      {'split': 'train', 'epoch': 2, 'loss': 0.6, 'examples_per_sec': 30.0},
      {'split': 'valid', 'epoch': 2, 'auc': 0.75, 'wall_time': 2.0},
      {'split': 'train', 'epoch': 3, 'loss': 0.5, 'examples_per_sec': 20.0},
      {'split': 'valid', 'epoch': 3, 'auc': 0.74, 'wall_time': 3.0},
      {'split': 'test', 'epoch': 2, 'auc': 0.76, 'wall_time': 3.5},
    ]
    self.assertEqual(quality.time_to_reach(lines, 0.72), 2.0)
    self.assertEqual(quality.time_to_reach(lines, 0.70), 1.0)
    self.assertIsNone(quality.time_to_reach(lines, 0.80))
    self.assertEqual(
      quality.summarize(lines),
      {
        'best_valid_auc': 0.75,
        'best_epoch': 2,
        'best_wall_time': 2.0,
        'epochs': 3,
        'test_auc': 0.76,
        'wall_time': 3.5,
        'train_ex_per_s': 20.0,
      },
    )

  def test_a_diverged_epoch_s_null_auc_is_skipped(self):
    lines = [
      {'split': 'train', 'epoch': 1, 'loss': 0.7, 'examples_per_sec': 10.0},
      {'split': 'valid', 'epoch': 1, 'auc': 0.70, 'wall_time': 1.0},
      {'split': 'train', 'epoch': 2, 'loss': None, 'examples_per_sec': 30.0},
      {'split': 'valid', 'epoch': 2, 'auc': None, 'wall_time': 2.0},
    ]
    self.assertIsNone(quality.time_to_reach(lines, 0.72))
    self.assertEqual(quality.summarize(lines)['best_valid_auc'], 0.70)

  def test_torchfm_reads_a_random_split_of_a_file_in_random_order(self):
    # pytorch-fm's random_split reads its training rows in a random order;
    # our streamed split keeps file order, so torchfm gets them permuted.
    from benchmarks import synthetic  # pylint: disable=g-import-not-at-top
    import data  # pylint: disable=g-import-not-at-top

    tmp = self.create_tempdir().full_path
    path = synthetic.write('criteo', 400, os.path.join(tmp, 'train.txt'))
    config = common.get_config('fm')
    config.dataset.name, config.dataset.path = 'criteo', path
    config.dataset.cache_dir = os.path.join(tmp, 'cache')
    dataset = data.load_dataset(config.dataset)
    ids, labels = np.asarray(dataset.train.ids), dataset.train.labels
    order = np.random.default_rng(config.dataset.seed).permutation(len(ids))
    splits, _ = quality.torchfm_data(config, dataset, raw=False)
    np.testing.assert_array_equal(splits['train'][0], ids[order])
    np.testing.assert_array_equal(splits['train'][1], labels[order])
    self.assertFalse(np.array_equal(splits['train'][0], ids))
    np.testing.assert_array_equal(splits['valid'][0], dataset.valid.ids)
    # time_to_auc's torchfm process reads the same order from its files.
    args = types.SimpleNamespace(
      criteo=path, cache_dir=config.dataset.cache_dir
    )
    out = os.path.join(tmp, 'split')
    time_to_auc.write_split('criteo', args, out)
    np.testing.assert_array_equal(
      np.load(os.path.join(out, 'train_ids.npy')), ids[order]
    )
    np.testing.assert_array_equal(
      np.load(os.path.join(out, 'test_labels.npy')), dataset.test.labels
    )
    # Files split by the user, and MovieLens (split in memory, stored in the
    # random split's order), keep their order.
    config.dataset.valid_path = config.dataset.test_path = path
    self.assertIsNone(quality.random_split_rows(config, len(ids)))
    self.assertIsNone(quality.random_split_rows(common.get_config('fm'), 9))

  def test_logloss_matches_the_formula(self):
    labels = np.array([1.0, 0.0, 1.0, 0.0])
    probs = np.array([0.9, 0.2, 0.0, 1.0])  # The last two clamp at -100.
    expected = -(np.log(0.9) + np.log(0.8) - 100 - 100) / 4
    self.assertAlmostEqual(quality._logloss(labels, probs), expected)


class TimeToAucTest(_TempDirs, absltest.TestCase):
  def test_times_count_from_the_launch(self):
    run = {
      'start': 100.0,
      'end': 109.0,
      'lines': [
        {'split': 'train', 'epoch': 1, 'time': 103.0},
        {'split': 'valid', 'epoch': 1, 'auc': 0.70, 'time': 103.5},
        {'split': 'valid', 'epoch': 2, 'auc': 0.76, 'time': 105.25},
        {'split': 'valid', 'epoch': 3, 'auc': 0.75, 'time': 107.0},
        {'split': 'test', 'epoch': 2, 'auc': 0.74, 'time': 108.0},
      ],
    }
    self.assertEqual(time_to_auc.time_to(run, 0.70), 3.5)
    self.assertEqual(time_to_auc.time_to(run, 0.755), 5.25)
    self.assertIsNone(time_to_auc.time_to(run, 0.77))
    self.assertEqual(
      time_to_auc.summary(run, 0.72),
      {
        'best_valid_auc': 0.76,
        'test_auc': 0.74,
        'epochs': 3,
        'seconds_to_target': 5.25,
        'seconds_total': 9.0,
      },
    )

  def test_launch_reads_the_lines_the_process_wrote(self):
    workdir = self.create_tempdir().full_path
    script = (
      'import json, sys, time\n'
      'with open(sys.argv[1] + "/metrics.jsonl", "w") as f:\n'
      '  f.write(json.dumps({"split": "valid", "time": time.time()}))\n'
    )
    run = time_to_auc.launch(['-c', script, workdir], workdir)
    (line,) = run['lines']
    self.assertLessEqual(run['start'], line['time'])
    self.assertLessEqual(line['time'], run['end'])
    with self.assertRaisesRegex(
      RuntimeError, r'failed:(?s:.*)ZeroDivisionError'
    ):
      time_to_auc.launch(['-c', '1 / 0'], workdir)

  def test_a_user_error_of_main_py_is_its_one_line(self):
    import utils  # pylint: disable=g-import-not-at-top

    tmp = self.create_tempdir().full_path
    path = synthetic.write('criteo', 50, os.path.join(tmp, 'train.txt'))
    args = time_to_auc.parse_args(
      ['--data=criteo', f'--criteo={path}', f'--cache_dir={tmp}/cache']
    )
    workdir = os.path.join(tmp, 'flax')
    flags = time_to_auc.data_flags('criteo', args)
    # Fewer training examples than one batch: main.py stops, status 2.
    with self.assertRaisesRegex(
      utils.UserError, r'^config\.batch_size=2048 exceeds the \d+ training'
    ) as raised:
      time_to_auc.launch(
        time_to_auc.main_argv('fm', 'config', workdir, flags), workdir
      )
    self.assertNotIn('\n', str(raised.exception))
    # Another program's status 2 is a failure, with its last lines.
    script = 'import sys; sys.exit("main.py: error: not main.py")'
    with self.assertRaisesRegex(RuntimeError, 'failed:'):
      time_to_auc.launch(['-c', script], workdir)

  def test_a_user_error_names_the_flags_of_the_tool(self):
    import utils  # pylint: disable=g-import-not-at-top

    tmp = self.create_tempdir().full_path
    lines = common.least_lines(common.get_config('fm'))  # Enough for a run.
    path = synthetic.write('criteo', lines, os.path.join(tmp, 'c.txt'))

    def write_split(name, args, out):
      del name, out
      raise utils.UserError(
        f'config.dataset.path: {args.criteo} is not readable. Free some'
        ' space or set config.dataset.cache_dir to a writable directory.'
      )

    with (
      mock.patch.object(time_to_auc, 'write_split', write_split),
      mock.patch.object(common, 'torch_available', lambda: True),
      self.assertRaises(SystemExit) as raised,
    ):
      time_to_auc.main(
        ['--data=criteo', f'--criteo={path}', f'--out_dir={tmp}/out']
      )
    self.assertEqual(
      str(raised.exception),
      f'error: --criteo: {path} is not readable. Free some space or set'
      ' --cache_dir to a writable directory.',
    )
    # The embedded data set is read from no flag's file.
    self.assertEqual(
      time_to_auc.data_keys('embedded'),
      {'config.dataset.cache_dir': '--cache_dir'},
    )

  def test_a_file_too_small_for_a_batch_stops_before_any_run(self):
    from datasets import split  # pylint: disable=g-import-not-at-top

    tmp = self.create_tempdir().full_path
    config = common.get_config('fm')
    least = common.least_lines(config)
    # The least whose training split holds one batch, as the data counts it.
    self.assertLess(
      split.split_sizes(least - 1, config.dataset.split)[0], config.batch_size
    )
    self.assertGreaterEqual(
      split.split_sizes(least, config.dataset.split)[0], config.batch_size
    )
    path = synthetic.write('criteo', least - 1, os.path.join(tmp, 'c.txt'))
    with open(path, 'a') as f:
      f.write('\n\n')  # Blank lines hold no example.
    flags = ['--data=criteo', f'--criteo={path}', f'--workdir={tmp}/w']
    with (
      mock.patch.object(common, 'torch_available', lambda: True),
      mock.patch.object(
        time_to_auc, 'write_split', side_effect=AssertionError('read')
      ) as write_split,
      mock.patch.object(
        time_to_auc, 'launch', side_effect=AssertionError('ran')
      ) as launch,
      self.assertRaises(SystemExit) as raised,
    ):
      time_to_auc.main([*flags, f'--out_dir={tmp}/out'])
    self.assertEqual(
      str(raised.exception),
      f'--criteo={path}: {least - 1} rows; give at least {least}, so that'
      ' the training split (80% of the rows) holds one batch of'
      ' configs/fm.py (2048 rows).',
    )
    write_split.assert_not_called()
    launch.assert_not_called()
    self.assertFalse(os.path.exists(f'{tmp}/w'))
    # One row more is enough; a ratings file's header is not a row.
    with open(path) as f:
      first = f.readline()
    with open(path, 'a') as f:
      f.write(first)
    time_to_auc.check_rows('criteo', path, ['fm'])
    ratings = synthetic.write('movielens', least, os.path.join(tmp, 'r.csv'))
    time_to_auc.check_rows('ml20m', ratings, ['fm'])
    with open(ratings) as f:
      lines = f.readlines()
    with open(ratings, 'w') as f:
      f.writelines(lines[:-1])
    with self.assertRaisesRegex(SystemExit, f': {least - 1} rows; give at'):
      time_to_auc.check_rows('ml20m', ratings, ['fm'])

  def test_a_user_error_of_the_torchfm_process_is_one_line(self):
    import utils  # pylint: disable=g-import-not-at-top

    tmp = self.create_tempdir().full_path
    stderr = os.path.join(tmp, 'stderr')
    lines = common.least_lines(common.get_config('fm')) + 40
    path = synthetic.write('criteo', lines, os.path.join(tmp, 'c.txt'))
    with open(path) as f:  # Every label 0: no AUC to reach.
      rows = ['0' + line[1:] for line in f]
    with open(path, 'w') as f:
      f.writelines(rows)
    flags = ['--data=criteo', f'--criteo={path}', f'--workdir={tmp}/w']
    flags += [f'--cache_dir={tmp}/cache', f'--out_dir={tmp}/out']
    with (
      mock.patch.object(common, 'torch_available', lambda: True),
      _stderr_of_children(stderr),
      self.assertRaises(SystemExit) as raised,
    ):
      time_to_auc.main(flags)
    self.assertEqual(
      str(raised.exception),
      f'error: --criteo={path}: its validation split (10% of the rows) has'
      f' 0 positive and {lines // 10} negative examples, and its AUC is'
      ' undefined without both classes; give a file with more rows of each'
      ' label.',
    )
    with open(stderr) as f:
      self.assertNotIn('Traceback', f.read())
    # Checked before torchfm trains: no metrics written.
    self.assertFalse(os.path.exists(f'{tmp}/w/criteo/fm/torchfm/metrics.jsonl'))
    # Its training split, too, must hold a batch.
    spec = {
      'source': '--criteo=c.txt',
      'model': 'fm',
      'config': {'batch_size': 4, 'dataset': {'split': [0.8, 0.1, 0.1]}},
    }
    both = (None, np.array([0.0, 1.0]))
    splits = {'train': (None, np.zeros(3)), 'valid': both, 'test': both}
    with self.assertRaisesRegex(
      utils.UserError,
      r'^--criteo=c\.txt: its training split \(80% of the rows\) holds 3'
      r' rows, fewer than one batch of configs/fm\.py \(4\); give a larger',
    ):
      time_to_auc.check_splits(splits, spec)
    splits['train'] = (None, np.zeros(4))
    time_to_auc.check_splits(splits, spec)
    # Any other failure of the process keeps its last lines.
    script = common.child_script('raise ValueError("a bug")')
    with self.assertRaisesRegex(RuntimeError, '(?s)^the child failed:.*a bug'):
      time_to_auc.launch(['-c', script], tmp, what='the child')

  def test_a_config_key_no_flag_sets_is_said_to_be_fixed(self):
    message = (
      'config.batch_size=2048 exceeds the 40 training examples of criteo:'
      ' lower it, or give training a larger part with config.dataset.split.'
    )
    self.assertEqual(
      time_to_auc.in_tool_terms(message, 'criteo'),
      f'{message} (No flag of this tool sets config.batch_size,'
      ' config.dataset.split: it runs each configs/<model>.py as it is; its'
      ' flags change the data: --data, --criteo, --ml20m, --cache_dir.)',
    )
    # Keys its flags set are named as the flags, with nothing added.
    self.assertEqual(
      time_to_auc.in_tool_terms(
        '--config.dataset.path=/c: no. Set config.dataset.cache_dir.', 'criteo'
      ),
      '--criteo=/c: no. Set --cache_dir.',
    )

  def test_data_flags_and_arguments(self):
    args = time_to_auc.parse_args(['--data=criteo', '--criteo=/d/c.txt'])
    self.assertEqual(
      time_to_auc.data_flags('criteo', args),
      [
        '--config.progress_bar=False',
        '--config.dataset.name=criteo',
        '--config.dataset.path=/d/c.txt',
      ],
    )
    self.assertEqual(args.optimizers, ['config'])  # What main.py runs.
    # The config's own optimizer: no flag (LR's and FiBiNET's are 'adam').
    self.assertEqual(
      time_to_auc.main_argv('lr', 'config', '/w', ['--x']),
      ['main.py', '--config=configs/lr.py', '--workdir=/w', '--x'],
    )
    self.assertIn(
      '--config.optimizer=auto',
      time_to_auc.main_argv('lr', 'auto', '/w', []),
    )
    args = time_to_auc.parse_args(['--data=ml20m', '--ml20m=/d/r.csv'])
    self.assertEqual(
      time_to_auc.data_flags('ml20m', args)[1:],
      ['--config.dataset.name=ml-20m', '--config.dataset.path=/d/r.csv'],
    )
    for name in ('criteo', 'ml20m'):
      with self.assertRaises(SystemExit):
        time_to_auc.parse_args([f'--data={name}'])
    with self.assertRaises(SystemExit):
      time_to_auc.parse_args(['--data=avazu'])

  def test_flags_that_would_fail_late_or_be_ignored_stop_first(self):
    for flags, message in (
      # main.py's subprocess would fail after torchfm's whole run.
      (['--optimizers=config,adamm'], "--optimizers: 'adamm' is not one of"),
      # The file would be read by no run.
      (['--criteo=/d/c.txt'], '--criteo is read with --data=criteo only'),
    ):
      with self.subTest(flags=flags):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
          with self.assertRaises(SystemExit):
            time_to_auc.parse_args(flags)
        self.assertIn(message, stderr.getvalue())
    with self.assertRaisesRegex(SystemExit, '--criteo=/d/c.txt: no such file'):
      time_to_auc.main(['--data=criteo', '--criteo=/d/c.txt'])


class SeedsTest(_TempDirs, absltest.TestCase):
  def test_parse_seeds(self):
    self.assertEqual(seeds.parse_seeds('0-2'), [0, 1, 2])
    self.assertEqual(seeds.parse_seeds('5,0-1, 1'), [0, 1, 5])
    for bad in ('', 'a', '1-x'):
      with self.assertRaises(SystemExit):
        seeds.parse_seeds(bad)

  def test_summary_is_the_sample_statistics(self):
    flax, torch = [0.79, 0.80, 0.78], [0.785, 0.795]
    r = seeds.summarize('fm', {'flax': flax, 'torchfm': torch})
    self.assertAlmostEqual(r['flax_mean'], 0.79)
    self.assertAlmostEqual(r['flax_std'], 0.01)  # sqrt(2e-4 / 2)
    self.assertAlmostEqual(r['torchfm_std'], math.sqrt(0.005**2 * 2))
    self.assertAlmostEqual(r['difference'], 0.79 - 0.79)
    self.assertAlmostEqual(
      r['difference_se'], math.sqrt(0.01**2 / 3 + 0.005**2 * 2 / 2)
    )

  def test_finished_runs_are_read_not_trained(self):
    out = self.create_tempdir().full_path
    work = self.create_tempdir().full_path
    for seed, auc in ((0, 0.61), (1, 0.63)):
      run = os.path.join(work, 'fm', f's{seed}', 'flax')
      os.makedirs(run)
      with open(os.path.join(run, 'metrics.jsonl'), 'w') as f:
        f.write(json.dumps({'split': 'valid', 'epoch': 1, 'auc': 0.5}) + '\n')
        f.write(json.dumps({'split': 'test', 'epoch': 1, 'auc': auc}) + '\n')
    # Nothing to train: no dataset is read, so this takes no time.
    records = seeds.main(
      [
        '--models=fm',
        '--seeds=0-1',
        '--no_torch',
        f'--workdir={work}',
        f'--out_dir={out}',
      ]
    )
    self.assertEqual(records[0]['flax_test_auc'], [0.61, 0.63])
    self.assertAlmostEqual(records[0]['flax_mean'], 0.62)
    saved = _read_json(os.path.join(out, 'seeds.json'))
    self.assertEqual(saved['results'], records)
    # The best validation AUC of each seed, and its mean beside the test's.
    self.assertEqual(records[0]['flax_valid_auc'], [0.5, 0.5])
    with open(os.path.join(out, 'seeds.md')) as f:
      text = f.read()
    self.assertIn('0.6200 ± 0.0141', text)
    self.assertIn('| 0.5000 / - |', text)

  def test_a_tiny_run_is_not_read_as_a_finished_run(self):
    out = self.create_tempdir().full_path
    work = self.create_tempdir().full_path
    args = ['--models=fm', '--seeds=0', '--no_torch', f'--workdir={work}']
    args.append(f'--out_dir={out}')
    run = os.path.join(work, 'fm', 's0', 'flax')
    os.makedirs(run)
    with open(os.path.join(run, 'metrics.jsonl'), 'w') as f:
      f.write(json.dumps({'split': 'valid', 'epoch': 1, 'auc': 0.6}) + '\n')
      f.write(json.dumps({'split': 'test', 'epoch': 1, 'auc': 0.61}) + '\n')
    trained = []

    def train_and_evaluate(config, workdir):
      trained.append((config.num_epochs, workdir))
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
        for split in ('valid', 'test'):
          f.write(json.dumps({'split': split, 'epoch': 1, 'auc': 0.55}))
          f.write('\n')

    with mock.patch('train.train_and_evaluate', train_and_evaluate):
      (tiny,) = seeds.main(args + ['--tiny'])
    # The smoke config trained in a directory of its own...
    self.assertEqual(trained, [(2, run + '-tiny')])
    self.assertEqual(tiny['flax_test_auc'], [0.55])
    # ... and the finished run of the whole config is still the one read.
    self.assertEqual(seeds.main(args)[0]['flax_test_auc'], [0.61])

  def test_overrides_have_runs_of_their_own(self):
    out = self.create_tempdir().full_path
    work = self.create_tempdir().full_path
    overrides = {'model.embed_dim': 8, 'learning_rate': 0.002}
    for split, run, auc in (
      ('s0', 'flax', 0.61),
      ('s0', seeds.run_dir('flax', overrides), 0.7),
      ('split3_s0', 'flax', 0.8),
    ):
      path = os.path.join(work, 'fm', split, run)
      os.makedirs(path)
      with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
        for split, value in (('valid', 0.6), ('valid', 0.65), ('test', auc)):
          f.write(json.dumps({'split': split, 'epoch': 1, 'auc': value}))
          f.write('\n')
    self.assertEqual(
      seeds.run_dir('flax', overrides),
      'flax-learning_rate=0.002-model.embed_dim=8',
    )
    self.assertEqual(seeds.run_dir('torchfm', overrides), 'torchfm')
    # The same data on both sides: torchfm takes the dataset keys.
    side = {'dataset.side_features': ('genres',), 'learning_rate': 0.002}
    self.assertEqual(
      seeds.run_dir('torchfm', side), 'torchfm-dataset.side_features=genres,'
    )
    self.assertEqual(
      seeds.run_overrides('torchfm', side),
      {'dataset.side_features': ('genres',)},
    )
    with self.assertRaisesRegex(SystemExit, '--split_seed'):
      seeds.main(['--models=fm', '--seeds=0', '--set=dataset.seed=1'])
    args = ['--models=fm', '--seeds=0', '--no_torch', f'--workdir={work}']
    args.append(f'--out_dir={out}')
    plain = seeds.main(args)
    changed = seeds.main(
      args + ['--set=model.embed_dim=8', '--set=learning_rate=0.002']
    )
    self.assertEqual(plain[0]['flax_test_auc'], [0.61])
    self.assertEqual(changed[0]['flax_test_auc'], [0.7])
    self.assertEqual(changed[0]['flax_valid_auc'], [0.65])
    # Another split (--split_seed) has runs of its own too.
    other = seeds.main(args + ['--split_seed=3'])
    self.assertEqual(other[0]['flax_test_auc'], [0.8])
    with self.assertRaises(SystemExit):
      seeds.main(args + ['--set=embed_dim'])

  def test_equal_values_typed_otherwise_share_a_run(self):
    out = self.create_tempdir().full_path
    work = self.create_tempdir().full_path
    trained = []

    def train_and_evaluate(config, workdir):
      trained.append(
        (os.path.relpath(workdir, work), config.dataset.side_features)
      )
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
        for split in ('valid', 'test'):
          f.write(json.dumps({'split': split, 'epoch': 1, 'auc': 0.6}) + '\n')

    args = ['--models=fm', '--seeds=0', '--no_torch', f'--workdir={work}']
    args.append(f'--out_dir={out}')
    with mock.patch('train.train_and_evaluate', train_and_evaluate):
      for typed in (
        ['dataset.side_features=genres', 'learning_rate=1'],
        ["dataset.side_features=('genres',)", 'learning_rate=1.0'],
        ['dataset.side_features=["genres"]', 'learning_rate=1e0'],
      ):
        seeds.main(args + [f'--set={s}' for s in typed])
    # One run, named as the config holds the values, read by the others.
    self.assertEqual(
      trained,
      [
        (
          'fm/s0/flax-dataset.side_features=genres,-learning_rate=1.0',
          ('genres',),
        )
      ],
    )

  def test_different_values_never_share_a_run(self):
    # Names that drop no character of a value are kept (those of the --set
    # flags of benchmarks/README.md among them).
    for overrides, expected in (
      ({'dataset.path': 'ab.csv'}, 'dataset.path=ab.csv'),
      ({'dataset.name': 'ml-20m'}, 'dataset.name=ml-20m'),
      ({'model.linear_init': 'lecun'}, 'model.linear_init=lecun'),
      (
        {'shuffle': False, 'weight_decay': 5e-5, 'learning_rate': 0.002},
        'learning_rate=0.002-shuffle=False-weight_decay=5e-05',
      ),
      ({'dataset.side_features': ('genres',)}, 'dataset.side_features=genres,'),
      ({'model.mlp_dims': (8, 8)}, 'model.mlp_dims=8,8'),
    ):
      with self.subTest(overrides=overrides):
        self.assertEqual(seeds.run_dir('flax', overrides), f'flax-{expected}')
    # Values whose names would be one, each with a run of its own.
    for values in (
      ['ab.csv', '/a/b.csv', 'a/b.csv', 'ab.csv-deadbeef'],
      ['1', 1, 1.0, True, (1,), '1,'],
      [('a', 'b'), 'a,b', ('a,b',), ('a', 'b,')],
      ['x-model.b=y'],
    ):
      with self.subTest(values=values):
        names = [seeds.run_dir('flax', {'model.a': v}) for v in values]
        self.assertLen(set(names), len(values))
    self.assertNotEqual(
      seeds.run_dir('flax', {'model.a': 'x-model.b=y'}),
      seeds.run_dir('flax', {'model.a': 'x', 'model.b': 'y'}),
    )
    # The readable name stays, with a hash of the value.
    self.assertRegex(
      seeds.run_dir('torchfm', {'dataset.path': '/a/b.csv'}),
      r'^torchfm-dataset\.path=ab\.csv-[0-9a-f]{8}$',
    )

  def test_a_path_does_not_read_the_run_of_another(self):
    out = self.create_tempdir().full_path
    work = self.create_tempdir().full_path
    done = os.path.join(
      work, 'fm', 's0', seeds.run_dir('flax', {'dataset.path': 'ab.csv'})
    )
    os.makedirs(done)
    with open(os.path.join(done, 'metrics.jsonl'), 'w') as f:
      for split in ('valid', 'test'):
        f.write(json.dumps({'split': split, 'epoch': 1, 'auc': 0.9}) + '\n')
    trained = []

    def train_and_evaluate(config, workdir):
      trained.append(config.dataset.path)
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
        for split in ('valid', 'test'):
          f.write(json.dumps({'split': split, 'epoch': 1, 'auc': 0.6}) + '\n')

    args = ['--models=fm', '--seeds=0', '--no_torch', f'--workdir={work}']
    args.append(f'--out_dir={out}')
    with mock.patch('train.train_and_evaluate', train_and_evaluate):
      (record,) = seeds.main(args + ['--set=dataset.path=/a/b.csv'])
      self.assertEqual(record['flax_test_auc'], [0.6])
      (record,) = seeds.main(args + ['--set=dataset.path=ab.csv'])
      self.assertEqual(record['flax_test_auc'], [0.9])
    self.assertEqual(trained, ['/a/b.csv'])

  def test_both_libraries_train_on_the_split_of_split_seed(self):
    # The flax and torchfm runs read config.dataset.seed; --set reaches
    # flax-fm's config only.
    seen = []

    def finish(run, config, workdir):
      seen.append((run, config.dataset.seed, config.model.embed_dim))
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
        for split in ('valid', 'test'):
          f.write(json.dumps({'split': split, 'epoch': 1, 'auc': 0.6}) + '\n')

    import data  # pylint: disable=g-import-not-at-top
    import train  # pylint: disable=g-import-not-at-top

    work = self.create_tempdir().full_path
    with (
      mock.patch.object(
        train,
        'train_and_evaluate',
        lambda config, workdir: finish('flax', config, workdir),
      ),
      mock.patch.object(data, 'load_dataset', lambda config: None),
      mock.patch.object(
        quality, 'torchfm_data', lambda config, dataset, raw: (None, None)
      ),
      mock.patch.object(
        quality,
        'train_torchfm',
        lambda name, config, splits, dims, workdir, steps: finish(
          'torchfm', config, workdir
        ),
      ),
      mock.patch.object(common, 'torch_available', lambda: True),
    ):
      seeds.main(
        [
          '--models=fm',
          '--seeds=0',
          '--split_seed=4',
          '--set=model.embed_dim=3',
          f'--workdir={work}',
          f'--out_dir={self.create_tempdir().full_path}',
        ]
      )
    self.assertEqual(sorted(seen), [('flax', 4, 3), ('torchfm', 4, 16)])

  def test_torch_drop_last_caps_torchfm_at_whole_batches(self):
    seen = []

    def finish(steps, config, workdir):
      seen.append((os.path.basename(workdir), steps, config.batch_size))
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
        for split in ('valid', 'test'):
          f.write(json.dumps({'split': split, 'epoch': 1, 'auc': 0.6}) + '\n')

    import data  # pylint: disable=g-import-not-at-top
    import train  # pylint: disable=g-import-not-at-top

    rows = 5 * 2048 + 7
    train_split = (np.zeros((rows, 2), np.int32), np.zeros(rows, np.float32))
    work = self.create_tempdir().full_path
    args = ['--models=fm', '--seeds=0', f'--workdir={work}']
    args.append(f'--out_dir={self.create_tempdir().full_path}')
    with (
      mock.patch.object(data, 'load_dataset', lambda config: None),
      mock.patch.object(
        quality,
        'torchfm_data',
        lambda config, dataset, raw: ({'train': train_split}, None),
      ),
      mock.patch.object(
        quality,
        'train_torchfm',
        lambda name, config, splits, dims, workdir, steps: finish(
          steps, config, workdir
        ),
      ),
      mock.patch.object(common, 'torch_available', lambda: True),
      mock.patch.object(
        train,
        'train_and_evaluate',
        lambda config, workdir: finish(None, config, workdir),
      ),
    ):
      seeds.main(args)
      seeds.main(args + ['--torch_drop_last'])
    # DataLoader's default keeps the last 7 rows (steps 0: no cap); with
    # the flag, 5 whole batches, in a run directory of its own.
    self.assertEqual(
      seen,
      [
        ('flax', None, 2048),
        ('torchfm', 0, 2048),
        ('torchfm-drop_last', 5, 2048),  # The flax run is reused.
      ],
    )

  def test_one_seed_has_no_spread(self):
    r = seeds.summarize('afn', {'flax': [0.78, 0.79], 'torchfm': [0.76]})
    self.assertIsNone(r['torchfm_std'])
    self.assertIsNone(r['difference_se'])
    self.assertAlmostEqual(r['difference'], 0.785 - 0.76)
    text = seeds.markdown([r], common.machine_info(), '')
    self.assertIn('0.7600 ± - | +0.0250 (± -)', text)


class PreprocessTest(_TempDirs, absltest.TestCase):
  def _row(self, fmt, lines, directory, keep, chunk_rows, parse_workers):
    """`preprocess.benchmark`'s row, without the work."""
    del directory, keep
    self.ran.append((lines, parse_workers))
    return dict(
      format=fmt,
      lines=lines,
      file_mib=0.1,
      seconds=0.1,
      lines_per_sec=10 * lines,
      mib_per_sec=1.0,
      peak_rss_mib=100,
      workers_peak_rss_mib=0,
      cache_mib=0.1,
      field_dims_sum=9,
      chunk_rows=chunk_rows,
      parse_workers=parse_workers,
      machine='x86_64, 2 CPUs',
      load_average=0.5,
      python='3.12',
    )

  def setUp(self):
    super().setUp()
    self.ran = []
    self.tmp = self.create_tempdir().full_path
    self.enter_context(mock.patch.object(preprocess, 'benchmark', self._row))

  def test_results_go_to_out_dir(self):
    blocked = os.path.join(self.tmp, 'a_file')
    open(blocked, 'w').close()
    with self.assertRaisesRegex(SystemExit, f'--out_dir={blocked}: is a file'):
      preprocess.main([f'--dir={self.tmp}/files', f'--out_dir={blocked}'])
    self.assertEqual((self.ran, os.listdir(self.tmp)), ([], ['a_file']))
    out = os.path.join(self.tmp, 'new', 'out')
    flags = ['--format=avazu', f'--dir={self.tmp}/files', f'--out_dir={out}']
    preprocess.main([*flags, '--lines=5,7', '--parse_workers=0,2'])
    self.assertEqual(self.ran, [(5, 0), (5, 2), (7, 0), (7, 2)])
    self.assertEqual(
      sorted(os.listdir(out)), ['preprocess_avazu.json', 'preprocess_avazu.md']
    )
    # Rows of other sizes in --out_dir are kept.
    preprocess.main([*flags, '--lines=9', '--parse_workers=0'])
    saved = _read_json(os.path.join(out, 'preprocess_avazu.json'))
    self.assertEqual(
      [(r['lines'], r['parse_workers']) for r in saved][-1], (9, 0)
    )
    self.assertLen(saved, 5)
    with open(os.path.join(out, 'preprocess_avazu.md')) as f:
      self.assertIn('--lines=5,7,9 --parse_workers=0,2`', f.read())
    self.assertEqual(
      preprocess.main([*flags, '--lines=3', '--no_write'])[0]['lines'], 3
    )
    self.assertLen(os.listdir(out), 2)

  def test_bad_flags_stop_in_a_line_before_anything_runs(self):
    files = os.path.join(self.tmp, 'files')
    blocked = os.path.join(self.tmp, 'a_file')
    open(blocked, 'w').close()
    for flag, message in (
      ('--lines=1e6', '--lines=1e6: give integers of at least 1,'),
      ('--lines=', '--lines=: give integers'),
      ('--lines=100,0', '--lines=100,0: give integers of at least 1,'),
      ('--parse_workers=two', '--parse_workers=two: give integers of at'),
      (
        '--parse_workers=0,-2',
        r'--parse_workers=0,-2: give integers of at least -1, separated by'
        r' commas\.$',
      ),
      ('--chunk_rows=0', r'--chunk_rows=0: give at least 1\.'),
      ('--rounds=0', r'--rounds=0: give at least 1\.'),
      (f'--dir={blocked}', f'--dir={blocked}: is a file'),
    ):
      with self.subTest(flag=flag):
        with self.assertRaisesRegex(SystemExit, f'^{message}'):
          preprocess.main([f'--dir={files}', flag, f'--out_dir={files}/out'])
    self.assertEqual((self.ran, os.listdir(self.tmp)), ([], ['a_file']))
    preprocess.main(
      ['--lines=5', '--parse_workers=-1,0,3', f'--dir={files}', '--no_write']
    )
    self.assertEqual(self.ran, [(5, -1), (5, 0), (5, 3)])


class PredictTest(_TempDirs, absltest.TestCase):
  def test_bad_flags_stop_in_a_line_before_anything_runs(self):
    tmp = self.create_tempdir().full_path
    files = os.path.join(tmp, 'files')
    blocked = os.path.join(tmp, 'a_file')
    open(blocked, 'w').close()
    for flag, message in (
      ('--lines=1k', '--lines=1k: give integers of at least 1,'),
      ('--lines=0', '--lines=0: give integers of at least 1,'),
      ('--train_lines=0', r'--train_lines=0: give at least 1\.'),
      ('--chunk_rows=-5', r'--chunk_rows=-5: give at least 1\.'),
      (f'--workdir={tmp}', f'--workdir={tmp}: not a finished run'),
      (f'--dir={blocked}', f'--dir={blocked}: is a file'),
    ):
      with self.subTest(flag=flag):
        with mock.patch.object(predict_benchmark, 'run_child') as run_child:
          with self.assertRaisesRegex(SystemExit, f'^{message}'):
            predict_benchmark.main(
              [f'--dir={files}', flag, f'--out_dir={files}/out']
            )
        run_child.assert_not_called()
    self.assertEqual(os.listdir(tmp), ['a_file'])

  def test_too_few_train_lines_for_a_batch_name_the_least(self):
    from datasets import split  # pylint: disable=g-import-not-at-top

    tmp = self.create_tempdir().full_path
    config = common.get_config('fm')
    least = predict_benchmark.least_train_lines()
    # The least whose training split holds one batch, as the data counts it.
    sizes = [
      split.split_sizes(n, config.dataset.split)[0] for n in (least - 1, least)
    ]
    self.assertLess(sizes[0], config.batch_size)
    self.assertGreaterEqual(sizes[1], config.batch_size)
    made = []

    class Trains(Exception):
      pass

    def synthetic(path, lines, seed):
      del seed
      made.append(lines)
      return path

    argv = ['--lines=5', f'--dir={tmp}/files', f'--out_dir={tmp}/out']
    with (
      mock.patch.object(predict_benchmark, '_synthetic', synthetic),
      mock.patch.object(
        predict_benchmark, 'run_child', side_effect=Trains
      ) as run_child,
    ):
      with self.assertRaisesRegex(
        SystemExit, rf'^--train_lines={least - 1}: give at least {least}\.$'
      ):
        predict_benchmark.main([*argv, f'--train_lines={least - 1}'])
      self.assertEqual((made, os.listdir(tmp)), ([], []))
      run_child.assert_not_called()
      # With as many, the run trains.
      with self.assertRaises(Trains):
        predict_benchmark.main([*argv, f'--train_lines={least}'])
      self.assertEqual(made, [least])
      # A finished run trains no more: --train_lines is not read.
      os.makedirs(os.path.join(tmp, 'files', 'run', 'encoder'))
      with mock.patch.object(predict_benchmark, 'benchmark', lambda *a: {}):
        predict_benchmark.main([*argv, '--train_lines=1', '--no_write'])

  def test_results_go_to_out_dir(self):
    tmp = self.create_tempdir().full_path
    run = os.path.join(tmp, 'run')
    os.makedirs(os.path.join(run, 'encoder'))  # A finished run.
    out = os.path.join(tmp, 'out')
    open(out, 'w').close()
    with self.assertRaisesRegex(SystemExit, f'--out_dir={out}: is a file'):
      predict_benchmark.main([f'--dir={tmp}/files', f'--out_dir={out}'])
    self.assertEqual(sorted(os.listdir(tmp)), ['out', 'run'])
    os.remove(out)
    ran = []

    def benchmark(workdir, lines, directory, chunk_rows, keep):
      del directory, keep
      ran.append((workdir, lines))
      return dict(
        lines=lines,
        rows=lines,
        seconds=0.1,
        rows_per_sec=10 * lines,
        load_seconds=0.1,
        cpu_seconds=0.2,
        rows_per_cpu_sec=5 * lines,
        peak_rss_mib=100,
        chunk_rows=chunk_rows,
        devices=1,
        machine='x86_64, 2 CPUs',
        load_average=0.5,
      )

    argv = ['--lines=5,7', f'--dir={tmp}/my files', f'--workdir={run}']
    argv += ['--chunk_rows=3', f'--out_dir={out}']
    with mock.patch.object(predict_benchmark, 'benchmark', benchmark):
      rows = predict_benchmark.main(argv)
    self.assertEqual(ran, [(run, 5), (run, 7)])
    self.assertEqual(_read_json(os.path.join(out, 'predict.json')), rows)
    with open(os.path.join(out, 'predict.md')) as f:
      text = f.read()
    # The whole command, quoted for a shell, and the table.
    (line,) = [x for x in text.splitlines() if x.startswith('`python')]
    self.assertEqual(
      shlex.split(line.strip('`')),
      ['python', '-m', 'benchmarks.predict', *argv],
    )
    self.assertIn('| 7 | 0.1 | 70 | 0.1 | 0.2 | 35 | 100 | 3 | 1 | 0.5 |', text)


@contextlib.contextmanager
def _stderr_of_children(path):
  """Sends file descriptor 2, which child processes inherit, to `path`."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, 'w') as f:
    os.dup2(f.fileno(), 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


class ChildErrorsTest(_TempDirs, absltest.TestCase):
  """A config or data error in a benchmark's child process is one line."""

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.stderr = os.path.join(self.tmp, 'stderr')

  def _children_wrote(self):
    with open(self.stderr) as f:
      return f.read()

  def test_preprocess(self):
    files = os.path.join(self.tmp, 'files')
    os.makedirs(files)
    with open(os.path.join(files, 'criteo_5.txt'), 'w') as f:
      f.write('not a criteo line\n')  # Read as it is: no synthetic file.
    with _stderr_of_children(self.stderr):
      with self.assertRaisesRegex(
        SystemExit, r'^error: [^\n]*criteo_5\.txt:1: expected 40 columns'
      ) as raised:
        preprocess.main(['--lines=5', f'--dir={files}', '--no_write'])
    self.assertNotIn('\n', str(raised.exception))
    self.assertNotIn('Traceback', self._children_wrote())
    # Any other failure keeps its traceback.
    with (
      mock.patch.object(preprocess, '_CHILD', 'raise ValueError("a bug")'),
      _stderr_of_children(self.stderr),
    ):
      with self.assertRaisesRegex(RuntimeError, r'^preprocessing failed'):
        preprocess.run_child({})
    self.assertIn('ValueError: a bug', self._children_wrote())

  def test_predict(self):
    run = os.path.join(self.tmp, 'run')
    os.makedirs(os.path.join(run, 'encoder'))  # But no encoder.json in it.

    def synthetic(path, lines, seed):  # An empty file, without a child.
      del lines, seed
      open(path, 'w').close()
      return path

    with (
      mock.patch.object(predict_benchmark, '_synthetic', synthetic),
      _stderr_of_children(self.stderr),
    ):
      with self.assertRaisesRegex(
        SystemExit, rf'^error: {run}: no encoder\.json in it[^\n]*\?$'
      ):
        predict_benchmark.main(
          ['--lines=5', f'--dir={self.tmp}/files', f'--workdir={run}']
          + ['--no_write']
        )
    self.assertNotIn('Traceback', self._children_wrote())
    with _stderr_of_children(self.stderr):
      with self.assertRaisesRegex(RuntimeError, r'^child failed \(exit 1\)$'):
        predict_benchmark.run_child('raise ValueError("a bug")')
    self.assertIn('ValueError: a bug', self._children_wrote())


class PlotTest(_TempDirs, absltest.TestCase):
  def _metrics(self, name, wall_time=True):
    workdir = os.path.join(self.create_tempdir().full_path, name)
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      for epoch in range(1, 4):
        for split, key, value in (
          ('train', 'loss', 0.7 - 0.05 * epoch),
          ('valid', 'auc', 0.7 + 0.02 * epoch),
        ):
          record = {'split': split, 'epoch': epoch, key: value}
          if wall_time:
            record['wall_time'] = 1.5 * epoch
          f.write(json.dumps(record) + '\n')
      f.write(json.dumps({'split': 'test', 'epoch': 3, 'auc': 0.75}) + '\n')
    return workdir

  def test_writes_a_png(self):
    pytest.importorskip('matplotlib')
    runs = [self._metrics('a'), self._metrics('b', wall_time=False)]
    out = os.path.join(self.create_tempdir().full_path, 'sub', 'runs.png')
    self.assertEqual(plot.main([*runs, f'--out={out}', '--title=t']), out)
    with open(out, 'rb') as f:
      blob = f.read()
    self.assertEqual(blob[:8], b'\x89PNG\r\n\x1a\n')
    self.assertEqual(blob[12:16], b'IHDR')
    width, height = struct.unpack('>II', blob[16:24])
    self.assertEqual((width, height), (1100, 750))
    self.assertGreater(len(blob), 20_000)
    self.assertEqual(blob[-8:-4], b'IEND')
    self.assertFalse(os.path.exists(out + '.tmp.png'))

  def test_series_and_labels(self):
    records = plot.read_run(self._metrics('c'))
    self.assertEqual(
      plot.series(records, 'valid', 'auc', 'epoch'),
      ([1, 2, 3], [0.72, 0.74, 0.76]),
    )
    self.assertEqual(
      plot.series(records, 'train', 'loss', 'wall_time')[0], [1.5, 3.0, 4.5]
    )
    self.assertEqual(plot.default_label('/x/fm/flax'), 'fm/flax')
    self.assertEqual(plot.default_label('/x/fm/flax/metrics.jsonl'), 'fm/flax')

  def test_bad_line_names_file_and_line(self):
    workdir = self._metrics('d')
    path = os.path.join(workdir, 'metrics.jsonl')
    with open(path, 'a') as f:
      f.write('{"split": "valid", \n')
    with self.assertRaisesRegex(SystemExit, f'{path}:8: not a JSON line'):
      plot.read_run(workdir)
    with self.assertRaisesRegex(SystemExit, 'no such metrics file'):
      plot.read_run(os.path.join(workdir, 'missing'))


class ReadmeCommandsTest(absltest.TestCase):
  """Every command benchmarks/README.md shows is one its tool accepts."""

  def commands(self):
    with open(os.path.join(common.ROOT, 'benchmarks', 'README.md')) as f:
      text = f.read()
    spans = re.findall(r'(?<!`)`([^`]+)`(?!`)', text)
    spans += re.findall(r'```sh\n(.*?)```', text, re.S)
    commands = []
    for span in spans:
      span = ' '.join(span.replace('\\\n', ' ').split())
      if 'python -m benchmarks.' in span:
        # Placeholders: <model>, <dir>, ... and --lines=N.
        span = re.sub(r'<[^>]*>|\.\.\.', 'fm', span)
        commands.append(re.sub(r'=N\b', '=1', span))
    return commands

  def test_every_command_parses(self):
    tools = {
      name: sys.modules[f'benchmarks.{name}']
      for name in ('ab', 'counts', 'plot', 'preprocess', 'profile')
      + ('quality', 'seeds', 'synthetic', 'throughput', 'time_to_auc')
    }
    parse = argparse.ArgumentParser.parse_args

    class Parsed(Exception):
      pass

    def parse_then_stop(parser, args=None, namespace=None):
      parse(parser, args, namespace)
      raise Parsed()

    commands = self.commands()
    self.assertGreater(len(commands), 50)
    for command in commands:
      with self.subTest(command=command):
        argv = shlex.split(command)
        argv = argv[argv.index('-m') + 1 :]
        tool = tools[argv.pop(0).removeprefix('benchmarks.')]
        stderr = io.StringIO()
        try:
          with contextlib.redirect_stderr(stderr):
            if hasattr(tool, 'parse_args'):  # Its checks of the values too.
              args = tool.parse_args(argv)
              for key in ('models', 'model'):
                if getattr(args, key, None) is not None:
                  common.parse_models(getattr(args, key))
              continue
            with (
              mock.patch.object(
                argparse.ArgumentParser, 'parse_args', parse_then_stop
              ),
              mock.patch.object(sys, 'argv', ['benchmarks', *argv]),
            ):
              tool.main() if tool is counts else tool.main(argv)
        except Parsed:
          pass
        except SystemExit as e:
          self.fail(f'{e.code}: {stderr.getvalue()}')


if __name__ == '__main__':
  absltest.main()
