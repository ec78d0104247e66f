"""Tests of config_unused.py: each key set but not read is warned of, once,
with its value and why; the warning is true (the run is the same without
the key); no shipped config is warned of."""

import functools
import importlib
import logging
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from flax import jax_utils
import jax
import jax.numpy as jnp
import numpy as np

import config_check
import config_unused
from configs import default
import data
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
  f[:-3]
  for f in os.listdir(os.path.join(ROOT, 'configs'))
  if f.endswith('.py') and f not in ('__init__.py', 'default.py')
)


def _config(name='fm', **overrides):
  """configs/<name>.py's config; `a__b=v` sets `a.b = v`."""
  config = importlib.import_module(f'configs.{name}').get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('__')
    for parent in parents:
      node = node[parent]
    with node.ignore_type():  # A flag's 'a,b' for a tuple, as main.py's.
      node[leaf] = value
  return config


def _csv(**options):
  overrides = {f'dataset__csv__{k}': v for k, v in options.items()}
  return _config(
    dataset__name='csv', dataset__csv__label_column='y', **overrides
  )


class _TestCase(parameterized.TestCase):
  def warnings(self, config):
    """What `warn_unused(config)` logs at WARNING, in order."""
    with self.assertLogs(level='WARNING') as logs:
      logging.warning('sentinel')
      config_unused.warn_unused(config)
    return [r.getMessage() for r in logs.records[1:]]


