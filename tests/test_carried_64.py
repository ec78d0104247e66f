"""Tests of small fixes: errors raised once, hashes counted, caches kept.

Each test runs in-process on tiny inputs; each fails without its fix.
"""

from absl.testing import absltest
from flax import linen as nn
import jax.numpy as jnp
import numpy as np

from models import fm
import sparse


class _OneTable(nn.Module):
  """Reads one declared table, then the caller's loss may fail."""

  @nn.compact
  def __call__(self, rows):
    t = self.param('t', nn.initializers.normal(1.0), (5, 2))
    return jnp.sum(fm.take_rows(t, rows, self, 't'), axis=-1)


class SparseErrorTest(absltest.TestCase):
  def test_a_model_error_after_the_lookups_is_raised_once(self):
    # The error comes from the gradient's trace; tracing the model again
    # to name the tables read raises it again, which must not chain onto
    # (and repeat) the first.
    model = _OneTable()
    rows = np.array([0, 3, 4], np.int32)
    params = {'t': np.ones((5, 2), np.float32)}
    calls = []

    def fun(params, perturbations):
      variables = {'params': params}
      if perturbations:
        variables[sparse.PERTURBATIONS] = perturbations
      model.apply(variables, rows, mutable=[sparse.ROWS])
      calls.append(perturbations is not None)
      raise TypeError('the model failed')

    with self.assertRaisesRegex(TypeError, '^the model failed$') as cm:
      sparse.value_and_grad(fun, params, frozenset({('t',)}))
    self.assertIsNone(cm.exception.__context__)
    self.assertIsNone(cm.exception.__cause__)
    # The gradient's trace, then the whole trace that names the reads.
    self.assertEqual(calls, [True, False])


if __name__ == '__main__':
  absltest.main()
