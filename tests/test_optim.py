"""Tests of optim.py: the row-wise optimizers against brute force in numpy,
against dense Adam, on 1 and 2 devices, and through a checkpoint."""

import functools
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from flax import jax_utils
from flax import traverse_util
import jax
import numpy as np
import optax

import checkpoints
from configs import default
import optim
import sparse
import train

FIELD_DIMS = (3, 4)  # 7 table rows.
NUM_ROWS = sum(FIELD_DIMS)
# Two batches of 4 that touch every row: ids of field 0 in [0, 3), field 1
# in [0, 4); rows = ids + (0, 3).
ALL_ROWS = np.array([[0, 0], [1, 1], [2, 2], [0, 3]], np.int32)
ALL_ROWS_2 = np.array([[2, 3], [1, 0], [0, 2], [1, 1]], np.int32)
# Rows 0, 1 (field 0) and 3, 5 (field 1), each read twice; rows 2, 4 and 6
# stay untouched.
SOME_ROWS = np.array([[0, 0], [1, 2], [0, 2], [1, 0]], np.int32)
# Field 1's ids 5 and 9 are rows 8 and 12, past the table's 7: each reads
# its last row, 6 (the gather clips). ALL_ROWS with [0, 5]: every row read,
# row 6 only so; SOME_ROWS with [0, 9]: rows 2 and 4 untouched.
ALL_ROWS_PAST_END = np.array([[0, 0], [1, 1], [2, 2], [0, 5]], np.int32)
SOME_ROWS_PAST_END = np.array([[0, 0], [1, 2], [0, 9], [1, 0]], np.int32)
LABELS = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
SPARSE = ('lazy_adam', 'rowwise_adagrad')


def _config(model_name='fm', optimizer='lazy_adam', **overrides):
  config = default.get_config()
  config.model_name = model_name
  config.model = {'embed_dim': 3}
  if model_name == 'ncf':
    # GMF's table holds the item field first: its rows are not the shared
    # table's.
    config.model = {
      'embed_dim': 3,
      'mlp_dims': (4,),
      'dropout': 0.0,
      'user_field_idx': 1,
      'item_field_idx': 0,
    }
  elif model_name == 'afm':
    config.model = {'embed_dim': 3, 'attn_size': 2, 'dropouts': (0.0, 0.0)}
  elif model_name == 'deepfm':
    config.model = {'embed_dim': 3, 'mlp_dims': (4,), 'dropout': 0.0}
  config.optimizer = optimizer
  config.learning_rate = 0.05
  config.table_learning_rate = 0.03  # rowwise_adagrad's, on the tables.
  config.weight_decay = 0.1
  config.update(overrides)
  return config


def _setup(config, num_devices=1, field_dims=FIELD_DIMS):
  model = train.create_model(config, field_dims, axis_name=train.AXIS)
  state = train.state_initializer(config, model)(jax.random.key(0))
  devices = jax.local_devices()[:num_devices]
  p_step = jax.pmap(
    functools.partial(train.train_step, model=model, config=config),
    axis_name=train.AXIS,
    devices=devices,
  )
  hyper = jax_utils.replicate(train.hyperparameters(config), devices=devices)
  return model, state, lambda state, batch: p_step(state, batch, hyper)


def _run(step, state, batches, num_devices=1):
  """`state` after one step per global batch; all replicas returned."""
  replicated = jax_utils.replicate(
    state, devices=jax.local_devices()[:num_devices]
  )
  for ids, labels in batches:
    batch = {
      'ids': ids.reshape(num_devices, -1, ids.shape[1]),
      'label': labels.reshape(num_devices, -1),
    }
    replicated, _ = step(replicated, batch)
  return jax.device_get(replicated)


def _first(tree):
  return jax.tree.map(lambda x: x[0], tree)


def _rows_read(model_name, ids):
  """Brute force: the table rows that `ids` read, per table path (a row
  past a table's end reads its last row)."""

  def read(rows):
    return set(np.minimum(rows, NUM_ROWS - 1).reshape(-1).tolist())

  rows = read(ids + [0, FIELD_DIMS[0]])
  if model_name == 'ncf':
    gmf = ids[:, [1, 0]] + [0, FIELD_DIMS[1]]  # Item field first.
    return {
      ('embedding', 'embedding'): rows,
      ('gmf_embedding', 'embedding'): read(gmf),
    }
  return {
    ('FeaturesLinear_0', 'weight'): rows,
    ('FeaturesEmbedding_0', 'embedding'): rows,
  }