class WarnUnusedTest(_TestCase):
  def test_the_grouplens_url_is_warned_of_where_nothing_downloads(self):
    # A Criteo URL put in dataset.url trained on dataset.path, silently.
    url = 'http://127.0.0.1:1/criteo.tar.gz'
    base = (
      f"config.dataset.url='{url}' has no effect: it is the base URL of the"
      ' GroupLens archives, read only to download ml-100k, ml-1m, ml-20m or'
      ' ml-25m, and {}. To download a file, give its http(s) URL as'
      ' config.dataset.path (valid_path, test_path).'
    )
    for name, path, why in (
      ('criteo', '/data/train.txt', 'criteo is not one'),
      ('ml-latest-small', '', 'ml-latest-small is not one'),
      ('ml-1m', '/data/ml-1m', 'config.dataset.path is given'),
    ):
      config = _config(dataset__name=name, dataset__path=path, dataset__url=url)
      self.assertEqual(self.warnings(config), [base.format(why)])
    # Read: a GroupLens set downloaded from a mirror; or the default URL.
    config = _config(dataset__name='ml-1m', dataset__url=url)
    self.assertEqual(self.warnings(config), [])
    self.assertEqual(self.warnings(_config(dataset__name='criteo')), [])

  def test_chunked_reading_keys_are_warned_of_on_movielens(self):
    # MovieLens reads its ratings whole: skip_bad_lines=True still stopped
    # at a malformed line.
    config = _config(
      dataset__skip_bad_lines=True,
      dataset__chunk_rows=10,
      dataset__parse_workers=2,
    )
    self.assertEqual(
      self.warnings(config),
      [
        f'config.dataset.{key}={value!r} has no effect: ml-latest-small is'
        ' read whole, in memory, and stops at its first malformed line; the'
        ' key serves criteo, avazu, libfm and csv files.'
        for key, value in (
          ('skip_bad_lines', True),
          ('chunk_rows', 10),
          ('parse_workers', 2),
        )
      ],
    )
    for name in ('criteo', 'csv'):  # Read there.
      config.dataset.name = name
      config.dataset.csv.label_column = 'y'
      self.assertEqual(self.warnings(config), [])

  def test_multi_hot_keys_without_multi_hot_columns_are_warned(self):
    self.assertEqual(
      self.warnings(_csv(multi_hot_sep=';', multi_hot_max_len=4)),
      [
        "config.dataset.csv.multi_hot_sep=';' has no effect:"
        ' config.dataset.csv.multi_hot_columns is empty, so no column is read'
        ' as a list. Name the list columns there, or leave multi_hot_sep at'
        " its default '|'.",
        'config.dataset.csv.multi_hot_max_len=4 has no effect:'
        ' config.dataset.csv.multi_hot_columns is empty, so no column is read'
        ' as a list. Name the list columns there, or leave multi_hot_max_len'
        ' at its default 16.',
      ],
    )
    for columns in (('g',), 'g', 'g,h'):  # A flag's 'g,h' too.
      config = _csv(multi_hot_sep=';', multi_hot_columns=columns)
      self.assertEqual(self.warnings(config), [])
    self.assertEqual(self.warnings(_csv(multi_hot_max_len=16)), [])

  def test_csv_log_bucket_without_numeric_columns_is_warned(self):
    self.assertEqual(
      self.warnings(_csv(log_bucket=False)),
      [
        'config.dataset.csv.log_bucket=False has no effect: it keeps the'
        ' integers of config.dataset.csv.numeric_columns unbucketed, and'
        ' numeric_columns is empty (no other column is bucketed).'
      ],
    )
    config = _csv(log_bucket=False, numeric_columns=('n',))
    self.assertEqual(self.warnings(config), [])

  def test_movielens_min_count_without_side_features_is_warned(self):
    self.assertEqual(
      self.warnings(_config(dataset__min_count=5)),
      [
        'config.dataset.min_count=5 has no effect: ml-latest-small keeps'
        ' every user and movie (as pytorch-fm); min_count applies to side'
        ' features only, and config.dataset.side_features is empty.'
      ],
    )
    config = _config(dataset__min_count=5, dataset__side_features='genres')
    self.assertEqual(self.warnings(config), [])
    config = _csv()
    config.dataset.min_count = 5  # A CSV's categorical values: read.
    self.assertEqual(self.warnings(config), [])

  @parameterized.parameters(
    ('adam', ''),
    ('lazy_adam', ''),
    ('auto', " ('auto' picks 'adam' or 'lazy_adam', never 'rowwise_adagrad')"),
  )
  def test_table_learning_rate_without_rowwise_adagrad_is_warned(
    self, optimizer, picks
  ):
    config = _config(optimizer=optimizer, table_learning_rate=0.2)
    self.assertEqual(
      self.warnings(config),
      [
        'config.table_learning_rate=0.2 has no effect: only'
        " config.optimizer='rowwise_adagrad' reads it (its step size on the"
        f" tables), and config.optimizer is '{optimizer}'{picks}; the tables"
        ' train at config.learning_rate. Set optimizer=rowwise_adagrad, or'
        ' leave table_learning_rate at its default 0.05.'
      ],
    )
    config.optimizer = 'rowwise_adagrad'
    self.assertEqual(self.warnings(config), [])
    self.assertEqual(self.warnings(_config(optimizer=optimizer)), [])

  @parameterized.parameters(
    (
      'finalmlp',
      dict(use_fs=False, fs2_context=(0,)),
      'config.model.fs2_context=(0,) has no effect: config.model.use_fs=False'
      ' builds no feature-selection gate (models/finalmlp.py). Set'
      ' use_fs=True, or leave fs2_context at its default ().',
      dict(use_fs=True),
    ),
    (
      'dcnv2',
      dict(num_experts=8),
      'config.model.num_experts=8 has no effect: config.model.low_rank=None'
      ' keeps the cross layers full rank, without the mixture of low-rank'
      ' experts (models/dcnv2.py). Set low_rank to a rank, e.g. 32, or leave'
      ' num_experts at its default 4.',
      dict(low_rank=2),
    ),
    (
      'wd',
      dict(cross_buckets=64),
      'config.model.cross_buckets=64 has no effect: config.model.'
      'cross_fields=() adds no cross-product feature to hash (models/wd.py).'
      ' Set cross_fields to pairs of field indices, e.g. ((0, 1),), or leave'
      ' cross_buckets at its default 131072.',
      dict(cross_fields=((0, 1),)),
    ),
  )
  def test_a_model_argument_that_another_switches_off_is_warned(
    self, name, arguments, warned, switched_on
  ):
    config = _config(name)
    config.model.update(arguments)
    if name == 'finalmlp':  # The config's own contexts are warned of too.
      config.model.fs1_context = ()
    self.assertEqual(self.warnings(config), [warned])
    config.model.update(switched_on)
    self.assertEqual(self.warnings(config), [])

  def test_finalmlp_without_gates_warns_of_each_context_set(self):
    config = _config('finalmlp', model__use_fs=False)
    said = self.warnings(config)
    self.assertLen(said, 2)
    self.assertStartsWith(said[0], 'config.model.fs1_context=(0,) has no')
    self.assertStartsWith(said[1], 'config.model.fs2_context=(1,) has no')

  def test_no_shipped_config_is_warned_of(self):
    for name in CONFIGS:
      for arg in (None, 'smoke'):
        config = importlib.import_module(f'configs.{name}').get_config(arg)
        with self.subTest(config=name, arg=arg):
          self.assertEqual(config_unused.unused(config), [])
          with self.assertNoLogs(level='WARNING'):
            config_unused.warn_unused(config)
            config_check.validate_config(
              config, dataset_names=tuple(data.FORMAT_OF), num_devices=2
            )

  def test_the_shipped_configs_load_the_embedded_data_without_a_warning(self):
    # data.load_dataset warns of what the data's files decide (split and
    # seed beside predefined files, criteo's log_bucket): every config
    # shares default.py's dataset, so one load stands for all.
    dataset = default.get_config().dataset
    for name in CONFIGS:
      for arg in (None, 'smoke'):
        config = importlib.import_module(f'configs.{name}').get_config(arg)
        self.assertEqual(config.dataset.to_dict(), dataset.to_dict())
    dataset.cache_dir = tempfile.mkdtemp()
    with self.assertNoLogs(level='WARNING'):
      loaded = data.load_dataset(dataset)
    self.assertEqual(loaded.name, 'ml-latest-small')

  def test_a_new_run_is_warned_once_by_validate_config_a_resume_is_not(self):
    config = _config(optimizer='adam', table_learning_rate=0.2)
    check = functools.partial(
      config_check.validate_config,
      config,
      dataset_names=tuple(data.FORMAT_OF),
      num_devices=2,
    )
    with self.assertLogs(level='WARNING') as logs:
      check()
    [record] = logs.records
    self.assertStartsWith(
      record.getMessage(), 'config.table_learning_rate=0.2 has no effect'
    )
    # A resume may run with the recorded optimizer instead of 'auto'.
    with self.assertNoLogs(level='WARNING'):
      check(resuming=True)
      config_check.validate_config(config)  # Not a run's whole config.


