"""HOFM (models/hofm.py): parity with pytorch-fm master, ANOVA by brute force.

tests/fixtures/torchfm_hofm.npz was written by tools/make_torchfm_fixtures.py
from pytorch-fm's GitHub master `HighOrderFactorizationMachineModel` (order
4; not in torchfm 0.7.0) with random weights: its eval-mode output and one
training step (loss, gradients). Torch is not needed to run these tests.
"""

import importlib
import itertools
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from model_tables import initial_zero_gradients
import numpy as np

from configs import hofm as hofm_config

hofm = importlib.import_module('models.hofm')

FIXTURE = os.path.join(
  os.path.dirname(__file__), 'fixtures', 'torchfm_hofm.npz'
)
FIELD_DIMS = (7, 11, 5, 4, 6)
MULTI_FIELD_DIMS = (6, 3)


def _ids(batch, seed=0, field_dims=FIELD_DIMS):
  rng = np.random.default_rng(seed)
  return np.stack(
    [rng.integers(0, d, size=batch) for d in field_dims], axis=1
  ).astype(np.int32)


def _side_inputs(batch, seed=0):
  """Multi-hot ids `[batch, 2, 3]` padded with -1 (some rows empty), dense."""
  rng = np.random.default_rng(seed)
  multi = np.full((batch, len(MULTI_FIELD_DIMS), 3), -1, np.int32)
  for b in range(batch):
    for m, d in enumerate(MULTI_FIELD_DIMS):
      n = rng.integers(0, 4)  # 0 to 3 ids
      multi[b, m, :n] = rng.choice(d, size=n, replace=False)
  dense = rng.normal(size=(batch, 2)).astype(np.float32)
  return multi, dense


def _randomize(variables, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (0.5 * rng.normal(size=x.shape)).astype(np.float32), variables
  )


def _np_fields(p, prefix, ids, multi=None, dense=None):
  """Rows `[batch, T, ...]` by hand: one-hot, multi-hot mean, value * row."""
  table = np.asarray(p[prefix], np.float64)
  out = [table[ids + np.cumsum((0,) + FIELD_DIMS[:-1])]]
  if multi is not None:
    multi_table = np.asarray(p[f'multi_{prefix}'], np.float64)
    starts = np.cumsum((0,) + MULTI_FIELD_DIMS[:-1])
    pooled = np.zeros(multi.shape[:2] + table.shape[1:])
    for b, m in itertools.product(*map(range, multi.shape[:2])):
      rows = [starts[m] + i for i in multi[b, m] if i >= 0]
      if rows:
        pooled[b, m] = multi_table[rows].mean(axis=0)
    out.append(pooled)
  if dense is not None:
    dense_table = np.asarray(p[f'dense_{prefix}'], np.float64)
    out.append(dense[:, :, None] * dense_table[None])
  return np.concatenate(out, axis=1)


def _np_anova(x, order):
  """sum over field subsets f_1 < ... < f_t of prod x_f, summed over dims."""
  total = np.zeros(x.shape[0])
  for subset in itertools.combinations(range(x.shape[1]), order):
    total += np.prod(x[:, subset], axis=1).sum(axis=-1)
  return total


def _np_hofm(params, order, embed_dim, ids, multi=None, dense=None):
  """w_0 + sum_f w_f + sum_{t=2}^m A^t(p^(t)) by enumeration of subsets."""
  linear = params['FeaturesLinear_0']
  y = linear['bias'][0] + _np_fields(linear, 'weight', ids, multi, dense).sum(
    axis=(1, 2)
  )
  if order >= 2:
    p = _np_fields(
      params['FeaturesEmbedding_0'], 'embedding', ids, multi, dense
    )
    for t in range(2, order + 1):
      y = y + _np_anova(p[..., (t - 2) * embed_dim : (t - 1) * embed_dim], t)
  return y


class ReferenceParityTest(absltest.TestCase):
  """Against pytorch-fm master's code (fixture), order 4, embed_dim 3."""

  def setUp(self):
    super().setUp()
    self.data = data = np.load(FIXTURE)
    w = {k[2:]: data[k] for k in data.files if k.startswith('w/')}
    self.variables = self._convert(w)
    self.model = hofm.Model(
      field_dims=tuple(int(d) for d in data['field_dims']),
      order=4,
      embed_dim=3,
    )

  @staticmethod
  def _convert(w):
    return {
      'params': {
        'FeaturesLinear_0': {
          'weight': w['linear.fc.weight'],
          'bias': w['linear.bias'],
        },
        'FeaturesEmbedding_0': {'embedding': w['embedding.embedding.weight']},
      }
    }

  def test_converted_tree_has_the_structure_of_init(self):
    init = self.model.init(jax.random.key(0), self.data['ids'])
    self.assertEqual(
      jax.tree.map(np.shape, init), jax.tree.map(np.shape, self.variables)
    )

  def test_eval_outputs_match_reference(self):
    logits = self.model.apply(self.variables, self.data['ids'])
    np.testing.assert_allclose(
      jax.nn.sigmoid(logits), self.data['probs'], rtol=1e-5, atol=1e-5
    )

  def test_training_step_matches_reference(self):
    ids, labels = self.data['ids'], self.data['train/labels']

    def loss_fn(params):
      logits = self.model.apply({'params': params}, ids, train=True)
      return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)

    loss, grads = jax.value_and_grad(loss_fn)(self.variables['params'])
    np.testing.assert_allclose(loss, self.data['train/loss'], rtol=1e-5)
    expected = self._convert(
      {k[5:]: self.data[k] for k in self.data.files if k.startswith('grad/')}
    )['params']
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      want = expected
      for key in path:
        want = want[key.key]
      with self.subTest(jax.tree_util.keystr(path)):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


