"""Training and evaluation throughput: flax-fm against pytorch-fm (torchfm).

For each model, on the same dense-encoded ids, `field_dims`, batch size and
hyper-parameters (configs/<model>.py), times N training steps after a
warm-up of our pmapped `train.train_steps` (`steps_per_dispatch` steps per
dispatch, as `train_and_evaluate`) with each of our optimizers, and of
torchfm's model fed pre-built in-memory tensors (its fastest path) with
torch's Adam (lr 1e-3 + L2 1e-6 added to the gradient), alternating all of
them for several rounds, and reports the median examples/s of each and
their ratio, evaluation examples/s, each process's peak RSS, and how far a
step is from the memory bandwidth: the bytes it must touch at the least
(benchmarks/bandwidth.py) against the machine's measured copy bandwidth.

Each library runs in its own worker process (spawned, so the parent imports
neither JAX nor torch): the peak RSS of a worker is what that library needs
for the model, and the two runtimes never share threads or memory.

Data: `synthetic` ids shaped as MovieLens-20M (138,493 users, 26,744 items,
Zipf popularity), `criteo` ids shaped as a 2M-line Criteo file
(benchmarks/synthetic.py's, encoded: 39 fields, 130,498 rows, Zipf 1.1 per
field) and `embedded` (the training split of ml-latest-small).

  python -m benchmarks.throughput                       # all models
  python -m benchmarks.throughput --models=fm,ffm --steps=100 --rounds=5
  python -m benchmarks.throughput --optimizers=adam,rowwise_adagrad
  python -m benchmarks.throughput --optimizers=config   # each config's own
  python -m benchmarks.throughput --tiny                # seconds, no torch

Results: benchmarks/results/throughput.{json,csv,md} (with --tiny:
benchmarks/results/tmp/, not committed).
"""

import argparse
from collections.abc import Sequence
import multiprocessing
import os
import statistics
import time
import traceback

import numpy as np

from benchmarks import bandwidth
from benchmarks import common

# MovieLens-20M: 138,493 users and 26,744 rated movies.
ML20M_FIELD_DIMS = (138_493, 26_744)
TINY_FIELD_DIMS = (1_000, 500)
# `field_dims` of a 2M-line file of benchmarks/synthetic.py (seed 0) after
# data.py's Criteo preprocessing: 13 bucketed integers, 26 categoricals.
CRITEO_FIELD_DIMS = (
  *(38, 52, 64, 54, 160, 81, 52, 66, 82, 37, 45, 32, 56),
  *(1461, 584, 10619, 11038, 306, 26, 11601, 634, 4, 12598, 5684, 10636),
  *(3195, 28, 12623, 10838, 11, 5653, 2175, 6, 10694, 20, 16, 11765, 107),
  7357,
)
FIELD_DIMS = {'criteo': CRITEO_FIELD_DIMS}
OPTIMIZERS = ('adam', 'lazy_adam', 'rowwise_adagrad')
# Also `auto`, resolved for the shape (optim.resolve), and `config`: each
# config's own optimizer (`auto` but for LR and FiBiNET), what a user runs.
KNOWN_OPTIMIZERS = OPTIMIZERS + ('auto', 'config')
DATA = ('synthetic', 'criteo', 'embedded')
# --tiny's defaults (flags given explicitly keep their values).
TINY = dict(
  models='fm',
  data='synthetic',
  optimizers='adam',
  batch_size=256,
  eval_batch_size=512,
  steps=4,
  warmup=2,
  rounds=2,
  eval_batches=2,
  pool_batches=4,
)


# --------------------------------------------------------------------------
# Data (built identically in each worker from a seed).


def zipf_ids(
  rng: np.random.Generator, size: int, num_ids: int, exponent: float = 1.0
) -> np.ndarray:
  """`size` ids in `[0, num_ids)`, popularity Zipf(`exponent`) by rank.

  Ranks are mapped to ids by a random permutation, so the popular rows are
  spread over the table as in real data, not packed at its start.
  """
  weights = 1.0 / np.arange(1, num_ids + 1) ** exponent
  cdf = np.cumsum(weights)
  ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1], side='right')
  ranks = np.minimum(ranks, num_ids - 1)
  return rng.permutation(num_ids).astype(np.int32)[ranks]


