"""programs.py: replicas that compile nothing, programs compiled ahead.

And `compile_train_and_eval`: the programs it compiles are the ones a run
calls, so the first epoch and evaluation start without compiling.
"""

import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys
import types
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import dataset_testing
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import batching
from configs import default
import data
import programs
import train

# One per program that a call lowers (compiled, or loaded from the cache).
LOWERING = '/jax/core/compile/jaxpr_to_mlir_module_duration'


@contextlib.contextmanager
def lowerings():
  """Yields the list of the programs lowered inside the block."""
  events = []

  def listen(event, duration, **kwargs):
    del duration, kwargs
    if event == LOWERING:
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


class ReplicateTest(absltest.TestCase):
  def test_every_device_holds_the_tree_and_nothing_compiles(self):
    tree = {
      'table': np.arange(12, dtype=np.float32).reshape(4, 3),
      'step': np.int32(5),
      'on_device': jnp.arange(3.0),  # Computed before the block.
    }
    tree['on_device'].block_until_ready()
    with lowerings() as lowered:
      out = programs.replicate(tree)
    self.assertEqual(lowered, [])
    count = jax.local_device_count()
    self.assertEqual(count, 2)  # conftest's two emulated devices.
    for key, value in tree.items():
      self.assertEqual(out[key].shape, (count,) + np.shape(value))
      self.assertEqual(out[key].dtype, np.asarray(value).dtype)
      self.assertEqual(out[key].sharding, programs.sharding())
      for shard in out[key].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data)[0], value)
    self.assertLen({s.device for s in out['table'].addressable_shards}, count)

  def test_replicas_are_laid_out_as_pmap_lays_out_its_outputs(self):
    step = jax.pmap(lambda x: x + 1.0, axis_name=programs.AXIS)
    x = programs.replicate(np.zeros(3, np.float32))
    y = step(x)
    self.assertEqual(y.sharding, x.sharding)
    with lowerings() as lowered:  # So the output's call compiles nothing.
      z = step(y)
    self.assertEqual(lowered, [])
    np.testing.assert_array_equal(np.asarray(z), np.full((2, 3), 2.0))

  def test_first_replica_is_a_host_copy_of_device_0s(self):
    # Different values on each device: the first replica is device 0's.
    scaled = jax.pmap(
      lambda x: x * (1.0 + lax.axis_index(programs.AXIS)),
      axis_name=programs.AXIS,
    )
    y = scaled(programs.replicate(np.arange(1.0, 4.0, dtype=np.float32)))
    np.testing.assert_array_equal(np.asarray(y)[1], [2.0, 4.0, 6.0])
    with lowerings() as lowered:
      host = programs.first_replica({'w': y})['w']
    self.assertEqual(lowered, [])
    self.assertIsInstance(host, np.ndarray)
    np.testing.assert_array_equal(host, [1.0, 2.0, 3.0])
    host[0] = 9.0  # A copy: the device's buffer keeps its value.
    np.testing.assert_array_equal(np.asarray(y)[0], [1.0, 2.0, 3.0])

  def test_replicated_shapes_are_those_of_the_replicas(self):
    value = np.ones((4, 3), np.float32)
    shape = programs.replicated_shapes(jax.eval_shape(lambda: value))
    replica = programs.replicate(value)
    self.assertEqual(shape.shape, replica.shape)
    self.assertEqual(shape.dtype, replica.dtype)
    self.assertEqual(shape.sharding, replica.sharding)


