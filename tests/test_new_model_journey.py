"""A researcher's new model file: what the trainer refuses, and how it says so.

Each case is a small model that breaks one rule of DESIGN.md 2 as a first
draft might: logits `[batch, 1]` (broadcast against labels `[batch]` they
train a `[batch, batch]` loss), bfloat16 logits, a BatchNorm without the
pmap axis (each device keeps its own statistics), a constructor without
`axis_name` or `multi_field_dims`, a file without `Model`. The trainer must
refuse each before training, naming what to write; the shipped models must
all pass the same checks.
"""

from collections.abc import Sequence
import dataclasses
import functools
import os
import re
import sys
import tempfile
import types
from typing import Literal
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
from model_tables import MODEL_NAMES
from model_tables import TEST_KWARGS
from model_tables import TORCHFM_PARITY
import numpy as np

import batching
import config_check
from configs import default
from configs import fm as fm_config
import model_contract
import models
import sparse
import train
import utils

FIELD_DIMS = (5, 7)


class Draft(nn.Module):
  """An FM-like draft: the pairwise term of a table's rows, then `out`.

  Attributes:
    field_dims: number of ids of each field.
    multi_field_dims: number of ids of each multi-hot field (unused).
    num_dense: number of numeric fields (unused).
    out: 'logits' (right), 'column' (`[batch, 1]`), 'bfloat16',
      'train_column' (`[batch, 1]` in training mode only).
    batch_norm: None (no BatchNorm), 'synced' (over `axis_name`) or
      'unsynced' (no axis name).
    declared: read the table as `take_rows` does; otherwise with a plain
      gather, which the optimizers cannot see.
    axis_name: the pmap axis.
  """

  field_dims: Sequence[int]
  multi_field_dims: Sequence[int] = ()
  num_dense: int = 0
  out: str = 'logits'
  batch_norm: str | None = None
  declared: bool = True
  axis_name: str | None = None

  @nn.compact
  def __call__(self, ids, multi_ids=None, dense=None, *, train=False):
    offsets = np.concatenate([[0], np.cumsum(self.field_dims)[:-1]])
    table = self.param(
      'embedding', nn.initializers.normal(0.1), (sum(self.field_dims), 3)
    )
    rows = ids + offsets  # [B, F]
    v = table[rows]  # [B, F, D]
    if self.declared and not self.is_initializing():  # As take_rows does.
      self.sow('table_rows', 'embedding', rows)
      v = self.perturb('embedding', v)
    if self.batch_norm:
      axis = self.axis_name if self.batch_norm == 'synced' else None
      v = nn.BatchNorm(use_running_average=not train, axis_name=axis)(v)
    y = jnp.sum(v[:, 0] * v[:, 1], axis=-1)  # [B]
    if self.out == 'column' or (self.out == 'train_column' and train):
      return y[:, None]
    return y.astype(jnp.bfloat16 if self.out == 'bfloat16' else jnp.float32)


class NoAxisName(nn.Module):
  """A draft without the `axis_name` argument that the trainer passes."""

  field_dims: Sequence[int]

  @nn.compact
  def __call__(self, ids, *, train=False):
    return jnp.zeros(ids.shape[:1], jnp.float32)


class NoTrain(nn.Module):
  """A draft whose `__call__` takes no `train`, which the trainer passes."""

  field_dims: Sequence[int]
  axis_name: str | None = None

  @nn.compact
  def __call__(self, ids):
    return jnp.zeros(ids.shape[:1], jnp.float32)


class IdsOnly(nn.Module):
  """A draft without `multi_field_dims` and `num_dense`."""

  field_dims: Sequence[int]
  axis_name: str | None = None

  @nn.compact
  def __call__(self, ids, *, train=False):
    return jnp.zeros(ids.shape[:1], jnp.float32)


class Choices(nn.Module):
  """A draft whose string argument lists its names as a `Literal`."""

  field_dims: Sequence[int]
  interaction: Literal['matrixed', 'vectorized'] = 'matrixed'
  axis_name: str | None = None

  @nn.compact
  def __call__(self, ids, *, train=False):
    if self.interaction not in ('matrixed', 'vectorized'):
      raise ValueError(f'interaction {self.interaction!r}')
    return jnp.zeros(ids.shape[:1], jnp.float32)


class _ModulePatch:
  """`sys.modules[key] = module` while started; only that key is undone."""

  def __init__(self, key, module):
    self.key, self.module = key, module

  def start(self):
    self.old = sys.modules.get(self.key)
    sys.modules[self.key] = self.module

  def stop(self):
    if self.old is None:
      sys.modules.pop(self.key, None)
    else:
      sys.modules[self.key] = self.old


