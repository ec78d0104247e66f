"""The row-wise optimizers on every model's config, against brute force.

For each config in configs/ (and variants that move a table's rows: NCF's
GMF table with the item field first, W&D with a cross, and both on eight
fields), the tables that the optimizer takes as rows are those that the
batches read. On a case of each table path, each of two steps of the run's
own train program with 'lazy_adam' or 'rowwise_adagrad' (on some cases
both; the second step at plateau-reduced rates) is checked against a
float64 numpy step computed from the DENSE gradient
(`jax.grad` over every parameter, tables whole): the tables' rows that the
batch's ids name, and only those, take the step, their moments or
accumulators with them; every other leaf takes dense Adam with L2. The
tables and their rows are written out here from the ids, not read from the
models' declarations. The batches hold duplicate ids, every field's OOV id
(its last), multi-hot lists padded with -1 (one empty) and numeric fields;
the trainer never pads a training batch (batching.train_rows drops the
remainder). The same steps on 2 devices (pmap) must equal 1 device's
(on a few cases).

A run stopped after an epoch and resumed must end with the parameters and
optimizer state, bit for bit, of one never stopped; a resume that changes
the optimizer or its rates is refused.
"""

import functools
import importlib
import json
import os
import tempfile
from unittest import mock

from absl import logging
from absl.testing import absltest
from absl.testing import parameterized
import dataset_testing
from flax import jax_utils
from flax import traverse_util
import jax
import numpy as np
import optax

import checkpoints
from configs import deepfm
import models
import optim
import train
import utils

FIELD_DIMS = (5, 4, 6)  # OOV ids 4, 3, 5; rows 0-4, 5-8, 9-14.
MULTI_FIELD_DIMS = (3, 5)  # OOV ids 2, 4; rows 0-2, 3-7.
NUM_DENSE = 2
# Two global batches of 8 (4 per device on 2), each id of a field read
# several times, OOV ids included. Unread one-hot rows: 1, 3 (field 0), 5,
# 7 (field 1), 10, 12, 13 (field 2) in the first; others in the second.
# In the first, device 1 alone reads field 0's id 4 and field 2's id 2.
IDS = (
  np.array(
    [
      [[0, 1, 0], [2, 3, 5], [0, 1, 5], [2, 3, 0]],
      [[4, 1, 2], [0, 3, 5], [4, 1, 2], [2, 3, 0]],
    ],
    np.int32,
  ).reshape(8, 3),
  np.array(
    [
      [[1, 0, 4], [3, 2, 4], [1, 0, 1], [3, 2, 3]],
      [[1, 2, 4], [3, 0, 1], [4, 2, 3], [1, 0, 5]],
    ],
    np.int32,
  ).reshape(8, 3),
)
# Multi-hot lists padded with -1 (empty ones, duplicates in some). Unread:
# field 0's id 1 and field 1's ids 0, 2 in the first; field 0's id 0 and
# field 1's id 3 in the second.
MULTI_IDS = (
  np.array(
    [
      [[0, 2, -1], [1, -1, -1]],
      [[2, 2, -1], [-1, -1, -1]],
      [[0, -1, -1], [4, 3, -1]],
      [[2, 0, 2], [1, 4, 3]],
      [[0, -1, -1], [3, -1, -1]],
      [[2, -1, -1], [4, -1, -1]],
      [[0, 2, -1], [1, 1, -1]],
      [[-1, -1, -1], [3, -1, -1]],
    ],
    np.int32,
  ),
  np.array(
    [
      [[1, 2, -1], [0, 2, -1]],
      [[1, -1, -1], [-1, -1, -1]],
      [[2, 1, -1], [4, 0, 2]],
      [[2, -1, -1], [2, -1, -1]],
      [[1, 1, -1], [0, -1, -1]],
      [[-1, -1, -1], [4, -1, -1]],
      [[2, -1, -1], [1, 2, -1]],
      [[1, 2, 1], [0, -1, -1]],
    ],
    np.int32,
  ),
)
LABELS = np.array([1, 0, 0, 1, 1, 1, 0, 0], np.float32)
# Eight one-hot fields and no others: the tables that some models read
# only through a flattening reshape are gathered apart (take_rows). Random
# ids, the first example's all OOV.
WIDE_FIELD_DIMS = (9, 8, 7, 4, 6, 8, 5, 7)
WIDE_IDS = tuple(
  np.concatenate(
    [
      [np.array(WIDE_FIELD_DIMS) - 1],
      np.random.default_rng(i).integers(0, WIDE_FIELD_DIMS, (7, 8)),
    ]
  ).astype(np.int32)
  for i in (0, 1)
)