def _numpy_step(optimizer, grads, state, read, config):
  """Brute force in float64, row by row on the tables.

  Args:
    optimizer: 'lazy_adam' or 'rowwise_adagrad', or 'adam' with every row
      of each table in `read`.
    grads: the dense gradient of every leaf (`jax.grad`).
    state: the train state before the step.
    read: the rows each table read (`_rows_read`).
    config: `learning_rate`, `table_learning_rate`, `weight_decay` and
      `table_weight_decay`.

  Returns:
    Flat dicts (by path) of the new params and of each state field.
  """
  lr, wd = config.learning_rate, config.weight_decay
  table_wd = (
    wd if config.table_weight_decay is None else config.table_weight_decay
  )
  b1, b2, eps = 0.9, 0.999, 1e-8
  # 'adam' is optax's chain: (the decay's empty state, (Adam's, the rate's)).
  adam_state = state.opt_state[1][0] if optimizer == 'adam' else None
  opt_state = adam_state or state.opt_state
  count = int(opt_state.count) + 1
  flat = lambda tree: {  # noqa: E731
    k: np.array(v, np.float64)
    for k, v in traverse_util.flatten_dict(tree).items()
    if not isinstance(v, optax.MaskedNode)
  }
  p, g = flat(state.params), flat(grads)
  mu, nu = flat(opt_state.mu), flat(opt_state.nu)
  acc = {}
  if optimizer == 'rowwise_adagrad':
    acc = flat(state.opt_state.accumulator)

  def adam(key, r):
    gr = g[key][r] + (table_wd if key in read else wd) * p[key][r]
    mu[key][r] = b1 * mu[key][r] + (1 - b1) * gr
    nu[key][r] = b2 * nu[key][r] + (1 - b2) * gr**2
    m_hat = mu[key][r] / (1 - b1**count)
    v_hat = nu[key][r] / (1 - b2**count)
    p[key][r] = p[key][r] - lr * m_hat / (np.sqrt(v_hat) + eps)

  for key in p:
    if key not in read:
      adam(key, Ellipsis)  # Dense leaves: every element at once.
      continue
    for r in sorted(read[key]):
      if optimizer in ('adam', 'lazy_adam'):
        adam(key, r)
      else:
        gr = g[key][r] + table_wd * p[key][r]
        acc[key][r] += np.mean(gr**2)
        step = config.table_learning_rate / (np.sqrt(acc[key][r]) + eps)
        p[key][r] = p[key][r] - step * gr
  return p, {'mu': mu, 'nu': nu, 'accumulator': acc}


def _before_batch_norm(path, flat_params):
  """Whether `path` is the bias of a Dense layer that BatchNorm follows.

  Its gradient is zero up to rounding, which Adam blows up to full steps:
  its value is noise, different in any two computations.
  """
  norm = path[:-2] + (path[-2].replace('Dense', 'BatchNorm'), 'scale')
  return path[-1] == 'bias' and norm in flat_params


@functools.cache
def _grad_program(model):
  """One compiled `jax.grad` of the train loss per model, for every call."""

  def loss(params, batch_stats, batch):
    return train.loss_fn(
      params, batch_stats, batch, jax.random.key(0), model=model
    )[0]

  return jax.jit(jax.grad(loss))


def _dense_grads(config, state, ids):
  """`jax.grad` of the train step's loss over whole tables, one device."""
  model = train.create_model(config, FIELD_DIMS)
  batch = {'ids': ids, 'label': LABELS}
  return _grad_program(model)(state.params, state.batch_stats, batch)


