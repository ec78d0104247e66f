"""Numerical parity with the reference pytorch-fm (torchfm 0.7.0).

The fixtures in tests/fixtures/ were written by tools/make_torchfm_fixtures.py
from torchfm's own modules with random weights; here the same weights go into
our models. Eval mode: the same outputs. One training step (train mode,
every dropout rate at 0, BCE of the probabilities averaged over the batch):
the same outputs, loss, gradient of every parameter and BatchNorm running
statistics. Torch is not needed to run these tests.

The comparisons are like for like where our files knowingly differ from
torchfm (each model file's docstring says why): our linear terms start at zero
(the weights come from torchfm here, so initialisation plays no part); AFM's
dropout is off in eval (the fixture's torch AFM has rate 0; a test below
records torchfm's random eval outputs); NCF's default has separate GMF and
MLP tables (`shared_embedding=True` is torchfm's); FNN's MLP also reads the
linear weights by default (`fm_linear_inputs=False` is torchfm's); W&D's
crosses are off by default, as torchfm has none. Flax's BatchNorm averages
the biased batch variance into its running variance where torch averages the
unbiased one; the training check converts torch's number accordingly.
"""

import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
from model_tables import MODEL_NAMES
from model_tables import TORCHFM_PARITY
from model_tables import dropout_kwargs
from model_tables import module
from model_testing import check_torchfm_eval
from model_testing import check_torchfm_step
from model_testing import load_fixture
from model_testing import prefixed
from model_testing import torch_batchnorm
from model_testing import torch_dense
from model_testing import torch_features_embedding
from model_testing import torch_features_linear
from model_testing import torch_mlp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lr(w):
  return {'params': {'FeaturesLinear_0': torch_features_linear(w)}}, {}


def _fm(w):
  params = {
    'FeaturesLinear_0': torch_features_linear(w),
    'FeaturesEmbedding_0': torch_features_embedding(w),
  }
  return {'params': params}, {'embed_dim': 4}


def _ffm(w):
  # torch keeps one [ids, dim] table per field; ours stacks them on axis 1.
  num_fields = sum(k.startswith('ffm.embeddings.') for k in w)
  table = np.stack(
    [w[f'ffm.embeddings.{g}.weight'] for g in range(num_fields)], axis=1
  )
  params = {
    'FeaturesLinear_0': torch_features_linear(w),
    'FieldAwareEmbedding_0': {'embedding': table},
  }
  return {'params': params}, {'embed_dim': 4}


