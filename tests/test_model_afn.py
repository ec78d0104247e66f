"""AFN (models/afn.py): parity with torchfm, the LNN by brute force, training.

tests/fixtures/torchfm_afn.npz was written by tools/make_torchfm_fixtures.py
from torchfm 0.7.0's `AdaptiveFactorizationNetwork` with random weights: its
eval-mode output, and one train-mode step (loss, gradients, BatchNorm
statistics). Torch is not needed to run these tests.
"""

import importlib
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from model_tables import initial_zero_gradients
import numpy as np

from configs import afn as afn_config

afn = importlib.import_module('models.afn')

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'torchfm_afn.npz')
FIELD_DIMS = (7, 11, 5, 4)
OFFSETS = np.cumsum((0,) + FIELD_DIMS[:-1])
EPS = 1e-5
KWARGS = dict(embed_dim=3, lnn_dim=5, mlp_dims=(16, 16))


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


def _np_batchnorm(x, params, mean, var, axis=-1):
  """BatchNorm over `axis` with the given mean and variance."""
  shape = [1] * x.ndim
  shape[axis] = -1
  x = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + EPS)
  return x * params['scale'].reshape(shape) + params['bias'].reshape(shape)


def _np_mlp(x, params, stats, num_hidden):
  """Eval-mode MultiLayerPerceptron (dropout is the identity)."""
  for i in range(num_hidden):
    x = x @ params[f'Dense_{i}']['kernel'] + params[f'Dense_{i}']['bias']
    s = stats[f'BatchNorm_{i}']
    x = _np_batchnorm(x, params[f'BatchNorm_{i}'], s['mean'], s['var'])
    x = np.maximum(x, 0.0)
  out = params[f'Dense_{num_hidden}']
  return (x @ out['kernel'] + out['bias'])[:, 0]


def _np_lnn(e, weight, form, params=None, stats=None):
  """Eq. (5) neuron by neuron, field by field, as a product of powers."""
  batch, fields, dim = e.shape
  if form == 'torchfm':
    base = 1.0 + np.abs(e) + 1e-7  # log1p(|e| + 1e-7) = log(base)
  else:
    base = np.exp(
      _np_batchnorm(
        np.log(np.maximum(np.abs(e), 1e-4)),
        params['log_batch_norm'],
        stats['log_batch_norm']['mean'],
        stats['log_batch_norm']['var'],
        axis=1,
      )
    )
  out = np.ones((batch, weight.shape[0], dim))
  for j in range(weight.shape[0]):
    for f in range(fields):
      out[:, j] *= base[:, f] ** weight[j, f]
  if form == 'torchfm':
    return np.maximum(out - 1.0, 0.0)
  s = stats['exp_batch_norm']
  return _np_batchnorm(out, params['exp_batch_norm'], s['mean'], s['var'], 1)


def _from_torch(w, num_hidden):
  """torchfm AFN state dict -> our (params, batch_stats)."""
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
    'FeaturesLinear_0': {
      'weight': w['linear.fc.weight'],
      'bias': w['linear.bias'],
    },
    'FeaturesEmbedding_0': {'embedding': w['embedding.embedding.weight']},
    'LogarithmicNeuralNetwork_0': {'weight': w['LNN.weight']},
    'MultiLayerPerceptron_0': mlp,
  }
  return {'params': params, 'batch_stats': {'MultiLayerPerceptron_0': stats}}


class TorchfmParityTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    data = np.load(FIXTURE)
    self.data = data
    self.w = {k[2:]: data[k] for k in data.files if k.startswith('w/')}
    self.variables = _from_torch(self.w, num_hidden=2)
    self.model = afn.Model(
      field_dims=tuple(int(d) for d in data['field_dims']),
      embed_dim=4,
      lnn_dim=6,
      mlp_dims=(8, 6),
      dropout=0.2,
    )

  def test_converted_tree_has_the_structure_of_init(self):
    init = self.model.init(jax.random.key(0), self.data['ids'])
    self.assertEqual(
      jax.tree.map(np.shape, init), jax.tree.map(np.shape, self.variables)
    )

  def test_eval_outputs_match_torchfm(self):
    logits = self.model.apply(self.variables, self.data['ids'], train=False)
    np.testing.assert_allclose(
      jax.nn.sigmoid(logits), self.data['probs'], rtol=1e-5, atol=1e-5
    )

  def test_train_step_matches_torchfm(self):
    # torchfm's step ran in train mode with dropout 0: batch statistics in
    # BatchNorm, BCE of the probabilities, then its running statistics.
    model = afn.Model(
      field_dims=self.model.field_dims,
      embed_dim=4,
      lnn_dim=6,
      mlp_dims=(8, 6),
      dropout=0.0,
    )
    ids, labels = self.data['ids'], self.data['train/labels']

    def loss_fn(params):
      logits, state = model.apply(
        {**self.variables, 'params': params},
        ids,
        train=True,
        mutable=['batch_stats'],
      )
      loss = jnp.mean(
        jnp.logaddexp(0.0, logits) - labels * logits
      )  # BCE with logits
      return loss, (logits, state)

    (loss, (logits, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      self.variables['params']
    )
    np.testing.assert_allclose(
      jax.nn.sigmoid(logits), self.data['train/probs'], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(loss, self.data['train/loss'], rtol=1e-5)
    torch_grads = _from_torch(
      {
        **self.w,
        **{k[5:]: self.data[k] for k in self.data.files if k[:5] == 'grad/'},
      },
      num_hidden=2,
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
      old_mean = self.w[f'{bn}.running_mean']
      old_var = self.w[f'{bn}.running_var']
      np.testing.assert_allclose(
        got['mean'], self.data[f'after/{bn}.running_mean'], rtol=1e-5, atol=1e-6
      )
      unbiased = (self.data[f'after/{bn}.running_var'] - 0.9 * old_var) / 0.1
      np.testing.assert_allclose(
        got['var'],
        0.9 * old_var + 0.1 * unbiased * (n - 1) / n,
        rtol=1e-4,
        atol=1e-5,
      )
      self.assertFalse(np.allclose(got['mean'], old_mean))


class LogarithmicNeuralNetworkTest(parameterized.TestCase):
  @parameterized.parameters('torchfm', 'paper')
  def test_eval_model_matches_brute_force(self, form):
    model = afn.Model(FIELD_DIMS, lnn=form, **KWARGS)
    ids = _ids(9)
    variables = _random_variables(model, ids)
    p, s = variables['params'], variables['batch_stats']
    out = model.apply(variables, ids, train=False)
    rows = ids + OFFSETS
    e = np.asarray(p['FeaturesEmbedding_0']['embedding'], np.float64)[rows]
    lnn_p = p['LogarithmicNeuralNetwork_0']
    y = _np_lnn(
      e,
      np.asarray(lnn_p['weight'], np.float64),
      form,
      lnn_p,
      s.get('LogarithmicNeuralNetwork_0'),
    )  # [B, L, D]
    linear = p['FeaturesLinear_0']
    expected = (
      linear['bias'][0]
      + linear['weight'][rows, 0].sum(axis=1)
      + _np_mlp(
        y.reshape(len(ids), -1),
        p['MultiLayerPerceptron_0'],
        s['MultiLayerPerceptron_0'],
        num_hidden=2,
      )
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_paper_form_normalises_with_batch_statistics_in_training(self):
    # Train mode: each field's logarithms and each neuron's outputs are
    # normalised over batch and embedding dimension, and the running
    # statistics move towards those batch moments.
    lnn = afn.LogarithmicNeuralNetwork(4, lnn='paper')
    e = np.random.default_rng(0).normal(size=(32, 3, 5)).astype(np.float32)
    variables = lnn.init(jax.random.key(0), e, train=False)
    out, state = lnn.apply(variables, e, train=True, mutable=['batch_stats'])
    log_e = np.log(np.maximum(np.abs(e), 1e-4)).astype(np.float64)
    mean, var = log_e.mean(axis=(0, 2)), log_e.var(axis=(0, 2))
    normed = (log_e - mean[:, None]) / np.sqrt(var[:, None] + EPS)
    w = np.asarray(variables['params']['weight'], np.float64)
    z = np.exp(np.einsum('lf,bfd->bld', w, normed))
    z_mean, z_var = z.mean(axis=(0, 2)), z.var(axis=(0, 2))
    expected = (z - z_mean[:, None]) / np.sqrt(z_var[:, None] + EPS)
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4)
    stats = state['batch_stats']
    np.testing.assert_allclose(
      stats['log_batch_norm']['mean'], 0.1 * mean, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
      stats['exp_batch_norm']['var'], 0.9 + 0.1 * z_var, rtol=1e-4, atol=1e-5
    )

  def test_weights_start_uniform_within_torch_bound(self):
    lnn = afn.LogarithmicNeuralNetwork(400)
    e = np.ones((2, 9, 3), np.float32)
    w = lnn.init(jax.random.key(0), e, train=False)['params']['weight']
    self.assertEqual(w.shape, (400, 9))
    self.assertLessEqual(float(jnp.max(jnp.abs(w))), 1 / 3)
    self.assertGreater(float(jnp.max(w)), 0.95 / 3)
    self.assertLess(float(jnp.min(w)), -0.95 / 3)

  def test_unknown_form_is_an_error(self):
    model = afn.Model(FIELD_DIMS, lnn='log', **KWARGS)
    with self.assertRaisesRegex(ValueError, "'torchfm' or 'paper'"):
      model.init(jax.random.key(0), _ids(2))


class TrainingModeTest(parameterized.TestCase):
  @parameterized.parameters('torchfm', 'paper')
  def test_dropout_batchnorm_and_eval(self, form):
    ids = _ids(16, seed=2)
    base = afn.Model(FIELD_DIMS, lnn=form, dropout=0.0, **KWARGS)
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
    for path, new in jax.tree_util.tree_leaves_with_path(state0['batch_stats']):
      old = variables['batch_stats']
      for key in path:
        old = old[key.key]
      with self.subTest(jax.tree_util.keystr(path)):
        self.assertFalse(np.allclose(new, old))
    # The MLP's dropout changes training outputs, by key.
    dropped = afn.Model(FIELD_DIMS, lnn=form, dropout=0.5, **KWARGS)
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
    zeros = initial_zero_gradients('afn')
    self.assertEqual(zeros, dict.fromkeys(zeros, []))


class ConfigTest(absltest.TestCase):
  def test_config_is_pytorch_fm_examples_main(self):
    config = afn_config.get_config()
    self.assertEqual(config.model_name, 'afn')
    self.assertEqual(
      dict(config.model),
      dict(embed_dim=16, lnn_dim=1500, mlp_dims=(400, 400, 400), dropout=0.0),
    )
    model = afn.Model(field_dims=(6, 9), **config.model)
    ids = _ids(4, field_dims=(6, 9))
    variables = jax.eval_shape(model.init, jax.random.key(0), ids)
    lnn = variables['params']['LogarithmicNeuralNetwork_0']['weight']
    self.assertEqual(lnn.shape, (1500, 2))
    out = jax.eval_shape(model.apply, variables, ids)
    self.assertEqual((out.shape, out.dtype), ((4,), jnp.float32))


if __name__ == '__main__':
  absltest.main()
