"""Training and evaluation throughput: flax-fm against pytorch-fm (torchfm).

For each model, on the same dense-encoded ids, `field_dims`, batch size,
optimizer (Adam lr 1e-3 + L2 1e-6 added to the gradient) and hyper-parameters
(configs/<model>.py), times N training steps after a warm-up of our pmapped
`train.train_step` and of torchfm's model fed pre-built in-memory tensors
(its fastest path), alternating the two libraries for several rounds, and
reports the median examples/s of each and their ratio, evaluation
examples/s, and each process's peak RSS.

Each library runs in its own worker process (spawned, so the parent imports
neither JAX nor torch): the peak RSS of a worker is what that library needs
for the model, and the two runtimes never share threads or memory.

Data: `synthetic` ids shaped as MovieLens-20M (138,493 users, 26,744 items,
Zipf popularity) and `embedded` (the training split of ml-latest-small).

  python -m benchmarks.throughput                       # all models
  python -m benchmarks.throughput --models=fm,ffm --steps=100 --rounds=5
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

from benchmarks import common

# MovieLens-20M: 138,493 users and 26,744 rated movies.
ML20M_FIELD_DIMS = (138_493, 26_744)
TINY_FIELD_DIMS = (1_000, 500)


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
  """Our pmapped train and eval steps on pre-built numpy batches."""

  def __init__(self, spec: dict):
    import functools  # pylint: disable=g-import-not-at-top

    import jax  # pylint: disable=g-import-not-at-top

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
    config.optimizer = spec.get('optimizer', 'adam')
    self.config, self.field_dims, self.train_mod = config, field_dims, train
    self.num_devices = jax.local_device_count()
    model = train.create_model(config, field_dims, axis_name=train.AXIS)
    state = train.create_train_state(
      jax.random.key(spec['seed']), config, model, len(field_dims)
    )
    self.state = train.replicate(state)
    self.p_train = jax.pmap(
      functools.partial(train.train_step, model=model, seed=spec['seed']),
      axis_name=train.AXIS,
      # As train_and_evaluate.
      donate_argnums=train.state_donation(config.optimizer),
    )
    self.p_eval = jax.pmap(
      functools.partial(train.eval_step, model=model), axis_name=train.AXIS
    )
    b = spec['batch_size']
    self.train_batches = [
      data.shard(
        {'ids': ids[i : i + b], 'label': labels[i : i + b]}, self.num_devices
      )
      for i in range(0, len(labels), b)
    ]
    split = data.Split(ids, labels)
    self.eval_batches = [
      data.shard(batch, self.num_devices)
      for batch in data.eval_batches(split, spec['eval_batch_size'])
    ][: spec['eval_batches']]
    self.step = 0

  def train(self, steps: int) -> float:
    loss = None
    start = time.perf_counter()
    for _ in range(steps):
      batch = self.train_batches[self.step % len(self.train_batches)]
      self.state, loss = self.p_train(self.state, batch)
      self.step += 1
    self.jax.block_until_ready((self.state, loss))
    elapsed = time.perf_counter() - start
    self.last_loss = float(loss[0])
    return elapsed

  def evaluate(self) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = [self.p_eval(self.state, b) for b in self.eval_batches]
    logits = [np.asarray(out[0]) for out in outputs]
    elapsed = time.perf_counter() - start
    return elapsed, sum(x.size for x in logits)

  def breakdown(self, steps: int) -> dict[str, float]:
    """ms per step of forward + backward alone and of the optimizer alone.

    The two parts of `train.train_step` (`train.loss_fn` and
    `optim.apply_gradients`), each jitted on one device's shard outside pmap
    (BatchNorm without an axis name), so they time apart.
    """
    import functools  # pylint: disable=g-import-not-at-top

    import optim  # pylint: disable=g-import-not-at-top

    jax, train = self.jax, self.train_mod
    model = train.create_model(self.config, self.field_dims)
    host = jax.tree.map(lambda x: x[0], self.state)
    batches = [jax.tree.map(lambda x: x[0], b) for b in self.train_batches]
    grad_fn = jax.jit(
      jax.grad(functools.partial(train.loss_fn, model=model), has_aux=True)
    )

    def update(grads, opt_state, params, ids):
      return optim.apply_gradients(
        host.tx,
        grads,
        opt_state,
        params,
        ids=ids,
        field_dims=self.field_dims,
        axis_name=None,
      )

    # Donated as the train step's state is (see train.state_donation).
    donate = (1, 2) if train.state_donation(self.config.optimizer) else ()
    update_fn = jax.jit(update, donate_argnums=donate)
    rng = jax.random.key(0)
    params, opt_state = host.params, host.opt_state

    def grads_of(batch):
      return grad_fn(params, host.batch_stats, batch, rng)[0]

    grads, ids = grads_of(batches[0]), batches[0]['ids']
    params, opt_state = update_fn(grads, opt_state, params, ids)  # Compiles.
    jax.block_until_ready(params)
    start = time.perf_counter()
    for i in range(steps):
      grads = grads_of(batches[i % len(batches)])
    jax.block_until_ready(grads)
    grad_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
      params, opt_state = update_fn(grads, opt_state, params, ids)
    jax.block_until_ready(params)
    update_s = time.perf_counter() - start
    return {
      'forward_backward_ms': 1e3 * grad_s / steps,
      'optimizer_ms': 1e3 * update_s / steps,
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

  def train(self, steps: int) -> float:
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
    return elapsed

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
      info = {'devices': runner.num_devices}
    else:
      runner = _TorchRunner(spec)
      info = {'threads': runner.torch.get_num_threads()}
    conn.send(('ok', info))
    while True:
      command, arg = conn.recv()
      if command == 'train':
        before = runner.compiles
        elapsed = runner.train(arg)
        conn.send(
          (
            'ok',
            {
              'seconds': elapsed,
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
  except BaseException:  # Reported to the parent, which names the model.
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
    self.info = self._receive()

  def _receive(self):
    try:
      status, payload = self.conn.recv()
    except EOFError as e:
      raise RuntimeError(
        f'The {self.library} worker died (exit code {self.process.exitcode}).'
      ) from e
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


def measure(model: str, data_name: str, args, libraries: Sequence[str]):
  """Times `libraries` on one model and data set, alternating per round."""
  spec = {
    'model': model,
    'data': data_name,
    'field_dims': args.field_dims,
    'batch_size': args.batch_size,
    'eval_batch_size': args.eval_batch_size,
    'eval_batches': args.eval_batches,
    'pool_batches': args.pool_batches,
    'devices': args.devices,
    'seed': 0,
    'cache_dir': args.cache_dir,
    'optimizer': args.optimizer,
  }
  workers = {}
  try:
    for library in libraries:
      workers[library] = Worker(library, spec)
    train_rates = {lib: [] for lib in libraries}
    eval_rates = {lib: [] for lib in libraries}
    losses, compiles = {}, {lib: 0 for lib in libraries}
    for worker in workers.values():
      worker.call('train', args.warmup)  # Compilation, allocator, caches.
      worker.call('eval')
    for _ in range(args.rounds):
      for library, worker in workers.items():
        out = worker.call('train', args.steps)
        train_rates[library].append(
          args.steps * args.batch_size / out['seconds']
        )
        losses[library] = out['loss']
        compiles[library] += out['compiles']
        out = worker.call('eval')
        eval_rates[library].append(out['examples'] / out['seconds'])
        compiles[library] += out['compiles']
    breakdown = {
      lib: worker.call('breakdown', args.steps)
      for lib, worker in workers.items()
    }
    record = {
      'model': model,
      'data': data_name,
      'field_dims': list(
        args.field_dims if data_name == 'synthetic' else (611, 9725)
      ),
      'batch_size': args.batch_size,
      'eval_batch_size': args.eval_batch_size,
      'steps': args.steps,
      'rounds': args.rounds,
      'optimizer': args.optimizer,
    }
    for library, worker in workers.items():
      record[f'{library}_train_ex_per_s'] = statistics.median(
        train_rates[library]
      )
      record[f'{library}_train_rounds'] = [
        round(r) for r in train_rates[library]
      ]
      record[f'{library}_eval_ex_per_s'] = statistics.median(
        eval_rates[library]
      )
      record[f'{library}_peak_rss_mib'] = worker.call('rss')
      record[f'{library}_step_ms'] = (
        1e3 * args.batch_size / record[f'{library}_train_ex_per_s']
      )
      for key, value in breakdown[library].items():
        record[f'{library}_{key}'] = value
      record[f'{library}_final_loss'] = losses[library]
      record[f'{library}_compiles_after_warmup'] = compiles[library]
      record[f'{library}_info'] = worker.info
    if 'torchfm' in workers:
      record['train_speedup'] = (
        record['flax_train_ex_per_s'] / record['torchfm_train_ex_per_s']
      )
      record['eval_speedup'] = (
        record['flax_eval_ex_per_s'] / record['torchfm_eval_ex_per_s']
      )
    return record
  finally:
    for worker in workers.values():
      worker.close()


def markdown(records: list[dict], info: dict, command: str) -> str:
  header = [
    'model',
    'data',
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
  split_header = ['model', 'data']
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
  for r in records:
    row = [r['model'], r['data']]
    for lib in libraries:
      step, grad = r.get(f'{lib}_step_ms'), r.get(f'{lib}_forward_backward_ms')
      rest = step - grad if step is not None and grad is not None else None
      row += [common.fmt(x, '.2f') for x in (step, grad, rest)]
    split_rows.append(row)
  first = records[0] if records else {}
  return '\n\n'.join(
    [
      f'`{command}`',
      common.markdown_table(header, rows),
      'Where the time of a training step goes: the whole step, forward +'
      ' backward alone (jitted apart on one device), and the rest, mostly'
      ' the optimizer update of the dense embedding gradient:',
      common.markdown_table(split_header, split_rows),
      f'Median of {first.get("rounds")} alternating rounds of'
      f' {first.get("steps")} training steps (batch'
      f' {first.get("batch_size")}) and of evaluation (batch'
      f' {first.get("eval_batch_size")}) after a warm-up; flax-fm on'
      f' {first.get("flax_info", {}).get("devices")} CPU device(s), torchfm'
      f' with {first.get("torchfm_info", {}).get("threads")} intra-op'
      f' threads. synthetic: MovieLens-20M-shaped ids (field_dims'
      f' {first.get("field_dims") if first.get("data") == "synthetic" else ""}'
      ', Zipf popularity); embedded: ml-latest-small, dense ids.',
      common.machine_line(info),
    ]
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog='python -m benchmarks.throughput', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--models', default='all', help='all or a,b,c')
  parser.add_argument(
    '--data', default='synthetic,embedded', help='synthetic and/or embedded'
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
    '--optimizer',
    default='adam',
    choices=('adam', 'lazy_adam'),
    help="flax-fm's config.optimizer (torchfm: always dense Adam)",
  )
  parser.add_argument(
    '--tiny', action='store_true', help='a seconds-long run on tiny data'
  )
  parser.add_argument('--out_dir', default=None)
  args = parser.parse_args(argv)
  args.field_dims = ML20M_FIELD_DIMS
  if args.tiny:
    args.field_dims = TINY_FIELD_DIMS
    if args.models == 'all':
      args.models = 'fm'
    if args.data == 'synthetic,embedded':
      args.data = 'synthetic'
    args.batch_size, args.eval_batch_size = 256, 512
    args.steps, args.warmup, args.rounds = 4, 2, 2
    args.eval_batches, args.pool_batches = 2, 4
  if args.out_dir is None:
    args.out_dir = os.path.join(common.RESULTS, 'tmp' if args.tiny else '')
  args.data = [d.strip() for d in args.data.split(',') if d.strip()]
  for d in args.data:
    if d not in ('synthetic', 'embedded'):
      parser.error(f'--data: unknown {d!r}; use synthetic and/or embedded')
  for key in ('batch_size', 'eval_batch_size', 'steps', 'rounds'):
    if getattr(args, key) <= 0:
      parser.error(f'--{key} must be positive')
  return args


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
  command = common.command_line('throughput', argv)
  records = []
  for data_name in args.data:
    for model in models:
      start = time.perf_counter()
      record = measure(model, data_name, args, libraries)
      records.append(record)
      print(
        f'{model:7s} {data_name:9s}'
        f' flax {record["flax_train_ex_per_s"]:>12,.0f} ex/s'
        f'  torchfm {common.fmt(record.get("torchfm_train_ex_per_s")):>10}'
        f' ex/s  speedup {common.fmt(record.get("train_speedup"), ".1f")}x'
        f'  eval {common.fmt(record.get("eval_speedup"), ".1f")}x'
        f'  ({time.perf_counter() - start:.0f} s)',
        flush=True,
      )
      # Written after every model, so a long run keeps what it measured.
      common.write_results(
        args.out_dir, 'throughput', records, info, markdown, command
      )
  return records


if __name__ == '__main__':
  main()
