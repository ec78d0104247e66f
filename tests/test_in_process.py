"""The library called many times in one process (a notebook, a sweep)."""

import gc
import weakref

from absl.testing import absltest
import jax
import ml_collections
import numpy as np

from configs import default
import data
import train


def _config(**overrides):
  config = default.get_config('smoke')
  config.model = ml_collections.ConfigDict(dict(embed_dim=4))
  config.update(overrides)
  return config


def _split(n=64, field_dims=(13, 17)):
  rng = np.random.default_rng(0)
  ids = np.stack([rng.integers(0, d, n) for d in field_dims], 1)
  return data.Split(ids.astype(np.int32), rng.integers(0, 2, n) * 1.0)


def _mapped(program):
  """The function that `jax.pmap` was given for `program`."""
  return getattr(program, 'program', program).__wrapped__


class PmappedProgramsTest(absltest.TestCase):
  def test_programs_of_a_run_are_freed_with_it(self):
    # jax.pmap caches each function it maps in an entry that holds the
    # function: every run's programs stayed for the life of the process
    # (NFM: 40 MB a train_and_evaluate). Dropped, they must go.
    config = _config()
    model = train.create_model(config, (13, 17), train.AXIS)
    state = train.state_initializer(config, model)(jax.random.key(0))
    p_train, p_eval = train.pmapped_steps(model, config)
    scores = train.evaluate(p_eval, train.replicate(state), _split(), 16)
    self.assertBetween(scores['auc'], 0.0, 1.0)  # The program ran.
    mapped = [weakref.ref(_mapped(p)) for p in (p_train, p_eval)]
    del p_train, p_eval
    gc.collect()
    self.assertEqual([m() for m in mapped], [None, None])


if __name__ == '__main__':
  absltest.main()
