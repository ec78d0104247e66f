"""Several training steps per dispatch, and the persistent compilation cache.

`config.steps_per_dispatch` must change how often the host dispatches, never
what the steps compute; the cache must store what a run compiles.
"""

import functools
import os
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np

from configs import default
import data
import train
import utils

FIELD_DIMS = (5, 6)


def _setup(optimizer):
  config = default.get_config()
  # Dropout, so the steps' keys must match; no BatchNorm, whose preceding
  # bias has a zero gradient up to rounding, which Adam turns into noise.
  config.model_name = 'afm'
  config.model = {'embed_dim': 3, 'attn_size': 2, 'dropouts': (0.3, 0.3)}
  config.optimizer = optimizer
  config.batch_size = 8
  config.learning_rate = 0.02
  config.progress_bar = False
  model = train.create_model(config, FIELD_DIMS, axis_name=train.AXIS)
  state = train.create_train_state(
    jax.random.key(0), config, model, len(FIELD_DIMS)
  )
  p_steps = jax.pmap(
    functools.partial(train.train_steps, model=model, seed=0),
    axis_name=train.AXIS,
  )
  return config, state, p_steps


def _split(num):
  rng = np.random.default_rng(0)
  ids = np.stack([rng.integers(0, d, num) for d in FIELD_DIMS], 1)
  return data.Split(ids.astype(np.int32), (rng.random(num) < 0.5) * 1.0)


class StepsPerDispatchTest(parameterized.TestCase):
  @parameterized.parameters('adam', 'rowwise_adagrad')
  def test_an_epoch_is_the_same_whatever_the_steps_per_dispatch(
    self, optimizer
  ):
    # 7 steps: with 3 per dispatch, a remainder of 1 then two stacks of 3.
    split = _split(7 * 8 + 5)
    states, losses = {}, {}
    for size in (1, 3, 16):
      config, state, p_steps = _setup(optimizer)
      config.steps_per_dispatch = size
      state, loss, rate = train.train_epoch(
        p_steps, train.replicate(state), split, config, epoch=0
      )
      states[size], losses[size] = jax.device_get(state), loss
      self.assertEqual(int(states[size].step[0]), 7)
      self.assertGreater(rate, 0)
    for size in (3, 16):
      np.testing.assert_allclose(losses[size], losses[1], rtol=1e-6)
      jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
        (states[size].params, states[size].opt_state),
        (states[1].params, states[1].opt_state),
      )
    # And the steps did train.
    moved = jax.tree.map(
      lambda a, b: np.abs(a - b).max(),
      states[1].params,
      jax.device_get(train.replicate(_setup(optimizer)[1]).params),
    )
    self.assertGreater(max(jax.tree.leaves(moved)), 1e-3)

  def test_stack_batches_keeps_the_order_of_the_batches(self):
    batches = [
      {'ids': np.full((4, 2), i), 'label': np.full(4, i)} for i in range(5)
    ]
    stacks = list(data.stack_batches(iter(batches), [2, 3], 2))
    self.assertEqual(
      [s['ids'].shape for s in stacks], [(2, 2, 2, 2), (2, 3, 2, 2)]
    )
    np.testing.assert_array_equal(
      stacks[1]['label'][1], [[2, 2], [3, 3], [4, 4]]
    )


class CompilationCacheTest(absltest.TestCase):
  def test_compiled_programs_are_written_under_the_cache_dir(self):
    before = jax.config.jax_compilation_cache_dir
    with (
      tempfile.TemporaryDirectory() as tmp,
      mock.patch.dict(os.environ, {'JAX_COMPILATION_CACHE_DIR': ''}),
    ):
      try:
        utils.enable_compilation_cache(tmp)
        directory = os.path.join(tmp, 'jax')
        self.assertEqual(jax.config.jax_compilation_cache_dir, directory)
        jax.jit(lambda x: jnp.sin(x) * 3.25)(
          jnp.arange(7.0)
        ).block_until_ready()
        self.assertNotEmpty(os.listdir(directory))
      finally:
        jax.config.update('jax_compilation_cache_dir', before)
        compilation_cache.reset_cache()

  def test_an_unusable_cache_dir_is_skipped(self):
    with tempfile.NamedTemporaryFile() as not_a_directory:
      before = jax.config.jax_compilation_cache_dir
      with (
        mock.patch.dict(os.environ, {'JAX_COMPILATION_CACHE_DIR': ''}),
        self.assertLogs(level='WARNING'),
      ):
        utils.enable_compilation_cache(not_a_directory.name)
      self.assertEqual(jax.config.jax_compilation_cache_dir, before)


if __name__ == '__main__':
  absltest.main()
