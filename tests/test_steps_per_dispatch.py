"""Several training steps per dispatch, and the persistent compilation cache.

`config.steps_per_dispatch` must change how often the host dispatches, never
what the steps compute; the cache must store what a run compiles.
"""

import functools
import os
import shutil
import sys
import tempfile
from unittest import mock
import zlib

from absl.testing import absltest
from absl.testing import parameterized
import dataset_testing
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np

import batching
from configs import default
import data
import train
import utils

FIELD_DIMS = (5, 6)


def _setup(optimizer, **inputs):
  config = default.get_config()
  # Dropout, so the steps' keys must match; no BatchNorm, whose preceding
  # bias has a zero gradient up to rounding, which Adam turns into noise.
  config.model_name = 'afm'
  config.model = {'embed_dim': 3, 'attn_size': 2, 'dropouts': (0.3, 0.3)}
  config.optimizer = optimizer
  config.batch_size = 8
  config.learning_rate = 0.02
  config.progress_bar = False
  model = train.create_model(config, FIELD_DIMS, axis_name=train.AXIS, **inputs)
  state = train.state_initializer(config, model)(jax.random.key(0))
  p_steps = jax.pmap(
    functools.partial(train.train_steps, model=model, config=config),
    axis_name=train.AXIS,
  )
  return config, state, p_steps


@functools.cache
def _built(optimizer, **inputs):
  config, state, p_steps = _setup(optimizer, **inputs)
  return config, jax.device_get(state), p_steps


def _shared_setup(optimizer, **inputs):
  """`_setup`'s, built once per optimizer and inputs: the same program
  (compiled once per shape of stack) and initial state (on the host, so
  that no run's donation deletes it), and a copy of the config to change
  (the program reads none of the fields that the tests set)."""
  config, state, p_steps = _built(optimizer, **inputs)
  return config.copy_and_resolve_references(), state, p_steps


def _split(num, side=False):
  return dataset_testing.random_split(num, FIELD_DIMS, side)