CONFIGS = sorted(
  name[:-3]
  for name in os.listdir(os.path.join(os.path.dirname(__file__), '../configs'))
  if name.endswith('.py') and name not in ('__init__.py', 'default.py')
)
# Variants whose tables' rows are not the one-hot table's: name ->
# (config, model arguments over the config's).
VARIANTS = {
  'ncf_item_field_first': ('ncf', {'user_field_idx': 1, 'item_field_idx': 0}),
  'wd_cross': ('wd', {'cross_fields': ((0, 2),)}),  # 30 rows: not hashed.
  # Their MLP's tables gathered apart, on WIDE_FIELD_DIMS.
  'ncf_eight_fields': ('ncf', {}),
  'wd_eight_fields': ('wd', {}),
}
WIDE = ('ncf_eight_fields', 'wd_eight_fields')
ROWWISE_CASES = (
  'afn',  # The largest rounding.
  'deepfm',
  'fm',
  'ncf_item_field_first',
  'wd_cross',
  'wd_eight_fields',
)
# The steps: each table path on one optimizer at least, through the blocks
# that the model files copy verbatim (tests/test_model_contract.py); the
# rows that a step updates are the same code for both rules. rowwise_adagrad
# on ROWWISE_CASES: FeaturesEmbedding with multi-hot and numeric rows and
# BatchNorm (fm, deepfm), NCF's GMF table item first, a cross, the tables
# gathered apart (take_rows). lazy_adam: FeaturesLinear alone (lr),
# FieldAwareEmbedding (ffm), NCF's own names, FinalMLP's context tables
# without a linear term, NCF gathered apart, and fm and deepfm. The other
# cases' tables, against brute force, in
# test_every_case_declares_the_tables_its_batches_read.
LAZY_ADAM_CASES = (
  'deepfm',
  'ffm',
  'finalmlp',
  'fm',
  'lr',
  'ncf',
  'ncf_eight_fields',
)
# 2 devices: each rowwise_adagrad case, and lazy_adam on one (the exchange
# of rows comes before the rule, the same code for both).
TWO_DEVICE_CASES = frozenset(
  [(c, 'rowwise_adagrad') for c in ROWWISE_CASES] + [('fm', 'lazy_adam')]
)
# The models without the linear term's tables (FeaturesLinear).
NO_LINEAR = ('dcn', 'dcnv2', 'finalmlp', 'fwfm', 'ncf', 'pnn')
B1, B2, EPS = 0.9, 0.999, 1e-8
# The config of each batch's rates: the second after two epochs without a
# better validation AUC at a plateau factor of 0.5 (the trainer's only
# schedule): both learning rates halved twice, as arguments of the program.
RATES = (
  lambda config: config,
  lambda config: optim.on_plateau(config, optim.plateau_scale(0.5, config)),
)


def _offsets(dims):
  return np.concatenate([[0], np.cumsum(dims)[:-1]]).astype(np.int32)


def _config(case, optimizer):
  name, overrides = VARIANTS.get(case, (case, {}))
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  for key in ('dropout', 'dropouts'):  # 2 devices draw other masks.
    if key in config.model:
      value = config.model[key]
      config.model[key] = 0.0 if isinstance(value, float) else (0.0,) * 2
  config.model.update(overrides)
  config.optimizer = optimizer
  # Steps of ~learning_rate, far above float32 rounding; the tables' own
  # L2 coefficient, so that a row decayed as a dense leaf would show.
  config.learning_rate = 0.05
  config.table_learning_rate = 0.3
  config.weight_decay = 0.1
  config.table_weight_decay = 0.4
  config.lr_plateau_factor = 0.5
  return config