class TableWeightDecayTest(parameterized.TestCase):
  def test_the_tables_get_their_own_coefficient(self):
    params = {
      'table': {'embedding': np.full((3, 2), 2.0, np.float32)},
      'dense': {'kernel': np.full((2,), 3.0, np.float32)},
    }
    grads = jax.tree.map(np.ones_like, params)
    tables = frozenset({('table', 'embedding')})
    tx = optim.add_decayed_weights(0.1, 0.5, tables)
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates['table']['embedding'], 1 + 0.5 * 2)
    np.testing.assert_allclose(updates['dense']['kernel'], 1 + 0.1 * 3)
    # None: optax's own, one coefficient; the state is empty either way.
    same, plain_state = optim.add_decayed_weights(0.1, None, tables).update(
      grads, optax.EmptyState(), params
    )
    np.testing.assert_allclose(same['table']['embedding'], 1 + 0.1 * 2)
    self.assertEqual(state, plain_state)

  @parameterized.parameters('fm', 'deepfm')
  def test_dense_adam_steps_match_brute_force(self, model_name):
    config = _config(model_name, 'adam', table_weight_decay=0.5)
    _, state, step = _setup(config)
    tables = frozenset(_rows_read(model_name, ALL_ROWS))
    self.assertEqual(optim.model_tables_of(state.tx), tables)
    self.assertEqual(optim.tables_of(state.tx), frozenset())  # Dense grads.
    state = _first(_run(step, state, [(ALL_ROWS, LABELS)]))
    for ids in (SOME_ROWS, ALL_ROWS_2):
      grads = _dense_grads(config, state, ids)
      every_row = {key: set(range(NUM_ROWS)) for key in tables}
      want_p, _ = _numpy_step('adam', grads, state, every_row, config)
      after = _first(_run(step, state, [(ids, LABELS)]))
      got_p = traverse_util.flatten_dict(after.params)
      for key, want in want_p.items():
        np.testing.assert_allclose(
          got_p[key], want, rtol=2e-5, atol=1e-6, err_msg=str(key)
        )
      state = after


