"""DCN-V2 (models/dcnv2.py) against its equations, by brute force in numpy.

pytorch-fm has no DCN-V2: the cross layers (full rank, eq. (1); mixture of
low-rank experts, eq. (4)), both structures and the whole model are
recomputed example by example from the paper's equations.
"""

import importlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
from model_testing import check_config_model
from model_testing import check_dropout_in_training_only
from model_testing import np_mlp
from model_testing import offsets
from model_testing import random_ids
from model_testing import random_variables
from model_testing import recipe
import numpy as np

from configs import dcnv2 as dcnv2_config

dcnv2 = importlib.import_module('models.dcnv2')

FIELD_DIMS = (7, 11, 5, 4)
KWARGS = dict(embed_dim=3, num_cross_layers=2, mlp_dims=(16, 16))


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


def _np_model(
  ids, variables, structure, low_rank, num_layers, num_hidden, batch_norm=True
):
  p, s = variables['params'], variables.get('batch_stats')
  table = np.asarray(p['FeaturesEmbedding_0']['embedding'], np.float64)
  x0 = table[ids + offsets(FIELD_DIMS)].reshape(len(ids), -1)  # [B, F * D]
  cross = np.stack(
    [_np_cross(x, p['CrossNetworkV2_0'], num_layers, low_rank) for x in x0]
  )
  mlp_p = p['MultiLayerPerceptron_0']
  mlp_s = s['MultiLayerPerceptron_0'] if batch_norm else None
  mlp = dict(output_layer=False, batchnorm=batch_norm)
  if structure == 'stacked':
    h = np_mlp(cross, mlp_p, mlp_s, num_hidden, **mlp)
  else:
    hidden = np_mlp(x0, mlp_p, mlp_s, num_hidden, **mlp)
    h = np.concatenate([cross, hidden], -1)
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
    ids = random_ids(7, FIELD_DIMS)
    variables = random_variables(model, ids)
    out = model.apply(variables, ids, train=False)
    expected = _np_model(ids, variables, structure, low_rank, 2, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  @parameterized.parameters('parallel', 'stacked')
  def test_deep_network_without_batchnorm_matches_brute_force(self, structure):
    # FuxiCTR's published configs: Linear (with bias) -> ReLU -> Dropout.
    model = dcnv2.Model(
      FIELD_DIMS, structure=structure, batch_norm=False, **KWARGS
    )
    ids = random_ids(7, FIELD_DIMS)
    variables = random_variables(model, ids)
    self.assertEqual(set(variables), {'params'})
    mlp = variables['params']['MultiLayerPerceptron_0']
    self.assertEqual(set(mlp), {'Dense_0', 'Dense_1'})
    self.assertEqual(set(mlp['Dense_0']), {'kernel', 'bias'})
    out = model.apply(variables, ids, train=False)
    expected = _np_model(ids, variables, structure, None, 2, 2, False)
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

  def test_mixture_init_is_fuxictrs_xavier_normal_over_the_whole_tensor(self):
    # FuxiCTR's CrossNetMix: torch's xavier_normal_ on [experts, n, r] (fan
    # in n r, fan out experts r) and [experts, r, r] (r^2, experts r), an
    # untruncated normal; per-expert fans gave U and V a 4x larger std here.
    n, r, experts = 96, 16, 4
    cross = dcnv2.CrossNetworkV2(1, low_rank=r, num_experts=experts)
    params = cross.init(jax.random.key(0), np.ones((1, n), np.float32))
    params = params['params']
    for name, fan_in in (('U_0', n * r), ('V_0', n * r), ('C_0', r * r)):
      w = np.asarray(params[name], np.float64)
      std = np.sqrt(2.0 / (fan_in + experts * r))
      self.assertAlmostEqual(np.mean(w), 0.0, delta=0.2 * std)
      self.assertAlmostEqual(np.std(w) / std, 1.0, delta=0.1, msg=name)
      if name != 'C_0':  # 6144 draws: a normal's tail, not truncated at 2.
        self.assertGreater(np.max(np.abs(w)) / std, 3.0)

  def test_a_rank_or_experts_below_one_is_an_error_at_construction(self):
    # Copied alone, without the trainer's config check: rank 0 or no
    # experts divided by zero in the initialiser, a negative rank failed in
    # XLA ('Invalid type').
    for low_rank, experts, key, value in (
      (0, 4, 'low_rank', 0),
      (-1, 4, 'low_rank', -1),
      (2, 0, 'num_experts', 0),
    ):
      with self.subTest(low_rank=low_rank, num_experts=experts):
        with self.assertRaisesRegex(
          ValueError, rf'^config.model.{key} must be >= 1.*; got {value}.$'
        ):
          dcnv2.Model(
            FIELD_DIMS,
            **{**KWARGS, 'low_rank': low_rank, 'num_experts': experts},
          )
    dcnv2.Model(FIELD_DIMS, **{**KWARGS, 'low_rank': None})

  def test_unknown_structure_is_an_error(self):
    model = dcnv2.Model(FIELD_DIMS, structure='stacked_parallel', **KWARGS)
    with self.assertRaisesRegex(ValueError, "'parallel' or 'stacked'"):
      model.init(jax.random.key(0), random_ids(2, FIELD_DIMS))


class TrainingModeTest(parameterized.TestCase):
  @parameterized.parameters('parallel', 'stacked')
  def test_dropout_batchnorm_and_eval(self, structure):
    ids = random_ids(16, FIELD_DIMS, seed=2)
    base = dcnv2.Model(FIELD_DIMS, structure=structure, dropout=0.0, **KWARGS)
    # The deep network's dropout.
    dropped = dcnv2.Model(
      FIELD_DIMS, structure=structure, dropout=0.5, **KWARGS
    )
    variables = random_variables(base, ids)
    check_dropout_in_training_only(base, dropped, variables, ids)

  def test_dropout_without_batchnorm(self):
    # No statistics: training mode without dropout is eval mode.
    ids = random_ids(16, FIELD_DIMS, seed=2)
    kwargs = dict(KWARGS, batch_norm=False)
    base = dcnv2.Model(FIELD_DIMS, dropout=0.0, **kwargs)
    dropped = dcnv2.Model(FIELD_DIMS, dropout=0.5, **kwargs)
    variables = random_variables(base, ids)
    self.assertNotIn('batch_stats', variables)
    check_dropout_in_training_only(base, dropped, variables, ids)


class ConfigTest(absltest.TestCase):
  def test_config(self):
    config = dcnv2_config.get_config()
    self.assertEqual(config.model_name, 'dcnv2')
    self.assertEqual(
      recipe(dcnv2_config),
      dict(
        embed_dim=16,
        num_cross_layers=3,
        mlp_dims=(16, 16),
        dropout=0.2,
        structure='parallel',
        low_rank=None,
        num_experts=4,
        linear_init='lecun',
        batch_norm=False,
      ),
    )
    variables = check_config_model(dcnv2, config)
    kernel = variables['params']['logit']['kernel']
    self.assertEqual(kernel.shape, (2 * 16 + 16, 1))  # [x_L; MLP(x_0)]


if __name__ == '__main__':
  absltest.main()
