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
import jax.numpy as jnp
from model_tables import MODEL_NAMES
from model_tables import TORCHFM_PARITY
from model_tables import dropout_kwargs
from model_tables import module
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')


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
  # are checked below).
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


# torchfm parameters that our files fold into another or drop, by model:
# name -> the parameter whose gradient it shares, or None when its gradient
# is always 0 (AFM's score bias, which the softmax cancels). See _afm.
FOLDED = {
  'afm': {'afm.fc.bias': 'linear.bias', 'afm.projection.bias': None},
}


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _load(name):
  """The fixture: its arrays, and the torch weights by state_dict name."""
  data = np.load(os.path.join(FIXTURES, f'torchfm_{name}.npz'))
  w = {k[2:]: data[k] for k in data.files if k.startswith('w/')}
  return data, w


def _prefixed(data, prefix):
  return {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}


def _build(name, data, kwargs):
  field_dims = tuple(int(d) for d in data['field_dims'])
  return module(name).Model(field_dims=field_dims, **kwargs)


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
    data, w = _load(name)
    variables, kwargs = CONVERTERS[name](w)
    model = _build(name, data, kwargs)
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

  @parameterized.named_parameters((n, n) for n in sorted(CONVERTERS))
  def test_one_training_step_matches_torchfm(self, name):
    data, w = _load(name)
    variables, kwargs = CONVERTERS[name](w)
    model = _build(name, data, dropout_kwargs(name, base=kwargs))
    ids, labels = data['ids'], data['train/labels']
    others = {k: v for k, v in variables.items() if k != 'params'}

    def loss_fn(params):
      logits, state = model.apply(
        {'params': params, **others},
        ids,
        train=True,
        rngs={'dropout': jax.random.key(0)},
        mutable=['batch_stats'],
      )
      # torch's BCELoss of sigmoid(logits), written stably.
      loss = jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)
      return loss, (logits, state)

    (loss, (logits, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables['params']
    )
    np.testing.assert_allclose(
      _sigmoid(logits), data['train/probs'], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(loss, data['train/loss'], rtol=1e-5)

    # Gradients: torch's, converted as its weights are.
    torch_grads = _prefixed(data, 'grad/')
    self.assertEqual(
      sorted(torch_grads),
      sorted(k for k in w if not k.endswith(('running_mean', 'running_var'))),
    )
    for folded, target in FOLDED.get(name, {}).items():
      if target is None:
        np.testing.assert_allclose(torch_grads[folded], 0.0, atol=1e-7)
      else:
        np.testing.assert_allclose(
          torch_grads[folded], torch_grads[target], rtol=1e-6, atol=1e-8
        )
      torch_grads[folded] = np.zeros_like(torch_grads[folded])
    expected, _ = CONVERTERS[name]({**w, **torch_grads})
    self.assertEqual(
      jax.tree.structure(grads), jax.tree.structure(expected['params'])
    )
    for (path, got), want in zip(
      jax.tree_util.tree_leaves_with_path(grads),
      jax.tree.leaves(expected['params']),
      strict=True,
    ):
      with self.subTest(jax.tree_util.keystr(path)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

    # Running statistics after the step. Same momentum (torch 0.1 is flax
    # 0.9); torch averages in the unbiased batch variance, flax the biased.
    after = _prefixed(data, 'after/')
    n = len(ids)
    for key in [k for k in after if k.endswith('running_var')]:
      old = w[key]
      unbiased = (after[key] - 0.9 * old) / 0.1
      after[key] = 0.9 * old + 0.1 * unbiased * (n - 1) / n
    expected_stats = CONVERTERS[name]({**w, **after})[0].get('batch_stats', {})
    got_stats = state.get('batch_stats', {})
    self.assertEqual(
      jax.tree.structure(got_stats), jax.tree.structure(expected_stats)
    )
    for (path, got), want, old in zip(
      jax.tree_util.tree_leaves_with_path(got_stats),
      jax.tree.leaves(expected_stats),
      jax.tree.leaves(variables.get('batch_stats', {})),
      strict=True,
    ):
      with self.subTest(jax.tree_util.keystr(path)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        self.assertGreater(np.max(np.abs(got - old)), 1e-4)


class DeparturesFromTorchfmTest(absltest.TestCase):
  """Where our files differ from torchfm on purpose, shown on its fixtures."""

  def test_afm_eval_has_no_dropout_unlike_pytorch_fm(self):
    # The fixture's torch AFM with dropouts (0.2, 0.2) gives two different
    # outputs in eval mode; ours with the same rates is deterministic and
    # equals torch's dropout-free output.
    data, w = _load('afm')
    torch_runs = data['eval_dropout_probs']
    self.assertGreater(np.max(np.abs(torch_runs[0] - torch_runs[1])), 1e-3)
    self.assertGreater(np.max(np.abs(torch_runs[0] - data['probs'])), 1e-3)
    variables, kwargs = CONVERTERS['afm'](w)
    self.assertEqual(kwargs['dropouts'], (0.2, 0.2))
    model = _build('afm', data, kwargs)
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
    data, w = _load('ncf')
    ids = data['ids']
    field_dims = tuple(int(d) for d in data['field_dims'])
    shared_variables, kwargs = CONVERTERS['ncf'](w)
    self.assertTrue(kwargs.pop('shared_embedding'))
    ncf = module('ncf')
    shared = ncf.Model(field_dims, shared_embedding=True, **kwargs)
    paper = ncf.Model(field_dims, **kwargs)
    shared_init = shared.init(jax.random.key(0), ids)
    paper_init = paper.init(jax.random.key(0), ids)
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
      _sigmoid(out), data['probs'], rtol=1e-5, atol=1e-5
    )
    shared_out = shared.apply(shared_variables, ids)
    np.testing.assert_allclose(out, shared_out, rtol=1e-6, atol=1e-6)

    untied = {**params, 'gmf_embedding': {'embedding': tied + 0.5}}
    out2 = paper.apply({'params': untied, 'batch_stats': batch_stats}, ids)
    self.assertFalse(np.allclose(out2, out, atol=1e-3))


if __name__ == '__main__':
  absltest.main()
