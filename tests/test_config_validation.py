"""Tests of config_check.py: every bad key is named before any data work."""

import dataclasses
import functools
import importlib
import os
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import ml_collections
import model_tables
import model_testing

import config_check
import models
import train
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
  f[:-3]
  for f in os.listdir(os.path.join(ROOT, 'configs'))
  if f.endswith('.py') and f not in ('__init__.py', 'default.py')
)


def _config(name='fm', **values):
  """The real config `configs/<name>.py` with `a__b=v` meaning `a.b = v`."""
  config = importlib.import_module(f'configs.{name}').get_config()
  for key, value in values.items():
    node = config
    *parents, leaf = key.split('__')
    for parent in parents:
      node = node[parent]
    if isinstance(node, ml_collections.ConfigDict):
      with node.ignore_type():
        node[leaf] = value
    else:
      node[leaf] = value
  return config


class _TestCase(parameterized.TestCase):
  def problems(self, config, **kwargs):
    """The message of the ConfigError that `config` must raise."""
    with self.assertRaises(config_check.ConfigError) as cm:
      config_check.validate_config(config, **kwargs)
    return str(cm.exception)


class RealConfigsTest(_TestCase):
  def test_every_config_file_is_valid(self):
    self.assertNotEmpty(CONFIGS)
    for name in CONFIGS:
      for arg in (None, 'smoke'):
        config = importlib.import_module(f'configs.{name}').get_config(arg)
        config_check.validate_config(config, num_devices=2)

  def test_configs_keep_pytorch_fm_recipe(self):
    # pytorch-fm's examples/main.py: get_model's arguments, the flags'
    # defaults, the 8:1:1 split and its EarlyStopper(num_trials=2).
    recipe = {
      'fm': dict(embed_dim=16),
      'ffm': dict(embed_dim=4),
      'fnn': dict(embed_dim=16, mlp_dims=(16, 16), dropout=0.2),
      'wd': dict(embed_dim=16, mlp_dims=(16, 16), dropout=0.2),
      'ipnn': dict(embed_dim=16, mlp_dims=(16,), method='inner', dropout=0.2),
      'opnn': dict(embed_dim=16, mlp_dims=(16,), method='outer', dropout=0.2),
      'dcn': dict(embed_dim=16, num_layers=3, mlp_dims=(16, 16), dropout=0.2),
      'nfm': dict(embed_dim=64, mlp_dims=(64,), dropouts=(0.2, 0.2)),
      'fnfm': dict(embed_dim=4, mlp_dims=(64,), dropouts=(0.2, 0.2)),
      'deepfm': dict(embed_dim=16, mlp_dims=(16, 16), dropout=0.2),
      'xdeepfm': dict(
        embed_dim=16,
        cross_layer_sizes=(16, 16),
        split_half=False,
        mlp_dims=(16, 16),
        dropout=0.2,
      ),
      'afm': dict(embed_dim=16, attn_size=16, dropouts=(0.2, 0.2)),
      'ncf': dict(embed_dim=16, mlp_dims=(16, 16), dropout=0.2),
    }
    # Adam's rates; lazy Adam where it did better on three splits
    # (benchmarks/README.md, "Lazy Adam for the models nearest their bar"),
    # 'auto' (dense Adam on this data) elsewhere.
    lazy = ('fnn', 'ipnn', 'opnn', 'dcn', 'ncf', 'ffm')
    for name, arguments in recipe.items():
      config = _config(name)
      with self.subTest(config=name):
        self.assertEqual({k: config.model[k] for k in arguments}, arguments)
        self.assertEqual(
          (config.optimizer, config.learning_rate, config.weight_decay),
          ('lazy_adam' if name in lazy else 'auto', 1e-3, 1e-6),
        )
        self.assertEqual((config.batch_size, config.patience), (2048, 2))
        self.assertEqual(tuple(config.dataset.split), (0.8, 0.1, 0.1))

  def test_every_smoke_config_is_small(self):
    # A smoke run takes seconds: at most 1M weights on the embedded data
    # (AFN's full size has 10M and took minutes, FinalMLP's 2.8M).
    for name in CONFIGS:
      config = importlib.import_module(f'configs.{name}').get_config('smoke')
      model = train.create_model(config, (610, 9742))
      ids = jax.ShapeDtypeStruct((2, 2), jax.numpy.int32)
      rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
      shapes = jax.eval_shape(
        functools.partial(model.init, train=False), rngs, ids
      )
      size = sum(x.size for x in jax.tree.leaves(shapes['params']))
      with self.subTest(config=name):
        self.assertBetween(size, 10_000, 1_000_000)

  def test_every_model_argument_is_a_key_a_flag_can_set(self):
    # A locked config takes no new key from the command line: each argument
    # the model documents (multi_pooling, AFN's lnn, ...) must be there.
    trainer = set(config_check.TRAINER_SET)
    for name in CONFIGS:
      config = importlib.import_module(f'configs.{name}').get_config()
      model = importlib.import_module(f'models.{config.model_name}').Model
      for field in dataclasses.fields(model):
        if field.name in trainer or field.default is None:
          continue
        with self.subTest(config=name, key=field.name):
          self.assertIn(field.name, config.model)
    from absl import flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    argv = ['main.py', f'--config={ROOT}/configs/afn.py']
    argv += ['--config.model.lnn=paper', '--config.model.multi_pooling=sum']
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
      'config', flag_values=values, sys_argv=argv, lock_config=True
    )
    values(argv)
    self.assertEqual(values.config.model.lnn, 'paper')
    self.assertEqual(values.config.model.multi_pooling, 'sum')

  def test_every_dropout_rate_of_every_config_is_checked(self):
    checked = 0
    for name in CONFIGS:
      model = _config(name).model
      for key in ('dropout', 'dropouts'):
        if key in model:
          bad = 1.0 if key == 'dropout' else (0.2,) * (len(model[key]) - 1)
          message = self.problems(_config(name, **{f'model__{key}': bad}))
          self.assertIn(f'config.model.{key}={bad!r}', message)
          self.assertIn('dropout rate', message)
          checked += 1
    self.assertGreaterEqual(checked, 7)

  def test_optimizer_names_are_those_the_optimizer_factory_builds(self):
    try:
      factory = importlib.import_module('optim').create_optimizer
    except ModuleNotFoundError:
      factory = importlib.import_module('train').create_optimizer
    resolve = importlib.import_module('optim').resolve
    built = set()
    for name in config_check.OPTIMIZERS:
      # 'auto' is resolved from the tables' rows before anything is built.
      for rows in (0, 10**9):
        factory(_config(optimizer=resolve(name, rows)))
        built.add(resolve(name, rows))
    self.assertEqual(built, set(config_check.OPTIMIZERS) - {'auto'})
    for name in ('sgd', 'auto'):
      with self.assertRaises(ValueError):
        factory(_config(optimizer=name))


