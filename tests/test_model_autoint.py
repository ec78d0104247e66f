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

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
from model_testing import apply_eval
from model_testing import apply_train
from model_testing import check_config_model
from model_testing import check_torchfm_eval
from model_testing import check_torchfm_step
from model_testing import load_fixture
from model_testing import np_fields
from model_testing import np_linear
from model_testing import np_mlp
from model_testing import random_ids
from model_testing import random_variables
from model_testing import recipe
from model_testing import torch_dense
from model_testing import torch_features_embedding
from model_testing import torch_features_linear
from model_testing import torch_mlp
import numpy as np

from configs import autoint as autoint_config

autoint = importlib.import_module('models.autoint')

FIELD_DIMS = (7, 11, 5, 4)
KWARGS = dict(
  embed_dim=3, atten_embed_dim=6, num_heads=2, num_layers=2, mlp_dims=(6, 4)
)


def _dense(x, params):
  return x @ np.asarray(params['kernel'], np.float64) + params['bias']


def _np_attention(x, params, num_heads, drop=False, keep=None):
  """Eq. (5)-(7) head by head and field by field, then torch's W_O.

  `keep`: dropout on the attention weights, their factors `[B, H, F, F]`
  (0 or 1 / (1 - rate)).
  """
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
      if keep is not None:
        alpha = alpha * keep[:, h, m]
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
  attention_keep=None,
):
  """Logits by numpy from the embeddings `e` `[B, T, D]` and linear term."""
  p = variables['params']
  e = np.asarray(e, np.float64)
  a = _dense(e, p['atten_embedding'])
  for i in range(kwargs['num_layers']):
    layer = p[f'self_attn_{i}']
    keep = None if attention_keep is None else attention_keep[i]
    a = _np_attention(a, layer, kwargs['num_heads'], drop_attention, keep)
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
    deep = np_mlp(e.reshape(len(e), -1), mlp, s, num_hidden)
  return linear + attn + deep


def _np_model(variables, ids, kwargs, **options):
  """`_np_autoint` with embeddings and linear term looked up from `ids`."""
  p = variables['params']
  e = np_fields(p['FeaturesEmbedding_0'], 'embedding', ids, FIELD_DIMS)
  linear = np_linear(p['FeaturesLinear_0'], ids, FIELD_DIMS)
  return _np_autoint(variables, e, linear, kwargs, **options)