class CompileAheadTest(absltest.TestCase):
  def test_a_program_compiled_ahead_runs_without_compiling(self):
    step = jax.pmap(lambda w, x: jnp.tanh(x @ w) * 1.5, axis_name=programs.AXIS)
    weights = np.full((3, 2), 0.25, np.float32)
    inputs = np.ones((2, 5, 3), np.float32)
    shape = jax.ShapeDtypeStruct(weights.shape, weights.dtype)
    wait = programs.compile_ahead(
      (step, lambda: (programs.replicated_shapes(shape), inputs))
    )
    wait()
    replicas = programs.replicate(weights)
    with lowerings() as lowered:
      out = step(replicas, inputs)
    self.assertEqual(lowered, [])
    np.testing.assert_allclose(
      np.asarray(out), np.tanh(inputs @ weights) * 1.5, rtol=1e-6
    )

  def test_options_reach_the_compiler_once_per_argument_shapes(self):
    step = jax.pmap(lambda w, x: jnp.tanh(x @ w), axis_name=programs.AXIS)
    self.assertIs(programs.with_options(step, None), step)
    program = programs.with_options(step, programs.CPU_COMPILER_OPTIONS)
    weights = programs.replicate(np.full((3, 2), 0.25, np.float32))
    shape = jax.ShapeDtypeStruct((3, 2), np.float32)
    inputs = np.ones((2, 5, 3), np.float32)
    programs.compile_ahead(
      (program, lambda: (programs.replicated_shapes(shape), inputs))
    )()
    with lowerings() as lowered:
      out = program(weights, inputs)
    self.assertEqual(lowered, [])  # The executable compiled ahead.
    np.testing.assert_array_equal(out, step(weights, inputs))
    with lowerings() as lowered:
      for _ in range(2):  # A new shape compiles once.
        out = program(weights, inputs[:, :4])
    self.assertLen(lowered, 1)
    np.testing.assert_array_equal(out, step(weights, inputs[:, :4]))
    with lowerings() as lowered:  # So does a new dtype of the same shape.
      out = program(weights, inputs.astype(np.int32))
    self.assertLen(lowered, 1)
    np.testing.assert_array_equal(out, step(weights, inputs.astype(np.int32)))
    refused = programs.with_options(
      step, {'xla_backend_optimization_level': 'high'}
    )
    with self.assertRaisesRegex(
      jax.errors.JaxRuntimeError, 'xla_backend_optimization_level'
    ):
      refused(weights, inputs)  # So the options are the compiler's.

  def test_several_processes_run_the_program_as_pmap_lowers_it(self):
    # Every process must run the same programs: options are for a
    # single-process run only.
    step = jax.pmap(lambda x: x, axis_name=programs.AXIS)
    options = programs.CPU_COMPILER_OPTIONS
    with mock.patch.object(jax, 'process_count', return_value=2):
      self.assertIs(programs.with_options(step, options), step)
    program = programs.with_options(step, options)
    self.assertIsInstance(program, programs.OptionedProgram)
    self.assertEqual(program.options, options)

  def test_wait_raises_what_a_compilation_raised(self):
    step = jax.pmap(lambda x: x @ x, axis_name=programs.AXIS)
    wait = programs.compile_ahead(
      (step, lambda: (np.ones((2, 3, 4), np.float32),))  # 3x4 @ 3x4.
    )
    with self.assertRaisesRegex(TypeError, 'dot_general'):
      wait()


FIELD_DIMS = (5, 6)


def _split(num, side=False):
  return dataset_testing.random_split(num, FIELD_DIMS, side)


# Half of the 16 combinations of the four choices: `side` is on where an odd
# number of the other three are (deepfm, rowwise_adagrad, resident), so
# that any three of the four choices meet in all of their 8 combinations.
_COMPILE_AHEAD_CASES = [
  (model_name, optimizer, resident, side)
  for model_name in ('fm', 'deepfm')
  for optimizer in ('adam', 'rowwise_adagrad')
  for resident in (False, True)
  for side in (False, True)
  if side == (model_name == 'deepfm') ^ (optimizer != 'adam') ^ resident
]


