"""FinalMLP (models/finalmlp.py) against its equations, by brute force.

pytorch-fm has no FinalMLP: the feature-selection gates (eq. (3)-(4)), the
multi-head bilinear fusion (eq. (5)-(6)) and the whole model are recomputed
example by example in numpy.
"""

import importlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
from model_testing import assert_same_shapes
from model_testing import check_config_model
from model_testing import check_dropout_in_training_only
from model_testing import init
from model_testing import np_mlp
from model_testing import offsets
from model_testing import random_ids
from model_testing import random_variables
from model_testing import recipe
import numpy as np

from configs import finalmlp as finalmlp_config

finalmlp = importlib.import_module('models.finalmlp')

FIELD_DIMS = (7, 11, 5, 4)
KWARGS = dict(embed_dim=3, mlp1_dims=(16, 8), mlp2_dims=(16, 12), fs_dims=(5,))


def _np_gate(x, params, num_hidden):
  """`2 sigmoid(MLP(x))` with ReLU hidden layers."""
  x = np_mlp(x, params, None, num_hidden, output_layer=False, batchnorm=False)
  out = params[f'Dense_{num_hidden}']
  return 2.0 / (1.0 + np.exp(-(x @ out['kernel'] + out['bias'])))


def _np_fusion(o1, o2, params, heads):
  """`b + w_1^T o_1 + w_2^T o_2 + sum_h sum_ij o_1^h_i W_h,ij o_2^h_j`."""
  y = (o1 @ params['w_x']['kernel'] + params['w_x']['bias'])[:, 0]
  y = y + (o2 @ params['w_y']['kernel'])[:, 0]
  w = params['w_xy']  # [heads, h1, h2]
  h1, h2 = w.shape[1], w.shape[2]
  for b in range(len(o1)):
    for h in range(heads):
      for i in range(h1):
        for j in range(h2):
          y[b] += o1[b, h * h1 + i] * w[h, i, j] * o2[b, h * h2 + j]
  return y


def _np_model(ids, variables, contexts, heads, batch_norm=True):
  p, s = variables['params'], variables.get('batch_stats')
  table = np.asarray(p['FeaturesEmbedding_0']['embedding'], np.float64)
  e = table[ids + offsets(FIELD_DIMS)].reshape(len(ids), -1)  # [B, F * D]
  streams = []
  for k, context in ((1, contexts[0]), (2, contexts[1])):
    if context:
      context = sorted(set(context))  # Increasing, each field once.
      ctx_table = p[f'fs{k}_context_embedding']['embedding']
      ctx_offsets = np.cumsum((0,) + tuple(FIELD_DIMS[f] for f in context))
      x = ctx_table[ids[:, list(context)] + ctx_offsets[:-1]]
      x = x.reshape(len(ids), -1)
      gate = _np_gate(x, p[f'fs{k}_gate'], 1)
    else:
      gate = 2.0 / (1.0 + np.exp(-np.asarray(p[f'fs{k}_gate_bias'])))
    h = gate * e
    stats = s[f'mlp{k}'] if batch_norm else None
    hidden = np_mlp(
      h, p[f'mlp{k}'], stats, 2, output_layer=False, batchnorm=batch_norm
    )
    streams.append(hidden)
  return _np_fusion(*streams, p['InteractionAggregation_0'], heads)


