"""FiBiNET (models/fibinet.py) against its equations, by brute force.

pytorch-fm has no FiBiNET: the SENET layer (eq. (1)-(4)), the three
bilinear types (eq. (5)-(7)) and the whole model are recomputed example by
example in numpy.
"""

import importlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from model_testing import check_config_model
from model_testing import check_dropout_in_training_only
from model_testing import init
from model_testing import loss_and_grads
from model_testing import np_linear
from model_testing import np_mlp
from model_testing import offsets
from model_testing import random_ids
from model_testing import random_variables
from model_testing import recipe
import numpy as np

from configs import fibinet as fibinet_config

fibinet = importlib.import_module('models.fibinet')

FIELD_DIMS = (7, 11, 5, 4)
KWARGS = dict(embed_dim=3, mlp_dims=(16, 16), reduction_ratio=2)


def _np_senet(e, params, excitation):
  """`v_f = a_f e_f`, `a = s(W_2 ReLU(W_1 z))`, `z_f = mean_d e_fd`."""
  w1 = params['Dense_0']['kernel'].T  # [reduced, F]
  w2 = params['Dense_1']['kernel'].T  # [F, reduced]
  out = np.empty_like(e)
  for b in range(len(e)):
    z = np.array([e[b, f].mean() for f in range(e.shape[1])])
    a = w2 @ np.maximum(w1 @ z, 0.0)
    a = np.maximum(a, 0.0) if excitation == 'relu' else 1 / (1 + np.exp(-a))
    out[b] = a[:, None] * e[b]
  return out


def _np_bilinear(e, weight, bilinear_type):
  """`p_fg = (e_f W) * e_g` for f < g, W by type, pair by pair."""
  num_fields = e.shape[1]
  pairs = []
  for f in range(num_fields):
    for g in range(f + 1, num_fields):
      if bilinear_type == 'field_all':
        w = weight
      elif bilinear_type == 'field_each':
        w = weight[f]
      else:
        w = weight[len(pairs)]
      pairs.append((e[:, f] @ w) * e[:, g])  # [B, D]
  return np.stack(pairs, axis=1)  # [B, P, D]


def _np_model(ids, variables, bilinear_type, excitation):
  p = variables['params']
  table = np.asarray(p['FeaturesEmbedding_0']['embedding'], np.float64)
  e = table[ids + offsets(FIELD_DIMS)]
  v = _np_senet(e, p['SqueezeExcitation_0'], excitation)
  first = _np_bilinear(e, p['BilinearInteraction_0']['weight'], bilinear_type)
  second = _np_bilinear(v, p['BilinearInteraction_1']['weight'], bilinear_type)
  pairs = np.concatenate([first, second], axis=1).reshape(len(ids), -1)
  # DeepNetwork: the MLP block without BatchNorm.
  deep = np_mlp(pairs, p['DeepNetwork_0'], None, 2, batchnorm=False)
  return np_linear(p['FeaturesLinear_0'], ids, FIELD_DIMS) + deep