class TrainCompileAheadTest(parameterized.TestCase):
  @parameterized.parameters(*_COMPILE_AHEAD_CASES)
  def test_the_run_calls_the_programs_compiled_ahead(
    self, model_name, optimizer, resident, side
  ):
    config = default.get_config()
    config.model_name = model_name
    config.model = {'embed_dim': 4}
    if model_name == 'deepfm':  # BatchNorm and dropout.
      config.model = {'embed_dim': 4, 'mlp_dims': (8,), 'dropout': 0.2}
    config.optimizer = optimizer
    config.batch_size, config.eval_batch_size = 8, 16
    config.steps_per_dispatch = 3  # 7 steps: a padded stack, then 3 and 3.
    config.progress_bar = False
    train_split, valid_split = _split(7 * 8 + 5, side), _split(40, side)
    inputs = {}
    if side:
      inputs = {'multi_field_dims': (4,), 'num_dense': 1}
    model = train.create_model(config, FIELD_DIMS, train.AXIS, **inputs)
    p_train, p_eval = train.pmapped_steps(model, config)
    for program in (p_train, p_eval):  # On CPU.
      self.assertEqual(program.options, programs.CPU_COMPILER_OPTIONS)
    init, rng = train.state_initializer(config, model), jax.random.key(0)
    rows = None
    if resident:
      rows = train.replicate(batching.resident_split(train_split, config))
    wait = programs.compile_train_and_eval(
      p_train,
      p_eval,
      jax.eval_shape(init, rng),
      train.hyperparameters(config),
      train_split,
      valid_split,
      config,
      rows,
    )
    state = train.replicate(init(rng))
    wait()
    with lowerings() as lowered:
      for epoch in range(2):
        state, loss, _ = train.train_epoch(
          p_train, state, train_split, config, epoch, rows
        )
        scores = train.evaluate(p_eval, state, valid_split, 16)
    self.assertEqual(lowered, [])
    self.assertEqual(int(np.asarray(state.step)[0]), 14)
    self.assertTrue(np.isfinite(loss))
    self.assertEqual(scores['num_examples'], 40)


