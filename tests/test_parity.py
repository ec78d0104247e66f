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


def _lr(w):
  return {'params': {'FeaturesLinear_0': _linear(w, 'linear')}}, {}


def _fm(w):
  params = {
    'FeaturesLinear_0': _linear(w, 'linear'),
    'FeaturesEmbedding_0': _embedding(w, 'embedding'),
  }
  return {'params': params}, {'embed_dim': 4}


# Model name -> function of the torch weights (dict name -> array) returning
# our variables and the constructor arguments matching the fixture.
CONVERTERS = {
  'lr': _lr,
  'fm': _fm,
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
