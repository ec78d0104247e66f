"""Tests of optim.py: `lazy_adam` against brute force and dense Adam, in
`train.train_step` on 1 and 2 devices, and `apply_gradients` without pmap."""

import functools
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from flax import jax_utils
import jax
import numpy as np
import optax

import checkpoints
from configs import default
import optim
import train

FIELD_DIMS = (3, 4)  # 7 table rows.
NUM_ROWS = sum(FIELD_DIMS)
# Two batches of 4 that touch every row: ids of field 0 in [0, 3), field 1
# in [0, 4); rows = ids + (0, 3).
ALL_ROWS = np.array([[0, 0], [1, 1], [2, 2], [0, 3]], np.int32)
ALL_ROWS_2 = np.array([[2, 3], [1, 0], [0, 2], [1, 1]], np.int32)
# Rows 0, 1 (field 0) and 3, 5 (field 1); rows 2, 4 and 6 stay untouched.
SOME_ROWS = np.array([[0, 0], [1, 2], [0, 2], [1, 0]], np.int32)
LABELS = np.array([1.0, 0.0, 1.0, 0.0], np.float32)


def _config(model_name='fm', optimizer='lazy_adam', **overrides):
  config = default.get_config()
  config.model_name = model_name
  config.model = {'embed_dim': 3}
  if model_name == 'ncf':
    config.model = {
      'embed_dim': 3,
      'mlp_dims': (4,),
      'dropout': 0.0,
      'user_field_idx': 0,
      'item_field_idx': 1,
    }
  elif model_name == 'afm':
    config.model = {'embed_dim': 3, 'attn_size': 2, 'dropouts': (0.0, 0.0)}
  elif model_name == 'deepfm':
    config.model = {'embed_dim': 3, 'mlp_dims': (4,), 'dropout': 0.0}
  config.optimizer = optimizer
  config.learning_rate = 0.05
  config.weight_decay = 0.1
  config.update(overrides)
  return config


def _setup(config, num_devices=1):
  model = train.create_model(config, FIELD_DIMS, axis_name=train.AXIS)
  state = train.create_train_state(
    jax.random.key(0), config, model, len(FIELD_DIMS)
  )
  step = jax.pmap(
    functools.partial(train.train_step, model=model, seed=0),
    axis_name=train.AXIS,
    devices=jax.local_devices()[:num_devices],
  )
  return model, state, step


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


def _numpy_lazy_adam(grads, mu, nu, params, rows, count, config):
  """Brute-force LazyAdam + L2 in float64, row by row on the tables."""
  lr, wd = config.learning_rate, config.weight_decay
  b1, b2, eps = 0.9, 0.999, 1e-8

  def leaf(g, m, v, p):
    g, m, v, p = (np.array(x, np.float64) for x in (g, m, v, p))
    # Other leaves: dense Adam, all elements at once.
    touched = sorted(set(rows)) if p.shape[0] == NUM_ROWS else [Ellipsis]
    for r in touched:
      gr = g[r] + wd * p[r]
      m[r] = b1 * m[r] + (1 - b1) * gr
      v[r] = b2 * v[r] + (1 - b2) * gr**2
      m_hat = m[r] / (1 - b1**count)
      v_hat = v[r] / (1 - b2**count)
      p[r] = p[r] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v

  out = jax.tree.map(leaf, grads, mu, nu, params)
  is_out = lambda x: isinstance(x, tuple)  # noqa: E731
  return tuple(
    jax.tree.map(lambda o, i=i: o[i], out, is_leaf=is_out) for i in range(3)
  )