def make_data(spec: dict):
  """ids int32 `[rows, fields]`, labels float32 `[rows]` and field_dims."""

  rows = spec['pool_batches'] * spec['batch_size']
  if spec['data'] == 'embedded':
    import data  # pylint: disable=g-import-not-at-top

    config = common.get_config(spec['model'])
    if spec.get('cache_dir'):
      config.dataset.cache_dir = spec['cache_dir']
    dataset = data.load_dataset(config.dataset)
    take = np.arange(rows) % len(dataset.train)
    return (
      np.asarray(dataset.train.ids[take]),
      np.asarray(dataset.train.labels[take]),
      tuple(dataset.field_dims),
    )
  field_dims = tuple(spec['field_dims'])
  rng = np.random.default_rng(spec['seed'])
  if spec['data'] == 'criteo':
    # Zipf 1.1 as benchmarks/synthetic.py's values; a batch of 2048 then
    # reads as many distinct rows (about 12K) as the encoded file's do.
    ids = np.stack([zipf_ids(rng, rows, d, 1.1) for d in field_dims], 1)
    labels = (rng.random(rows) < 0.25).astype(np.float32)
    return ids, labels, field_dims
  # User activity is less skewed than item popularity in MovieLens.
  ids = np.stack(
    [
      zipf_ids(rng, rows, field_dims[0], exponent=0.6),
      zipf_ids(rng, rows, field_dims[1], exponent=1.0),
    ],
    axis=1,
  )
  labels = (rng.random(rows) < 0.57).astype(np.float32)
  return ids, labels, field_dims


# --------------------------------------------------------------------------
# Workers: one process per library and model; commands over a pipe.


