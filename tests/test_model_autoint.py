"""AutoInt (models/autoint.py): parity with torchfm, attention, training mode.

tests/fixtures/torchfm_autoint.npz was written by
tools/make_torchfm_fixtures.py from torchfm 0.7.0's
`AutomaticFeatureInteractionModel` with random weights: its eval-mode output
and one train-mode step (loss, gradients, BatchNorm statistics) with two
attention layers of two heads and the residual connection, and (keys
`nores/...`) the eval-mode output of a second model with one layer of three
heads and no residual connection. Torch is not needed to run these tests.
"""

import importlib
import math
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from model_tables import random_ids
from model_tables import randomize
import numpy as np

from configs import autoint as autoint_config

autoint = importlib.import_module('models.autoint')

FIXTURE = os.path.join(
  os.path.dirname(__file__), 'fixtures', 'torchfm_autoint.npz'
)
FIELD_DIMS = (7, 11, 5, 4)
OFFSETS = np.cumsum((0,) + FIELD_DIMS[:-1])
EPS = 1e-5
KWARGS = dict(
  embed_dim=3, atten_embed_dim=6, num_heads=2, num_layers=2, mlp_dims=(6, 4)
)


def _np_mlp(x, params, stats, num_hidden):
  """MultiLayerPerceptron without dropout; `stats=None`: batch statistics."""
  for i in range(num_hidden):
    x = x @ params[f'Dense_{i}']['kernel'] + params[f'Dense_{i}']['bias']
    if stats is None:
      mean, var = x.mean(axis=0), x.var(axis=0)
    else:
      mean, var = (stats[f'BatchNorm_{i}'][k] for k in ('mean', 'var'))
    bn = params[f'BatchNorm_{i}']
    x = (x - mean) / np.sqrt(var + EPS) * bn['scale'] + bn['bias']
    x = np.maximum(x, 0.0)
  out = params[f'Dense_{num_hidden}']
  return (x @ out['kernel'] + out['bias'])[:, 0]


def _dense(x, params):
  return x @ np.asarray(params['kernel'], np.float64) + params['bias']


def _np_attention(x, params, num_heads, drop=False):
  """Eq. (5)-(7) head by head and field by field, then torch's W_O."""
  batch, fields, width = x.shape
  d = width // num_heads
  q, k, v = (_dense(x, params[n]) for n in ('query', 'key', 'value'))
  heads = np.zeros_like(q)
  for h in range(num_heads):
    cols = slice(h * d, (h + 1) * d)
    for m in range(fields):
      scores = np.stack(
        [(q[:, m, cols] * k[:, j, cols]).sum(-1) for j in range(fields)], 1
      ) / math.sqrt(d)  # [B, F]
      alpha = np.exp(scores - scores.max(1, keepdims=True))
      alpha /= alpha.sum(1, keepdims=True)
      if drop:  # dropout at rate 1 on the attention weights
        alpha = np.zeros_like(alpha)
      heads[:, m, cols] = np.einsum('bj,bjd->bd', alpha, v[:, :, cols])
  return _dense(heads, params['out'])


def _np_autoint(
  variables,
  e,
  linear,
  kwargs,
  has_residual=True,
  batch_stats=True,
  drop_attention=False,
  drop_mlp=False,
):
  """Logits by numpy from the embeddings `e` `[B, T, D]` and linear term."""
  p = variables['params']
  e = np.asarray(e, np.float64)
  a = _dense(e, p['atten_embedding'])
  for i in range(kwargs['num_layers']):
    layer = p[f'self_attn_{i}']
    a = _np_attention(a, layer, kwargs['num_heads'], drop_attention)
  if has_residual:
    a = a + _dense(e, p['res_embedding'])
  r = np.maximum(a, 0.0).reshape(len(e), -1)
  attn = _dense(r, p['attn_fc'])[:, 0]
  mlp = p['MultiLayerPerceptron_0']
  num_hidden = len(kwargs['mlp_dims'])
  if drop_mlp:  # every hidden unit dropped: the output layer's bias remains
    deep = mlp[f'Dense_{num_hidden}']['bias'][0]
  else:
    s = None
    if batch_stats:
      s = variables['batch_stats']['MultiLayerPerceptron_0']
    deep = _np_mlp(e.reshape(len(e), -1), mlp, s, num_hidden)
  return linear + attn + deep