class AnovaKernelTest(parameterized.TestCase):
  @parameterized.parameters(1, 2, 3, 4, 5, 6)
  def test_matches_enumeration_of_field_subsets(self, order):
    x = np.random.default_rng(order).normal(size=(4, 6, 3)).astype(np.float32)
    kernel = hofm.AnovaKernel(order)
    out = kernel.apply({}, x)
    np.testing.assert_allclose(out, _np_anova(x, order), rtol=1e-4, atol=1e-4)
    per_dim = hofm.AnovaKernel(order, reduce_sum=False).apply({}, x)
    self.assertEqual(per_dim.shape, (4, 3))
    np.testing.assert_allclose(per_dim.sum(-1), out, rtol=1e-5, atol=1e-5)

  def test_order_above_the_field_count_is_zero(self):
    x = np.random.default_rng(0).normal(size=(4, 3, 2)).astype(np.float32)
    np.testing.assert_array_equal(hofm.AnovaKernel(4).apply({}, x), 0.0)

  def test_order_two_is_the_fm_identity(self):
    x = np.random.default_rng(1).normal(size=(5, 7, 4)).astype(np.float32)
    np.testing.assert_allclose(
      hofm.AnovaKernel(2).apply({}, x),
      hofm.FactorizationMachine().apply({}, x),
      rtol=1e-5,
      atol=1e-5,
    )


class ModelTest(parameterized.TestCase):
  @parameterized.parameters(1, 2, 3, 4)
  def test_eval_model_matches_brute_force(self, order):
    model = hofm.Model(FIELD_DIMS, order=order, embed_dim=3)
    ids = _ids(6)
    params = _randomize(model.init(jax.random.key(0), ids))['params']
    if order == 1:
      self.assertNotIn('FeaturesEmbedding_0', params)
    else:
      table = params['FeaturesEmbedding_0']['embedding']
      self.assertEqual(table.shape, (sum(FIELD_DIMS), (order - 1) * 3))
    out = model.apply({'params': params}, ids)
    np.testing.assert_allclose(
      out, _np_hofm(params, order, 3, ids), rtol=1e-4, atol=1e-4
    )

  def test_side_fields_are_more_fields_of_every_order(self):
    # 5 one-hot + 2 multi-hot + 2 numeric fields: subsets of all 9.
    model = hofm.Model(
      FIELD_DIMS,
      multi_field_dims=MULTI_FIELD_DIMS,
      num_dense=2,
      order=3,
      embed_dim=2,
    )
    ids = _ids(6)
    multi, dense = _side_inputs(6)
    params = _randomize(model.init(jax.random.key(0), ids, multi, dense))[
      'params'
    ]
    out = model.apply({'params': params}, ids, multi, dense)
    np.testing.assert_allclose(
      out,
      _np_hofm(params, 3, 2, ids, multi, dense),
      rtol=1e-4,
      atol=1e-4,
    )

  def test_training_mode_is_eval_mode(self):
    # No dropout, no BatchNorm: train=True changes nothing, and there is no
    # state to update.
    model = hofm.Model(FIELD_DIMS, order=3, embed_dim=3)
    ids = _ids(8)
    variables = _randomize(model.init(jax.random.key(0), ids))
    self.assertEqual(set(variables), {'params'})
    train, state = model.apply(
      variables,
      ids,
      train=True,
      rngs={'dropout': jax.random.key(1)},
      mutable=['batch_stats'],
    )
    self.assertEqual(dict(state), {})
    np.testing.assert_array_equal(train, model.apply(variables, ids))

  def test_order_below_one_is_an_error(self):
    with self.assertRaisesRegex(ValueError, 'order must be >= 1'):
      hofm.Model(FIELD_DIMS, order=0).init(jax.random.key(0), _ids(2))


class InitialGradientTest(absltest.TestCase):
  def test_every_parameter_gets_a_gradient_from_initialisation(self):
    # tests/model_tables.py's TEST_KWARGS model on two fields, three draws.
    zeros = initial_zero_gradients('hofm')
    self.assertEqual(zeros, dict.fromkeys(zeros, []))


class ConfigTest(absltest.TestCase):
  def test_config_is_pytorch_fm_examples_main(self):
    config = hofm_config.get_config()
    self.assertEqual(config.model_name, 'hofm')
    self.assertEqual(dict(config.model), dict(order=3, embed_dim=16))
    model = hofm.Model(field_dims=(6, 9), **config.model)
    ids = _ids(4, field_dims=(6, 9))
    out = model.apply(model.init(jax.random.key(0), ids), ids)
    self.assertEqual(out.shape, (4,))
    self.assertEqual(out.dtype, jnp.float32)


if __name__ == '__main__':
  absltest.main()