def _tables(config, batch, field_dims):
  """Brute force: each table's path and the rows that `batch` reads."""
  name, ids = config.model_name, batch['ids']
  one_hot = set((ids + _offsets(field_dims)).reshape(-1).tolist())
  multi = batch.get('multi_ids')
  if multi is not None:
    rows = multi + _offsets(MULTI_FIELD_DIMS)[:, None]
    multi = set(rows[multi >= 0].tolist())
  out = {}
  if name != 'lr':
    embedding = {
      'ffm': 'FieldAwareEmbedding_0',
      'fnfm': 'FieldAwareEmbedding_0',
      'ncf': 'embedding',
    }.get(name, 'FeaturesEmbedding_0')
    out[(embedding, 'embedding')] = one_hot
    if multi is not None:
      out[(embedding, 'multi_embedding')] = multi
  if name not in NO_LINEAR:
    out[('FeaturesLinear_0', 'weight')] = one_hot
    if multi is not None:
      out[('FeaturesLinear_0', 'multi_weight')] = multi
  if name == 'ncf' and not config.model.shared_embedding:
    fields = [config.model.user_field_idx, config.model.item_field_idx]
    rows = ids[:, fields] + _offsets([field_dims[f] for f in fields])
    out[('gmf_embedding', 'embedding')] = set(rows.reshape(-1).tolist())
  if name == 'finalmlp':
    for k in (1, 2):
      fields = sorted(config.model[f'fs{k}_context'])
      if fields:
        rows = ids[:, fields] + _offsets([field_dims[f] for f in fields])
        path = (f'fs{k}_context_embedding', 'embedding')
        out[path] = set(rows.reshape(-1).tolist())
  for f, g in config.model.get('cross_fields', ()):
    rows = ids[:, f] * field_dims[g] + ids[:, g]  # One cross: from row 0.
    out[('CrossProductLinear_0', 'weight')] = set(rows.tolist())
  return out


def _batch(i, wide=False):
  """Batch `i` of the case's inputs: WIDE_IDS alone, or three one-hot,
  two multi-hot and two numeric fields."""
  if wide:
    return {'ids': WIDE_IDS[i], 'label': LABELS[::-1] if i else LABELS}
  dense = np.linspace(-1.5, 2, 16, dtype=np.float32).reshape(8, 2)
  return {
    'ids': IDS[i],
    'multi_ids': MULTI_IDS[i],
    'dense': dense[::-1] if i else dense,
    'label': LABELS[::-1] if i else LABELS,
  }


def _model(config, wide, axis_name=None):
  if wide:
    return train.create_model(config, WIDE_FIELD_DIMS, axis_name)
  return train.create_model(
    config,
    FIELD_DIMS,
    axis_name,
    multi_field_dims=MULTI_FIELD_DIMS,
    num_dense=NUM_DENSE,
  )


def _initial_state(config, wide):
  """The train state from step 5, its parameters moved off their initial
  values (zeros among them) and its moments random: a row's parameters and
  state that a step should not touch would move if stepped.
  """
  model = _model(config, wide, train.AXIS)
  state = train.state_initializer(config, model)(jax.random.key(0))
  rng = np.random.default_rng(0)

  def normal(x, scale=0.5):
    return (x + scale * rng.standard_normal(x.shape)).astype(x.dtype)

  def positive(x):
    return rng.uniform(0.01, 0.1, x.shape).astype(x.dtype)

  opt_state = state.opt_state
  fields = {'mu': normal, 'nu': positive, 'accumulator': positive}
  # Parameters near a model's own initial scale: far larger ones (of 0.5
  # everywhere) make logits of 1e4, whose float32 rounding moves a step.
  params = jax.tree.map(functools.partial(normal, scale=0.1), state.params)
  opt_state = opt_state._replace(
    count=np.int32(5),
    **{
      k: jax.tree.map(fields[k], getattr(opt_state, k))
      for k in opt_state._fields
      if k in fields
    },
  )
  # On the host: the train program donates the copies it is given.
  return jax.device_get(
    state.replace(step=5, params=params, opt_state=opt_state)
  )