class RowwiseOptimizerTest(parameterized.TestCase):
  @parameterized.parameters(
    ('lazy_adam', 'fm'),
    ('lazy_adam', 'ncf'),
    ('rowwise_adagrad', 'fm'),
    ('rowwise_adagrad', 'ncf'),
    ('lazy_adam', 'fm', 0.5),  # The tables' own weight decay.
    ('rowwise_adagrad', 'ncf', 0.5),
    # Ids past the table's end: the last row they read takes their steps.
    ('lazy_adam', 'fm', None, (SOME_ROWS_PAST_END,)),
    ('rowwise_adagrad', 'fm', None, (SOME_ROWS_PAST_END,)),
    ('rowwise_adagrad', 'ncf', None, (SOME_ROWS_PAST_END,)),
  )
  def test_steps_match_brute_force(
    self,
    optimizer,
    model_name,
    table_weight_decay=None,
    batches=(SOME_ROWS, SOME_ROWS[::-1], ALL_ROWS_2),
  ):
    config = _config(
      model_name, optimizer, table_weight_decay=table_weight_decay
    )
    _, state, step = _setup(config)
    tables = set(_rows_read(model_name, ALL_ROWS))
    self.assertEqual(set(optim.tables_of(state.tx)), tables)
    # A first step touching every row makes all moments nonzero; then steps
    # that read some rows, each twice.
    state = _first(_run(step, state, [(ALL_ROWS, LABELS)]))
    for ids in batches:
      read = _rows_read(model_name, ids)
      grads = _dense_grads(config, state, ids)
      want_p, want_state = _numpy_step(optimizer, grads, state, read, config)
      after = _first(_run(step, state, [(ids, LABELS)]))
      self.assertEqual(int(after.opt_state.count), int(after.step))
      got_p = traverse_util.flatten_dict(after.params)
      for key, want in want_p.items():
        if _before_batch_norm(key, want_p):
          continue
        # Steps are ~learning_rate = 0.05; float32 rounding of the
        # gradients (two compiled programs) moves Adam's by ~1e-7.
        np.testing.assert_allclose(
          got_p[key], want, rtol=2e-5, atol=1e-6, err_msg=str(key)
        )
      for field, leaves in want_state.items():
        if not leaves:  # lazy_adam has no accumulators.
          continue
        got = traverse_util.flatten_dict(getattr(after.opt_state, field))
        for key, want in leaves.items():
          if _before_batch_norm(key, want_p):
            continue
          np.testing.assert_allclose(
            got[key], want, rtol=2e-5, atol=1e-6, err_msg=f'{field} {key}'
          )
      # Rows not read, parameters and state alike: bit-identical.
      before_p = traverse_util.flatten_dict(state.params)
      for key, rows in read.items():
        unread = sorted(set(range(got_p[key].shape[0])) - rows)
        np.testing.assert_array_equal(got_p[key][unread], before_p[key][unread])
        self.assertFalse(
          np.array_equal(got_p[key][sorted(rows)], before_p[key][sorted(rows)])
        )
      state = after

  def test_rowwise_adagrad_from_zero_accumulators_matches_brute_force(self):
    # TorchRec's exact row-wise Adagrad from accumulators of zero, on
    # gradients of 1e-6 to 1: eps is added to the root, so that a row of
    # tiny gradients still takes a step of about the learning rate.
    table = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    params = {
      't': {'embedding': table},
      'd': {'kernel': np.ones(2, np.float32)},
    }
    tables = frozenset({('t', 'embedding')})
    tx = optim.rowwise_adagrad(0.05, 0.0, tables, 0.5, table_weight_decay=0.0)
    state = tx.init(params)
    np.testing.assert_array_equal(state.accumulator['t']['embedding'], [0] * 5)
    # Row 2 read twice, row 0 with gradients of 1e-6, padding, row 4.
    rows = np.array([2, 0, 2, -1, 4], np.int32)
    values = np.array(
      [[1, -2, 3], [1e-6, 2e-6, -1e-6], [1, 2, -1], [0.5, 0, 0], [9, 9, 9]],
      np.float32,
    )
    grads = {
      't': {'embedding': sparse.RowGrads(rows, values)},
      'd': {'kernel': np.ones(2, np.float32)},
    }
    want_w, want_a = table.astype(np.float64), np.zeros(5)
    apply = jax.jit(tx.apply)
    for _ in range(2):
      params, state = apply(grads, state, params)
      for r in (0, 2, 4):
        g = values[rows == r].sum(axis=0)
        want_a[r] += np.mean(g**2)
        want_w[r] -= 0.5 * g / (np.sqrt(want_a[r]) + 1e-8)
      np.testing.assert_allclose(params['t']['embedding'], want_w, rtol=1e-5)
      np.testing.assert_allclose(
        state.accumulator['t']['embedding'], want_a, rtol=1e-5
      )
    # Row 0's tiny gradients took two steps of about the rate.
    self.assertGreater(np.abs(table[0] - want_w[0]).min(), 0.5)

  @parameterized.parameters(
    ('fm',),
    ('ffm',),
    ('ncf',),
    ('deepfm',),
    # Row 6 read only through ids past the table's end.
    ('fm', ALL_ROWS_PAST_END),
    ('deepfm', ALL_ROWS_PAST_END),
  )
  def test_lazy_adam_equals_dense_adam_when_every_row_is_touched(
    self, model_name, first=ALL_ROWS
  ):
    batches = [(first, LABELS), (ALL_ROWS_2, LABELS), (first, LABELS)]
    states = {}
    for optimizer in ('adam', 'lazy_adam'):
      _, state, step = _setup(_config(model_name, optimizer))
      states[optimizer] = _first(_run(step, state, batches))
    dense, lazy = states['adam'], states['lazy_adam']
    pairs = (
      (lazy.params, dense.params),
      (lazy.opt_state.mu, dense.opt_state[1][0].mu),
      (lazy.opt_state.nu, dense.opt_state[1][0].nu),
    )
    for got, want in pairs:
      got, want = map(traverse_util.flatten_dict, (got, want))
      self.assertEqual(set(got), set(want))
      for path in want:
        if _before_batch_norm(path, want):
          continue
        # The two sum a row's lookups in different orders, and Adam divides
        # by sqrt(nu): an ulp of a small gradient moves a parameter by up to
        # ~1e-6 (seen on an Intel Xeon, not on AMD EPYC). A wrong row or a
        # missed decay moves it by a step, ~learning_rate (0.05).
        np.testing.assert_allclose(
          got[path], want[path], rtol=1e-5, atol=1e-5, err_msg=str(path)
        )

  @parameterized.product(optimizer=SPARSE, model_name=('fm', 'ffm'))
  def test_two_devices_match_one(self, optimizer, model_name):
    config = _config(model_name, optimizer)
    # In the second step each device's half touches rows the other's does
    # not: device 1 alone touches rows 2 and 6 (ids [2, 3]), and reads them
    # four times.
    labels = np.concatenate([LABELS, LABELS[::-1]])
    batches = [
      (np.concatenate([ALL_ROWS_2, ALL_ROWS]), labels),
      (np.concatenate([SOME_ROWS, np.array([[2, 3]] * 4, np.int32)]), labels),
    ]
    _, start, step1 = _setup(config, num_devices=1)
    one = _first(_run(step1, start, batches, num_devices=1))
    _, state, step2 = _setup(config, num_devices=2)
    two = _run(step2, state, batches, num_devices=2)
    for leaf in jax.tree.leaves(two):
      np.testing.assert_array_equal(leaf[0], leaf[1])
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
      (two.step[0], _first(two.params), _first(two.opt_state)),
      (one.step, one.params, one.opt_state),
    )
    # With a batch per device that touched every row, the same steps on
    # device 0's rows alone would leave rows 2 and 6 as after the first.
    first = _first(_run(step1, start, batches[:1], num_devices=1))
    table = two.params['FeaturesLinear_0']['weight'][0]
    self.assertFalse(
      np.array_equal(
        table[[2, 6]], first.params['FeaturesLinear_0']['weight'][[2, 6]]
      )
    )

  @parameterized.parameters('adam', *SPARSE)
  def test_apply_gradients_without_axis_equals_the_train_step(self, optimizer):
    # The benchmarks time loss_fn and apply_gradients outside pmap: they must
    # be the train step's. AFM has tables and dense layers, and no dropout
    # here, so dropout keys do not matter. (A bias before BatchNorm has a
    # zero gradient up to rounding, which Adam would blow up to full steps.)
    config = _config('afm', optimizer)
    _, state, step = _setup(config)
    model = train.create_model(config, FIELD_DIMS)
    state = _first(_run(step, state, [(ALL_ROWS, LABELS)]))
    want = _first(_run(step, state, [(SOME_ROWS, LABELS)]))
    batch = {'ids': SOME_ROWS, 'label': LABELS}

    def update(params, opt_state):
      fun = lambda p, perturbations: train.loss_fn(  # noqa: E731
        p,
        state.batch_stats,
        batch,
        jax.random.key(0),
        model=model,
        perturbations=perturbations,
      )
      (_, batch_stats), grads = sparse.value_and_grad(
        fun, params, optim.tables_of(state.tx)
      )
      return batch_stats, *optim.apply_gradients(
        state.tx, grads, opt_state, params, axis_name=None
      )

    batch_stats, params, opt_state = jax.jit(update)(
      state.params, state.opt_state
    )
    check = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
    jax.tree.map(
      check,
      (params, opt_state, batch_stats),
      (want.params, want.opt_state, want.batch_stats),
    )
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params, state.params)
    self.assertGreater(max(jax.tree.leaves(moved)), 0)

  def test_a_table_given_a_dense_gradient_is_refused(self):
    config = _config('fm', 'rowwise_adagrad')
    _, state, _ = _setup(config)
    grads = jax.tree.map(np.zeros_like, state.params)
    with self.assertRaisesRegex(TypeError, 'RowGrads'):
      optim.apply_gradients(
        state.tx, grads, state.opt_state, state.params, axis_name=None
      )

  def test_rates_default_to_the_dense_ones(self):
    # A config without table_learning_rate (as `config.get` allows), and
    # table_weight_decay None: the tables take the dense rates.
    config = _config('fm', 'rowwise_adagrad', learning_rate=0.25)
    del config['table_learning_rate']
    rates = optim.rates_of(config)
    self.assertEqual(
      {k: float(v) for k, v in rates.items()},
      {
        'learning_rate': 0.25,
        'weight_decay': np.float32(0.1),
        'table_learning_rate': 0.25,
        'table_weight_decay': np.float32(0.1),
      },
    )
    self.assertTrue(all(v.dtype == np.float32 for v in rates.values()))

  def test_plateau_rates_stop_at_the_floor_unless_set_below_it(self):
    config = _config('fm', 'rowwise_adagrad', learning_rate=1e-3)
    config.table_learning_rate = 5e-7  # Below the floor: kept.
    self.assertIs(optim.on_plateau(config, 1.0), config)
    reduced = optim.rates_of(optim.on_plateau(config, 0.01))
    np.testing.assert_allclose(
      [float(reduced[k]) for k in ('learning_rate', 'table_learning_rate')],
      [1e-5, 5e-7],
    )
    floor = optim.rates_of(optim.on_plateau(config, 1e-9))
    self.assertEqual(float(floor['learning_rate']), np.float32(1e-6))
    self.assertEqual(config.learning_rate, 1e-3)  # A copy was reduced.
    config.lr_plateau_factor = 0.5
    self.assertEqual(optim.plateau_scale(0.5, config), 0.25)
    del config['lr_plateau_factor']  # A config from before the key.
    self.assertEqual(optim.plateau_scale(0.5, config), 0.5)

  def test_unknown_optimizer_names_the_config_field(self):
    with self.assertRaisesRegex(ValueError, r'config\.optimizer.*sgd'):
      optim.create_optimizer(_config(optimizer='sgd'))

  @parameterized.parameters(*SPARSE)
  def test_state_round_trips_through_orbax(self, optimizer):
    _, state, step = _setup(_config('ffm', optimizer))
    state = _first(_run(step, state, [(SOME_ROWS, LABELS)]))
    with tempfile.TemporaryDirectory() as workdir:
      manager = checkpoints.manager(workdir)
      checkpoints.save(manager, 1, state, {'epoch': 1}, keep=set)
      _, target, _ = _setup(_config('ffm', optimizer))
      restored, meta = checkpoints.restore(manager, 1, target)
      manager.close()
    self.assertEqual(meta, {'epoch': 1})
    self.assertIsInstance(restored.opt_state, type(state.opt_state))
    jax.tree.map(
      np.testing.assert_array_equal,
      (restored.step, restored.params, restored.opt_state),
      (state.step, state.params, state.opt_state),
    )


