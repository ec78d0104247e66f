"""PNN (models/pnn.py): parity with torchfm, products by brute force, training.

tests/fixtures/torchfm_ipnn.npz and torchfm_opnn.npz were written by
tools/make_torchfm_fixtures.py from torchfm 0.7.0's
`ProductNeuralNetworkModel` (method 'inner' and 'outer') with random
weights: its eval-mode output, and one train-mode step (loss, gradients,
BatchNorm statistics). Torch is not needed to run these tests.
"""

import importlib
import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from model_testing import check_config_model
from model_testing import check_dropout_in_training_only
from model_testing import check_torchfm_eval
from model_testing import check_torchfm_step
from model_testing import load_fixture
from model_testing import np_fields
from model_testing import np_mlp
from model_testing import random_ids
from model_testing import random_variables
from model_testing import recipe
from model_testing import side_inputs
from model_testing import torch_features_embedding
from model_testing import torch_mlp
import numpy as np

from configs import ipnn as ipnn_config
from configs import opnn as opnn_config

pnn = importlib.import_module('models.pnn')

FIELD_DIMS = (7, 11, 5, 4)
MULTI_FIELD_DIMS = (6, 3)
KWARGS = dict(embed_dim=3, mlp_dims=(6, 4))


def _np_pnn(variables, method, v):
  """y = MLP([v_1; ...; v_T; p_12, ..., p_{T-1,T}]), pair by pair."""
  params, stats = variables['params'], variables['batch_stats']
  batch, fields, _ = v.shape
  products = []
  for pair, (f, g) in enumerate(itertools.combinations(range(fields), 2)):
    if method == 'inner':
      products.append(np.sum(v[:, f] * v[:, g], axis=1))
    else:
      # torchfm's kernel K[a, pair, c] pairs v_g[a] with v_f[c].
      k = np.asarray(params['OuterProductNetwork_0']['kernel'], np.float64)
      products.append(
        np.array([v[b, g] @ k[:, pair, :] @ v[b, f] for b in range(batch)])
      )
  # One field has no pair: the MLP reads z alone.
  p = np.stack(products, 1) if products else np.zeros((batch, 0))
  x = np.concatenate([v.reshape(batch, -1), p], axis=1)
  return np_mlp(
    x,
    params['MultiLayerPerceptron_0'],
    stats['MultiLayerPerceptron_0'],
    num_hidden=2,
  )


def _from_torch(w, method, num_hidden=2):
  """torchfm PNN state dict -> our variables."""
  mlp, stats = torch_mlp(w, 'mlp.mlp', num_hidden)
  params = {
    'FeaturesEmbedding_0': torch_features_embedding(w),
    'MultiLayerPerceptron_0': mlp,
  }
  if method == 'outer':
    # Same [dim, pairs, dim] layout and index order as torchfm's kernel.
    params['OuterProductNetwork_0'] = {'kernel': w['pn.kernel']}
  return {'params': params, 'batch_stats': {'MultiLayerPerceptron_0': stats}}


class TorchfmParityTest(parameterized.TestCase):
  def _load(self, method, dropout):
    """The model of the fixture, the fixture, and its converter."""
    data, field_dims = load_fixture({'inner': 'ipnn', 'outer': 'opnn'}[method])
    model = pnn.Model(
      field_dims,
      embed_dim=4,
      mlp_dims=(8, 6),
      dropout=dropout,
      method=method,
    )
    return model, data, lambda w: _from_torch(w, method)

  @parameterized.parameters('inner', 'outer')
  def test_eval_outputs_match_torchfm(self, method):
    check_torchfm_eval(*self._load(method, dropout=0.2))

  @parameterized.parameters('inner', 'outer')
  def test_train_step_matches_torchfm(self, method):
    check_torchfm_step(*self._load(method, dropout=0.0))