class EquationTest(parameterized.TestCase):
  @parameterized.parameters(
    ('field_all', 'sigmoid'),
    ('field_each', 'sigmoid'),
    ('field_interaction', 'sigmoid'),
    ('field_interaction', 'relu'),
  )
  def test_eval_model_matches_brute_force(self, bilinear_type, excitation):
    model = fibinet.Model(
      FIELD_DIMS, bilinear_type=bilinear_type, excitation=excitation, **KWARGS
    )
    ids = random_ids(6, FIELD_DIMS)
    variables = random_variables(model, ids)
    out = model.apply(variables, ids, train=False)
    expected = _np_model(ids, variables, bilinear_type, excitation)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_weight_shapes_by_type(self):
    # 4 fields, 6 pairs, dim 3; SENET squeezes 4 fields to int(4 / 2) = 2.
    expected = {
      'field_all': (3, 3),
      'field_each': (3, 3, 3),  # one per field but the last
      'field_interaction': (6, 3, 3),
    }
    ids = random_ids(2, FIELD_DIMS)
    for bilinear_type, shape in expected.items():
      model = fibinet.Model(FIELD_DIMS, bilinear_type=bilinear_type, **KWARGS)
      shapes = jax.tree.map(
        np.shape, jax.eval_shape(model.init, jax.random.key(0), ids)['params']
      )
      with self.subTest(bilinear_type):
        for name in ('BilinearInteraction_0', 'BilinearInteraction_1'):
          self.assertEqual(shapes[name]['weight'], shape)
        self.assertEqual(
          shapes['SqueezeExcitation_0'],
          {'Dense_0': {'kernel': (4, 2)}, 'Dense_1': {'kernel': (2, 4)}},
        )

  def test_bilinear_init_is_xavier_normal_per_matrix(self):
    # As the docstring says: fans dim and dim per [dim, dim] matrix, std
    # sqrt(1 / dim) for every type. FuxiCTR's fans over the whole tensor
    # would give 0.29x (field_each) and 0.21x (field_interaction) of it.
    fields, dim = 8, 16
    e = np.ones((1, fields, dim), np.float32)
    for bilinear_type in ('field_all', 'field_each', 'field_interaction'):
      layer = fibinet.BilinearInteraction(bilinear_type)
      w = np.asarray(layer.init(jax.random.key(0), e)['params']['weight'])
      with self.subTest(bilinear_type):
        self.assertAlmostEqual(np.std(w) * np.sqrt(dim), 1.0, delta=0.1)

  def test_two_fields_squeeze_to_one_unit(self):
    # max(1, int(2 / 3)) = 1, as FuxiCTR; one pair.
    model = fibinet.Model((6, 9), embed_dim=3, mlp_dims=(4,))
    shapes = jax.tree.map(
      np.shape,
      jax.eval_shape(model.init, jax.random.key(0), random_ids(2, (6, 9))),
    )['params']
    self.assertEqual(shapes['SqueezeExcitation_0']['Dense_0']['kernel'], (2, 1))
    self.assertEqual(shapes['BilinearInteraction_0']['weight'], (1, 3, 3))

  def test_bad_arguments_are_errors(self):
    ids = random_ids(2, FIELD_DIMS)
    for kwargs, message in (
      (dict(bilinear_type='field_pair'), "'field_all', 'field_each'"),
      (dict(excitation='tanh'), "'relu' or 'sigmoid'"),
    ):
      with self.subTest(message):
        model = fibinet.Model(FIELD_DIMS, **kwargs, **KWARGS)
        with self.assertRaisesRegex(ValueError, message):
          model.init(jax.random.key(0), ids)
    with self.assertRaisesRegex(ValueError, 'at least two fields'):
      fibinet.Model((5,), **KWARGS).init(jax.random.key(0), ids[:, :1])


def _brier(logits, labels):
  return jnp.mean((jax.nn.sigmoid(logits) - labels) ** 2)


class ExcitationTest(parameterized.TestCase):
  @parameterized.parameters(('relu', True), ('sigmoid', False))
  def test_relu_excitation_silences_a_field_for_good(self, excitation, dead):
    # Two fields squeeze to one unit r >= 0; a negative entry of W_2 makes
    # that field's ReLU weight 0 for every example, so q (one pair) is 0
    # and SENET and q's bilinear weights get no gradient. The sigmoid
    # weight of the same field is in (0, 1) and passes one.
    field_dims = (6, 9)
    model = fibinet.Model(
      field_dims, embed_dim=3, mlp_dims=(4,), excitation=excitation
    )
    ids = random_ids(32, field_dims)
    params = init(model, ids)['params']
    senet = dict(params['SqueezeExcitation_0'])
    senet['Dense_1'] = {'kernel': jnp.array([[-1.0, 1.0]])}
    params = {**params, 'SqueezeExcitation_0': senet}
    labels = (np.arange(32) % 3 == 0).astype(np.float32)
    _, _, grads, _ = loss_and_grads(
      model, {'params': params}, (ids,), labels, loss=_brier, train=False
    )
    for leaf in (
      grads['BilinearInteraction_1']['weight'],
      grads['SqueezeExcitation_0']['Dense_0']['kernel'],
      grads['SqueezeExcitation_0']['Dense_1']['kernel'],
    ):
      self.assertEqual(float(jnp.max(jnp.abs(leaf))) == 0.0, dead)


class TrainingModeTest(absltest.TestCase):
  def test_dropout_acts_only_in_training_and_there_is_no_batchnorm(self):
    ids = random_ids(16, FIELD_DIMS, seed=2)
    base = fibinet.Model(FIELD_DIMS, dropout=0.0, **KWARGS)
    # The MLP's dropout.
    dropped = fibinet.Model(FIELD_DIMS, dropout=0.5, **KWARGS)
    variables = random_variables(base, ids)
    self.assertEqual(set(variables), {'params'})
    check_dropout_in_training_only(base, dropped, variables, ids)


class ConfigTest(absltest.TestCase):
  def test_config(self):
    config = fibinet_config.get_config()
    self.assertEqual(config.model_name, 'fibinet')
    self.assertEqual(
      recipe(fibinet_config),
      dict(
        embed_dim=16,
        mlp_dims=(),
        dropout=0.0,
        reduction_ratio=3.0,
        excitation='sigmoid',
        bilinear_type='field_interaction',
        linear_init='torch',
      ),
    )
    variables = check_config_model(fibinet, config)
    kernel = variables['params']['DeepNetwork_0']['Dense_0']['kernel']
    self.assertEqual(kernel.shape, (2 * 16, 1))  # p and q of one pair


if __name__ == '__main__':
  absltest.main()