def _stepper(config, wide):
  """`steps(state, which, num_devices)`: `state` after one dispatch of the
  run's train program for each `i` in `which`, of `_batch(i)` at the rates
  of `RATES[i]`, on `num_devices` devices; every device's copy returned."""
  model = _model(config, wide, train.AXIS)
  p_train_step, _ = train.pmapped_steps(model, config)

  def steps(state, which, num_devices):
    devices = jax.local_devices()[:num_devices]
    replicate = functools.partial(jax_utils.replicate, devices=devices)
    state = replicate(state)
    count = replicate(np.int32(1))
    for i in which:
      batch = _batch(i, wide)
      hyper = replicate(train.hyperparameters(RATES[i](config)))
      stack = {
        k: v.reshape((num_devices, 1, -1) + v.shape[1:])
        for k, v in batch.items()
      }
      state, _ = p_train_step(state, stack, hyper, None, count)
    return jax.device_get(state)

  return steps


@functools.cache
def _dense_grads(case):
  """`grads(state, batch)`: `jax.grad` of the train loss over every
  parameter, tables whole; one compiled program for both optimizers."""
  model = _model(_config(case, 'adam'), case in WIDE)
  rng = jax.random.key(0)  # No dropout: the key is not read.

  @jax.jit
  def grads(params, batch_stats, batch):
    return jax.grad(
      lambda p: train.loss_fn(p, batch_stats, batch, rng, model=model)[0]
    )(params)

  return lambda state, batch: grads(state.params, state.batch_stats, batch)


def _flat(tree):
  return {
    k: np.asarray(v, np.float64)
    for k, v in traverse_util.flatten_dict(tree).items()
    if not isinstance(v, optax.MaskedNode)
  }


def _numpy_step(config, grads, state, read):
  """Brute force in float64: the new params and each state field, flat.

  Tables (the paths of `read`): lazy Adam or row-wise Adagrad on the rows
  read alone, with `table_weight_decay`; bias correction by the global
  step count. Every other leaf: Adam with `weight_decay`, every element.
  """
  lr, wd, table_wd = (
    config.learning_rate,
    config.weight_decay,
    config.table_weight_decay,
  )
  opt_state = state.opt_state
  count = int(opt_state.count) + 1
  p, g = _flat(state.params), _flat(grads)
  out = {k: _flat(getattr(opt_state, k)) for k in ('mu', 'nu')}
  mu, nu = out['mu'], out['nu']
  if config.optimizer == 'rowwise_adagrad':
    out['accumulator'] = acc = _flat(opt_state.accumulator)

  def adam(key, r, decay):
    gr = g[key][r] + decay * p[key][r]
    mu[key][r] = B1 * mu[key][r] + (1 - B1) * gr
    nu[key][r] = B2 * nu[key][r] + (1 - B2) * gr**2
    m_hat = mu[key][r] / (1 - B1**count)
    v_hat = nu[key][r] / (1 - B2**count)
    p[key][r] = p[key][r] - lr * m_hat / (np.sqrt(v_hat) + EPS)

  for key in p:
    if key not in read:
      adam(key, Ellipsis, wd)
      continue
    for r in sorted(read[key]):
      if config.optimizer == 'lazy_adam':
        adam(key, r, table_wd)
      else:
        gr = g[key][r] + table_wd * p[key][r]
        acc[key][r] += np.mean(gr**2)
        step = config.table_learning_rate / (np.sqrt(acc[key][r]) + EPS)
        p[key][r] = p[key][r] - step * gr
  return p, out


def _max_difference(got, want):
  """The largest absolute difference between two trees' leaves."""
  return max(
    float(np.abs(np.float64(a) - np.float64(b)).max(initial=0))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  )