class AutoOptimizerTest(parameterized.TestCase):
  def test_auto_is_adam_below_the_rows_and_lazy_adam_from_them(self):
    rows = optim.AUTO_SPARSE_ROWS
    self.assertEqual(optim.resolve('auto', rows - 1), 'adam')
    self.assertEqual(optim.resolve('auto', rows), 'lazy_adam')
    for name in ('adam', 'lazy_adam', 'rowwise_adagrad'):
      self.assertEqual(optim.resolve(name, 0), name)
      self.assertEqual(optim.resolve(name, rows), name)

  def test_the_multi_hot_rows_count(self):
    config = _config('fm', 'auto')
    rows = optim.AUTO_SPARSE_ROWS
    for multi, want in ((0, 'adam'), (1, 'lazy_adam')):
      model = train.create_model(
        config, (3, rows - 5), multi_field_dims=(multi + 1,)
      )
      self.assertEqual(train.resolve_optimizer(config, model).optimizer, want)
    self.assertEqual(config.optimizer, 'auto')  # The caller's is kept.

  @parameterized.parameters((-1, 'adam', 'lazy_adam'), (0, 'lazy_adam', 'adam'))
  def test_a_step_with_auto_is_the_step_of_what_it_resolves_to(
    self, offset, want, other
  ):
    # SOME_ROWS's ids fit; the second field has the rows that decide.
    field_dims = (3, optim.AUTO_SPARSE_ROWS - 3 + offset)
    states = {}
    for name in ('auto', want, other):
      _, state, step = _setup(_config('fm', name), field_dims=field_dims)
      states[name] = _first(_run(step, state, [(SOME_ROWS, LABELS)]))
    self.assertIsInstance(
      states['auto'].opt_state, type(states[want].opt_state)
    )
    jax.tree.map(
      np.testing.assert_array_equal,
      states['auto'].params,
      states[want].params,
    )
    # Dense Adam moves the rows not read (their L2 gradient), lazy Adam not.
    table = ('FeaturesEmbedding_0', 'embedding')
    flat = traverse_util.flatten_dict
    self.assertFalse(
      np.allclose(
        flat(states['auto'].params)[table], flat(states[other].params)[table]
      )
    )


if __name__ == '__main__':
  absltest.main()