class EvalBatchSizeTest(absltest.TestCase):
  def test_an_eval_batch_far_above_the_split_pads_it_less_than_twice(self):
    # config.eval_batch_size=10**8 padded the embedded data's 10,084
    # validation rows to 10**8 rows: 98 s an epoch instead of 2.
    devices = jax.device_count()
    for rows in (1, 2, 3, 30, 40, 64, 65, 10_084):
      smallest = devices  # The least devices * 2**k that holds the rows.
      while smallest < rows:
        smallest *= 2
      split = data.Split(
        np.zeros((rows, 2), np.int32), np.zeros((rows,), np.float32)
      )
      with self.subTest(rows=rows):
        self.assertEqual(programs.eval_batch_size(split, 10**8), smallest)
        self.assertEqual(programs.eval_batch_size(split, devices), devices)
    # Through the eval program: the same metrics, batches of 64 rows (40
    # rows, 2 devices: 2 * 32), and the program compiled ahead is the one
    # that runs.
    config = default.get_config()
    config.model = {'embed_dim': 4}
    config.batch_size, config.eval_batch_size = 8, 10**6
    model = train.create_model(config, FIELD_DIMS, train.AXIS)
    p_train, p_eval = train.pmapped_steps(model, config)
    init, rng = train.state_initializer(config, model), jax.random.key(0)
    train_split, valid_split = _split(7 * 8 + 5), _split(40)
    wait = programs.compile_train_and_eval(
      p_train,
      p_eval,
      jax.eval_shape(init, rng),
      train.hyperparameters(config),
      train_split,
      valid_split,
      config,
      None,
    )
    state = train.replicate(init(rng))
    wait()
    shapes = []

    def recording(state, batch):
      shapes.append(batch['ids'].shape)
      return p_eval(state, batch)

    with lowerings() as lowered:
      scores = programs.evaluate(recording, state, valid_split, 10**6)
    self.assertEqual(lowered, [])
    self.assertEqual(shapes, [(devices, 64 // devices, len(FIELD_DIMS))])
    self.assertEqual(scores, programs.evaluate(p_eval, state, valid_split, 8))


# Evaluates a model on 3 devices at eval batch sizes that 3 does not divide,
# and on the whole split at once without pmap, printing both as JSON.
_THREE_DEVICES = """
import json
import jax
import numpy as np
from configs import default
import data, programs, train
assert jax.device_count() == 3
rng = np.random.default_rng(0)
# Distinct rows: no tied scores, which rounding could split apart.
ids = rng.permutation(1000 * 1000)[:100]
split = data.Split(
  np.stack([ids // 1000, ids % 1000], 1).astype(np.int32),
  rng.integers(0, 2, 100).astype(np.float32),
)
config = default.get_config()
config.model_name, config.model = 'deepfm', {'embed_dim': 4, 'mlp_dims': (8,)}
model = train.create_model(config, (1000, 1000), train.AXIS)
_, p_eval = train.pmapped_steps(model, config)
state = train.state_initializer(config, model)(jax.random.key(0))
out = {}
for size in (1, 16, 8192):
  sizes = programs.eval_batch_size(split, size)
  scores = train.evaluate(p_eval, train.replicate(state), split, size)
  out[size] = [sizes, scores]
plain = train.create_model(config, (1000, 1000))
logits = plain.apply(
  {'params': state.params, 'batch_stats': state.batch_stats},
  split.ids, train=False,
)
out['logits'] = np.asarray(logits, np.float64).tolist()
out['labels'] = split.labels.tolist()
print(json.dumps(out))
"""


class ThreeDeviceEvalTest(absltest.TestCase):
  def test_eval_batches_that_3_devices_do_not_divide_give_exact_metrics(self):
    # config.eval_batch_size had to divide by the devices: the default 8192
    # was refused on 3. Evaluation pads, so it rounds its size up instead.
    env = dict(os.environ)
    env['XLA_FLAGS'] = env.get('XLA_FLAGS', '').replace(
      'device_count=2', 'device_count=3'
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
      [sys.executable, '-c', _THREE_DEVICES],
      cwd=root,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])
    out = json.loads(done.stdout.splitlines()[-1])
    logits, labels = np.array(out.pop('logits')), np.array(out.pop('labels'))
    # Brute force on one device: every positive against every negative, the
    # scores far enough apart that rounding cannot reorder them.
    self.assertGreater(np.diff(np.sort(logits)).min(), 1e-5)
    pos, neg = logits[labels == 1], logits[labels == 0]
    auc = (pos[:, None] > neg[None, :]).mean()
    logloss = np.mean(np.logaddexp(0, logits) - labels * logits)
    # Rounded up to a multiple of 3; at most the devices times a power of
    # two above the split's 100 rows (34 a device: 64).
    expected_sizes = {'1': 3, '16': 18, '8192': 192}
    for size, (rows, scores) in out.items():
      with self.subTest(eval_batch_size=size):
        self.assertEqual(rows, expected_sizes[size])
        self.assertEqual(scores['num_examples'], 100)
        self.assertAlmostEqual(scores['auc'], auc, places=12)
        self.assertAlmostEqual(scores['logloss'], logloss, places=5)


class TrainEpochRateTest(parameterized.TestCase):
  # 7 steps of 8: one dispatch of 7, or a padded stack of 1, then 3 and 3.
  @parameterized.parameters((16, 0), (3, 1))
  def test_the_rate_is_the_timed_examples_over_their_time(
    self, steps_per_dispatch, untimed_steps
  ):
    config = default.get_config()
    config.model = {'embed_dim': 4}
    config.batch_size = 8
    config.steps_per_dispatch = steps_per_dispatch
    config.progress_bar = False
    model = train.create_model(config, FIELD_DIMS, train.AXIS)
    p_train, _ = train.pmapped_steps(model, config)
    state = train.replicate(
      train.state_initializer(config, model)(jax.random.key(0))
    )
    # Each reading of the clock is 10 s after the one before: the rate's
    # two readings bound what it timed.
    clock = types.SimpleNamespace(
      perf_counter=itertools.count(0.0, 10.0).__next__
    )
    with mock.patch.object(programs, 'time', clock):
      state, _, rate = train.train_epoch(p_train, state, _split(61), config, 0)
    self.assertEqual(int(np.asarray(state.step)[0]), 7)
    # A single dispatch is timed whole; else from the end of the first,
    # which may compile.
    self.assertAlmostEqual(rate, (7 - untimed_steps) * 8 / 10.0)


class EpochStacksTest(parameterized.TestCase):
  @parameterized.parameters(False, True)
  def test_the_stacks_hold_the_epochs_batches_in_order(self, resident):
    # 61 rows, whose labels are their indices: 7 steps of 8, 3 a dispatch
    # (a padded stack of 1, then 3 and 3). Shuffled, an epoch is the rows
    # of numpy's permutation seeded by (seed, epoch); else the stored order.
    ids = dataset_testing.random_split(61, FIELD_DIMS).ids
    split = data.Split(ids, np.arange(61, dtype=np.float32))
    config = default.get_config()
    config.batch_size, config.steps_per_dispatch = 8, 3

    def rows(seed, epoch, shuffle):
      config.seed, config.shuffle = seed, shuffle
      sizes, stacks = programs.epoch_stacks(
        split, config, epoch, {'label': split.labels} if resident else None
      )
      self.assertEqual(sizes, [1, 3, 3])
      steps = []
      for size, stack in zip(sizes, stacks, strict=True):
        stack = stack if resident else stack['label']  # [devices, 3, 4]
        steps += [np.sort(np.reshape(stack[:, i], -1)) for i in range(size)]
      return np.stack(steps)

    stored = np.arange(56).reshape(7, 8)
    np.testing.assert_array_equal(rows(0, 0, False), stored)
    np.testing.assert_array_equal(rows(3, 2, False), stored)
    for seed, epoch in ((0, 0), (0, 1), (3, 0)):
      perm = np.random.default_rng([seed, epoch]).permutation(61)
      np.testing.assert_array_equal(
        rows(seed, epoch, True), np.sort(perm[:56].reshape(7, 8), axis=1)
      )


class StateFitsTest(absltest.TestCase):
  def test_a_state_beyond_the_memory_left_is_named_before_init(self):
    # Under `ulimit -v`, XLA's allocation of it never returned.
    shapes = {
      'table': jax.ShapeDtypeStruct((1000, 256), jnp.float32),
      'mu': jax.ShapeDtypeStruct((1000, 256), jnp.float32),
    }
    need = 2 * 1000 * 256 * 4 * jax.local_device_count()  # Each CPU device.
    with mock.patch.object(programs, 'host_memory', return_value=need):
      programs.check_state_fits(shapes)
    with (
      mock.patch.object(programs, 'host_memory', return_value=need - 1),
      self.assertRaisesRegex(
        programs.utils.UserError,
        r'^The train state .* needs 0.00 GiB, more than the 0.00 GiB of this'
        r" host's available memory. Make the tables smaller",
      ),
    ):
      programs.check_state_fits(shapes)
    self.assertGreater(programs.host_memory(), 2**20)

  def test_the_memory_left_is_at_most_what_the_address_space_limit_leaves(
    self,
  ):
    # Under `ulimit -v` XLA's allocation of a state beyond it never returned.
    page = os.sysconf('SC_PAGE_SIZE')
    with open('/proc/self/statm') as f:
      used = int(f.read().split()[0]) * page
    unlimited = resource.RLIM_INFINITY
    with mock.patch.object(programs.resource, 'getrlimit') as getrlimit:
      getrlimit.return_value = (used // 2, unlimited)  # Already past it.
      self.assertEqual(programs.host_memory(), 0)
      getrlimit.return_value = (used + 2**30, unlimited)
      left = programs.host_memory()
      getrlimit.return_value = (unlimited, unlimited)
      available = programs.host_memory()
    # 1 GiB, less what the process mapped between the two readings.
    self.assertAlmostEqual(left, min(2**30, available), delta=2**26)

  def test_the_memory_left_is_meminfos_available_kib(self):
    meminfo = 'MemTotal:  8000 kB\nMemFree:  10 kB\nMemAvailable:  3000 kB\n'
    with (
      mock.patch('builtins.open', mock.mock_open(read_data=meminfo)),
      mock.patch.object(
        programs.resource,
        'getrlimit',
        return_value=(resource.RLIM_INFINITY,) * 2,
      ),
    ):
      self.assertEqual(programs.host_memory(), 3000 * 1024)


class DonationTest(parameterized.TestCase):
  @parameterized.parameters(
    ('adam', False),
    ('lazy_adam', True),
    ('rowwise_adagrad', True),
    ('auto', False),  # Adam on these tables.
  )
  def test_the_state_is_donated_except_dense_adams_on_cpu(
    self, optimizer, donated
  ):
    # The row-wise ones write the rows read in place only in a donated
    # state: else XLA copies every table first. Dense Adam's donated state
    # costs a copy of its parameters and moments on XLA:CPU.
    config = default.get_config()
    config.model = {'embed_dim': 4}
    config.optimizer = optimizer
    config.batch_size = 8
    config.progress_bar = False
    self.assertEqual(jax.default_backend(), 'cpu')
    # Elsewhere every optimizer donates it.
    with mock.patch.object(programs.jax, 'default_backend', return_value='gpu'):
      self.assertEqual(programs.state_donation(optimizer), (0,))
    model = train.create_model(config, FIELD_DIMS, train.AXIS)
    p_train, _ = train.pmapped_steps(model, config)
    state = train.replicate(
      train.state_initializer(config, model)(jax.random.key(0))
    )
    table = state.params['FeaturesEmbedding_0']['embedding']
    before = np.asarray(table)
    _, stacks = programs.epoch_stacks(_split(8), config, 0)
    new, _ = p_train(
      state,
      next(stacks),
      train.replicate(train.hyperparameters(config)),
      None,
      train.replicate(np.int32(1)),
    )
    self.assertEqual(table.is_deleted(), donated)
    moved = new.params['FeaturesEmbedding_0']['embedding']
    self.assertGreater(np.abs(np.asarray(moved) - before).max(), 0)


class InFlightTest(absltest.TestCase):
  """Host batches: the host waits for old dispatches, not for none."""

  def test_train_and_eval_wait_for_the_dispatch_two_before(self):
    events = []

    class Result(np.ndarray):
      def block_until_ready(self):
        events.append(('wait', int(self.flat[0])))
        return self

    def result(i, shape=(1,)):
      return np.full(shape, i, np.float32).view(Result)

    class Loss:
      def __init__(self, i):
        self.i = i

      def addressable_data(self, _):
        return result(self.i)

      def block_until_ready(self):  # The first, for the rate.
        events.append(('first', self.i))

    def p_train(state, batch, hyper, resident, count):
      del batch, hyper, resident, count
      events.append(('train', state))
      return state + 1, Loss(state)

    config = default.get_config()
    config.batch_size = 8
    config.steps_per_dispatch = 1
    config.progress_bar = False  # Nothing else waits.
    programs.train_epoch(p_train, 0, _split(48), config, 0)
    k = programs.IN_FLIGHT
    expected = []
    for i in range(6):
      expected += [('train', i)] + ([('wait', i - k)] if i >= k else [])
      expected += [('first', 0)] if i == 0 else []
    self.assertEqual(events, expected)

    # Evaluation too.
    events.clear()

    def p_eval(state, batch):
      del state, batch
      n = len(events)
      events.append(('eval', n))
      return result(n, (2, 4)), Loss(1), Loss(8)

    with mock.patch.object(programs.multihost, 'allgather', lambda x: x):
      programs.evaluate(p_eval, None, _split(30), 8)
    evals = [e for e in events if e[0] == 'eval']
    self.assertLen(evals, 4)
    self.assertIn(('wait', evals[0][1]), events)
    self.assertLess(
      events.index(('wait', evals[0][1])), events.index(evals[k + 1])
    )


if __name__ == '__main__':
  absltest.main()
