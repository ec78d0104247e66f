"""DCN-V2 (models/dcnv2.py) against its equations, by brute force in numpy.

pytorch-fm has no DCN-V2: the cross layers (full rank, eq. (1); mixture of
low-rank experts, eq. (4)), both structures and the whole model are
recomputed example by example from the paper's equations.
"""

import importlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from model_tables import initial_zero_gradients
import numpy as np

from configs import dcnv2 as dcnv2_config

dcnv2 = importlib.import_module('models.dcnv2')

FIELD_DIMS = (7, 11, 5, 4)
OFFSETS = np.cumsum((0,) + FIELD_DIMS[:-1])
EPS = 1e-5
KWARGS = dict(embed_dim=3, num_cross_layers=2, mlp_dims=(16, 16))


def _ids(batch, seed=0, field_dims=FIELD_DIMS):
  rng = np.random.default_rng(seed)
  return np.stack(
    [rng.integers(0, d, size=batch) for d in field_dims], axis=1
  ).astype(np.int32)


def _random_variables(model, ids, seed=1):
  """Init, then random parameters and BatchNorm statistics everywhere."""
  variables = model.init(jax.random.key(0), ids)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 1.5, size=x.shape).astype(np.float32)
    return (0.5 * rng.normal(size=x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, variables)


def _np_hidden(x, params, stats, num_hidden):
  """Eval-mode hidden layers Linear -> BatchNorm -> ReLU (no output layer)."""
  for i in range(num_hidden):
    x = x @ params[f'Dense_{i}']['kernel'] + params[f'Dense_{i}']['bias']
    bn, s = params[f'BatchNorm_{i}'], stats[f'BatchNorm_{i}']
    x = (x - s['mean']) / np.sqrt(s['var'] + EPS) * bn['scale'] + bn['bias']
    x = np.maximum(x, 0.0)
  return x


def _np_cross(x0, params, num_layers, low_rank):
  """x_L for one example `x0` `[n]`, eq. (1) or eq. (4), layer by layer."""
  x = x0
  for k in range(num_layers):
    if low_rank is None:
      w = params[f'cross_{k}']['kernel'].T  # W_l [n, n]: (W x)_i
      b = params[f'cross_{k}']['bias']
      x = x0 * (w @ x + b) + x
      continue
    u, v, c = params[f'U_{k}'], params[f'V_{k}'], params[f'C_{k}']
    gates = params['gating']['kernel'].T @ x  # g_i^T x_l, [experts]
    gates = np.exp(gates - gates.max())
    gates /= gates.sum()
    mixture = np.zeros_like(x)
    for i in range(len(gates)):
      expert = np.tanh(c[i] @ np.tanh(v[i].T @ x))  # [r]
      expert = x0 * (u[i] @ expert + params[f'b_{k}'])  # [n]
      mixture += gates[i] * expert
    x = mixture + x
  return x


def _np_model(ids, variables, structure, low_rank, num_layers, num_hidden):
  p, s = variables['params'], variables['batch_stats']
  table = np.asarray(p['FeaturesEmbedding_0']['embedding'], np.float64)
  x0 = table[ids + OFFSETS].reshape(len(ids), -1)  # [B, F * D]
  cross = np.stack(
    [_np_cross(x, p['CrossNetworkV2_0'], num_layers, low_rank) for x in x0]
  )
  mlp_p, mlp_s = p['MultiLayerPerceptron_0'], s['MultiLayerPerceptron_0']
  if structure == 'stacked':
    h = _np_hidden(cross, mlp_p, mlp_s, num_hidden)
  else:
    h = np.concatenate([cross, _np_hidden(x0, mlp_p, mlp_s, num_hidden)], -1)
  return (h @ p['logit']['kernel'] + p['logit']['bias'])[:, 0]


class EquationTest(parameterized.TestCase):
  @parameterized.parameters(
    ('parallel', None),
    ('stacked', None),
    ('parallel', 2),
    ('stacked', 2),
  )
  def test_eval_model_matches_brute_force(self, structure, low_rank):
    model = dcnv2.Model(
      FIELD_DIMS,
      structure=structure,
      low_rank=low_rank,
      num_experts=3,
      **KWARGS,
    )
    ids = _ids(7)
    variables = _random_variables(model, ids)
    out = model.apply(variables, ids, train=False)
    expected = _np_model(ids, variables, structure, low_rank, 2, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_one_full_rank_layer_is_a_polynomial_of_degree_two(self):
    # x_1 = x_0 * (W x_0 + b) + x_0: scaling x_0 by t scales the quadratic
    # part by t^2 and the rest by t (with b = 0, x_1(t) = t^2 q + t x_0).
    cross = dcnv2.CrossNetworkV2(1)
    x0 = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    params = cross.init(jax.random.key(0), x0)
    x1 = cross.apply(params, x0)
    x2 = cross.apply(params, 2 * x0)
    np.testing.assert_allclose(x2 - 2 * x0, 4 * (x1 - x0), rtol=1e-4, atol=1e-5)

  def test_mixture_shapes_and_shared_gates(self):
    cross = dcnv2.CrossNetworkV2(3, low_rank=2, num_experts=5)
    params = cross.init(jax.random.key(0), np.ones((1, 8), np.float32))
    shapes = jax.tree.map(np.shape, params['params'])
    self.assertEqual(shapes['gating'], {'kernel': (8, 5)})
    for k in range(3):
      self.assertEqual(shapes[f'U_{k}'], (5, 8, 2))
      self.assertEqual(shapes[f'V_{k}'], (5, 8, 2))
      self.assertEqual(shapes[f'C_{k}'], (5, 2, 2))
      self.assertEqual(shapes[f'b_{k}'], (8,))

  def test_unknown_structure_is_an_error(self):
    model = dcnv2.Model(FIELD_DIMS, structure='stacked_parallel', **KWARGS)
    with self.assertRaisesRegex(ValueError, "'parallel' or 'stacked'"):
      model.init(jax.random.key(0), _ids(2))


class TrainingModeTest(parameterized.TestCase):
  @parameterized.parameters('parallel', 'stacked')
  def test_dropout_batchnorm_and_eval(self, structure):
    ids = _ids(16, seed=2)
    base = dcnv2.Model(FIELD_DIMS, structure=structure, dropout=0.0, **KWARGS)
    variables = _random_variables(base, ids)

    def train_out(model, seed):
      return model.apply(
        variables,
        ids,
        train=True,
        rngs={'dropout': jax.random.key(seed)},
        mutable=['batch_stats'],
      )

    # Without dropout, training mode is deterministic but uses batch
    # statistics: it differs from eval mode, and the statistics move.
    out0, state0 = train_out(base, 0)
    out1, _ = train_out(base, 1)
    np.testing.assert_array_equal(out0, out1)
    self.assertFalse(np.allclose(out0, base.apply(variables, ids)))
    old = variables['batch_stats']['MultiLayerPerceptron_0']
    new = state0['batch_stats']['MultiLayerPerceptron_0']
    for layer in ('BatchNorm_0', 'BatchNorm_1'):
      for stat in ('mean', 'var'):
        self.assertFalse(np.allclose(new[layer][stat], old[layer][stat]))
    # The deep network's dropout changes training outputs, by key.
    dropped = dcnv2.Model(
      FIELD_DIMS, structure=structure, dropout=0.5, **KWARGS
    )
    a, _ = train_out(dropped, 0)
    b, _ = train_out(dropped, 1)
    self.assertGreater(np.mean(~np.isclose(a, out0)), 0.9)
    self.assertGreater(np.mean(~np.isclose(a, b)), 0.9)
    # Eval mode ignores dropout and keys.
    np.testing.assert_array_equal(
      dropped.apply(variables, ids),
      dropped.apply(variables, ids, rngs={'dropout': jax.random.key(5)}),
    )
    np.testing.assert_array_equal(
      dropped.apply(variables, ids), base.apply(variables, ids)
    )


class InitialGradientTest(absltest.TestCase):
  def test_every_parameter_gets_a_gradient_from_initialisation(self):
    # tests/model_tables.py's TEST_KWARGS model on two fields, three draws.
    zeros = initial_zero_gradients('dcnv2')
    self.assertEqual(zeros, dict.fromkeys(zeros, []))


class ConfigTest(absltest.TestCase):
  def test_config(self):
    config = dcnv2_config.get_config()
    self.assertEqual(config.model_name, 'dcnv2')
    self.assertEqual(
      dict(config.model),
      dict(
        embed_dim=16,
        num_cross_layers=3,
        mlp_dims=(500, 500, 500),
        dropout=0.5,
        structure='parallel',
        low_rank=None,
        num_experts=4,
      ),
    )
    model = dcnv2.Model(field_dims=(6, 9), **config.model)
    ids = _ids(4, field_dims=(6, 9))
    variables = jax.eval_shape(model.init, jax.random.key(0), ids)
    kernel = variables['params']['logit']['kernel']
    self.assertEqual(kernel.shape, (2 * 16 + 500, 1))  # [x_L; MLP(x_0)]
    out = jax.eval_shape(model.apply, variables, ids)
    self.assertEqual((out.shape, out.dtype), ((4,), jnp.float32))


if __name__ == '__main__':
  absltest.main()