def _install(name, model):
  """Makes `models/<name>.py` seem to exist, its `Model` being `model`
  (None: a file without `Model`)."""
  module = types.ModuleType(f'models.{name}')
  if model is not None:
    module.Model = model
  names = models.names() + [name]
  # Not patch.dict(sys.modules): it would drop every module imported while
  # it is on (pandas' own, say), which a later test in the process needs.
  patches = [
    _ModulePatch(f'models.{name}', module),
    mock.patch.object(models, 'names', lambda: sorted(names)),
  ]
  for patch in patches:
    patch.start()
  return patches


def _config(name, **model):
  config = fm_config.get_config('smoke')
  config.model_name = name
  config.model = model
  config.optimizer = 'adam'
  return config


class NewModelJourneyTest(parameterized.TestCase):
  def use(self, model, name='draft'):
    for patch in _install(name, model):
      self.addCleanup(patch.stop)
    return name

  def initialise(self, config, **inputs):
    model = train.create_model(config, FIELD_DIMS, train.AXIS, **inputs)
    return train.state_initializer(config, model)

  def test_the_right_draft_trains_its_logits(self):
    # The control: the same file with float32 logits [batch] is accepted,
    # and its state initialises.
    name = self.use(Draft)
    state = self.initialise(_config(name))(jax.random.key(0))
    self.assertEqual(state.params['embedding'].shape, (12, 3))

  @parameterized.named_parameters(
    ('column', 'column', 'returned float32[2, 1]'),
    ('bfloat16', 'bfloat16', 'returned bfloat16[2]'),
  )
  def test_logits_of_another_shape_or_dtype_are_refused(self, out, got):
    name = self.use(Draft)
    with self.assertRaisesRegex(ValueError, 'float32 logits') as caught:
      self.initialise(_config(name, out=out))
    message = str(caught.exception)
    self.assertIn(got, message)
    self.assertIn('README.md: Models', message)
    self.assertNotIn('\n', message)

  def test_logits_of_another_shape_in_training_alone_are_refused(self):
    # Start-up traces the eval call alone (its cost counts in every run);
    # the train program's own trace checks the training mode's logits.
    name = self.use(Draft)
    config = _config(name, out='train_column')
    model = train.create_model(config, FIELD_DIMS, train.AXIS)
    state = train.state_initializer(config, model)(jax.random.key(0))
    batch = {
      'ids': np.zeros((4, len(FIELD_DIMS)), np.int32),
      'label': np.zeros(4, np.float32),
    }
    loss = functools.partial(train.loss_fn, model=model)
    told = r'train=True\) returned float32\[4, 1\]; .*float32 logits \[4\]'
    with self.assertRaisesRegex(model_contract.ContractError, told):
      jax.eval_shape(
        loss, state.params, state.batch_stats, batch, jax.random.key(0)
      )
    # A run stops on it in one line that names the file, before training.
    with tempfile.TemporaryDirectory() as workdir:
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      with self.assertRaises(utils.UserError) as caught:
        train.train_and_evaluate(config, os.path.join(workdir, 'run'))
      self.assertFalse(
        os.path.exists(os.path.join(workdir, 'run', 'metrics.jsonl'))
      )
    message = str(caught.exception)
    self.assertStartsWith(message, f'models/{name}.py: Model(...).apply(')
    self.assertIn('train=True) returned float32[', message)
    self.assertNotIn('\n', message)

  def test_a_batch_norm_without_the_axis_is_refused(self):
    name = self.use(Draft)
    with self.assertRaisesRegex(ValueError, 'BatchNorm') as caught:
      self.initialise(_config(name, batch_norm='unsynced'))
    message = str(caught.exception)
    self.assertIn('BatchNorm_0 (axis_name=None)', message)
    self.assertIn('axis_name=self.axis_name', message)
    # Synced over the trainer's axis, the same BatchNorm is accepted; and
    # under plain jax.jit (no axis) nothing is asked of it.
    self.initialise(_config(name, batch_norm='synced'))
    model = train.create_model(_config(name, batch_norm='unsynced'), FIELD_DIMS)
    inputs = batching.example_inputs(model)
    shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), train=False, **inputs)
    )
    model_contract.check(model, shapes, inputs)

  @parameterized.named_parameters(
    (o, o) for o in ('adam', 'lazy_adam', 'rowwise_adagrad')
  )
  def test_a_table_read_without_take_rows_is_refused(self, optimizer):
    # lazy_adam would have updated the undeclared table as a dense leaf,
    # every row, with no word (as 'auto' picks it on large tables).
    name = self.use(Draft)
    config = _config(name, declared=False)
    config.optimizer = optimizer
    with self.assertRaisesRegex(ValueError, 'not declared') as caught:
      self.initialise(config)
    message = str(caught.exception)
    self.assertStartsWith(message, 'embedding is read at the rows')
    self.assertIn('take_rows(table, rows, self', message)

  def test_a_model_without_axis_name_is_told_to_declare_it(self):
    name = self.use(NoAxisName)
    with self.assertRaisesRegex(ValueError, 'no argument axis_name') as caught:
      train.create_model(_config(name), FIELD_DIMS, train.AXIS)
    self.assertIn('`axis_name: str | None = None`', str(caught.exception))

  def test_a_call_without_train_is_told_to_declare_it(self):
    # It was a TypeError traceback from model.init(..., train=False).
    name = self.use(NoTrain)
    with self.assertRaisesRegex(ValueError, 'no argument `train`') as caught:
      train.create_model(_config(name), FIELD_DIMS, train.AXIS)
    self.assertIn('`train: bool = False`', str(caught.exception))
    self.assertNotIn('\n', str(caught.exception))

  def test_a_model_without_side_fields_is_told_when_the_data_has_them(self):
    name = self.use(IdsOnly)
    train.create_model(_config(name), FIELD_DIMS)  # Ids alone: accepted.
    with self.assertRaisesRegex(ValueError, 'no argument') as caught:
      train.create_model(
        _config(name), FIELD_DIMS, multi_field_dims=(4,), num_dense=1
      )
    message = str(caught.exception)
    self.assertIn('multi_field_dims or num_dense', message)
    self.assertIn('`multi_field_dims: Sequence[int] = ()`', message)
    self.assertIn('`num_dense: int = 0`', message)

  def test_a_file_without_model_is_told_to_end_with_it(self):
    name = self.use(None)
    told = r'models/draft.py must end with `Model = <ClassName>`'
    with self.assertRaisesRegex(ValueError, told):
      train.create_model(_config(name), FIELD_DIMS)
    # The config file's own call, which a run makes first.
    with self.assertRaisesRegex(ValueError, told):
      default.with_model_arguments(_config(name))

  def test_a_literal_annotation_is_the_config_rule_of_a_string(self):
    # Before, config_check.MODEL had to learn each new string argument by
    # hand (a test insists), or a bad value passed the config check and
    # stopped the run only after the data had loaded.
    name = self.use(Choices)
    config = _config(name, interaction='bogus')
    with self.assertRaises(config_check.ConfigError) as caught:
      config_check.validate_config(config)
    self.assertIn(
      "config.model.interaction='bogus' must be one of matrixed, vectorized",
      str(caught.exception),
    )
    config.model.interaction = 'vectorized'
    config_check.validate_config(config)
    # The rule the every-model test of tests/test_config_validation.py reads.
    field = {f.name: f for f in dataclasses.fields(Choices)}['interaction']
    rule = config_check.model_rule(field)
    self.assertIsNone(rule('matrixed'))
    self.assertEqual(rule('no-such-name'), 'one of matrixed, vectorized')

  @parameterized.named_parameters((n, n) for n in MODEL_NAMES)
  def test_every_shipped_model_keeps_the_contract(self, name):
    module = model_contract.model_class(name)
    # With multi-hot and numeric fields: their tables are read by ids too.
    model = module(
      field_dims=(4, 6, 5),
      multi_field_dims=(3, 4),
      num_dense=2,
      axis_name='batch',
      **TEST_KWARGS[name],
    )
    inputs = batching.example_inputs(model)
    shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), train=False, **inputs)
    )
    tables = model_contract.check(model, shapes, inputs)
    self.assertNotEmpty(tables)
    # Its one trace finds the tables that a trace of its own would.
    self.assertEqual(
      tables, sparse.declared_tables(model.apply, shapes, **inputs)
    )


class EquationTestTest(absltest.TestCase):
  def test_every_model_names_an_equation_test_that_exists(self):
    # tests/test_model_parity.py checks the files of TORCHFM_PARITY's
    # entries that start with 'tests/'; a model without a pytorch-fm
    # counterpart says 'none: ...; brute force in tests/test_model_<name>.py'
    # and the file it names was never looked for: a new model's entry
    # passed every test with no test of its equation.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    self.assertEqual(sorted(TORCHFM_PARITY), MODEL_NAMES)
    for name, where in TORCHFM_PARITY.items():
      with self.subTest(name):
        paths = re.findall(r'tests/\S+\.py', where)
        self.assertNotEmpty(paths, f'{name}: {where!r} names no test file')
        for path in paths:
          self.assertTrue(
            os.path.exists(os.path.join(root, path)),
            f'{name}: {path} does not exist; write it (numpy brute force of'
            ' the equation, as tests/test_model_fwfm.py) or name the test'
            ' that checks the model in tests/model_tables.py TORCHFM_PARITY',
          )


if __name__ == '__main__':
  absltest.main()