class EquationTest(parameterized.TestCase):
  @parameterized.parameters(
    ((), (), 1),
    ((0,), (1, 3), 2),
    ((), (2,), 4),
    ((3, 1, 3), (), 2),
  )
  def test_eval_model_matches_brute_force(self, fs1, fs2, heads):
    model = finalmlp.Model(
      FIELD_DIMS, fs1_context=fs1, fs2_context=fs2, num_heads=heads, **KWARGS
    )
    ids = random_ids(6, FIELD_DIMS)
    variables = random_variables(model, ids)
    out = model.apply(variables, ids, train=False)
    expected = _np_model(ids, variables, (fs1, fs2), heads)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_streams_without_batchnorm_match_brute_force(self):
    # FuxiCTR's published configs: Linear (with bias) -> ReLU -> Dropout.
    model = finalmlp.Model(
      FIELD_DIMS, fs1_context=(0,), batch_norm=False, **KWARGS
    )
    ids = random_ids(6, FIELD_DIMS)
    variables = random_variables(model, ids)
    self.assertEqual(set(variables), {'params'})
    for k in (1, 2):
      mlp = variables['params'][f'mlp{k}']
      self.assertEqual(set(mlp), {'Dense_0', 'Dense_1'})
      self.assertEqual(set(mlp['Dense_0']), {'kernel', 'bias'})
    out = model.apply(variables, ids, train=False)
    expected = _np_model(ids, variables, ((0,), ()), 2, batch_norm=False)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_without_feature_selection_streams_see_the_embeddings(self):
    gated = finalmlp.Model(FIELD_DIMS, **KWARGS)
    plain = finalmlp.Model(FIELD_DIMS, use_fs=False, **KWARGS)
    ids = random_ids(6, FIELD_DIMS)
    variables = random_variables(gated, ids)
    p = dict(variables['params'])
    for name in ('fs1_gate_bias', 'fs2_gate_bias'):
      del p[name]
    out = plain.apply({**variables, 'params': p}, ids)
    shapes = jax.eval_shape(plain.init, jax.random.key(0), ids)['params']
    assert_same_shapes(p, shapes)
    # A gate of exactly 1 (zero gate bias) is no gate.
    p = {**variables['params']}
    for k in (1, 2):
      p[f'fs{k}_gate_bias'] = np.zeros_like(p[f'fs{k}_gate_bias'])
    np.testing.assert_allclose(
      gated.apply({**variables, 'params': p}, ids), out, rtol=1e-6
    )

  def test_gate_without_context_is_one_learned_vector_starting_at_one(self):
    # FuxiCTR's gate MLP on a zero-initialised learned input: only its
    # output bias ever gets a gradient, so the bias alone is the gate.
    model = finalmlp.Model(FIELD_DIMS, fs2_context=(1,), **KWARGS)
    ids = random_ids(4, FIELD_DIMS)
    params = init(model, ids)['params']
    self.assertEqual(params['fs1_gate_bias'].shape, (4 * 3,))
    np.testing.assert_array_equal(params['fs1_gate_bias'], np.zeros(12))
    self.assertNotIn('fs1_gate', params)
    self.assertNotIn('fs2_gate_bias', params)
    self.assertIn('fs2_gate', params)

  def test_heads_must_divide_stream_widths(self):
    model = finalmlp.Model(FIELD_DIMS, num_heads=3, **KWARGS)
    with self.assertRaisesRegex(ValueError, 'num_heads=3 must divide'):
      model.init(jax.random.key(0), random_ids(2, FIELD_DIMS))

  def test_heads_below_one_are_an_error_at_construction(self):
    # Copied alone, without the trainer's config check: 0 heads divided by
    # zero at the first call.
    for heads in (0, -2):
      with self.assertRaisesRegex(
        ValueError, rf'^config.model.num_heads must be >= 1; got {heads}.$'
      ):
        finalmlp.Model(FIELD_DIMS, **{**KWARGS, 'num_heads': heads})

  def test_context_fields_must_be_one_hot_fields(self):
    n = len(FIELD_DIMS)
    model = finalmlp.Model(FIELD_DIMS, fs1_context=(0, n), **KWARGS)
    with self.assertRaisesRegex(
      ValueError, rf'fs1_context=\(0, {n}\): .* in \[0, {n}\)'
    ):
      model.init(jax.random.key(0), random_ids(2, FIELD_DIMS))


class TrainingModeTest(parameterized.TestCase):
  @parameterized.parameters(0, 1)
  def test_dropout_batchnorm_and_eval(self, stream):
    ids = random_ids(16, FIELD_DIMS, seed=2)
    base = finalmlp.Model(FIELD_DIMS, dropouts=(0.0, 0.0), **KWARGS)
    # Each stream's dropout alone; the statistics of both streams move.
    rates = [0.0, 0.0]
    rates[stream] = 0.5
    dropped = finalmlp.Model(FIELD_DIMS, dropouts=tuple(rates), **KWARGS)
    variables = random_variables(base, ids)
    self.assertEqual(set(variables['batch_stats']), {'mlp1', 'mlp2'})
    check_dropout_in_training_only(base, dropped, variables, ids)

  @parameterized.parameters(0, 1)
  def test_dropout_without_batchnorm(self, stream):
    # No statistics: training mode without dropout is eval mode.
    ids = random_ids(16, FIELD_DIMS, seed=2)
    kwargs = dict(KWARGS, batch_norm=False)
    base = finalmlp.Model(FIELD_DIMS, dropouts=(0.0, 0.0), **kwargs)
    rates = [0.0, 0.0]
    rates[stream] = 0.5
    dropped = finalmlp.Model(FIELD_DIMS, dropouts=tuple(rates), **kwargs)
    variables = random_variables(base, ids)
    self.assertNotIn('batch_stats', variables)
    check_dropout_in_training_only(base, dropped, variables, ids)


class ConfigTest(absltest.TestCase):
  def test_config(self):
    config = finalmlp_config.get_config()
    self.assertEqual(config.model_name, 'finalmlp')
    self.assertEqual(
      recipe(finalmlp_config),
      dict(
        embed_dim=16,
        mlp1_dims=(1024, 512),
        mlp2_dims=(1024, 512, 256),
        dropouts=(0.5, 0.5),
        use_fs=True,
        fs_dims=(1024, 512),
        fs1_context=(0,),
        fs2_context=(1,),
        num_heads=2,
        linear_init='lecun',
        batch_norm=False,
      ),
    )
    variables = check_config_model(finalmlp, config)
    w = variables['params']['InteractionAggregation_0']['w_xy']
    self.assertEqual(w.shape, (2, 256, 128))


if __name__ == '__main__':
  absltest.main()
