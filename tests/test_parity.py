"""Numerical parity with the reference pytorch-fm (torchfm 0.7.0).

The fixtures in tests/fixtures/ were written by tools/make_torchfm_fixtures.py
from torchfm's own modules with random weights; here the same weights go into
our models, which must give the same eval-mode outputs. Torch is not needed to
run these tests.
"""

import importlib
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def _linear(w, prefix):
  """torch FeaturesLinear -> our FeaturesLinear params."""
  return {'weight': w[f'{prefix}.fc.weight'], 'bias': w[f'{prefix}.bias']}


def _embedding(w, prefix):
  """torch FeaturesEmbedding -> our FeaturesEmbedding params."""
  return {'embedding': w[f'{prefix}.embedding.weight']}


def _mlp(w, prefix, num_hidden):
  """torch MultiLayerPerceptron -> our (params, batch_stats).

  torch's Sequential holds Linear, BatchNorm1d, ReLU, Dropout per hidden
  layer (indices 4i and 4i + 1), then the output Linear (index 4n).
  """
  params, stats = {}, {}
  for i in range(num_hidden):
    lin, bn = f'{prefix}.{4 * i}', f'{prefix}.{4 * i + 1}'
    params[f'Dense_{i}'] = {
      'kernel': w[f'{lin}.weight'].T,
      'bias': w[f'{lin}.bias'],
    }
    params[f'BatchNorm_{i}'] = {
      'scale': w[f'{bn}.weight'],
      'bias': w[f'{bn}.bias'],
    }
    stats[f'BatchNorm_{i}'] = {
      'mean': w[f'{bn}.running_mean'],
      'var': w[f'{bn}.running_var'],
    }
  out = f'{prefix}.{4 * num_hidden}'
  params[f'Dense_{num_hidden}'] = {
    'kernel': w[f'{out}.weight'].T,
    'bias': w[f'{out}.bias'],
  }
  return params, stats


def _lr(w):
  return {'params': {'FeaturesLinear_0': _linear(w, 'linear')}}, {}


def _fm(w):
  params = {
    'FeaturesLinear_0': _linear(w, 'linear'),
    'FeaturesEmbedding_0': _embedding(w, 'embedding'),
  }
  return {'params': params}, {'embed_dim': 4}


def _ffm(w):
  # torch keeps one [ids, dim] table per field; ours stacks them on axis 1.
  num_fields = sum(k.startswith('ffm.embeddings.') for k in w)
  table = np.stack(
    [w[f'ffm.embeddings.{g}.weight'] for g in range(num_fields)], axis=1
  )
  params = {
    'FeaturesLinear_0': _linear(w, 'linear'),
    'FieldAwareEmbedding_0': {'embedding': table},
  }
  return {'params': params}, {'embed_dim': 4}


def _fnn(w):
  # pytorch-fm feeds the factors alone: fm_linear_inputs=False.
  mlp, stats = _mlp(w, 'mlp.mlp', 2)
  params = {
    'FeaturesEmbedding_0': _embedding(w, 'embedding'),
    'MultiLayerPerceptron_0': mlp,
  }
  variables = {
    'params': params,
    'batch_stats': {'MultiLayerPerceptron_0': stats},
  }
  kwargs = dict(embed_dim=4, mlp_dims=(8, 6), dropout=0.2)
  return variables, {**kwargs, 'fm_linear_inputs': False}


def _wd(w):
  """W&D without cross products (the default, as pytorch-fm) and DeepFM.

  Both are a linear term, one embedding table and an MLP, under the same
  names in torch and in our files.
  """
  mlp, stats = _mlp(w, 'mlp.mlp', 2)
  params = {
    'FeaturesLinear_0': _linear(w, 'linear'),
    'FeaturesEmbedding_0': _embedding(w, 'embedding'),
    'MultiLayerPerceptron_0': mlp,
  }
  variables = {
    'params': params,
    'batch_stats': {'MultiLayerPerceptron_0': stats},
  }
  return variables, dict(embed_dim=4, mlp_dims=(8, 6), dropout=0.2)


def _afm(w):
  # The score bias `afm.projection.bias` is dropped (softmax cancels it) and
  # the output bias `afm.fc.bias` is folded into w_0 (models/afm.py).
  linear = _linear(w, 'linear')
  linear['bias'] = linear['bias'] + w['afm.fc.bias']
  params = {
    'FeaturesLinear_0': linear,
    'FeaturesEmbedding_0': _embedding(w, 'embedding'),
    'AttentionalFactorizationMachine_0': {
      'attention': {
        'kernel': w['afm.attention.weight'].T,
        'bias': w['afm.attention.bias'],
      },
      'projection': {'kernel': w['afm.projection.weight'].T},
      'fc': {'kernel': w['afm.fc.weight'].T},
    },
  }
  # Our dropouts are off in eval mode; the fixture's torch model had 0.
  return {'params': params}, dict(embed_dim=4, attn_size=3, dropouts=(0.2, 0.2))


