"""FwFM (models/fwfm.py): the equations by brute force, FM at init, training.

pytorch-fm has no FwFM: the model is checked against numpy loops over the
pairs of fields, for each of the paper's linear terms.
"""

import importlib
import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from model_testing import check_config_model
from model_testing import check_training_mode_is_eval_mode
from model_testing import init
from model_testing import np_fields
from model_testing import random_ids
from model_testing import random_variables
from model_testing import recipe
from model_testing import side_inputs
import numpy as np

from configs import fwfm as fwfm_config

fwfm = importlib.import_module('models.fwfm')
fm = importlib.import_module('models.fm')

FIELD_DIMS = (7, 11, 5, 4)
MULTI_FIELD_DIMS = (6, 3)
LINEAR_TYPES = ('lw', 'felv', 'filv')


def _np_rows(p, name, ids, multi=None, dense=None, pooling='mean'):
  """`np_fields` of this file's fields."""
  return np_fields(
    p, name, ids, FIELD_DIMS, multi, MULTI_FIELD_DIMS, dense, pooling
  )


def _np_fwfm(params, linear_type, ids, multi=None, dense=None, pooling='mean'):
  """linear(x) + sum_{f<g} r_fg <v_f, v_g>, pair by pair."""
  rows = lambda p, name: _np_rows(p, name, ids, multi, dense, pooling)
  v = rows(params['FeaturesEmbedding_0'], 'embedding')
  if linear_type == 'lw':
    p = params['FeaturesLinear_0']
    w = rows(p, 'weight')[..., 0]  # [B, T]
    y = p['bias'][0] + w.sum(axis=1)
  else:
    p = params['EmbeddingLinear_0']
    if linear_type == 'felv':
      w = rows(p, 'weight')
    else:
      w = np.broadcast_to(p['weight'], v.shape)
    y = p['bias'][0] + np.sum(v * w, axis=(1, 2))
  r = params['FieldWeightedInteraction_0']['r']
  pairs = itertools.combinations(range(v.shape[1]), 2)
  for k, (f, g) in enumerate(pairs):
    y = y + r[k] * np.sum(v[:, f] * v[:, g], axis=1)
  return y