def _from_torch(w, num_layers, num_hidden, has_residual):
  """torchfm AutomaticFeatureInteractionModel state dict -> our variables."""
  mlp, stats = torch_mlp(w, 'mlp.mlp', num_hidden)
  params = {
    'FeaturesLinear_0': torch_features_linear(w),
    'FeaturesEmbedding_0': torch_features_embedding(w),
    'atten_embedding': torch_dense(w, 'atten_embedding'),
    'attn_fc': torch_dense(w, 'attn_fc'),
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
    layer['out'] = torch_dense(w, f'{prefix}.out_proj')
    params[f'self_attn_{i}'] = layer
  if has_residual:
    params['res_embedding'] = torch_dense(w, 'V_res_embedding')
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


def _convert(kwargs):
  """The converter of a fixture model with these constructor arguments."""
  return lambda w: _from_torch(
    w, kwargs['num_layers'], len(kwargs['mlp_dims']), kwargs['has_residual']
  )


class TorchfmParityTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.data, self.field_dims = load_fixture('autoint')

  @parameterized.named_parameters(('residual', ''), ('no_residual', 'nores/'))
  def test_eval_outputs_match_torchfm(self, prefix):
    kwargs = FIXTURE_MODELS[prefix]
    # Our dropouts act in training only; the fixture's attention had 0.
    model = autoint.Model(self.field_dims, dropouts=(0.2, 0.2), **kwargs)
    check_torchfm_eval(model, self.data, _convert(kwargs), prefix)

  def test_train_step_matches_torchfm(self):
    kwargs = FIXTURE_MODELS['']
    model = autoint.Model(self.field_dims, dropouts=(0.0, 0.0), **kwargs)
    check_torchfm_step(model, self.data, _convert(kwargs))


class SelfAttentionTest(parameterized.TestCase):
  @parameterized.parameters(
    (True, 3),
    (False, 3),
    # Embeddings wider than 1.5 A: the first layer applies the embedding
    # projection before its own instead of composing the two.
    (True, 10),
  )
  def test_eval_model_matches_the_equations(self, has_residual, embed_dim):
    kwargs = {**KWARGS, 'embed_dim': embed_dim}
    model = autoint.Model(FIELD_DIMS, has_residual=has_residual, **kwargs)
    ids = random_ids(7, FIELD_DIMS)
    variables = random_variables(model, ids)
    np.testing.assert_allclose(
      model.apply(variables, ids),
      _np_model(variables, ids, kwargs, has_residual=has_residual),
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
    self.ids = random_ids(16, FIELD_DIMS, seed=2)
    base = autoint.Model(FIELD_DIMS, dropouts=(0.0, 0.0), **KWARGS)
    self.variables = random_variables(base, self.ids)

  def _train(self, dropouts, seed=0):
    model = autoint.Model(FIELD_DIMS, dropouts=dropouts, **KWARGS)
    return apply_train(model, self.variables, self.ids, seed=seed)

  def _expected(self, **options):
    return _np_model(
      self.variables, self.ids, KWARGS, batch_stats=False, **options
    )

  def test_batch_statistics_in_training(self):
    out, stats = self._train((0.0, 0.0))
    np.testing.assert_allclose(out, self._expected(), rtol=1e-4, atol=1e-4)
    old = self.variables['batch_stats']['MultiLayerPerceptron_0']
    new = stats['MultiLayerPerceptron_0']
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

  def test_attention_dropout_drops_the_weights_by_their_mask(self):
    # Rate 0.5: each layer's weights alpha [B, H, F, F] (not the heads'
    # outputs) kept twice or dropped, by the mask drawn.
    model = autoint.Model(FIELD_DIMS, dropouts=(0.5, 0.0), **KWARGS)
    drawn = []

    def record(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Dropout) and context.module.rate:
        drawn.append(np.where(np.asarray(y) != 0, 2.0, 0.0))
      return y

    with nn.intercept_methods(record):  # Eagerly: no jit, concrete masks.
      out, _ = model.apply(
        self.variables,
        self.ids,
        train=True,
        rngs={'dropout': jax.random.key(0)},
        mutable=['batch_stats'],
      )
    self.assertLen(drawn, KWARGS['num_layers'])
    expected = self._expected(attention_keep=drawn)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

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
    out = apply_eval(model, self.variables, self.ids)
    np.testing.assert_array_equal(
      out, apply_eval(model, self.variables, self.ids, seed=3)
    )
    np.testing.assert_allclose(
      out, _np_model(self.variables, self.ids, KWARGS), rtol=1e-4, atol=1e-4
    )


class SideInputTest(absltest.TestCase):
  def test_multi_hot_and_numeric_fields_attend_as_fields(self):
    model = autoint.Model(
      FIELD_DIMS, multi_field_dims=(5,), num_dense=1, **KWARGS
    )
    ids = random_ids(4, FIELD_DIMS)
    multi_ids = np.array([[[0, 3]], [[2, -1]], [[-1, -1]], [[4, 4]]], np.int32)
    dense = np.array([[0.5], [-1.0], [2.0], [0.0]], np.float32)
    variables = random_variables(model, ids, multi_ids, dense)
    p = variables['params']
    self.assertEqual(p['attn_fc']['kernel'].shape, (6 * 6, 1))
    side = (ids, FIELD_DIMS, multi_ids, (5,), dense)
    e = np_fields(p['FeaturesEmbedding_0'], 'embedding', *side)  # [B, 6, D]
    linear = np_linear(p['FeaturesLinear_0'], *side)
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
      recipe(autoint_config),
      dict(
        embed_dim=16,
        atten_embed_dim=64,
        num_heads=2,
        num_layers=3,
        mlp_dims=(400, 400),
        dropouts=(0.0, 0.0),
        has_residual=True,
        linear_init='lecun',
      ),
    )
    check_config_model(autoint, config)


if __name__ == '__main__':
  absltest.main()