def _bn(w, prefix):
  """torch BatchNorm1d -> our (params, batch_stats) of one nn.BatchNorm."""
  params = {'scale': w[f'{prefix}.weight'], 'bias': w[f'{prefix}.bias']}
  stats = {
    'mean': w[f'{prefix}.running_mean'],
    'var': w[f'{prefix}.running_var'],
  }
  return params, stats


def _nfm(w):
  # torch's `fm` Sequential: 0 FactorizationMachine, 1 BatchNorm1d, 2 Dropout.
  mlp, mlp_stats = _mlp(w, 'mlp.mlp', 2)
  bn, bn_stats = _bn(w, 'fm.1')
  params = {
    'FeaturesLinear_0': _linear(w, 'linear'),
    'FeaturesEmbedding_0': _embedding(w, 'embedding'),
    'BatchNorm_0': bn,
    'MultiLayerPerceptron_0': mlp,
  }
  stats = {'BatchNorm_0': bn_stats, 'MultiLayerPerceptron_0': mlp_stats}
  variables = {'params': params, 'batch_stats': stats}
  return variables, dict(embed_dim=4, mlp_dims=(8, 6), dropouts=(0.2, 0.2))


def _ncf(w):
  # pytorch-fm's MLP tower has no output layer (`fc` is the prediction
  # layer): give `_mlp` a placeholder one and drop it. One table feeds both
  # towers in pytorch-fm: shared_embedding=True (the paper's separate tables
  # are checked in tests/test_models_b.py).
  dummy = {'mlp.mlp.8.weight': np.zeros((1, 6)), 'mlp.mlp.8.bias': np.zeros(1)}
  mlp, mlp_stats = _mlp({**w, **dummy}, 'mlp.mlp', 2)
  del mlp['Dense_2']
  params = {
    'embedding': _embedding(w, 'embedding'),
    'MultiLayerPerceptron_0': mlp,
    'prediction': {'kernel': w['fc.weight'].T, 'bias': w['fc.bias']},
  }
  variables = {
    'params': params,
    'batch_stats': {'MultiLayerPerceptron_0': mlp_stats},
  }
  kwargs = dict(user_field_idx=0, item_field_idx=1, embed_dim=4)
  kwargs.update(mlp_dims=(8, 6), dropout=0.2, shared_embedding=True)
  return variables, kwargs


def _fnfm(w):
  # torch keeps one [ids, dim] table per field; ours stacks them on axis 1.
  num_fields = sum(k.startswith('ffm.embeddings.') for k in w)
  table = np.stack(
    [w[f'ffm.embeddings.{g}.weight'] for g in range(num_fields)], axis=1
  )
  mlp, mlp_stats = _mlp(w, 'mlp.mlp', 2)
  bn, bn_stats = _bn(w, 'bn')
  params = {
    'FeaturesLinear_0': _linear(w, 'linear'),
    'FieldAwareEmbedding_0': {'embedding': table},
    'BatchNorm_0': bn,
    'MultiLayerPerceptron_0': mlp,
  }
  stats = {'BatchNorm_0': bn_stats, 'MultiLayerPerceptron_0': mlp_stats}
  variables = {'params': params, 'batch_stats': stats}
  return variables, dict(embed_dim=4, mlp_dims=(8, 6), dropouts=(0.2, 0.2))


# Model name -> function of the torch weights (dict name -> array) returning
# our variables and the constructor arguments matching the fixture.
CONVERTERS = {
  'lr': _lr,
  'fm': _fm,
  'ffm': _ffm,
  'fnn': _fnn,
  'wd': _wd,
  'afm': _afm,
  'nfm': _nfm,
  'ncf': _ncf,
  'fnfm': _fnfm,
  'deepfm': _wd,
}


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


class TorchfmParityTest(parameterized.TestCase):
  def test_every_model_has_a_fixture(self):
    models_dir = os.path.join(os.path.dirname(FIXTURES), '..', 'models')
    models = sorted(f[:-3] for f in os.listdir(models_dir) if f.endswith('.py'))
    self.assertEqual(sorted(CONVERTERS), models)

  @parameterized.parameters(*sorted(CONVERTERS))
  def test_eval_outputs_match_torchfm(self, name):
    data = np.load(os.path.join(FIXTURES, f'torchfm_{name}.npz'))
    w = {k[2:]: data[k] for k in data.files if k.startswith('w/')}
    variables, kwargs = CONVERTERS[name](w)
    model = importlib.import_module(f'models.{name}').Model(
      field_dims=tuple(int(d) for d in data['field_dims']), **kwargs
    )
    # The converted tree must have exactly the structure init creates.
    init = model.init(jax.random.key(0), data['ids'], train=False)
    self.assertEqual(
      jax.tree.structure(jax.tree.map(np.shape, init)),
      jax.tree.structure(jax.tree.map(np.shape, variables)),
    )
    jax.tree.map(
      lambda a, b: self.assertEqual(np.shape(a), np.shape(b)),
      init,
      variables,
    )
    logits = model.apply(variables, data['ids'], train=False)
    np.testing.assert_allclose(
      _sigmoid(logits), data['probs'], rtol=1e-5, atol=1e-5
    )


if __name__ == '__main__':
  absltest.main()