class EveryModelTest(parameterized.TestCase):
  def test_every_config_and_variant_is_a_case(self):
    names = {importlib.import_module(f'configs.{c}') for c in CONFIGS}
    built = {m.get_config().model_name for m in names}
    self.assertEqual(built, set(models.names()))

  # Every case: the optimizer's tables are those that brute force finds
  # read (shapes only: nothing compiles). A table read otherwise than
  # through the copied blocks is refused per model by model_contract.check
  # (tests/test_new_model_journey.py).
  @parameterized.parameters(*CONFIGS, *sorted(VARIANTS))
  def test_every_case_declares_the_tables_its_batches_read(self, case):
    wide = case in WIDE
    field_dims = WIDE_FIELD_DIMS if wide else FIELD_DIMS
    for optimizer in ('lazy_adam', 'rowwise_adagrad'):
      config = _config(case, optimizer)
      init = train.state_initializer(config, _model(config, wide, train.AXIS))
      tx = jax.eval_shape(init, jax.random.key(0)).tx
      for i in (0, 1):
        read = _tables(config, _batch(i, wide), field_dims)
        self.assertEqual(set(optim.tables_of(tx)), set(read), (optimizer, i))

  # The steps on LAZY_ADAM_CASES and ROWWISE_CASES; 2 devices on
  # TWO_DEVICE_CASES (the suite's time: each compiles its programs).
  @parameterized.parameters(
    *((case, 'lazy_adam') for case in LAZY_ADAM_CASES),
    *((case, 'rowwise_adagrad') for case in ROWWISE_CASES),
  )
  def test_steps_match_brute_force_and_two_devices_one(self, case, optimizer):
    config = _config(case, optimizer)
    wide = case in WIDE
    state = start = _initial_state(config, wide)
    field_dims = WIDE_FIELD_DIMS if wide else FIELD_DIMS
    batches = [_batch(i, wide) for i in (0, 1)]
    read = [_tables(config, batch, field_dims) for batch in batches]
    self.assertEqual(set(optim.tables_of(state.tx)), set(read[0]))
    steps, dense_grads = _stepper(config, wide), _dense_grads(case)
    worst = []  # Of each step: params, then state.
    for i in (0, 1):
      grads = dense_grads(state, batches[i])
      rates = RATES[i](config)
      want_p, want_state = _numpy_step(rates, grads, state, read[i])
      after = jax.tree.map(lambda x: x[0], steps(state, [i], 1))
      self.assertEqual(
        int(after.opt_state.count), int(state.opt_state.count) + 1
      )
      got_p = _flat(after.params)
      self.assertEqual(set(got_p), set(want_p))
      # The two programs' float32 gradients differ by rounding (~1e-7
      # relative), which Adagrad's steps of up to table_learning_rate carry
      # to ~1e-6 (AFN: 8.7e-7). A row missed, decayed at the other rate or
      # stepped at another learning rate is off by 1e-3 or more.
      for key, want in want_p.items():
        np.testing.assert_allclose(
          got_p[key], want, rtol=2e-5, atol=5e-6, err_msg=f'{i} {key}'
        )
      for field, leaves in want_state.items():
        got = _flat(getattr(after.opt_state, field))
        self.assertEqual(set(got), set(leaves))
        for key, want in leaves.items():
          np.testing.assert_allclose(
            got[key], want, rtol=2e-5, atol=1e-6, err_msg=f'{i} {field} {key}'
          )
      worst.append(_max_difference(got_p, want_p))
      got_state = {f: _flat(getattr(after.opt_state, f)) for f in want_state}
      worst.append(_max_difference(got_state, want_state))
      # The rows not read, parameters and state alike: bit for bit.
      fields = ('params', *want_state)
      for field in fields:
        if field == 'params':
          was, now = _flat(state.params), got_p
        else:
          was = _flat(getattr(state.opt_state, field))
          now = _flat(getattr(after.opt_state, field))
        for key, rows in read[i].items():
          if key not in was:
            continue
          unread = sorted(set(range(was[key].shape[0])) - rows)
          self.assertTrue(unread, key)
          np.testing.assert_array_equal(
            now[key][unread], was[key][unread], err_msg=f'{i} {field} {key}'
          )
      state = after
    logging.info(
      '%s %s: largest |difference| from brute force: params %.3g, %.3g,'
      ' state %.3g, %.3g (steps 1, 2)',
      case,
      optimizer,
      *worst[::2],
      *worst[1::2],
    )
    if (case, optimizer) not in TWO_DEVICE_CASES:
      return
    # Both steps on 2 devices, each with half of each batch.
    one = jax.tree.map(lambda x: x[0], steps(start, (0, 1), 1))
    two = steps(start, (0, 1), 2)
    for leaf in jax.tree.leaves(two):
      np.testing.assert_array_equal(leaf[0], leaf[1])
    two = jax.tree.map(lambda x: x[0], two)
    # Summed in another order: as far apart as from brute force (AFN 8.2e-7).
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=5e-6),
      (two.params, two.opt_state, two.batch_stats),
      (one.params, one.opt_state, one.batch_stats),
    )
    logging.info(
      '%s %s: 2 devices from 1: %.3g',
      case,
      optimizer,
      _max_difference(two, one),
    )