def _np_model(variables, ids, kwargs, **options):
  """`_np_autoint` with embeddings and linear term looked up from `ids`."""
  p = variables['params']
  rows = ids + OFFSETS
  e = np.asarray(p['FeaturesEmbedding_0']['embedding'])[rows]
  lin = p['FeaturesLinear_0']
  linear = lin['bias'][0] + np.asarray(lin['weight'])[rows, 0].sum(1)
  return _np_autoint(variables, e, linear, kwargs, **options)


def _linear(w, name):
  return {'kernel': w[f'{name}.weight'].T, 'bias': w[f'{name}.bias']}


def _from_torch(w, num_layers, num_hidden, has_residual):
  """torchfm AutomaticFeatureInteractionModel state dict -> our variables."""
  mlp, stats = {}, {}
  for i in range(num_hidden):
    bn = f'mlp.mlp.{4 * i + 1}'
    mlp[f'Dense_{i}'] = _linear(w, f'mlp.mlp.{4 * i}')
    mlp[f'BatchNorm_{i}'] = {
      'scale': w[f'{bn}.weight'],
      'bias': w[f'{bn}.bias'],
    }
    stats[f'BatchNorm_{i}'] = {
      'mean': w[f'{bn}.running_mean'],
      'var': w[f'{bn}.running_var'],
    }
  mlp[f'Dense_{num_hidden}'] = _linear(w, f'mlp.mlp.{4 * num_hidden}')
  params = {
    'FeaturesLinear_0': {
      'weight': w['linear.fc.weight'],
      'bias': w['linear.bias'],
    },
    'FeaturesEmbedding_0': {'embedding': w['embedding.embedding.weight']},
    'atten_embedding': _linear(w, 'atten_embedding'),
    'attn_fc': _linear(w, 'attn_fc'),
    'MultiLayerPerceptron_0': mlp,
  }
  for i in range(num_layers):
    # torch stacks the query, key and value projections in `in_proj`.
    prefix = f'self_attns.{i}'
    weight, bias = w[f'{prefix}.in_proj_weight'], w[f'{prefix}.in_proj_bias']
    width = weight.shape[1]
    layer = {
      name: {
        'kernel': weight[j * width : (j + 1) * width].T,
        'bias': bias[j * width : (j + 1) * width],
      }
      for j, name in enumerate(('query', 'key', 'value'))
    }
    layer['out'] = _linear(w, f'{prefix}.out_proj')
    params[f'self_attn_{i}'] = layer
  if has_residual:
    params['res_embedding'] = _linear(w, 'V_res_embedding')
  return {'params': params, 'batch_stats': {'MultiLayerPerceptron_0': stats}}


# The two torchfm models of the fixture: key prefix -> constructor arguments.
FIXTURE_MODELS = {
  '': dict(
    embed_dim=4,
    atten_embed_dim=6,
    num_heads=2,
    num_layers=2,
    mlp_dims=(8, 6),
    has_residual=True,
  ),
  'nores/': dict(
    embed_dim=4,
    atten_embed_dim=6,
    num_heads=3,
    num_layers=1,
    mlp_dims=(8,),
    has_residual=False,
  ),
}


def _fixture_variables(w, kwargs):
  return _from_torch(
    w, kwargs['num_layers'], len(kwargs['mlp_dims']), kwargs['has_residual']
  )


class TorchfmParityTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.data = np.load(FIXTURE)
    self.field_dims = tuple(int(d) for d in self.data['field_dims'])

  def _weights(self, prefix):
    key = f'{prefix}w/'
    return {
      k[len(key) :]: self.data[k] for k in self.data.files if k.startswith(key)
    }

  @parameterized.named_parameters(('residual', ''), ('no_residual', 'nores/'))
  def test_eval_outputs_match_torchfm(self, prefix):
    kwargs = FIXTURE_MODELS[prefix]
    # Our dropouts act in training only; the fixture's attention had 0.
    model = autoint.Model(self.field_dims, dropouts=(0.2, 0.2), **kwargs)
    variables = _fixture_variables(self._weights(prefix), kwargs)
    ids = self.data['ids']
    init = model.init(jax.random.key(0), ids)
    self.assertEqual(
      jax.tree.map(np.shape, init), jax.tree.map(np.shape, variables)
    )
    logits = model.apply(variables, ids, train=False)
    np.testing.assert_allclose(
      jax.nn.sigmoid(logits), self.data[f'{prefix}probs'], rtol=1e-5, atol=1e-5
    )

  def test_train_step_matches_torchfm(self):
    # torchfm's step ran in train mode with dropout 0: batch statistics in
    # BatchNorm, BCE of the probabilities, then its running statistics.
    kwargs = FIXTURE_MODELS['']
    model = autoint.Model(self.field_dims, dropouts=(0.0, 0.0), **kwargs)
    w = self._weights('')
    variables = _fixture_variables(w, kwargs)
    ids, labels = self.data['ids'], self.data['train/labels']

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
      jax.nn.sigmoid(logits), self.data['train/probs'], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(loss, self.data['train/loss'], rtol=1e-5)
    grad_w = {k[5:]: self.data[k] for k in self.data.files if k[:5] == 'grad/'}
    expected = _fixture_variables({**w, **grad_w}, kwargs)['params']
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      want = expected
      for key in path:
        want = want[key.key]
      with self.subTest(jax.tree_util.keystr(path)):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)
    # Running statistics: torch updates the variance with the unbiased batch
    # variance, Flax with the biased one; same momentum (0.1 / 0.9).
    n = len(ids)
    for i, bn in ((0, 'mlp.mlp.1'), (1, 'mlp.mlp.5')):
      got = state['batch_stats']['MultiLayerPerceptron_0'][f'BatchNorm_{i}']
      old_var = w[f'{bn}.running_var']
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
      self.assertFalse(np.allclose(got['mean'], w[f'{bn}.running_mean']))


class SelfAttentionTest(parameterized.TestCase):
  @parameterized.parameters(True, False)
  def test_eval_model_matches_the_equations(self, has_residual):
    model = autoint.Model(FIELD_DIMS, has_residual=has_residual, **KWARGS)
    ids = random_ids(7, field_dims=FIELD_DIMS)
    variables = randomize(model.init(jax.random.key(0), ids))
    np.testing.assert_allclose(
      model.apply(variables, ids),
      _np_model(variables, ids, KWARGS, has_residual=has_residual),
      rtol=1e-4,
      atol=1e-4,
    )

  def test_bad_heads_or_dropouts_are_errors(self):
    with self.assertRaisesRegex(ValueError, 'num_heads must divide'):
      autoint.Model(FIELD_DIMS, atten_embed_dim=6, num_heads=4)
    with self.assertRaisesRegex(ValueError, 'two rates'):
      autoint.Model(FIELD_DIMS, dropouts=(0.0, 0.0, 0.0))


class TrainingModeTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.ids = random_ids(16, field_dims=FIELD_DIMS, seed=2)
    base = autoint.Model(FIELD_DIMS, dropouts=(0.0, 0.0), **KWARGS)
    self.variables = randomize(base.init(jax.random.key(0), self.ids))

  def _train(self, dropouts, seed=0):
    model = autoint.Model(FIELD_DIMS, dropouts=dropouts, **KWARGS)
    return model.apply(
      self.variables,
      self.ids,
      train=True,
      rngs={'dropout': jax.random.key(seed)},
      mutable=['batch_stats'],
    )

  def _expected(self, **options):
    return _np_model(
      self.variables, self.ids, KWARGS, batch_stats=False, **options
    )

  def test_batch_statistics_in_training(self):
    out, state = self._train((0.0, 0.0))
    np.testing.assert_allclose(out, self._expected(), rtol=1e-4, atol=1e-4)
    old = self.variables['batch_stats']['MultiLayerPerceptron_0']
    new = state['batch_stats']['MultiLayerPerceptron_0']
    for layer in ('BatchNorm_0', 'BatchNorm_1'):
      for stat in ('mean', 'var'):
        with self.subTest(f'{layer} {stat}'):
          self.assertFalse(np.allclose(new[layer][stat], old[layer][stat]))

  def test_attention_dropout_site(self):
    # Rate 1 zeroes every attention weight: each layer outputs b_O.
    out, _ = self._train((1.0, 0.0))
    np.testing.assert_allclose(
      out, self._expected(drop_attention=True), rtol=1e-4, atol=1e-4
    )
    a, _ = self._train((0.5, 0.0), seed=0)
    b, _ = self._train((0.5, 0.0), seed=1)
    self.assertGreater(np.mean(~np.isclose(a, b)), 0.5)

  def test_mlp_dropout_site(self):
    # Rate 1 drops every hidden unit of the MLP: its output is its bias.
    out, _ = self._train((0.0, 1.0))
    np.testing.assert_allclose(
      out, self._expected(drop_mlp=True), rtol=1e-4, atol=1e-4
    )
    a, _ = self._train((0.0, 0.5), seed=0)
    b, _ = self._train((0.0, 0.5), seed=1)
    self.assertGreater(np.mean(~np.isclose(a, b)), 0.5)

  def test_eval_ignores_dropout_and_keys(self):
    model = autoint.Model(FIELD_DIMS, dropouts=(0.5, 0.5), **KWARGS)
    out = model.apply(self.variables, self.ids)
    rngs = {'dropout': jax.random.key(3)}
    np.testing.assert_array_equal(
      out, model.apply(self.variables, self.ids, rngs=rngs)
    )
    np.testing.assert_allclose(
      out, _np_model(self.variables, self.ids, KWARGS), rtol=1e-4, atol=1e-4
    )


class SideInputTest(absltest.TestCase):
  def test_multi_hot_and_numeric_fields_attend_as_fields(self):
    model = autoint.Model(
      FIELD_DIMS, multi_field_dims=(5,), num_dense=1, **KWARGS
    )
    ids = random_ids(4, field_dims=FIELD_DIMS)
    multi_ids = np.array([[[0, 3]], [[2, -1]], [[-1, -1]], [[4, 4]]], np.int32)
    dense = np.array([[0.5], [-1.0], [2.0], [0.0]], np.float32)
    variables = model.init(jax.random.key(0), ids, multi_ids, dense)
    p = variables['params']
    self.assertEqual(p['attn_fc']['kernel'].shape, (6 * 6, 1))
    present = [[i for i in row[0] if i >= 0] for row in multi_ids]
    emb = jax.tree.map(np.asarray, p['FeaturesEmbedding_0'])
    multi = np.stack(
      [emb['multi_embedding'][r].mean(0) if r else np.zeros(3) for r in present]
    )
    e = np.concatenate(
      [
        emb['embedding'][ids + OFFSETS],
        multi[:, None],
        dense[:, :, None] * emb['dense_embedding'][None],
      ],
      axis=1,
    )  # [B, 6, D]
    lin = jax.tree.map(np.asarray, p['FeaturesLinear_0'])
    multi_w = np.array(
      [lin['multi_weight'][r, 0].mean() if r else 0.0 for r in present]
    )
    linear = (
      lin['bias'][0]
      + lin['weight'][ids + OFFSETS, 0].sum(1)
      + multi_w
      + dense[:, 0] * lin['dense_weight'][0, 0]
    )
    out = model.apply(variables, ids, multi_ids, dense)
    np.testing.assert_allclose(
      out,
      _np_autoint(variables, e, linear, KWARGS),
      rtol=1e-4,
      atol=1e-5,
    )


class ConfigTest(absltest.TestCase):
  def test_config_is_pytorch_fm_examples_main(self):
    config = autoint_config.get_config()
    self.assertEqual(config.model_name, 'autoint')
    self.assertEqual(
      dict(config.model),
      dict(
        embed_dim=16,
        atten_embed_dim=64,
        num_heads=2,
        num_layers=3,
        mlp_dims=(400, 400),
        dropouts=(0.0, 0.0),
        has_residual=True,
      ),
    )
    model = autoint.Model(field_dims=(6, 9), **config.model)
    ids = random_ids(4, field_dims=(6, 9))
    out = model.apply(model.init(jax.random.key(0), ids), ids)
    self.assertEqual(out.shape, (4,))
    self.assertEqual(out.dtype, jnp.float32)


if __name__ == '__main__':
  absltest.main()