class StepsPerDispatchTest(parameterized.TestCase):
  @parameterized.parameters('adam', 'rowwise_adagrad')
  def test_an_epoch_is_the_same_whatever_the_steps_per_dispatch(
    self, optimizer
  ):
    # 7 steps: with 3 per dispatch, a remainder of 1 then two stacks of 3.
    split = _split(7 * 8 + 5)
    states, losses = {}, {}
    for size in (1, 3, 16):
      config, state, p_steps = _shared_setup(optimizer)
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
      jax.device_get(train.replicate(_shared_setup(optimizer)[1]).params),
    )
    self.assertGreater(max(jax.tree.leaves(moved)), 1e-3)

  @parameterized.parameters('adam', 'rowwise_adagrad')
  def test_a_split_kept_on_the_devices_trains_as_one_fed_by_the_host(
    self, optimizer
  ):
    split = _split(7 * 8 + 5, side=True)
    inputs = {'multi_field_dims': (4,), 'num_dense': 1}
    runs = {}
    for mb in (0, 1):
      config, state, p_steps = _shared_setup(optimizer, **inputs)
      config.steps_per_dispatch = 3
      config.device_split_mb = mb
      resident = train.replicate(batching.resident_split(split, config))
      self.assertEqual(resident is None, mb == 0)
      state, loss, _ = train.train_epoch(
        p_steps, train.replicate(state), split, config, 0, resident
      )
      runs[mb] = jax.device_get((state.params, state.opt_state)), loss
    self.assertEqual(jax.local_device_count(), 2)
    self.assertEqual(runs[1][1], runs[0][1])
    jax.tree.map(np.testing.assert_array_equal, runs[1][0], runs[0][0])

    # The side inputs reached the model: their embeddings moved.
    def flat(params):
      leaves = jax.tree_util.tree_leaves_with_path(params)
      return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}

    trained = flat(runs[1][0][0])
    initial = flat(
      train.replicate(_shared_setup(optimizer, **inputs)[1]).params
    )
    for name in ('multi_embedding', 'dense_embedding'):
      key = next(k for k in trained if name in k)
      self.assertGreater(np.abs(trained[key] - initial[key]).max(), 1e-3)

  def test_the_bar_shows_the_recent_losses_reading_each_stack_once(self):
    # 23 steps, 3 per dispatch (2, then 3 x 7), a bar line every 5 steps:
    # after the stacks that cross a multiple of 5, and the last.
    split = _split(23 * 8 + 5)
    config, state, p_steps = _setup('adam')
    config.steps_per_dispatch, config.progress_bar = 1, True
    captions, read = [], []
    get = jax.device_get

    def device_get(tree):
      read.extend(jax.tree.leaves(tree))
      return get(tree)

    def update(bar, done, count, caption=''):
      del bar, count
      captions.append((done, float(caption.split()[-1])))

    # Per-step losses, from a run with one step a dispatch and a line a step.
    config.log_every_steps = 1
    with (
      mock.patch.object(sys.stderr, 'isatty', lambda: True),
      mock.patch.object(utils.ProgressBar, 'update', update),
    ):
      train.train_epoch(p_steps, train.replicate(state), split, config, 0)
      steps = np.array([loss for _, loss in captions])
      captions.clear()
      config.steps_per_dispatch, config.log_every_steps = 3, 5
      with mock.patch.object(jax, 'device_get', device_get):
        _, loss, _ = train.train_epoch(
          p_steps, train.replicate(state), split, config, 0
        )
    self.assertLen(steps, 23)
    self.assertEqual([d for d, _ in captions], [5, 11, 17, 20, 23])
    for done, recent in captions:
      np.testing.assert_allclose(
        recent, steps[done - 5 : done].mean(), atol=1e-4
      )
    # The captions round to 4 decimals.
    np.testing.assert_allclose(loss, steps.mean(), atol=1e-4)
    # Each stack's losses are read once, not once per line.
    self.assertLen(read, 8)

  def test_an_epoch_off_a_terminal_logs_its_progress(self):
    # An epoch of a large table runs for minutes: a log file shows it move,
    # at most once every LOG_EVERY seconds (here at every bar update).
    split = _split(23 * 8 + 5)
    config, state, p_steps = _setup('adam')
    config.steps_per_dispatch, config.log_every_steps = 3, 5
    config.progress_bar = True
    with (
      mock.patch.object(sys.stderr, 'isatty', lambda: False),
      mock.patch.object(utils.ProgressBar, 'LOG_EVERY', 0.0),
      self.assertLogs(level='INFO') as logs,
    ):
      train.train_epoch(p_steps, train.replicate(state), split, config, 0)
    lines = [r.getMessage() for r in logs.records]
    lines = [m for m in lines if m.startswith('epoch 1: ')]
    self.assertEqual(
      [m.split(', ')[1].split()[0] for m in lines],
      ['5/23', '11/23', '17/23', '20/23', '23/23'],
    )
    self.assertRegex(lines[-1], r'^epoch 1: 100%, 23/23 [\d,]+ ex/s loss ')

  def test_resident_split_respects_the_size_limit(self):
    config = default.get_config()
    config.device_split_mb = 1
    for rows, fits in ((2**16, True), (2**16 + 1, False)):
      # 3 ids and a label: 16 bytes a row, 1 MiB in 2**16 rows.
      split = data.Split(
        np.zeros((rows, 3), np.int32), np.arange(rows, dtype=np.float32)
      )
      with self.assertLogs(level='INFO') as logs:
        whole = batching.resident_split(split, config)
      self.assertEqual(whole is not None, fits)
      # The log says which, as a streamed split trains at another speed.
      where = 'kept on the devices' if fits else 'read from the host'
      self.assertIn(f'Training split: 1.0 MiB, {where}', logs.output[-1])
    whole = batching.resident_split(_split(10, side=True), config)
    self.assertEqual(sorted(whole), ['dense', 'ids', 'label', 'multi_ids'])
    np.testing.assert_array_equal(
      whole['multi_ids'], _split(10, side=True).multi_ids
    )
    config.device_split_mb = 0
    self.assertIsNone(batching.resident_split(_split(10), config))

  def test_stack_batches_keeps_the_order_of_the_batches(self):
    batches = [
      {'ids': np.full((4, 2), i), 'label': np.full(4, i)} for i in range(5)
    ]
    stacks = list(batching.stack_batches(iter(batches), [2, 3], 2))
    # The shorter stack is padded with zeros to the longer's shape.
    self.assertEqual(
      [s['ids'].shape for s in stacks], [(2, 3, 2, 2), (2, 3, 2, 2)]
    )
    np.testing.assert_array_equal(
      stacks[0]['label'][1], [[0, 0], [1, 1], [0, 0]]
    )
    np.testing.assert_array_equal(
      stacks[1]['label'][1], [[2, 2], [3, 3], [4, 4]]
    )

  def test_an_epoch_with_a_remainder_compiles_one_program(self):
    shapes = []

    def traced(state, batches, *args, **kwargs):
      shapes.append(jax.tree.map(jnp.shape, batches))
      return train_steps(state, batches, *args, **kwargs)

    train_steps = train.train_steps
    with mock.patch.object(train, 'train_steps', traced):
      config, state, p_steps = _setup('adam')
    config.steps_per_dispatch = 3  # 7 steps: stacks of 1, 3 and 3.
    state, _, _ = train.train_epoch(
      p_steps, train.replicate(state), _split(7 * 8 + 5), config, epoch=0
    )
    self.assertEqual(int(state.step[0]), 7)
    self.assertEqual(shapes, [{'ids': (3, 4, 2), 'label': (3, 4)}])