class BadValueTest(_TestCase):
  @parameterized.parameters(
    ('batch_size', 0, 'an integer >= 1'),
    ('batch_size', -3, 'an integer >= 1'),
    ('batch_size', 2.5, 'an integer >= 1'),
    ('eval_batch_size', 0, 'an integer >= 1'),
    ('num_epochs', 0, 'an integer >= 1'),
    ('log_every_steps', 0, 'an integer >= 1'),
    ('patience', 0, 'an integer >= 1'),
    ('lr_plateau_factor', 0.0, 'a factor in (0, 1] (1: off)'),
    ('lr_plateau_factor', 1.5, 'a factor in (0, 1] (1: off)'),
    ('learning_rate', -1.0, 'a number > 0'),
    ('learning_rate', 0.0, 'a number > 0'),
    ('learning_rate', float('nan'), 'a number > 0'),
    ('weight_decay', -1e-6, 'a number >= 0'),
    ('table_weight_decay', -1e-6, 'a number >= 0 or None'),
    ('optimizer', 'sgd', 'one of auto, adam, lazy_adam, rowwise_adagrad'),
    ('seed', -1, 'an integer >= 0'),
    ('seed', 2**63, 'an integer >= 0 and < 9223372036854775808'),
    ('progress_bar', 'yes', 'True or False'),
    ('steps_per_dispatch', 0, 'an integer >= 1'),
    ('device_split_mb', -1, 'an integer >= 0'),
    ('model__embed_dim', 0, 'an integer >= 1'),
    ('model__embed_dim', -4, 'an integer >= 1'),
    ('dataset__seed', -1, 'an integer >= 0'),
    ('dataset__chunk_rows', 0, 'an integer >= 1'),
    ('dataset__min_count', -2, 'an integer >= -1'),
    ('dataset__skip_bad_lines', 1, 'True or False'),
  )
  def test_bad_value_is_named_with_its_rule(self, key, value, rule):
    message = self.problems(_config(**{key: value}))
    self.assertIn(f'config.{key.replace("__", ".")}={value!r} must be', message)
    self.assertIn(rule, message)
    self.assertStartsWith(message, '1 bad config value: ')

  @parameterized.parameters(
    ('batch_size', True, 'an integer >= 1'),
    ('patience', False, 'an integer >= 1'),
    ('learning_rate', float('inf'), 'a number > 0'),
    ('weight_decay', float('inf'), 'a number >= 0'),
    ('shuffle', 1, 'True or False'),
    ('init_from', 3, 'a string'),
    ('dataset__sep', ',,', 'a string of one character'),
    ('dataset__sep', '\n', 'a string of one character'),
    ('dataset__numeric_columns', ('a', 1.5), 'column names'),
    ('dataset__field_dims', (4, True), 'a sequence of integers >= 1'),
    ('dataset__numeric', 'float', 'one of buckets, dense'),
  )
  def test_the_edges_of_each_rule_are_refused(self, key, value, rule):
    # A bool is not an integer, nor is infinity a number.
    message = self.problems(_config(**{key: value}))
    self.assertIn(f'config.{key.replace("__", ".")}={value!r} must be', message)
    self.assertIn(rule, message)
    self.assertStartsWith(message, '1 bad config value: ')
    self.assertIn('. Fix it in the config file', message)

  def test_the_edges_of_each_rule_are_accepted(self):
    config_check.validate_config(
      _config(
        batch_size=1,
        patience=1,
        seed=2**63 - 1,
        learning_rate=1e-30,
        weight_decay=0.0,
        table_weight_decay=None,
        device_split_mb=0,
        dataset__min_count=-1,
        dataset__sep='\\t',
        dataset__numeric_columns=('a', 1),
        dataset__field_dims=(1, 1),
      )
    )

  def test_keys_that_default_to_none_take_numbers_from_the_command_line(self):
    from absl import flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    def parse(*overrides):
      # As main.py's flag: config_flags reads the overrides from the argv.
      argv = ['main.py', f'--config={ROOT}/configs/fm.py', *overrides]
      values = flags.FlagValues()
      config_flags.DEFINE_config_file(
        'config', flag_values=values, sys_argv=argv
      )
      values(argv)
      config_check.validate_config(values.config)
      return values.config

    self.assertIsNone(parse().table_weight_decay)
    self.assertEqual(
      parse('--config.table_weight_decay=0').table_weight_decay, 0
    )
    config = parse('--config.table_weight_decay=1e-5')
    self.assertEqual(config.table_weight_decay, 1e-5)
    # DCN-V2's low-rank mixture, off by default, as its config says.
    argv = [f'--config={ROOT}/configs/dcnv2.py', '--config.model.low_rank=32']
    for overrides, low_rank in (([], None), (argv[1:], 32)):
      values = flags.FlagValues()
      config_flags.DEFINE_config_file(
        'config', flag_values=values, sys_argv=['main.py', argv[0], *overrides]
      )
      values(['main.py', argv[0], *overrides])
      config_check.validate_config(values.config)
      self.assertEqual(values.config.model.low_rank, low_rank)

  @parameterized.parameters(
    ('nfm', 'model__mlp_dims', (64, 0), 'integers >= 1'),
    ('afm', 'model__attn_size', 0, 'an integer >= 1'),
    ('afm', 'model__attn_l2', -0.1, 'a number >= 0'),
    ('wd', 'model__cross_fields', ((1, 1),), 'two different field indices'),
    ('wd', 'model__cross_fields', ((0, -1),), 'two different field indices'),
    ('wd', 'model__cross_fields', ((0, 1, 2),), 'two different field indices'),
    ('wd', 'model__cross_fields', ((0, True),), 'two different field indices'),
    # One cross given twice trained two weights for it, silently.
    (
      'wd',
      'model__cross_fields',
      ((0, 1), (0, 1)),
      'must be a sequence of pairs of two different field indices, each pair'
      ' once: (0, 1) is given twice (one cross would train two weights)',
    ),
    (
      'wd',
      'model__cross_fields',
      ((0, 1), (1, 0)),
      'each pair once: (1, 0) crosses the same fields as (0, 1) (one cross',
    ),
    ('nfm', 'model__dropouts', (0.2, 1.0), 'sequence of 2 dropout rates'),
    # An integer argument without a rule of its own: from its default.
    ('dcnv2', 'model__num_cross_layers', -1, 'an integer >= 0'),
    ('wd', 'model__cross_buckets', 0, 'an integer >= 1'),
    ('ncf', 'model__user_field_idx', -1, 'a field index >= 0'),
    ('ncf', 'model__shared_embedding', 'no', 'True or False'),
    ('fnn', 'model__fm_linear_inputs', 0, 'True or False'),
    ('deepfm', 'model__linear_init', 'xavier', 'one of lecun, torch'),
    ('ipnn', 'model__method', 'kernel', 'one of inner, outer'),
    ('dcnv2', 'model__structure', 'mixed', 'one of parallel, stacked'),
    ('afn', 'model__lnn', 'log', 'one of torchfm, paper'),
    ('fibinet', 'model__excitation', 'tanh', 'one of relu, sigmoid'),
    ('fibinet', 'model__bilinear_type', 'all', 'one of field_all'),
    ('fwfm', 'model__linear_type', 'fw', 'one of lw, felv, filv'),
    ('fm', 'model__multi_pooling', 'max', 'one of mean, sum'),
    ('autoint', 'model__num_heads', 0, 'an integer >= 1'),
    ('autoint', 'model__atten_embed_dim', 0, 'an integer >= 1'),
    ('hofm', 'model__order', 0, 'an integer >= 1'),
    ('afn', 'model__lnn_dim', 0, 'an integer >= 1'),
    ('fibinet', 'model__reduction_ratio', 0.0, 'a number > 0'),
    ('dcnv2', 'model__low_rank', 0, 'an integer >= 1 or None'),
    ('dcnv2', 'model__num_experts', 0, 'an integer >= 1'),
    ('finalmlp', 'model__fs1_context', (-1,), 'integers >= 0'),
    ('finalmlp', 'model__fs_dims', (-1,), 'integers >= 1'),
    ('finalmlp', 'model__mlp2_dims', (0,), 'integers >= 1'),
    ('xdeepfm', 'model__cross_layer_sizes', (16.5,), 'integers >= 1'),
  )
  def test_bad_model_argument_is_named(self, name, key, value, rule):
    message = self.problems(_config(name, **{key: value}))
    self.assertIn(f'config.{key.replace("__", ".")}={value!r} must be', message)
    self.assertIn(rule, message)

  def test_every_string_model_argument_has_its_names(self):
    # A string the model does not know would otherwise stop the run at
    # initialisation with a traceback: each string argument of each model
    # has a one-of rule, the rule takes the default, and the model takes
    # every name the rule allows.
    checked = 0
    for name in models.names():
      model_cls = importlib.import_module(f'models.{name}').Model
      for field in dataclasses.fields(model_cls):
        if not isinstance(field.default, str) or field.name in (
          config_check.TRAINER_SET
        ):
          continue
        with self.subTest(model=name, key=field.name):
          rule = config_check.model_rule(field)
          self.assertIsNotNone(rule, f'no rule for {field.name}')
          self.assertIsNone(rule(field.default))
          self.assertIsNotNone(rule('no-such-name'))
          names = rule('no-such-name').removeprefix('one of ').split(', ')
          for value in names:
            model = model_tables.build(name, **{field.name: value})
            # Tracing runs the model's own checks; nothing compiles.
            jax.eval_shape(
              functools.partial(model.init, train=False),
              jax.random.key(0),
              model_testing.random_ids(2, model_tables.FIELD_DIMS),
            )
          checked += 1
    self.assertGreaterEqual(checked, 6 + len(models.names()))

  def test_a_config_built_from_scratch_names_the_keys_it_lacks(self):
    # train.py read config.dataset first: an AttributeError traceback.
    config = ml_collections.ConfigDict(
      {'model_name': 'fm', 'model': {}, 'batch_size': 64}
    )
    with self.assertRaisesRegex(
      config_check.ConfigError,
      r'^The config has no config.eval_batch_size, config.learning_rate,'
      r' .*config.progress_bar, config.optimizer, config.dataset: build it'
      r" on configs/default.py's get_config\(\)",
    ):
      config_check.validate_config(config, dataset_names=('csv',))
    config_check.validate_config(config)  # A part of a config: its keys.
    config_check.validate_config(  # configs/default.py's keys: all there.
      _config(), dataset_names=('ml-latest-small',)
    )

  def test_a_key_that_no_run_reads_is_named(self):
    # A config file's `config.learning_rte = 0.01` trained at the default.
    config = _config()
    config.learning_rte = 0.01
    config.foo = 1
    message = self.problems(config, dataset_names=('ml-latest-small',))
    self.assertIn(
      'config.foo is no key of configs/default.py; config.learning_rte is no'
      ' key of configs/default.py (did you mean learning_rate?).',
      message,
    )
    config_check.validate_config(config)  # A part of a config: its keys.

  def test_a_model_name_override_needs_a_config_built_for_that_model(self):
    # `--config=configs/fm.py --config.model_name=dcnv2` trained DCN-V2 at
    # its class defaults (500-500-500 layers, BatchNorm), not at
    # configs/dcnv2.py's, and the locked config took no flag for them.
    check = config_check.check_model_name_override
    with self.assertRaises(config_check.ConfigError) as cm:
      check(_config('fm', model_name='dcnv2'))
    message = str(cm.exception)
    self.assertStartsWith(message, '--config.model_name=dcnv2: config.model')
    self.assertIn('lacks batch_norm, dropout, linear_init, mlp_dims,', message)
    self.assertEndsWith(message, 'instead: --config=configs/dcnv2.py.')
    with self.assertRaises(config_check.ConfigError) as cm:
      check(_config('deepfm', model_name='fm'))
    self.assertIn(
      'has dropout, linear_init, mlp_dims, which models/fm.py does not take',
      str(cm.exception),
    )
    with self.assertRaises(config_check.ConfigError) as cm:
      check(_config('fm', model_name='pnn'))  # Its file: configs/ipnn.py.
    self.assertEndsWith(str(cm.exception), ': --config=configs/ipnn.py.')
    # Each config's own model, and one whose arguments are the same, pass;
    # an unknown name is left to validate_config.
    for name in CONFIGS:
      check(_config(name))
    check(_config('fm', model_name='ffm'))
    check(_config('fm', model_name='nope'))

  def test_unknown_model_is_named_before_any_data(self):
    message = self.problems(_config(model_name='nope'))
    self.assertIn("model_name='nope' must name a file in models/", message)
    self.assertIn(', '.join(models.names()), message)

  def test_model_argument_the_model_does_not_take_is_named(self):
    message = self.problems(_config(model__embed_dims=8))
    self.assertIn('model.embed_dims=8: models/fm.py has no such', message)
    self.assertIn('embed_dim', message)
    message = self.problems(_config(model__field_dims=(3, 4)))
    self.assertIn('config.model.field_dims=(3, 4): remove it', message)

  @parameterized.parameters(
    ((1.0, 0.0, 0.0), 'every part a fraction > 0'),
    ((0.0, 0.5, 0.5), 'every part a fraction > 0'),
    ((0.5, 0.5), 'three non-negative fractions'),
    ((0.8, 0.1, 0.2), 'summing to 1'),
    ((0.8, 0.1, 0.1001), 'summing to 1'),
    ((1.1, -0.05, -0.05), 'three non-negative fractions'),
  )
  def test_bad_split_is_named(self, split, rule):
    message = self.problems(_config(dataset__split=split))
    self.assertIn(f'config.dataset.split={split!r} must', message)
    self.assertIn(rule, message)

  def test_predefined_files_allow_a_split_without_validation_part(self):
    config = _config(
      dataset__split=(1.0, 0.0, 0.0),
      dataset__valid_path='v.txt',
      dataset__test_path='t.txt',
    )
    config_check.validate_config(config)
    message = self.problems(_config(dataset__valid_path='v.txt'))
    self.assertIn('valid_path and config.dataset.test_path must', message)
    # A libfm directory holds its own files; a libfm file is split.
    with tempfile.TemporaryDirectory() as directory:
      libfm = dict(dataset__name='libfm', dataset__split=(1.0, 0.0, 0.0))
      config_check.validate_config(_config(dataset__path=directory, **libfm))
      path = os.path.join(directory, 'train.libfm')
      message = self.problems(_config(dataset__path=path, **libfm))
      self.assertIn('must give every part a fraction > 0', message)

  def test_nested_dataset_keys_are_checked_by_name(self):
    config = _config()
    config.dataset.csv = ml_collections.ConfigDict(
      {'sep': 3, 'multi_hot_max_len': 0}
    )
    config.dataset.libfm = ml_collections.ConfigDict({'field_dims': (4, 0)})
    message = self.problems(config)
    self.assertIn('config.dataset.csv.sep=3 must be a string', message)
    self.assertIn('config.dataset.libfm.field_dims=(4, 0) must be', message)
    self.assertIn(
      'config.dataset.csv.multi_hot_max_len=0 must be an integer >= 1', message
    )
    config.dataset.csv = ml_collections.ConfigDict({'sep': '"'})
    message = self.problems(config)
    self.assertIn(
      """config.dataset.csv.sep='"' must be a string of one""", message
    )

  def test_dataset_names_and_device_count_when_given(self):
    message = self.problems(
      _config(dataset__name='movielens', batch_size=6, eval_batch_size=8),
      dataset_names=('ml-1m', 'criteo'),
      num_devices=4,
    )
    self.assertIn("dataset.name='movielens' must be one of ml-1m", message)
    self.assertIn('config.batch_size=6 must be a multiple of the 4', message)
    self.assertNotIn('eval_batch_size=8', message)

  def test_the_eval_batch_need_not_split_over_the_devices(self):
    # Evaluation pads its batches (programs.eval_batch_size): the default
    # eval_batch_size=8192 runs on 3 or 6 devices when batch_size splits.
    for devices in (3, 6):
      config_check.validate_config(
        _config(batch_size=3072, eval_batch_size=8192), num_devices=devices
      )
    message = self.problems(_config(batch_size=2048), num_devices=3)
    self.assertIn('config.batch_size=2048 must be a multiple of the 3', message)

  def test_a_resume_whose_batch_size_does_not_split_names_device_counts(self):
    # A resume cannot change batch_size: the device count is what to fix.
    for size, devices, fits in ((6, 4, '3 devices'), (2047, 2, '1 device')):
      message = self.problems(
        _config(batch_size=size, eval_batch_size=6),
        num_devices=devices,
        resuming=True,
      )
      self.assertIn(
        f'config.batch_size={size} must be a multiple of the {devices}', message
      )
      self.assertIn(f'resume on {fits} (or a count that divides', message)
      self.assertNotIn('--config.<key>', message)
    # A resume whose batch size splits is not refused for it.
    config_check.validate_config(
      _config(batch_size=12), num_devices=4, resuming=True
    )

  def test_init_from_must_hold_a_best_checkpoint(self):
    with tempfile.TemporaryDirectory() as run:
      message = self.problems(_config(init_from=run))
      self.assertIn(f'config.init_from={run!r} must be the workdir', message)
      # A best directory without a step (a save cut short) is not one.
      os.makedirs(os.path.join(run, 'checkpoints', 'best', '4.orbax-tmp'))
      message = self.problems(_config(init_from=run))
      self.assertIn(f'config.init_from={run!r} must be the workdir', message)
      os.makedirs(os.path.join(run, 'checkpoints', 'best', '4'))
      config_check.validate_config(_config(init_from=run))
    # `~` is the user's home, as the run that reads it expands it.
    with tempfile.TemporaryDirectory() as home:
      os.makedirs(os.path.join(home, 'run', 'checkpoints', 'best', '4'))
      with mock.patch.dict(os.environ, {'HOME': home}):
        config_check.validate_config(_config(init_from='~/run'))
    # A resumed run does not read it: it may be gone.
    config_check.validate_config(_config(init_from=run), resuming=True)
    self.assertIn('init_from', self.problems(_config(init_from=run)))

  def test_all_problems_in_one_message(self):
    config = _config(
      'deepfm',
      batch_size=0,
      learning_rate=-1.0,
      model__embed_dim=0,
      model__dropout=1.5,
      dataset__split=(1.0, 0.0, 0.0),
      log_every_steps=0,
    )
    with self.assertRaises(utils.UserError) as cm:
      config_check.validate_config(config)
    self.assertIsInstance(cm.exception, ValueError)
    message = str(cm.exception)
    self.assertStartsWith(message, '6 bad config values: ')
    for key in (
      'batch_size=0',
      'learning_rate=-1.0',
      'model.embed_dim=0',
      'model.dropout=1.5',
      'dataset.split=(1.0, 0.0, 0.0)',
      'log_every_steps=0',
    ):
      self.assertIn(f'config.{key} must', message)
    self.assertNotIn('\n', message)
    self.assertIn('. Fix them in the config file', message)
    self.assertEndsWith(message, '--config.<key>=<value>.')


if __name__ == '__main__':
  absltest.main()