class LazyAdamTest(parameterized.TestCase):
  def test_one_step_matches_brute_force(self):
    config = _config()
    model, state, step = _setup(config)
    # A first step touching every row makes all moments nonzero.
    before = _first(_run(step, state, [(ALL_ROWS, LABELS)]))

    def loss_fn(params):
      logits = model.apply({'params': params}, SOME_ROWS, train=True)
      return optax.sigmoid_binary_cross_entropy(logits, LABELS).mean()

    grads = jax.grad(loss_fn)(before.params)
    rows = (SOME_ROWS + np.array([0, FIELD_DIMS[0]])).reshape(-1).tolist()
    want_p, want_m, want_v = _numpy_lazy_adam(
      grads,
      before.opt_state.mu,
      before.opt_state.nu,
      before.params,
      rows,
      2,
      config,
    )
    after = _first(_run(step, before, [(SOME_ROWS, LABELS)]))
    self.assertEqual(int(after.step), 2)
    self.assertEqual(int(after.opt_state.count), 2)
    for got, want in (
      (after.params, want_p),
      (after.opt_state.mu, want_m),
      (after.opt_state.nu, want_v),
    ):
      jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-7),
        got,
        want,
      )
    # Untouched rows, parameters and moments alike: bit-identical.
    untouched = [2, 4, 6]
    for name in ('FeaturesEmbedding_0', 'FeaturesLinear_0'):
      leaf = 'embedding' if name == 'FeaturesEmbedding_0' else 'weight'
      for old, new in (
        (before.params, after.params),
        (before.opt_state.mu, after.opt_state.mu),
        (before.opt_state.nu, after.opt_state.nu),
      ):
        np.testing.assert_array_equal(
          new[name][leaf][untouched], old[name][leaf][untouched]
        )
        self.assertFalse(
          np.array_equal(new[name][leaf][[0, 3]], old[name][leaf][[0, 3]])
        )

  @parameterized.parameters('fm', 'ffm', 'ncf', 'deepfm')
  def test_equals_dense_adam_when_every_row_is_touched(self, model_name):
    batches = [(ALL_ROWS, LABELS), (ALL_ROWS_2, LABELS), (ALL_ROWS, LABELS)]
    states = {}
    for optimizer in ('adam', 'lazy_adam'):
      _, state, step = _setup(_config(model_name, optimizer))
      states[optimizer] = _first(_run(step, state, batches))
    dense, lazy = states['adam'], states['lazy_adam']
    check = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
    jax.tree.map(check, lazy.params, dense.params)
    jax.tree.map(check, lazy.opt_state.mu, dense.opt_state[1][0].mu)
    jax.tree.map(check, lazy.opt_state.nu, dense.opt_state[1][0].nu)

  @parameterized.parameters('fm', 'ffm')
  def test_two_devices_match_one(self, model_name):
    config = _config(model_name)
    # In the second step each device's half touches rows the other's does
    # not: device 1 alone touches rows 2 and 6 (ids [2, 3]).
    labels = np.concatenate([LABELS, LABELS[::-1]])
    batches = [
      (np.concatenate([ALL_ROWS_2, ALL_ROWS]), labels),
      (np.concatenate([SOME_ROWS, np.array([[2, 3]] * 4, np.int32)]), labels),
    ]
    _, state, step1 = _setup(config, num_devices=1)
    one = _first(_run(step1, state, batches, num_devices=1))
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
    _, state, step1 = _setup(config, num_devices=1)
    first = _first(_run(step1, state, batches[:1], num_devices=1))
    table = two.params['FeaturesLinear_0']['weight'][0]
    self.assertFalse(
      np.array_equal(
        table[[2, 6]], first.params['FeaturesLinear_0']['weight'][[2, 6]]
      )
    )

  @parameterized.parameters('adam', 'lazy_adam')
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
    (_, batch_stats), grads = jax.value_and_grad(
      functools.partial(train.loss_fn, model=model), has_aux=True
    )(state.params, state.batch_stats, batch, jax.random.key(0))
    params, opt_state = jax.jit(
      functools.partial(
        optim.apply_gradients,
        state.tx,
        ids=SOME_ROWS,
        field_dims=FIELD_DIMS,
        axis_name=None,
      )
    )(grads, state.opt_state, state.params)
    check = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
    jax.tree.map(
      check,
      (params, opt_state, batch_stats),
      (want.params, want.opt_state, want.batch_stats),
    )
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params, state.params)
    self.assertGreater(max(jax.tree.leaves(moved)), 0)

  def test_unknown_optimizer_names_the_config_field(self):
    with self.assertRaisesRegex(ValueError, r'config\.optimizer.*sgd'):
      optim.create_optimizer(_config(optimizer='sgd'), num_rows=NUM_ROWS)

  def test_state_round_trips_through_orbax(self):
    _, state, step = _setup(_config('ffm'))
    state = _first(_run(step, state, [(SOME_ROWS, LABELS)]))
    with tempfile.TemporaryDirectory() as workdir:
      manager = checkpoints.manager(workdir)
      checkpoints.save(manager, 1, state, {'epoch': 1}, keep=set)
      _, target, _ = _setup(_config('ffm'))
      restored, meta = checkpoints.restore(manager, 1, target)
      manager.close()
    self.assertEqual(meta, {'epoch': 1})
    self.assertIsInstance(restored.opt_state, optim.LazyAdamState)
    jax.tree.map(
      np.testing.assert_array_equal,
      (restored.step, restored.params, restored.opt_state),
      (state.step, state.params, state.opt_state),
    )


if __name__ == '__main__':
  absltest.main()