class NoEffectTest(absltest.TestCase):
  """What the warnings say: the run is the same with or without the key."""

  def test_table_learning_rate_changes_no_step_of_adam_or_lazy_adam(self):
    ids = np.array([[[0, 0], [1, 2], [0, 2], [1, 0]]], np.int32)
    batch = {'ids': ids, 'label': np.array([[1, 0, 1, 0]], np.float32)}
    for optimizer in ('adam', 'lazy_adam', 'rowwise_adagrad'):
      params = []
      for table_lr in (0.05, 0.5):
        config = _config(
          optimizer=optimizer, learning_rate=0.01, table_learning_rate=table_lr
        )
        config.model = {'embed_dim': 3}
        model = train.create_model(config, (3, 4), axis_name=train.AXIS)
        state = train.state_initializer(config, model)(jax.random.key(0))
        step = jax.pmap(
          functools.partial(train.train_step, model=model, config=config),
          axis_name=train.AXIS,
          devices=jax.local_devices()[:1],
        )
        hyper = jax_utils.replicate(
          train.hyperparameters(config), devices=jax.local_devices()[:1]
        )
        state = jax_utils.replicate(state, devices=jax.local_devices()[:1])
        state, _ = step(state, batch, hyper)
        params.append(jax.device_get(state.params))
      same = jax.tree.all(jax.tree.map(np.array_equal, params[0], params[1]))
      with self.subTest(optimizer=optimizer):
        # rowwise_adagrad, the control: the same test sees the rate.
        self.assertEqual(same, optimizer != 'rowwise_adagrad')

  def test_switched_off_model_arguments_change_nothing(self):
    ids = jnp.array([[0, 1], [2, 3], [4, 0]], jnp.int32)
    for name, off, unused, control in (
      ('finalmlp', dict(use_fs=False), dict(fs1_context=(0,)), 'use_fs'),
      ('dcnv2', dict(low_rank=None), dict(num_experts=2), 'low_rank'),
      ('wd', dict(cross_fields=()), dict(cross_buckets=3), 'cross_fields'),
    ):
      on = dict(use_fs=True, low_rank=2, cross_fields=((0, 1),))[control]
      outputs = {}
      for switched_on, switch in ((False, off[control]), (True, on)):
        for given in (False, True):
          config = _config(name)
          config.model.update(off)
          config.model[control] = switch
          if given:
            config.model.update(unused)
          if name == 'finalmlp':
            config.model.update(
              fs1_context=unused['fs1_context'] if given else (),
              fs2_context=(),
              mlp1_dims=(4,),
              mlp2_dims=(4,),
              fs_dims=(4,),
            )
          model = train.create_model(config, (5, 6))
          variables = model.init(jax.random.key(0), ids, train=False)
          outputs[switched_on, given] = (
            jax.tree.map(np.shape, variables),
            np.asarray(model.apply(variables, ids, train=False)),
          )
      with self.subTest(model=name):
        for switched_on in (False, True):
          (shapes, logits), (shapes2, logits2) = (
            outputs[switched_on, False],
            outputs[switched_on, True],
          )
          # Off: the same parameters and logits; on (the control): not.
          same = shapes == shapes2 and np.array_equal(logits, logits2)
          self.assertEqual(same, not switched_on)

  def test_multi_hot_keys_without_multi_hot_columns_change_no_id(self):
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, 'd.csv')
    rng = np.random.default_rng(0)
    with open(path, 'w') as f:
      f.write('y,a,b\n')
      for _ in range(60):
        a, b = rng.integers(0, 5, 2)
        f.write(f'{rng.integers(0, 2)},x{a}|z,{b}\n')
    arrays = []
    for options in ({}, dict(multi_hot_sep=';', multi_hot_max_len=1)):
      config = _csv(**options).dataset
      config.update(path=path, cache_dir=os.path.join(tmp, 'cache'))
      dataset = data.load_dataset(config)
      arrays.append([dataset.field_dims, dataset.train.ids, dataset.test.ids])
    self.assertEqual(arrays[0][0], arrays[1][0])
    for one, other in zip(arrays[0][1:], arrays[1][1:], strict=True):
      np.testing.assert_array_equal(one, other)
    self.assertLen(os.listdir(os.path.join(tmp, 'cache', 'encoded')), 2)


if __name__ == '__main__':
  absltest.main()