class EquationTest(parameterized.TestCase):
  @parameterized.parameters(*LINEAR_TYPES)
  def test_eval_model_matches_brute_force(self, linear_type):
    model = fwfm.Model(FIELD_DIMS, embed_dim=3, linear_type=linear_type)
    ids = random_ids(7, FIELD_DIMS)
    params = random_variables(model, ids)['params']
    self.assertEqual(params['FieldWeightedInteraction_0']['r'].shape, (6,))
    out = model.apply({'params': params}, ids)
    np.testing.assert_allclose(
      out, _np_fwfm(params, linear_type, ids), rtol=1e-4, atol=1e-4
    )

  @parameterized.parameters(
    (linear_type, pooling)
    for linear_type in LINEAR_TYPES
    for pooling in ('mean', 'sum')
  )
  def test_side_fields_are_more_fields_of_both_terms(
    self, linear_type, pooling
  ):
    # 4 one-hot + 2 multi-hot + 2 numeric fields: T = 8, 28 pair weights.
    # FeLV's vectors pool as the embeddings do.
    model = fwfm.Model(
      FIELD_DIMS,
      multi_field_dims=MULTI_FIELD_DIMS,
      num_dense=2,
      multi_pooling=pooling,
      embed_dim=3,
      linear_type=linear_type,
    )
    ids = random_ids(7, FIELD_DIMS)
    multi, dense = side_inputs(7, MULTI_FIELD_DIMS)
    params = random_variables(model, ids, multi, dense)['params']
    self.assertEqual(params['FieldWeightedInteraction_0']['r'].shape, (28,))
    out = model.apply({'params': params}, ids, multi, dense)
    np.testing.assert_allclose(
      out,
      _np_fwfm(params, linear_type, ids, multi, dense, pooling),
      rtol=1e-4,
      atol=1e-4,
    )

  @parameterized.parameters(('lw', 0.0), ('filv', 0.0), ('felv', 1.0))
  def test_numeric_field_terms(self, linear_type, quadratic):
    # One one-hot and one numeric field: the pair, <v_0, x e>, is linear in
    # x, and so is the linear term, except FeLV's <x e, x w> (as FuxiCTR).
    model = fwfm.Model((3,), num_dense=1, embed_dim=3, linear_type=linear_type)
    ids = np.zeros((4, 1), np.int32)
    dense = np.array([[0.0], [0.5], [1.0], [-2.0]], np.float32)
    variables = random_variables(model, ids, None, dense)
    y, y2, y0 = (
      model.apply(variables, ids, dense=scale * dense) for scale in (1, 2, 0)
    )
    self.assertFalse(np.allclose(y, y0))
    p = variables['params']
    x2 = 0.0
    if quadratic:
      e = p['FeaturesEmbedding_0']['dense_embedding'][0]
      w = p['EmbeddingLinear_0']['dense_weight'][0]
      x2 = float(jnp.dot(e, w)) * dense[:, 0] ** 2
    # y(2x) - y(0) - 2 (y(x) - y(0)) = 2 * (quadratic part of y(x)).
    np.testing.assert_allclose(
      (y2 - y0) - 2 * (y - y0), 2 * x2, rtol=1e-4, atol=1e-5
    )

  @parameterized.parameters(*LINEAR_TYPES)
  def test_parameters_of_each_linear_type(self, linear_type):
    model = fwfm.Model(FIELD_DIMS, embed_dim=3, linear_type=linear_type)
    ids = random_ids(2, FIELD_DIMS)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)['params']
    shapes = jax.tree.map(np.shape, shapes)
    expected = {
      'lw': {'FeaturesLinear_0': {'weight': (27, 1), 'bias': (1,)}},
      'felv': {'EmbeddingLinear_0': {'weight': (27, 3), 'bias': (1,)}},
      'filv': {'EmbeddingLinear_0': {'weight': (4, 3), 'bias': (1,)}},
    }[linear_type]
    self.assertEqual(
      shapes,
      {
        **expected,
        'FeaturesEmbedding_0': {'embedding': (27, 3)},
        'FieldWeightedInteraction_0': {'r': (6,)},
      },
    )

  def test_untrained_fwfm_with_lw_is_fm(self):
    # r starts at one and the names match models/fm.py: an FM's parameters
    # give the same outputs (and warm-start an FwFM).
    ids = random_ids(9, FIELD_DIMS)
    fm_model = fm.Model(FIELD_DIMS, embed_dim=3)
    fm_params = random_variables(fm_model, ids)['params']
    model = fwfm.Model(FIELD_DIMS, embed_dim=3, linear_type='lw')
    params = init(model, ids)['params']
    np.testing.assert_array_equal(params['FieldWeightedInteraction_0']['r'], 1)
    params = {**params, **fm_params}
    np.testing.assert_allclose(
      model.apply({'params': params}, ids),
      fm_model.apply({'params': fm_params}, ids),
      rtol=1e-5,
      atol=1e-5,
    )

  def test_unknown_linear_type_is_an_error(self):
    model = fwfm.Model(FIELD_DIMS, linear_type='lv')
    with self.assertRaisesRegex(ValueError, "'lw', 'felv' or 'filv'"):
      model.init(jax.random.key(0), random_ids(2, FIELD_DIMS))


class TrainingModeTest(absltest.TestCase):
  def test_training_mode_is_eval_mode(self):
    model = fwfm.Model(FIELD_DIMS, embed_dim=3)
    ids = random_ids(8, FIELD_DIMS)
    variables = random_variables(model, ids)
    check_training_mode_is_eval_mode(model, variables, ids)


class ConfigTest(absltest.TestCase):
  def test_config_is_fuxictr_defaults(self):
    config = fwfm_config.get_config()
    self.assertEqual(config.model_name, 'fwfm')
    self.assertEqual(
      recipe(fwfm_config), dict(embed_dim=10, linear_type='filv')
    )
    check_config_model(fwfm, config)


if __name__ == '__main__':
  absltest.main()