class ResumeTest(parameterized.TestCase):
  def _run(self, root, name, config, num_epochs):
    config = config.copy_and_resolve_references()
    config.num_epochs = num_epochs
    return train.train_and_evaluate(config, os.path.join(root, name))

  def _latest(self, root, name, epoch):
    """The latest checkpoint of `epoch`, as saved: state and meta."""
    directory = os.path.join(root, name, 'checkpoints', 'latest')
    manager = checkpoints.manager(directory, read_only=True)
    try:
      state, meta = checkpoints.restore(manager, epoch)
    finally:
      manager.close()
    del meta['wall_time']
    return state, meta

  # Dense Adam's resume ('auto' on small tables), BatchNorm and dropout
  # with it, is tests/test_knobs_invariance.py's.
  @parameterized.parameters('lazy_adam', 'rowwise_adagrad')
  def test_a_resumed_run_takes_the_steps_of_one_never_stopped(self, optimizer):
    # Criteo-shaped lines with min_count 2: 39 fields (take_rows gathers
    # apart from 8), an OOV id in each; DeepFM with dropout and BatchNorm;
    # a plateau factor, so that the learning rates' scale is state too:
    # each epoch's validation AUC is made lower than the one before, so the
    # run stopped after epoch 2 goes on at half the rates. Epochs of 15
    # steps in dispatches of 4: a remainder first.
    evaluate = train.evaluate

    def worse_each_epoch(p_eval_step, state, split, batch_size):
      metrics = evaluate(p_eval_step, state, split, batch_size)
      return dict(metrics, auc=1 / (1 + int(np.asarray(state.step)[0])))

    self.enter_context(mock.patch.object(train, 'evaluate', worse_each_epoch))
    with tempfile.TemporaryDirectory() as root:
      path = dataset_testing.write_lines(
        os.path.join(root, 'train.txt'), dataset_testing.criteo_rows(1200), '\t'
      )
      config = deepfm.get_config('smoke')
      config.dataset.name = 'criteo'
      config.dataset.path = path
      config.dataset.min_count = 2
      config.dataset.cache_dir = os.path.join(root, 'cache')
      config.model.update(embed_dim=4, mlp_dims=(8,), dropout=0.2)
      config.update(
        optimizer=optimizer,
        batch_size=64,
        steps_per_dispatch=4,
        learning_rate=0.01,
        table_learning_rate=0.1,
        table_weight_decay=1e-4,
        lr_plateau_factor=0.5,
        patience=3,
        progress_bar=False,
      )
      whole = self._run(root, 'whole', config, 3)
      self._run(root, 'resumed', config, 2)
      self.assertEqual(self._latest(root, 'resumed', 2)[1]['lr_scale'], 0.5)
      resumed = self._run(root, 'resumed', config, 3)
      self.assertEqual(resumed, whole)
      want, want_meta = self._latest(root, 'whole', 3)
      got, got_meta = self._latest(root, 'resumed', 3)
      # Another optimizer, learning rate, weight decay or plateau factor
      # would not continue the run: refused, in one line naming the key.
      # (table_learning_rate only where the optimizer reads it: see
      # test_workdir.)
      other = 'adam'
      reads_table_rate = optimizer == 'rowwise_adagrad'
      for key, value in (
        ('optimizer', other),
        ('learning_rate', 0.02),
        *[('table_learning_rate', 0.2)] * reads_table_rate,
        ('weight_decay', 1e-5),
        ('table_weight_decay', None),
        ('lr_plateau_factor', 0.1),
      ):
        changed = config.copy_and_resolve_references()
        changed[key] = value
        with self.assertRaises(utils.UserError) as refused:
          self._run(root, 'resumed', changed, 4)
        message = str(refused.exception)
        self.assertNotIn('\n', message)
        self.assertIn(f': {key} ', message)
        self.assertIn(f' -> {json.dumps(value)} (recorded in ', message)
    self.assertEqual(got_meta, want_meta)
    self.assertEqual(set(got), {'step', 'params', 'opt_state', 'batch_stats'})
    self.assertGreater(int(got['step']), 0)
    jax.tree.map(np.testing.assert_array_equal, got, want)


if __name__ == '__main__':
  absltest.main()
