"""HOFM (models/hofm.py): parity with pytorch-fm master, ANOVA by brute force.

tests/fixtures/torchfm_hofm.npz was written by tools/make_torchfm_fixtures.py
from pytorch-fm's GitHub master `HighOrderFactorizationMachineModel` (order
4; not in torchfm 0.7.0) with random weights: its eval-mode output and one
training step (loss, gradients). Torch is not needed to run these tests.
"""

import importlib
import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
from model_testing import check_config_model
from model_testing import check_torchfm_eval
from model_testing import check_torchfm_step
from model_testing import check_training_mode_is_eval_mode
from model_testing import load_fixture
from model_testing import np_fields
from model_testing import np_linear
from model_testing import random_ids
from model_testing import random_variables
from model_testing import recipe
from model_testing import side_inputs
from model_testing import torch_features_embedding
from model_testing import torch_features_linear
import numpy as np

from configs import hofm as hofm_config

hofm = importlib.import_module('models.hofm')

FIELD_DIMS = (7, 11, 5, 4, 6)
MULTI_FIELD_DIMS = (6, 3)


def _np_anova(x, order):
  """sum over field subsets f_1 < ... < f_t of prod x_f, summed over dims."""
  total = np.zeros(x.shape[0])
  for subset in itertools.combinations(range(x.shape[1]), order):
    total += np.prod(x[:, subset], axis=1).sum(axis=-1)
  return total


def _np_hofm(params, order, embed_dim, ids, multi=None, dense=None):
  """w_0 + sum_f w_f + sum_{t=2}^m A^t(p^(t)) by enumeration of subsets."""
  side = (multi, MULTI_FIELD_DIMS, dense)
  y = np_linear(params['FeaturesLinear_0'], ids, FIELD_DIMS, *side)
  if order >= 2:
    embedding = params['FeaturesEmbedding_0']
    p = np_fields(embedding, 'embedding', ids, FIELD_DIMS, *side)
    for t in range(2, order + 1):
      y = y + _np_anova(p[..., (t - 2) * embed_dim : (t - 1) * embed_dim], t)
  return y


def _from_torch(w):
  """pytorch-fm master's HOFM state dict -> our variables."""
  return {
    'params': {
      'FeaturesLinear_0': torch_features_linear(w),
      'FeaturesEmbedding_0': torch_features_embedding(w),
    }
  }


class ReferenceParityTest(absltest.TestCase):
  """Against pytorch-fm master's code (fixture), order 4, embed_dim 3."""

  def setUp(self):
    super().setUp()
    self.data, field_dims = load_fixture('hofm')
    self.model = hofm.Model(field_dims, order=4, embed_dim=3)

  def test_eval_outputs_match_reference(self):
    check_torchfm_eval(self.model, self.data, _from_torch)

  def test_training_step_matches_reference(self):
    check_torchfm_step(self.model, self.data, _from_torch)


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

  @parameterized.parameters('normal', 'positive')
  def test_criteo_s_39_fields_lose_no_precision(self, values):
    # Newton's identities subtract; with all values positive their terms
    # are largest against the kernel. float32 against float64 enumeration.
    rng = np.random.default_rng(7)
    x = (
      rng.normal(scale=0.3, size=(3, 39, 2))
      if values == 'normal'
      else rng.uniform(size=(3, 39, 2))
    )
    for order in (3, 4):
      out = hofm.AnovaKernel(order).apply({}, x.astype(np.float32))
      want = _np_anova(x, order)
      np.testing.assert_allclose(out, want, rtol=5e-6)

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
    ids = random_ids(6, FIELD_DIMS)
    params = random_variables(model, ids)['params']
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
    ids = random_ids(6, FIELD_DIMS)
    multi, dense = side_inputs(6, MULTI_FIELD_DIMS)
    params = random_variables(model, ids, multi, dense)['params']
    out = model.apply({'params': params}, ids, multi, dense)
    np.testing.assert_allclose(
      out,
      _np_hofm(params, 3, 2, ids, multi, dense),
      rtol=1e-4,
      atol=1e-4,
    )

  def test_training_mode_is_eval_mode(self):
    model = hofm.Model(FIELD_DIMS, order=3, embed_dim=3)
    ids = random_ids(8, FIELD_DIMS)
    variables = random_variables(model, ids)
    check_training_mode_is_eval_mode(model, variables, ids)

  def test_order_below_one_is_an_error(self):
    with self.assertRaisesRegex(ValueError, 'order must be >= 1'):
      hofm.Model(FIELD_DIMS, order=0).init(
        jax.random.key(0), random_ids(2, FIELD_DIMS)
      )


class ConfigTest(absltest.TestCase):
  def test_config_is_pytorch_fm_examples_main(self):
    config = hofm_config.get_config()
    self.assertEqual(config.model_name, 'hofm')
    self.assertEqual(recipe(hofm_config), dict(order=3, embed_dim=16))
    check_config_model(hofm, config)


if __name__ == '__main__':
  absltest.main()
