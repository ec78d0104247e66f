"""PNN (models/pnn.py): parity with torchfm, products by brute force, training.

tests/fixtures/torchfm_ipnn.npz and torchfm_opnn.npz were written by
tools/make_torchfm_fixtures.py from torchfm 0.7.0's
`ProductNeuralNetworkModel` (method 'inner' and 'outer') with random
weights: its eval-mode output, and one train-mode step (loss, gradients,
BatchNorm statistics). Torch is not needed to run these tests.
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

from configs import ipnn as ipnn_config
from configs import opnn as opnn_config

pnn = importlib.import_module('models.pnn')

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
FIELD_DIMS = (7, 11, 5, 4)
MULTI_FIELD_DIMS = (6, 3)
EPS = 1e-5
KWARGS = dict(embed_dim=3, mlp_dims=(6, 4))


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
  """Random parameters and BatchNorm statistics everywhere."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 1.5, size=x.shape).astype(np.float32)
    return (0.5 * rng.normal(size=x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, variables)


def _np_fields(p, ids, multi=None, dense=None):
  """Field vectors `[batch, T, dim]` by hand: one-hot, multi-hot mean, x*e."""
  table = np.asarray(p['embedding'], np.float64)
  out = [table[ids + np.cumsum((0,) + FIELD_DIMS[:-1])]]
  if multi is not None:
    multi_table = np.asarray(p['multi_embedding'], np.float64)
    starts = np.cumsum((0,) + MULTI_FIELD_DIMS[:-1])
    pooled = np.zeros(multi.shape[:2] + (table.shape[1],))
    for b, m in itertools.product(*map(range, multi.shape[:2])):
      rows = [starts[m] + i for i in multi[b, m] if i >= 0]
      if rows:
        pooled[b, m] = multi_table[rows].mean(axis=0)
    out.append(pooled)
  if dense is not None:
    dense_table = np.asarray(p['dense_embedding'], np.float64)
    out.append(dense[:, :, None] * dense_table[None])
  return np.concatenate(out, axis=1)


def _np_mlp(x, params, stats, num_hidden):
  """Eval-mode MultiLayerPerceptron (dropout is the identity)."""
  for i in range(num_hidden):
    x = x @ params[f'Dense_{i}']['kernel'] + params[f'Dense_{i}']['bias']
    bn, s = params[f'BatchNorm_{i}'], stats[f'BatchNorm_{i}']
    x = (x - s['mean']) / np.sqrt(s['var'] + EPS) * bn['scale'] + bn['bias']
    x = np.maximum(x, 0.0)
  out = params[f'Dense_{num_hidden}']
  return (x @ out['kernel'] + out['bias'])[:, 0]


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
  x = np.concatenate([v.reshape(batch, -1), np.stack(products, 1)], axis=1)
  return _np_mlp(
    x,
    params['MultiLayerPerceptron_0'],
    stats['MultiLayerPerceptron_0'],
    num_hidden=2,
  )


def _from_torch(w, method, num_hidden=2):
  """torchfm PNN state dict (or its gradients) -> our variables."""
  mlp, stats = {}, {}
  for i in range(num_hidden):
    lin, bn = f'mlp.mlp.{4 * i}', f'mlp.mlp.{4 * i + 1}'
    mlp[f'Dense_{i}'] = {
      'kernel': w[f'{lin}.weight'].T,
      'bias': w[f'{lin}.bias'],
    }
    mlp[f'BatchNorm_{i}'] = {
      'scale': w[f'{bn}.weight'],
      'bias': w[f'{bn}.bias'],
    }
    if f'{bn}.running_mean' in w:
      stats[f'BatchNorm_{i}'] = {
        'mean': w[f'{bn}.running_mean'],
        'var': w[f'{bn}.running_var'],
      }
  out = f'mlp.mlp.{4 * num_hidden}'
  mlp[f'Dense_{num_hidden}'] = {
    'kernel': w[f'{out}.weight'].T,
    'bias': w[f'{out}.bias'],
  }
  params = {
    'FeaturesEmbedding_0': {'embedding': w['embedding.embedding.weight']},
    'MultiLayerPerceptron_0': mlp,
  }
  if method == 'outer':
    # Same [dim, pairs, dim] layout and index order as torchfm's kernel.
    params['OuterProductNetwork_0'] = {'kernel': w['pn.kernel']}
  return {'params': params, 'batch_stats': {'MultiLayerPerceptron_0': stats}}


class TorchfmParityTest(parameterized.TestCase):
  def _load(self, method):
    name = {'inner': 'ipnn', 'outer': 'opnn'}[method]
    data = np.load(os.path.join(FIXTURES, f'torchfm_{name}.npz'))
    w = {k[2:]: data[k] for k in data.files if k.startswith('w/')}
    field_dims = tuple(int(d) for d in data['field_dims'])
    return data, w, field_dims

  def _model(self, field_dims, method, dropout=0.2):
    return pnn.Model(
      field_dims=field_dims,
      embed_dim=4,
      mlp_dims=(8, 6),
      dropout=dropout,
      method=method,
    )

  @parameterized.parameters('inner', 'outer')
  def test_eval_outputs_match_torchfm(self, method):
    data, w, field_dims = self._load(method)
    variables = _from_torch(w, method)
    model = self._model(field_dims, method)
    init = model.init(jax.random.key(0), data['ids'])
    self.assertEqual(
      jax.tree.map(np.shape, init), jax.tree.map(np.shape, variables)
    )
    logits = model.apply(variables, data['ids'], train=False)
    np.testing.assert_allclose(
      jax.nn.sigmoid(logits), data['probs'], rtol=1e-5, atol=1e-5
    )

  @parameterized.parameters('inner', 'outer')
  def test_train_step_matches_torchfm(self, method):
    # torchfm's step ran in train mode with dropout 0: batch statistics in
    # BatchNorm, BCE of the probabilities, then its running statistics.
    data, w, field_dims = self._load(method)
    variables = _from_torch(w, method)
    model = self._model(field_dims, method, dropout=0.0)
    ids, labels = data['ids'], data['train/labels']

    def loss_fn(params):
      logits, state = model.apply(
        {**variables, 'params': params},
        ids,
        train=True,
        mutable=['batch_stats'],
      )
      loss = jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)
      return loss, (logits, state)

    (loss, (logits, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables['params']
    )
    np.testing.assert_allclose(
      jax.nn.sigmoid(logits), data['train/probs'], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(loss, data['train/loss'], rtol=1e-5)
    torch_grads = _from_torch(
      {k[5:]: data[k] for k in data.files if k.startswith('grad/')}, method
    )['params']
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      expected = torch_grads
      for key in path:
        expected = expected[key.key]
      with self.subTest(jax.tree_util.keystr(path)):
        np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-6)
    # Running statistics: torch updates the variance with the unbiased
    # batch variance, Flax with the biased one; same momentum (0.1 / 0.9).
    n = len(ids)
    for i, bn in ((0, 'mlp.mlp.1'), (1, 'mlp.mlp.5')):
      got = state['batch_stats']['MultiLayerPerceptron_0'][f'BatchNorm_{i}']
      old_var = w[f'{bn}.running_var']
      np.testing.assert_allclose(
        got['mean'], data[f'after/{bn}.running_mean'], rtol=1e-5, atol=1e-6
      )
      unbiased = (data[f'after/{bn}.running_var'] - 0.9 * old_var) / 0.1
      np.testing.assert_allclose(
        got['var'],
        0.9 * old_var + 0.1 * unbiased * (n - 1) / n,
        rtol=1e-4,
        atol=1e-5,
      )


class ProductTest(parameterized.TestCase):
  @parameterized.parameters('inner', 'outer')
  def test_eval_model_matches_brute_force(self, method):
    model = pnn.Model(FIELD_DIMS, method=method, **KWARGS)
    ids = _ids(7)
    variables = _randomize(model.init(jax.random.key(0), ids))
    out = model.apply(variables, ids)
    v = _np_fields(variables['params']['FeaturesEmbedding_0'], ids)
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
    ids = _ids(7)
    multi, dense = _side_inputs(7)
    variables = _randomize(model.init(jax.random.key(0), ids, multi, dense))
    first = variables['params']['MultiLayerPerceptron_0']['Dense_0']
    self.assertEqual(first['kernel'].shape, (8 * 3 + 28, 6))
    out = model.apply(variables, ids, multi, dense)
    v = _np_fields(
      variables['params']['FeaturesEmbedding_0'], ids, multi, dense
    )
    np.testing.assert_allclose(
      out, _np_pnn(variables, method, v), rtol=1e-4, atol=1e-4
    )

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
      model.init(jax.random.key(0), _ids(2))


class TrainingModeTest(parameterized.TestCase):
  @parameterized.parameters('inner', 'outer')
  def test_dropout_batchnorm_and_eval(self, method):
    ids = _ids(16, seed=2)
    # Wide hidden layers: dropout 0.5 rarely drops a whole layer.
    kwargs = dict(embed_dim=3, mlp_dims=(16, 16), method=method)
    base = pnn.Model(FIELD_DIMS, dropout=0.0, **kwargs)
    variables = _randomize(base.init(jax.random.key(0), ids))

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
    for path, new in jax.tree_util.tree_leaves_with_path(state0['batch_stats']):
      old = variables['batch_stats']
      for key in path:
        old = old[key.key]
      with self.subTest(jax.tree_util.keystr(path)):
        self.assertFalse(np.allclose(new, old))
    # The MLP's dropout (the model's only dropout site) changes training
    # outputs, by key.
    dropped = pnn.Model(FIELD_DIMS, dropout=0.5, **kwargs)
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
    zeros = initial_zero_gradients('pnn')
    self.assertEqual(zeros, dict.fromkeys(zeros, []))


class ConfigTest(parameterized.TestCase):
  @parameterized.parameters(
    (ipnn_config, 'inner'),
    (opnn_config, 'outer'),
  )
  def test_config_is_pytorch_fm_examples_main(self, config_module, method):
    config = config_module.get_config()
    self.assertEqual(config.model_name, 'pnn')
    self.assertEqual(
      dict(config.model),
      dict(embed_dim=16, mlp_dims=(16,), dropout=0.2, method=method),
    )
    model = pnn.Model(field_dims=(6, 9), **config.model)
    ids = _ids(4, field_dims=(6, 9))
    out = model.apply(model.init(jax.random.key(0), ids), ids)
    self.assertEqual(out.shape, (4,))
    self.assertEqual(out.dtype, jnp.float32)


if __name__ == '__main__':
  absltest.main()