class CompilationCacheTest(absltest.TestCase):
  def test_compiled_programs_are_written_under_the_cache_dir(self):
    before = jax.config.jax_compilation_cache_dir
    min_time = 'jax_persistent_cache_min_compile_time_secs'
    before_min_time = getattr(jax.config, min_time)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR='')
    env.pop(min_time.upper(), None)  # The tests' conftest sets one.
    with (
      tempfile.TemporaryDirectory() as tmp,
      mock.patch.dict(os.environ, env, clear=True),
    ):
      try:
        utils.enable_compilation_cache(tmp)
        directory = os.path.join(tmp, 'jax')
        self.assertEqual(jax.config.jax_compilation_cache_dir, directory)
        # Even a program that compiles in milliseconds.
        jax.jit(lambda x: jnp.sin(x) * 3.25)(
          jnp.arange(7.0)
        ).block_until_ready()
        self.assertNotEmpty(os.listdir(directory))
        # A threshold the user set in its environment variable is kept.
        os.environ[min_time.upper()] = '0.5'
        jax.config.update(min_time, 0.5)
        utils.enable_compilation_cache(tmp)
        self.assertEqual(getattr(jax.config, min_time), 0.5)
      finally:
        jax.config.update('jax_compilation_cache_dir', before)
        jax.config.update(min_time, before_min_time)
        compilation_cache.reset_cache()

  def test_a_cache_copied_to_another_path_is_still_hit(self):
    # An entry's key must not hold the cache's own path: a warm cache
    # copied elsewhere (a CI cache, an image) loads its programs there.
    before = jax.config.jax_compilation_cache_dir
    xla_caches = 'jax_persistent_cache_enable_xla_caches'
    before_xla_caches = getattr(jax.config, xla_caches)
    min_time = 'jax_persistent_cache_min_compile_time_secs'
    before_min_time = getattr(jax.config, min_time)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR='')
    env.pop(xla_caches.upper(), None)
    env.pop(min_time.upper(), None)  # The tests' conftest sets one.
    program = lambda x: jnp.cos(x) * 2.75 - 0.125  # Cached nowhere else.
    with (
      tempfile.TemporaryDirectory() as first,
      tempfile.TemporaryDirectory() as second,
      mock.patch.dict(os.environ, env, clear=True),
    ):
      try:
        utils.enable_compilation_cache(first)
        jax.jit(program)(jnp.arange(5.0)).block_until_ready()
        written = sorted(os.listdir(os.path.join(first, 'jax')))
        self.assertNotEmpty(written)
        shutil.copytree(os.path.join(first, 'jax'), os.path.join(second, 'jax'))
        utils.enable_compilation_cache(second)
        jax.clear_caches()  # Compile again, or load from the copy.
        jax.jit(program)(jnp.arange(5.0)).block_until_ready()
        self.assertEqual(
          sorted(os.listdir(os.path.join(second, 'jax'))), written
        )
      finally:
        jax.config.update('jax_compilation_cache_dir', before)
        jax.config.update(xla_caches, before_xla_caches)
        jax.config.update(min_time, before_min_time)
        compilation_cache.reset_cache()

  def test_entries_cut_short_are_dropped_once(self):
    # JAX writes an entry in place and keeps one that exists: entries cut
    # short by a full disk (0 bytes on a full tmpfs) warned "Error reading
    # persistent compilation cache entry" and compiled again in every run.
    # JAX's zlib entry (zstd where a zstd module is installed; either is
    # told by its header). An entry of a format unknown there is kept.
    before = jax.config.jax_compilation_cache_dir
    whole = zlib.compress(b'program' * 100)
    with (
      tempfile.TemporaryDirectory() as tmp,
      mock.patch.dict(os.environ, {'JAX_COMPILATION_CACHE_DIR': ''}),
    ):
      directory = os.path.join(tmp, 'jax')
      os.makedirs(directory)

      def write(name, data, ns=None):
        with open(os.path.join(directory, name), 'wb') as f:
          f.write(data)
        if ns:
          os.utime(os.path.join(directory, name), ns=(ns, ns))

      write('jit_a-1-cache', whole)
      write('jit_a-1-atime', b'12345678')  # Not an entry.
      write('jit_b-2-cache', b'')
      write('jit_c-3-cache', whole[: len(whole) // 2])
      write('jit_f-6-cache', b'no known compression')
      try:
        with self.assertLogs(level='WARNING') as logs:
          utils.enable_compilation_cache(tmp)
        self.assertLen(logs.output, 2)
        for name in ('jit_b-2-cache', 'jit_c-3-cache'):
          self.assertIn(
            f'{name}: a compiled program cut short', str(logs.output)
          )
        self.assertEqual(
          sorted(os.listdir(directory)),
          ['.checked', 'jit_a-1-atime', 'jit_a-1-cache', 'jit_f-6-cache'],
        )
        # Checked once: an entry older than the check is not read again.
        write('jit_d-4-cache', b'', ns=1)
        write('jit_e-5-cache', b'')
        jax.config.update('jax_compilation_cache_dir', before)
        with self.assertLogs(level='WARNING') as logs:
          utils.enable_compilation_cache(tmp)
        self.assertLen(logs.output, 1)
        self.assertIn('jit_e-5-cache', logs.output[0])
        self.assertEqual(
          sorted(os.listdir(directory)),
          [
            '.checked',
            'jit_a-1-atime',
            'jit_a-1-cache',
            'jit_d-4-cache',
            'jit_f-6-cache',
          ],
        )
      finally:
        jax.config.update('jax_compilation_cache_dir', before)
        compilation_cache.reset_cache()

  def test_a_cache_dir_set_in_the_environment_is_kept(self):
    before = jax.config.jax_compilation_cache_dir
    with (
      tempfile.TemporaryDirectory() as tmp,
      mock.patch.dict(os.environ, {'JAX_COMPILATION_CACHE_DIR': tmp}),
    ):
      try:
        utils.enable_compilation_cache(tmp)
        self.assertEqual(jax.config.jax_compilation_cache_dir, before)
        self.assertEqual(os.listdir(tmp), [])
      finally:
        if jax.config.jax_compilation_cache_dir != before:
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