class _JaxRunner:
  """Our pmapped train steps (one optimizer) and eval step on numpy batches."""

  def __init__(self, spec: dict):
    import jax  # pylint: disable=g-import-not-at-top

    import batching  # pylint: disable=g-import-not-at-top
    import data  # pylint: disable=g-import-not-at-top
    import train  # pylint: disable=g-import-not-at-top

    self.compiles = 0

    def count(event, duration, **kwargs):
      del duration, kwargs
      if event.endswith('backend_compile_duration'):
        self.compiles += 1

    jax.monitoring.register_event_duration_secs_listener(count)
    self.jax = jax
    ids, labels, field_dims = make_data(spec)
    config = common.get_config(spec['model'])
    config.seed = spec['seed']
    if spec['optimizer'] != 'config':
      config.optimizer = spec['optimizer']
    if spec.get('steps_per_dispatch'):
      config.steps_per_dispatch = spec['steps_per_dispatch']
    model = train.create_model(config, field_dims, axis_name=train.AXIS)
    config = train.resolve_optimizer(config, model)  # `auto`: what it is.
    self.config, self.field_dims, self.train_mod = config, field_dims, train
    self.num_devices = jax.local_device_count()
    state = train.state_initializer(config, model)(jax.random.key(spec['seed']))
    b = spec['batch_size']
    self.leaves = self._leaves(state, ids, b)
    self.state = train.replicate(state)
    self.p_train, self.p_eval = train.pmapped_steps(model, config)
    self.hyper = train.replicate(train.hyperparameters(config))
    self.batches = [
      {'ids': ids[i : i + b], 'label': labels[i : i + b]}
      for i in range(0, len(labels), b)
    ]
    self.per_dispatch = min(config.steps_per_dispatch, len(self.batches))
    sizes = [self.per_dispatch] * (len(self.batches) // self.per_dispatch)
    self.train_batches = list(
      batching.stack_batches(iter(self.batches), sizes, self.num_devices)
    )
    split = data.Split(ids, labels)
    self.eval_batches = [
      batching.shard(batch, self.num_devices)
      for batch in batching.eval_batches(split, spec['eval_batch_size'])
    ][: spec['eval_batches']]
    self.step = 0

  def _leaves(self, state, ids: np.ndarray, batch_size: int) -> dict:
    """Each parameter's size; for a table, its rows and the lookups and
    distinct rows of a global batch (mean over the first batches)."""
    from flax import traverse_util  # pylint: disable=g-import-not-at-top

    import sparse  # pylint: disable=g-import-not-at-top

    model = self.train_mod.create_model(self.config, self.field_dims)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    rows_of = self.jax.jit(
      lambda v, x: model.apply(v, x, mutable=[sparse.ROWS])[1]
    )
    counts = {}
    for i in range(0, min(len(ids), 8 * batch_size), batch_size):
      read = rows_of(variables, ids[i : i + batch_size]).get(sparse.ROWS, {})
      for path, (rows,) in traverse_util.flatten_dict(read).items():
        rows = np.asarray(rows)
        rows = rows[rows >= 0]
        counts.setdefault(path, []).append((rows.size, np.unique(rows).size))
    leaves = {}
    for path, x in traverse_util.flatten_dict(state.params).items():
      leaf = {'size': int(x.size)}
      if path in counts:
        lookups, unique = np.mean(counts[path], axis=0)
        leaf.update(rows=int(x.shape[0]), lookups=lookups, unique=unique)
      leaves['/'.join(path)] = leaf
    return leaves

  def train(self, steps: int) -> tuple[float, int]:
    """Seconds for at least `steps` steps, whole dispatches; steps run."""
    loss = None
    dispatches = -(-steps // self.per_dispatch)
    start = time.perf_counter()
    for _ in range(dispatches):
      batch = self.train_batches[self.step % len(self.train_batches)]
      self.state, loss = self.p_train(self.state, batch, self.hyper)
      self.step += 1
    self.jax.block_until_ready((self.state, loss))
    elapsed = time.perf_counter() - start
    self.last_loss = float(loss[0, -1])
    return elapsed, dispatches * self.per_dispatch

  def evaluate(self) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = [self.p_eval(self.state, b) for b in self.eval_batches]
    for out in outputs:
      np.asarray(out[0])  # The scores, brought back to the host.
    elapsed = time.perf_counter() - start
    # The last batch is padded (mask 0); torchfm's is shorter.
    return elapsed, sum(int(b['mask'].sum()) for b in self.eval_batches)

  def breakdown(self, steps: int) -> dict[str, float]:
    """ms, GFLOP and MiB of a step's forward + backward and of its optimizer.

    The two parts of `train.train_step` (`sparse.value_and_grad` of
    `train.loss_fn`, and `optim.apply_gradients`), each jitted on one
    device's share of a batch outside pmap (BatchNorm without an axis name),
    so they time apart; their operations and the bytes they move as compiled
    are counted by XLA's cost analysis (`bandwidth.compiled_cost`).
    """
    import functools  # pylint: disable=g-import-not-at-top

    import optim  # pylint: disable=g-import-not-at-top
    import programs  # pylint: disable=g-import-not-at-top
    import sparse  # pylint: disable=g-import-not-at-top

    jax, train = self.jax, self.train_mod
    model = train.create_model(self.config, self.field_dims)
    host = jax.tree.map(lambda x: x[0], self.state)
    share = lambda x: x[: len(x) // self.num_devices]  # noqa: E731
    batches = [jax.tree.map(share, b) for b in self.batches]
    tables = optim.tables_of(host.tx)
    rng = jax.random.key(0)

    def grads_of(params, batch):
      fun = functools.partial(
        train.loss_fn,
        batch_stats=host.batch_stats,
        batch=batch,
        dropout_rng=rng,
        model=model,
      )
      return sparse.value_and_grad(
        lambda p, perturbations: fun(p, perturbations=perturbations),
        params,
        tables,
      )[1]

    def update(grads, params, opt_state):
      return optim.apply_gradients(
        host.tx, grads, opt_state, params, axis_name=None
      )

    # Compiled as the train step is (programs.with_options).
    options = getattr(self.p_train, 'options', None)
    grad_fn = jax.jit(grads_of, compiler_options=options)
    # Donated as the train step's state (see programs.state_donation), the
    # arguments in the order of the outputs, each buffer its own output's.
    donate = (1, 2) if programs.state_donation(self.config.optimizer) else ()
    update_fn = jax.jit(update, donate_argnums=donate, compiler_options=options)
    params, opt_state = host.params, host.opt_state
    grads = grad_fn(params, batches[0])
    # The programs timed below: their compilations are shared.
    grad_cost = bandwidth.compiled_cost(grad_fn, params, batches[0])
    update_cost = bandwidth.compiled_cost(update_fn, grads, params, opt_state)
    cost = {
      'forward_backward_gflop': 1e-9 * grad_cost['flops'],
      'optimizer_gflop': 1e-9 * update_cost['flops'],
      'forward_backward_compiled_mib': grad_cost['bytes'] / 2**20,
      'optimizer_compiled_mib': update_cost['bytes'] / 2**20,
    }
    params, opt_state = update_fn(grads, params, opt_state)  # Compiles.
    jax.block_until_ready(params)
    start = time.perf_counter()
    for i in range(steps):
      grads = grad_fn(params, batches[i % len(batches)])
    jax.block_until_ready(grads)
    grad_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
      params, opt_state = update_fn(grads, params, opt_state)
    jax.block_until_ready(params)
    update_s = time.perf_counter() - start
    return {
      'forward_backward_ms': 1e3 * grad_s / steps,
      'optimizer_ms': 1e3 * update_s / steps,
      **cost,
    }


class _TorchRunner:
  """torchfm's model, Adam(weight_decay) and BCELoss on in-memory tensors."""

  def __init__(self, spec: dict):
    import torch  # pylint: disable=g-import-not-at-top

    self.torch = torch
    self.compiles = 0
    torch.manual_seed(spec['seed'])
    ids, labels, field_dims = make_data(spec)
    config = common.get_config(spec['model'])
    self.model = common.torchfm_model(spec['model'], config.model, field_dims)
    self.optimizer = torch.optim.Adam(
      self.model.parameters(),
      lr=config.learning_rate,
      weight_decay=config.weight_decay,
    )
    self.criterion = torch.nn.BCELoss()
    ids = torch.from_numpy(ids.astype('int64'))
    labels = torch.from_numpy(labels)
    b = spec['batch_size']
    self.train_batches = [
      (ids[i : i + b], labels[i : i + b]) for i in range(0, len(labels), b)
    ]
    e = spec['eval_batch_size']
    self.eval_batches = [ids[i : i + e] for i in range(0, len(labels), e)][
      : spec['eval_batches']
    ]
    self.step = 0

  def train(self, steps: int) -> tuple[float, int]:
    self.model.train()
    start = time.perf_counter()
    for _ in range(steps):
      x, y = self.train_batches[self.step % len(self.train_batches)]
      loss = self.criterion(self.model(x), y)
      self.model.zero_grad()
      loss.backward()
      self.optimizer.step()
      self.step += 1
    elapsed = time.perf_counter() - start
    self.last_loss = float(loss.detach())
    return elapsed, steps

  def breakdown(self, steps: int) -> dict[str, float]:
    """ms per step of forward + backward and of `optimizer.step()`."""
    self.model.train()
    grad_s = update_s = 0.0
    for i in range(steps):
      x, y = self.train_batches[i % len(self.train_batches)]
      start = time.perf_counter()
      loss = self.criterion(self.model(x), y)
      self.model.zero_grad()
      loss.backward()
      middle = time.perf_counter()
      self.optimizer.step()
      grad_s += middle - start
      update_s += time.perf_counter() - middle
    return {
      'forward_backward_ms': 1e3 * grad_s / steps,
      'optimizer_ms': 1e3 * update_s / steps,
    }

  def evaluate(self) -> tuple[float, int]:
    self.model.eval()
    start = time.perf_counter()
    with self.torch.no_grad():
      probs = [self.model(x).numpy() for x in self.eval_batches]
    elapsed = time.perf_counter() - start
    return elapsed, sum(p.size for p in probs)


def _worker(library: str, spec: dict, conn) -> None:
  """Builds the runner, then answers `(command, arg)` messages until `quit`."""
  try:
    if library == 'flax':
      devices = spec.get('devices')
      if devices:
        flags = [
          f
          for f in os.environ.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')
        ]
        flags.append(f'--xla_force_host_platform_device_count={devices}')
        os.environ['XLA_FLAGS'] = ' '.join(flags)
      os.environ.setdefault('JAX_PLATFORMS', 'cpu')
      runner = _JaxRunner(spec)
      info = {
        'devices': runner.num_devices,
        'steps_per_dispatch': runner.per_dispatch,
        'optimizer': runner.config.optimizer,
        'step_bytes': bandwidth.step_bytes(
          runner.leaves, runner.config.optimizer
        ),
        'matmul_flops_per_s': bandwidth.matmul_rate(),
      }
    else:
      runner = _TorchRunner(spec)
      info = {'threads': runner.torch.get_num_threads()}
    conn.send(('ok', info))
    while True:
      command, arg = conn.recv()
      if command == 'train':
        before = runner.compiles
        elapsed, steps = runner.train(arg)
        conn.send(
          (
            'ok',
            {
              'seconds': elapsed,
              'steps': steps,
              'loss': runner.last_loss,
              'compiles': runner.compiles - before,
            },
          )
        )
      elif command == 'eval':
        before = runner.compiles
        elapsed, count = runner.evaluate()
        conn.send(
          (
            'ok',
            {
              'seconds': elapsed,
              'examples': count,
              'compiles': runner.compiles - before,
            },
          )
        )
      elif command == 'breakdown':
        conn.send(('ok', runner.breakdown(arg)))
      elif command == 'rss':
        conn.send(('ok', common.rss_mib()[1]))
      else:
        conn.send(('ok', None))
        return
  except BaseException as e:  # Reported to the parent, which names the model.
    import utils  # pylint: disable=g-import-not-at-top

    if isinstance(e, utils.UserError):  # A config or data error: one line.
      conn.send(('user_error', str(e)))
    else:
      conn.send(('error', traceback.format_exc()))


class Worker:
  """A spawned worker process driven over a pipe."""

  def __init__(self, library: str, spec: dict):
    ctx = multiprocessing.get_context('spawn')
    self.library = library
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(
      target=_worker, args=(library, spec, child), daemon=True
    )
    self.process.start()
    child.close()
    try:
      self.info = self._receive()
    except BaseException:  # No worker is left behind by one that failed.
      self.close()
      raise

  def _receive(self):
    """The worker's answer.

    Raises:
      utils.UserError: the worker stopped on a config or data error; its
        message, without the worker's traceback.
      RuntimeError: the worker died or failed otherwise (its traceback).
    """
    try:
      status, payload = self.conn.recv()
    except EOFError as e:
      raise RuntimeError(
        f'The {self.library} worker died (exit code {self.process.exitcode}).'
      ) from e
    if status == 'user_error':
      import utils  # pylint: disable=g-import-not-at-top

      raise utils.UserError(payload)
    if status != 'ok':
      raise RuntimeError(f'The {self.library} worker failed:\n{payload}')
    return payload

  def call(self, command: str, arg=None):
    self.conn.send((command, arg))
    return self._receive()

  def close(self) -> None:
    try:
      self.call('quit')
    except (RuntimeError, OSError):
      pass
    self.process.join(timeout=30)
    if self.process.is_alive():
      self.process.terminate()
      self.process.join()


# --------------------------------------------------------------------------
# Measurement.


def measure(
  model: str,
  data_name: str,
  args,
  libraries: Sequence[str],
  bytes_per_second: float,
) -> list[dict]:
  """Times one model on one data set, alternating every runner per round.

  The runners are torchfm's (if in `libraries`) and ours with each of
  `args.optimizers`; returns one record per optimizer, each with torchfm's
  figures.
  """
  spec = {
    'model': model,
    'data': data_name,
    'field_dims': FIELD_DIMS.get(data_name, args.field_dims),
    'batch_size': args.batch_size,
    'eval_batch_size': args.eval_batch_size,
    'eval_batches': args.eval_batches,
    'pool_batches': args.pool_batches,
    'devices': args.devices,
    'seed': 0,
    'cache_dir': args.cache_dir,
    'steps_per_dispatch': args.steps_per_dispatch,
  }
  runners = [
    (f'flax:{o}', 'flax', dict(spec, optimizer=o)) for o in args.optimizers
  ]
  if 'torchfm' in libraries and common.has_torchfm(model):
    runners.append(('torchfm', 'torchfm', spec))
  workers = {}
  try:
    for name, library, runner_spec in runners:
      workers[name] = Worker(library, runner_spec)
    train_rates = {name: [] for name in workers}
    eval_rates = {name: [] for name in workers}
    losses, compiles = {}, {name: 0 for name in workers}
    for worker in workers.values():
      worker.call('train', args.warmup)  # Compilation, allocator, caches.
      worker.call('eval')
    for _ in range(args.rounds):
      for name, worker in workers.items():
        out = worker.call('train', args.steps)
        train_rates[name].append(
          out['steps'] * args.batch_size / out['seconds']
        )
        losses[name] = out['loss']
        compiles[name] += out['compiles']
        out = worker.call('eval')
        eval_rates[name].append(out['examples'] / out['seconds'])
        compiles[name] += out['compiles']
    figures = {}
    for name, worker in workers.items():
      rate = statistics.median(train_rates[name])
      figures[name] = {
        'train_ex_per_s': rate,
        'train_rounds': [round(r) for r in train_rates[name]],
        'eval_ex_per_s': statistics.median(eval_rates[name]),
        'peak_rss_mib': worker.call('rss'),
        'step_ms': 1e3 * args.batch_size / rate,
        **worker.call('breakdown', args.steps),
        'final_loss': losses[name],
        'compiles_after_warmup': compiles[name],
        'info': worker.info,
      }
  finally:
    for worker in workers.values():
      worker.close()
  records = []
  for optimizer in args.optimizers:
    record = {
      'model': model,
      'data': data_name,
      'field_dims': list(
        spec['field_dims'] if data_name != 'embedded' else (611, 9725)
      ),
      'batch_size': args.batch_size,
      'eval_batch_size': args.eval_batch_size,
      'steps': args.steps,
      'rounds': args.rounds,
      'optimizer': optimizer,
    }
    ours = figures[f'flax:{optimizer}']
    record.update({f'flax_{k}': v for k, v in ours.items()})
    record['resolved_optimizer'] = ours['info']['optimizer']
    # The least bytes a step touches, and the fastest step they allow.
    step_bytes = ours['info']['step_bytes']['total']
    record['flax_step_mib'] = step_bytes / 2**20
    record['bandwidth_gb_per_s'] = bytes_per_second / 1e9
    record['flax_bound_ex_per_s'] = (
      args.batch_size * bytes_per_second / step_bytes
    )
    record['flax_of_bound'] = (
      ours['train_ex_per_s'] / record['flax_bound_ex_per_s']
    )
    # The operations of a whole batch (each device counts its share), and
    # the fastest step XLA's matrix-product rate allows at that count.
    devices = ours['info']['devices']
    step_gflop = devices * (
      ours['forward_backward_gflop'] + ours['optimizer_gflop']
    )
    record['flax_step_gflop'] = step_gflop
    record['matmul_gflop_per_s'] = ours['info']['matmul_flops_per_s'] / 1e9
    record['flax_compute_bound_ex_per_s'] = (
      args.batch_size * record['matmul_gflop_per_s'] / step_gflop
    )
    # The bytes the compiled step moves, intermediates included, and the
    # step rate the copy bandwidth allows at that traffic.
    compiled_bytes = (
      devices
      * 2**20
      * (ours['forward_backward_compiled_mib'] + ours['optimizer_compiled_mib'])
    )
    record['flax_compiled_step_mib'] = compiled_bytes / 2**20
    record['flax_compiled_traffic_bound_ex_per_s'] = (
      args.batch_size * bytes_per_second / compiled_bytes
    )
    if 'torchfm' in figures:
      record.update({f'torchfm_{k}': v for k, v in figures['torchfm'].items()})
      record['train_speedup'] = (
        record['flax_train_ex_per_s'] / record['torchfm_train_ex_per_s']
      )
      record['eval_speedup'] = (
        record['flax_eval_ex_per_s'] / record['torchfm_eval_ex_per_s']
      )
      # The most any implementation of our step's arithmetic could reach.
      record['compute_bound_speedup'] = (
        record['flax_compute_bound_ex_per_s'] / record['torchfm_train_ex_per_s']
      )
    records.append(record)
  return records


def _optimizer(record: dict) -> str:
  """The optimizer asked for, and what `auto` was for the shape."""
  asked, resolved = record['optimizer'], record.get('resolved_optimizer')
  return f'{asked} ({resolved})' if resolved and resolved != asked else asked


def markdown(records: list[dict], info: dict, command: str) -> str:
  header = [
    'model',
    'data',
    'optimizer',
    'flax-fm train ex/s',
    'torchfm train ex/s',
    'train speedup',
    'flax-fm eval ex/s',
    'torchfm eval ex/s',
    'eval speedup',
    'peak RSS MiB (flax-fm / torchfm)',
  ]
  rows = []
  for r in records:
    rows.append(
      [
        r['model'],
        r['data'],
        _optimizer(r),
        common.fmt(r.get('flax_train_ex_per_s')),
        common.fmt(r.get('torchfm_train_ex_per_s')),
        common.fmt(r.get('train_speedup'), '.1f') + 'x',
        common.fmt(r.get('flax_eval_ex_per_s')),
        common.fmt(r.get('torchfm_eval_ex_per_s')),
        common.fmt(r.get('eval_speedup'), '.1f') + 'x',
        f'{common.fmt(r.get("flax_peak_rss_mib"))} /'
        f' {common.fmt(r.get("torchfm_peak_rss_mib"))}',
      ]
    )
  split_header = ['model', 'data', 'optimizer']
  split_rows = []
  libraries = [
    lib
    for lib in ('flax', 'torchfm')
    if any(f'{lib}_step_ms' in r for r in records)
  ]
  for lib in libraries:
    name = 'flax-fm' if lib == 'flax' else lib
    split_header += [
      f'{name} step ms',
      f'{name} forward+backward ms',
      f'{name} rest (optimizer) ms',
    ]
  split_header += [
    'flax-fm MiB touched / step',
    'bound ex/s',
    'flax-fm of bound',
    'flax-fm GFLOP / step',
    'compute bound ex/s',
    'compute bound / torchfm',
    'flax-fm MiB moved as compiled / step',
    'its bound ex/s',
  ]
  for r in records:
    row = [r['model'], r['data'], _optimizer(r)]
    for lib in libraries:
      step, grad = r.get(f'{lib}_step_ms'), r.get(f'{lib}_forward_backward_ms')
      rest = step - grad if step is not None and grad is not None else None
      row += [common.fmt(x, '.2f') for x in (step, grad, rest)]
    row += [
      common.fmt(r.get('flax_step_mib'), '.1f'),
      common.fmt(r.get('flax_bound_ex_per_s')),
      common.fmt(100 * r.get('flax_of_bound', float('nan')), '.0f') + '%',
      common.fmt(r.get('flax_step_gflop'), '.3g'),
      common.fmt(r.get('flax_compute_bound_ex_per_s')),
      common.fmt(r.get('compute_bound_speedup'), '.1f') + 'x',
      common.fmt(r.get('flax_compiled_step_mib'), '.1f'),
      common.fmt(r.get('flax_compiled_traffic_bound_ex_per_s')),
    ]
    split_rows.append(row)
  first = records[0] if records else {}
  flax_info = first.get('flax_info', {})
  synthetic = next(
    (r['field_dims'] for r in records if r['data'] == 'synthetic'),
    list(ML20M_FIELD_DIMS),
  )
  return '\n\n'.join(
    [
      f'`{command}`',
      common.markdown_table(header, rows),
      'Where the time of a training step goes: the whole step, forward +'
      ' backward alone (jitted apart on one device), and the rest, mostly'
      ' the optimizer update; then the least memory traffic of a step'
      ' (benchmarks/bandwidth.py: the lookups, their gradients and the'
      ' update of the rows or tables it must read and write), the step rate'
      ' that the measured copy bandwidth'
      f' ({common.fmt(first.get("bandwidth_gb_per_s"), ".1f")} GB/s) would'
      ' allow at that traffic, and the share of it reached; then the'
      " operations of a step (XLA's cost analysis), the step rate that XLA's"
      ' f32 matrix product'
      f' ({common.fmt(first.get("matmul_gflop_per_s"), ".0f")} GFLOP/s) would'
      " allow at that count, and that rate against torchfm's: the most any"
      ' implementation of the same arithmetic could reach on this machine;'
      ' last, the bytes our compiled step moves (the same analysis: every'
      ' operand and result of every fused operation, intermediates'
      ' included) and the step rate the copy bandwidth allows at that'
      ' traffic:',
      common.markdown_table(split_header, split_rows),
      f'Median of {first.get("rounds")} alternating rounds of'
      f' {first.get("steps")} training steps (batch'
      f' {first.get("batch_size")}; flax-fm'
      f' {flax_info.get("steps_per_dispatch")} steps per dispatch) and of'
      f' evaluation (batch {first.get("eval_batch_size")}) after a warm-up;'
      f' flax-fm on {flax_info.get("devices")} CPU device(s), torchfm with'
      f' {first.get("torchfm_info", {}).get("threads")} intra-op threads and'
      ' dense Adam. synthetic: MovieLens-20M-shaped ids (field_dims'
      f' {synthetic}, Zipf popularity); criteo: ids shaped as a'
      f' 2M-line Criteo file ({len(CRITEO_FIELD_DIMS)} fields,'
      f' {sum(CRITEO_FIELD_DIMS):,} rows, Zipf 1.1); embedded:'
      ' ml-latest-small, dense ids.',
      common.machine_line(info),
    ]
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = common.ArgumentParser(
    prog='python -m benchmarks.throughput', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--models', default='all', help='all or a,b,c')
  parser.add_argument(
    '--data', default=','.join(DATA), help=f'some of {", ".join(DATA)}'
  )
  parser.add_argument('--batch_size', type=int, default=2048)
  parser.add_argument('--eval_batch_size', type=int, default=8192)
  parser.add_argument('--steps', type=int, default=50, help='per round')
  parser.add_argument('--warmup', type=int, default=5, help='steps')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--eval_batches', type=int, default=8)
  parser.add_argument(
    '--pool_batches', type=int, default=32, help='distinct batches cycled'
  )
  parser.add_argument(
    '--devices', type=int, default=None, help='emulated CPU devices for JAX'
  )
  parser.add_argument(
    '--no_torch', action='store_true', help='measure flax-fm only'
  )
  parser.add_argument('--cache_dir', default='', help='dataset cache')
  parser.add_argument(
    '--optimizers',
    default=','.join(OPTIMIZERS),
    help="flax-fm's config.optimizer values, some of"
    f' {", ".join(KNOWN_OPTIMIZERS)} (default: all but auto; with --tiny,'
    ' adam). torchfm: always dense Adam',
  )
  parser.add_argument(
    '--steps_per_dispatch',
    type=int,
    default=None,
    help="flax-fm's config.steps_per_dispatch (default: the config's)",
  )
  parser.add_argument(
    '--tiny',
    action='store_true',
    help='a seconds-long run on tiny data (flags given explicitly win)',
  )
  parser.add_argument('--out_dir', default=None)
  args = common.parse_tiny(parser, argv, TINY)
  args.field_dims = TINY_FIELD_DIMS if args.tiny else ML20M_FIELD_DIMS
  if args.out_dir is None:
    args.out_dir = os.path.join(common.RESULTS, 'tmp' if args.tiny else '')
  common.check_dir(args.out_dir, '--out_dir')
  for key, known in (('data', DATA), ('optimizers', KNOWN_OPTIMIZERS)):
    values = [v.strip() for v in getattr(args, key).split(',') if v.strip()]
    for v in values:
      if v not in known:
        parser.error(f'--{key}: unknown {v!r}; use some of {", ".join(known)}')
    setattr(args, key, values)
  for key in (
    'batch_size',
    'eval_batch_size',
    'steps',
    'rounds',
    'warmup',  # Compiles outside the timed rounds.
    'eval_batches',
    'pool_batches',
    'devices',
  ):
    if getattr(args, key) is not None and getattr(args, key) <= 0:
      parser.error(f'--{key} must be positive')
  for key in ('batch_size', 'eval_batch_size'):  # Split over the devices.
    if args.devices and getattr(args, key) % args.devices:
      parser.error(
        f'--{key}={getattr(args, key)} must be a multiple of'
        f' --devices={args.devices}'
      )
  if args.steps_per_dispatch is not None and args.steps_per_dispatch <= 0:
    parser.error('--steps_per_dispatch must be positive')
  return args


@common.user_errors(keys=common.CACHE_DIR_FLAG)
def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  models = common.parse_models(args.models)
  libraries = ['flax']
  if args.no_torch:
    print('torchfm side skipped (--no_torch).')
  elif common.torch_available():
    libraries.append('torchfm')
  else:
    print('torchfm side skipped: torch or torchfm is not installed.')
  info = common.machine_info()
  bytes_per_second = bandwidth.copy_bandwidth(mib=32 if args.tiny else 256)
  info['copy_bandwidth_gb_per_s'] = bytes_per_second / 1e9
  print(f'copy bandwidth {bytes_per_second / 1e9:.1f} GB/s', flush=True)
  command = common.command_line('throughput', argv)
  records = []
  for data_name in args.data:
    for model in models:
      start = time.perf_counter()
      new = measure(model, data_name, args, libraries, bytes_per_second)
      records += new
      for record in new:
        print(
          f'{model:7s} {data_name:9s} {record["optimizer"]:15s}'
          f' flax {record["flax_train_ex_per_s"]:>12,.0f} ex/s'
          f' ({100 * record["flax_of_bound"]:.0f}% of bound)'
          f'  torchfm {common.fmt(record.get("torchfm_train_ex_per_s")):>10}'
          f' ex/s  speedup {common.fmt(record.get("train_speedup"), ".1f")}x'
          f'  eval {common.fmt(record.get("eval_speedup"), ".1f")}x',
          flush=True,
        )
      print(f'  ({time.perf_counter() - start:.0f} s)', flush=True)
      # Written after every model, so a long run keeps what it measured.
      common.write_results(
        args.out_dir, 'throughput', records, info, markdown, command
      )
  return records


if __name__ == '__main__':
  common.run(main)
