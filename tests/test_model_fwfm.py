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
from model_tables import initial_zero_gradients
import numpy as np

from configs import fwfm as fwfm_config

fwfm = importlib.import_module('models.fwfm')
fm = importlib.import_module('models.fm')

FIELD_DIMS = (7, 11, 5, 4)
MULTI_FIELD_DIMS = (6, 3)
LINEAR_TYPES = ('lw', 'felv', 'filv')


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


def _np_rows(p, prefix, ids, multi=None, dense=None):
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


def _np_fwfm(params, linear_type, ids, multi=None, dense=None):
  """linear(x) + sum_{f<g} r_fg <v_f, v_g>, pair by pair."""
  v = _np_rows(params['FeaturesEmbedding_0'], 'embedding', ids, multi, dense)
  if linear_type == 'lw':
    p = params['FeaturesLinear_0']
    w = _np_rows(p, 'weight', ids, multi, dense)[..., 0]  # [B, T]
    y = p['bias'][0] + w.sum(axis=1)
  else:
    p = params['EmbeddingLinear_0']
    if linear_type == 'felv':
      w = _np_rows(p, 'weight', ids, multi, dense)
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
    ids = _ids(7)
    params = _randomize(model.init(jax.random.key(0), ids))['params']
    self.assertEqual(params['FieldWeightedInteraction_0']['r'].shape, (6,))
    out = model.apply({'params': params}, ids)
    np.testing.assert_allclose(
      out, _np_fwfm(params, linear_type, ids), rtol=1e-4, atol=1e-4
    )

  @parameterized.parameters(*LINEAR_TYPES)
  def test_side_fields_are_more_fields_of_both_terms(self, linear_type):
    # 4 one-hot + 2 multi-hot + 2 numeric fields: T = 8, 28 pair weights.
    model = fwfm.Model(
      FIELD_DIMS,
      multi_field_dims=MULTI_FIELD_DIMS,
      num_dense=2,
      embed_dim=3,
      linear_type=linear_type,
    )
    ids = _ids(7)
    multi, dense = _side_inputs(7)
    params = _randomize(model.init(jax.random.key(0), ids, multi, dense))[
      'params'
    ]
    self.assertEqual(params['FieldWeightedInteraction_0']['r'].shape, (28,))
    out = model.apply({'params': params}, ids, multi, dense)
    np.testing.assert_allclose(
      out,
      _np_fwfm(params, linear_type, ids, multi, dense),
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
    variables = _randomize(model.init(jax.random.key(0), ids, dense=dense))
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
    params = model.init(jax.random.key(0), _ids(2))['params']
    shapes = jax.tree.map(np.shape, params)
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
    ids = _ids(9)
    fm_model = fm.Model(FIELD_DIMS, embed_dim=3)
    fm_params = _randomize(fm_model.init(jax.random.key(0), ids))['params']
    model = fwfm.Model(FIELD_DIMS, embed_dim=3, linear_type='lw')
    params = model.init(jax.random.key(0), ids)['params']
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
      model.init(jax.random.key(0), _ids(2))


class TrainingModeTest(absltest.TestCase):
  def test_training_mode_is_eval_mode(self):
    # No dropout, no BatchNorm: train=True changes nothing, and there is no
    # state to update.
    model = fwfm.Model(FIELD_DIMS, embed_dim=3)
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


class InitialGradientTest(absltest.TestCase):
  def test_every_parameter_gets_a_gradient_from_initialisation(self):
    # tests/model_tables.py's TEST_KWARGS model on two fields, three draws.
    zeros = initial_zero_gradients('fwfm')
    self.assertEqual(zeros, dict.fromkeys(zeros, []))


class ConfigTest(absltest.TestCase):
  def test_config_is_fuxictr_defaults(self):
    config = fwfm_config.get_config()
    self.assertEqual(config.model_name, 'fwfm')
    self.assertEqual(dict(config.model), dict(embed_dim=10, linear_type='filv'))
    model = fwfm.Model(field_dims=(6, 9), **config.model)
    ids = _ids(4, field_dims=(6, 9))
    out = model.apply(model.init(jax.random.key(0), ids), ids)
    self.assertEqual(out.shape, (4,))
    self.assertEqual(out.dtype, jnp.float32)


if __name__ == '__main__':
  absltest.main()