class ProductTest(parameterized.TestCase):
  @parameterized.parameters('inner', 'outer')
  def test_eval_model_matches_brute_force(self, method):
    model = pnn.Model(FIELD_DIMS, method=method, **KWARGS)
    ids = random_ids(7, FIELD_DIMS)
    variables = random_variables(model, ids)
    out = model.apply(variables, ids)
    v = np_fields(
      variables['params']['FeaturesEmbedding_0'], 'embedding', ids, FIELD_DIMS
    )
    np.testing.assert_allclose(
      out, _np_pnn(variables, method, v), rtol=1e-4, atol=1e-4
    )

  @parameterized.parameters('inner', 'outer')
  def test_side_fields_are_more_fields_of_the_products(self, method):
    # 4 one-hot + 2 multi-hot + 2 numeric fields: T = 8, 28 pairs.
    model = pnn.Model(
      FIELD_DIMS,
      multi_field_dims=MULTI_FIELD_DIMS,
      num_dense=2,
      method=method,
      **KWARGS,
    )
    ids = random_ids(7, FIELD_DIMS)
    multi, dense = side_inputs(7, MULTI_FIELD_DIMS)
    variables = random_variables(model, ids, multi, dense)
    first = variables['params']['MultiLayerPerceptron_0']['Dense_0']
    self.assertEqual(first['kernel'].shape, (8 * 3 + 28, 6))
    out = model.apply(variables, ids, multi, dense)
    v = np_fields(
      variables['params']['FeaturesEmbedding_0'],
      'embedding',
      ids,
      FIELD_DIMS,
      multi,
      MULTI_FIELD_DIMS,
      dense,
    )
    np.testing.assert_allclose(
      out, _np_pnn(variables, method, v), rtol=1e-4, atol=1e-4
    )

  @parameterized.parameters('inner', 'outer')
  def test_one_field_has_no_pair_and_the_mlp_reads_z_alone(self, method):
    # As torchfm's: P = 0 products; OPNN then has no kernel (its xavier fans
    # would be zero) and is IPNN with the same weights.
    model = pnn.Model((9,), method=method, **KWARGS)
    ids = random_ids(7, (9,))
    variables = random_variables(model, ids)
    self.assertNotIn('OuterProductNetwork_0', variables['params'])
    first = variables['params']['MultiLayerPerceptron_0']['Dense_0']
    self.assertEqual(first['kernel'].shape, (3, 6))
    out = model.apply(variables, ids)
    v = np_fields(
      variables['params']['FeaturesEmbedding_0'], 'embedding', ids, (9,)
    )
    np.testing.assert_allclose(
      out, _np_pnn(variables, method, v), rtol=1e-4, atol=1e-4
    )
    inner = pnn.Model((9,), method='inner', **KWARGS).apply(variables, ids)
    np.testing.assert_allclose(out, inner, rtol=1e-6)
    y, _ = model.apply(
      variables,
      ids,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(1)},
    )
    self.assertTrue(np.all(np.isfinite(y)))

  def test_outer_kernel_is_xavier_uniform_with_torch_fans(self):
    # torch's xavier_uniform_ on [dim, pairs, dim]: fan_in = pairs * dim,
    # fan_out = dim * dim.
    v = np.ones((2, 20, 8), np.float32)  # 190 pairs
    kernel = pnn.OuterProductNetwork().init(jax.random.key(0), v)['params'][
      'kernel'
    ]
    self.assertEqual(kernel.shape, (8, 190, 8))
    bound = np.sqrt(6.0 / (190 * 8 + 8 * 8))
    self.assertLessEqual(float(jnp.max(jnp.abs(kernel))), bound)
    self.assertGreater(float(jnp.max(jnp.abs(kernel))), 0.99 * bound)

  def test_unknown_method_is_an_error(self):
    model = pnn.Model(FIELD_DIMS, method='kernel', **KWARGS)
    with self.assertRaisesRegex(ValueError, "'inner' or 'outer'"):
      model.init(jax.random.key(0), random_ids(2, FIELD_DIMS))


class TrainingModeTest(parameterized.TestCase):
  @parameterized.parameters('inner', 'outer')
  def test_dropout_batchnorm_and_eval(self, method):
    ids = random_ids(16, FIELD_DIMS, seed=2)
    # Wide hidden layers: dropout 0.5 rarely drops a whole layer.
    kwargs = dict(embed_dim=3, mlp_dims=(16, 16), method=method)
    base = pnn.Model(FIELD_DIMS, dropout=0.0, **kwargs)
    # The MLP's dropout, the model's only dropout site.
    dropped = pnn.Model(FIELD_DIMS, dropout=0.5, **kwargs)
    variables = random_variables(base, ids)
    check_dropout_in_training_only(base, dropped, variables, ids)


class ConfigTest(parameterized.TestCase):
  @parameterized.parameters(
    (ipnn_config, 'inner'),
    (opnn_config, 'outer'),
  )
  def test_config_is_pytorch_fm_examples_main(self, config_module, method):
    config = config_module.get_config()
    self.assertEqual(config.model_name, 'pnn')
    self.assertEqual(
      recipe(config_module),
      dict(
        embed_dim=16,
        mlp_dims=(16,),
        dropout=0.2,
        method=method,
        # pytorch-fm's torch.nn.Linear initialisers.
        linear_init='torch',
      ),
    )
    check_config_model(pnn, config)


if __name__ == '__main__':
  absltest.main()