def _fnn(w):
  # pytorch-fm feeds the factors alone: fm_linear_inputs=False.
  mlp, stats = torch_mlp(w, 'mlp.mlp', 2)
  params = {
    'FeaturesEmbedding_0': torch_features_embedding(w),
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
  mlp, stats = torch_mlp(w, 'mlp.mlp', 2)
  params = {
    'FeaturesLinear_0': torch_features_linear(w),
    'FeaturesEmbedding_0': torch_features_embedding(w),
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
  linear = torch_features_linear(w)
  linear['bias'] = linear['bias'] + w['afm.fc.bias']
  params = {
    'FeaturesLinear_0': linear,
    'FeaturesEmbedding_0': torch_features_embedding(w),
    'AttentionalFactorizationMachine_0': {
      'attention': torch_dense(w, 'afm.attention'),
      'projection': {'kernel': w['afm.projection.weight'].T},
      'fc': {'kernel': w['afm.fc.weight'].T},
    },
  }
  # Our dropouts are off in eval mode; the fixture's torch model had 0.
  return {'params': params}, dict(embed_dim=4, attn_size=3, dropouts=(0.2, 0.2))


def _nfm(w):
  # torch's `fm` Sequential: 0 FactorizationMachine, 1 BatchNorm1d, 2 Dropout.
  mlp, mlp_stats = torch_mlp(w, 'mlp.mlp', 2)
  bn, bn_stats = torch_batchnorm(w, 'fm.1')
  params = {
    'FeaturesLinear_0': torch_features_linear(w),
    'FeaturesEmbedding_0': torch_features_embedding(w),
    'BatchNorm_0': bn,
    'MultiLayerPerceptron_0': mlp,
  }
  stats = {'BatchNorm_0': bn_stats, 'MultiLayerPerceptron_0': mlp_stats}
  variables = {'params': params, 'batch_stats': stats}
  return variables, dict(embed_dim=4, mlp_dims=(8, 6), dropouts=(0.2, 0.2))


def _ncf(w):
  # pytorch-fm's MLP tower has no output layer (`fc` is the prediction
  # layer). One table feeds both towers in pytorch-fm: shared_embedding=True
  # (the paper's separate tables are checked below).
  mlp, mlp_stats = torch_mlp(w, 'mlp.mlp', 2, output_layer=False)
  params = {
    'embedding': torch_features_embedding(w),
    'MultiLayerPerceptron_0': mlp,
    'prediction': torch_dense(w, 'fc'),
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
  mlp, mlp_stats = torch_mlp(w, 'mlp.mlp', 2)
  bn, bn_stats = torch_batchnorm(w, 'bn')
  params = {
    'FeaturesLinear_0': torch_features_linear(w),
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


# torchfm parameters that our files fold into another or drop, by model:
# name -> the parameter whose gradient it shares, or None when its gradient
# is always 0 (AFM's score bias, which the softmax cancels). See _afm.
FOLDED = {
  'afm': {'afm.fc.bias': 'linear.bias', 'afm.projection.bias': None},
}


def _load(name, dropout=True):
  """The fixture's model (with our dropout rates or at 0), fixture, converter.

  The converter of the torch weights returns our variables.
  """
  data, field_dims = load_fixture(name)
  _, kwargs = CONVERTERS[name](prefixed(data, 'w/'))
  if not dropout:
    kwargs = dropout_kwargs(name, base=kwargs)
  model = module(name).Model(field_dims, **kwargs)
  return model, data, lambda w: CONVERTERS[name](w)[0]


class TorchfmParityTest(parameterized.TestCase):
  def test_every_model_names_its_torchfm_check(self):
    self.assertEqual(sorted(TORCHFM_PARITY), MODEL_NAMES)
    for name in CONVERTERS:
      self.assertEqual(TORCHFM_PARITY[name], 'tests/test_model_parity.py')
    for name, where in TORCHFM_PARITY.items():
      if where.startswith('tests/'):
        with self.subTest(name):
          self.assertTrue(os.path.exists(os.path.join(ROOT, where)), where)
          if where == 'tests/test_model_parity.py':
            self.assertIn(name, CONVERTERS)

  @parameterized.named_parameters((n, n) for n in sorted(CONVERTERS))
  def test_eval_outputs_match_torchfm(self, name):
    check_torchfm_eval(*_load(name))

  @parameterized.named_parameters((n, n) for n in sorted(CONVERTERS))
  def test_one_training_step_matches_torchfm(self, name):
    model, data, convert = _load(name, dropout=False)
    grads = prefixed(data, 'grad/')
    for folded, target in FOLDED.get(name, {}).items():
      if target is None:
        np.testing.assert_allclose(grads[folded], 0.0, atol=1e-7)
      else:
        np.testing.assert_allclose(
          grads[folded], grads[target], rtol=1e-6, atol=1e-8
        )
      grads[folded] = np.zeros_like(grads[folded])
    check_torchfm_step(model, data, convert, grads)


class DeparturesFromTorchfmTest(absltest.TestCase):
  """Where our files differ from torchfm on purpose, shown on its fixtures."""

  def test_bias_before_batchnorm_has_no_gradient_in_torchfm(self):
    # Our hidden Dense layers have no bias (models/*.py,
    # MultiLayerPerceptron): BatchNorm cancels it, and the converters fold
    # torchfm's into the running mean. Its gradient in torchfm's step is 0
    # up to rounding, while the weights' are not.
    checked = []
    fixtures = os.path.join(ROOT, 'tests', 'fixtures')
    for file in sorted(os.listdir(fixtures)):
      if not file.startswith('torchfm_'):
        continue
      name = file[len('torchfm_') : -len('.npz')]
      data = np.load(os.path.join(fixtures, file))
      for key in data.files:
        if not (key.startswith('grad/mlp.mlp.') and key.endswith('.bias')):
          continue
        layer = key[len('grad/') : -len('.bias')]
        prefix, index = layer.rsplit('.', 1)
        if f'w/{prefix}.{int(index) + 1}.running_mean' not in data.files:
          continue  # The output layer: no BatchNorm after it.
        with self.subTest(key=f'{name} {key}'):
          self.assertLess(np.max(np.abs(data[key])), 1e-6)
          weight = np.max(np.abs(data[f'grad/{layer}.weight']))
          self.assertGreater(weight, 1e-3)
        checked.append(name)
    self.assertEqual(
      set(checked),
      {'afn', 'autoint', 'dcn', 'deepfm', 'fnfm', 'fnn', 'ipnn', 'ncf', 'nfm'}
      | {'opnn', 'wd', 'xdeepfm'},
    )

  def test_afm_eval_has_no_dropout_unlike_pytorch_fm(self):
    # The fixture's torch AFM with dropouts (0.2, 0.2) gives two different
    # outputs in eval mode; ours with the same rates is deterministic and
    # equals torch's dropout-free output.
    model, data, convert = _load('afm')
    torch_runs = data['eval_dropout_probs']
    self.assertGreater(np.max(np.abs(torch_runs[0] - torch_runs[1])), 1e-3)
    self.assertGreater(np.max(np.abs(torch_runs[0] - data['probs'])), 1e-3)
    self.assertEqual(model.dropouts, (0.2, 0.2))
    variables = convert(prefixed(data, 'w/'))
    first = model.apply(variables, data['ids'], train=False)
    second = model.apply(variables, data['ids'], train=False)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(
      jax.nn.sigmoid(first), data['probs'], rtol=1e-5, atol=1e-5
    )

  def test_ncf_paper_variant_has_separate_tables_and_matches_when_tied(self):
    # pytorch-fm feeds GMF and MLP from one table; the paper (and our
    # default) gives GMF its own. Loaded with pytorch-fm's table in both
    # places, the default model reproduces pytorch-fm's outputs; with its own
    # GMF table it does not.
    data, field_dims = load_fixture('ncf')
    ids = data['ids']
    shared_variables, kwargs = CONVERTERS['ncf'](prefixed(data, 'w/'))
    self.assertTrue(kwargs.pop('shared_embedding'))
    ncf = module('ncf')
    shared = ncf.Model(field_dims, shared_embedding=True, **kwargs)
    paper = ncf.Model(field_dims, **kwargs)
    shared_init = jax.eval_shape(shared.init, jax.random.key(0), ids)
    paper_init = jax.eval_shape(paper.init, jax.random.key(0), ids)
    self.assertNotIn('gmf_embedding', shared_init['params'])
    self.assertEqual(
      paper_init['params']['gmf_embedding']['embedding'].shape,
      (field_dims[0] + field_dims[1], 4),
    )
    params = shared_variables['params']
    batch_stats = shared_variables['batch_stats']
    # User and item rows are the first two fields' rows of the shared table.
    tied = params['embedding']['embedding'][: field_dims[0] + field_dims[1]]
    tied_params = {**params, 'gmf_embedding': {'embedding': tied}}
    out = paper.apply({'params': tied_params, 'batch_stats': batch_stats}, ids)
    np.testing.assert_allclose(
      jax.nn.sigmoid(out), data['probs'], rtol=1e-5, atol=1e-5
    )
    shared_out = shared.apply(shared_variables, ids)
    np.testing.assert_allclose(out, shared_out, rtol=1e-6, atol=1e-6)

    untied = {**params, 'gmf_embedding': {'embedding': tied + 0.5}}
    out2 = paper.apply({'params': untied, 'batch_stats': batch_stats}, ids)
    self.assertFalse(np.allclose(out2, out, atol=1e-3))


if __name__ == '__main__':
  absltest.main()
