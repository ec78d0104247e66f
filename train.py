"""Data-parallel training and evaluation with `jax.pmap`.

`train_and_evaluate(config, workdir)` loads the dataset, builds
`models/<config.model_name>.py`, trains with the global batch split over all
local devices (and processes), evaluates AUC and logloss on the validation
split after every epoch, keeps the best checkpoint, stops early, and finally
scores the best state on the test split. Restarted in the same workdir it
resumes from the latest checkpoint.
"""

from collections.abc import Callable
import functools
import importlib
import math
import os
import sys
import threading
import time
from typing import Any, NamedTuple

from absl import logging
from flax import jax_utils
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

import data
import utils

AXIS = 'batch'


class TrainState(train_state.TrainState):
  """Params, optimizer state and BatchNorm statistics (`{}` if none)."""

  batch_stats: Any = None


# --------------------------------------------------------------------------
# Metrics.


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Exact ROC AUC: the Mann-Whitney statistic, ties counted half.

  Args:
    labels: 0/1 `[n]`.
    scores: any monotone score `[n]` (logits keep more resolution than
      probabilities, which saturate to 1.0 in float32).

  Returns:
    P(score of a random positive > score of a random negative), with ties
    counted 1/2; NaN when one class is absent.
  """
  labels = np.asarray(labels, np.float64).reshape(-1)
  scores = np.asarray(scores, np.float64).reshape(-1)
  n_pos = labels.sum()
  n_neg = len(labels) - n_pos
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  order = np.argsort(scores, kind='mergesort')
  sorted_scores = scores[order]
  # Average 1-based rank of each run of equal scores.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
  ends = np.r_[starts[1:], len(scores)]
  ranks = np.empty(len(scores))
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  return float(
    (ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
  )


def binary_logloss(labels: np.ndarray, logits: np.ndarray) -> float:
  """Mean binary cross-entropy of `sigmoid(logits)`, computed stably."""
  labels = np.asarray(labels, np.float64)
  logits = np.asarray(logits, np.float64)
  return float(
    np.mean(
      np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-abs(logits)))
    )
  )


# --------------------------------------------------------------------------
# Factories.


def create_model(
  config: ml_collections.ConfigDict,
  field_dims: tuple[int, ...],
  axis_name: str | None = None,
):
  """Builds `models/<config.model_name>.py`'s `Model`."""
  try:
    module = importlib.import_module(f'models.{config.model_name}')
  except ModuleNotFoundError as e:
    names = sorted(
      f[:-3]
      for f in os.listdir(os.path.join(data.ROOT, 'models'))
      if f.endswith('.py') and not f.startswith('_')
    )
    raise ValueError(
      f'config.model_name: no model {config.model_name!r} in models/;'
      f' choose one of {", ".join(names)}.'
    ) from e
  return module.Model(
    field_dims=tuple(field_dims), axis_name=axis_name, **config.model
  )


def is_table(x: jax.Array, num_rows: int) -> bool:
  """Whether a parameter leaf is a shared table of `num_rows` rows."""
  return x.ndim >= 1 and x.shape[0] == num_rows


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """`x[rows]`, zeros for the out-of-range padding of `touched_rows`."""
  return jnp.take(x, rows, axis=0, mode='fill', fill_value=0)


def touched_rows(
  ids: jax.Array, field_dims: tuple[int, ...], axis_name: str | None = AXIS
) -> jax.Array:
  """Sorted unique table rows of the global batch, padded out of range.

  Args:
    ids: this device's ids `[batch / devices, fields]`.
    field_dims: the dataset's field sizes.
    axis_name: the pmap axis whose devices' rows are joined; None: this
      device's rows only.

  Returns:
    `[batch * fields]` int32: every row that some device's batch touches,
    once, then `sum(field_dims)` as padding (a static size for XLA). Every
    device gets the same array, so replicas update the same rows.
  """
  offsets = np.concatenate([[0], np.cumsum(field_dims)[:-1]]).astype(np.int32)
  rows = (ids + offsets).reshape(-1)
  if axis_name is not None:
    rows = lax.all_gather(rows, axis_name).reshape(-1)
  return jnp.unique(rows, size=rows.size, fill_value=sum(field_dims))


def gather_rows(grads: Any, rows: jax.Array, num_rows: int) -> Any:
  """The table leaves' gradients at `rows` `[len(rows), ...]`; others as is."""
  return jax.tree.map(
    lambda g: take_rows(g, rows) if is_table(g, num_rows) else g, grads
  )


def apply_row_updates(
  params: Any, updates: Any, rows: jax.Array, num_rows: int
) -> Any:
  """`optax.apply_updates` with the tables' updates given at `rows` only."""

  def apply(p, u):
    if is_table(p, num_rows):
      new = take_rows(p, rows) + u
      return p.at[rows].set(new.astype(p.dtype), mode='drop')
    return (p + u).astype(p.dtype)

  return jax.tree.map(apply, params, updates)


class LazyAdamState(NamedTuple):
  """State of `lazy_adam`: the step count and the first and second moments."""

  count: jax.Array
  mu: optax.Params
  nu: optax.Params


def lazy_adam(
  learning_rate: float,
  weight_decay: float,
  num_rows: int,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  """Row-sparse Adam with L2 (TensorFlow's LazyAdam, torch's SparseAdam).

  Leaves whose first dimension is `num_rows` (the shared embedding tables,
  indexed by `ids + field_offsets`) are updated only in the touched `rows`:
  those rows get the weight decay, the moment updates and Adam's step
  exactly as dense Adam would; the other rows keep their parameters and
  moments. Bias correction uses the global step count. Other leaves get
  dense Adam with L2 (as `create_optimizer`'s 'adam'). (A layer with as
  many inputs as the tables have rows would be taken for a table; real
  tables have far more rows than any layer here has inputs.)

  `update(grads, state, params, rows=rows)` takes the rows' gradients
  `[len(rows), ...]` for the table leaves (`gather_rows`) and returns the
  rows' updates likewise, so that a step costs O(batch), not O(table), for
  the tables: apply them with `apply_row_updates`. `rows` are unique, padded
  with `num_rows` (out of range: read as zeros, dropped when written).
  """

  def init(params):
    zeros = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    return LazyAdamState(
      count=jnp.zeros([], jnp.int32), mu=zeros(params), nu=zeros(params)
    )

  def update(grads, state, params=None, *, rows=None, **extra_args):
    del extra_args
    if params is None or rows is None:
      raise ValueError('lazy_adam needs params and rows (see train_step).')
    count = optax.safe_increment(state.count)
    bc1, bc2 = 1 - b1**count, 1 - b2**count

    # The arithmetic of optax.add_decayed_weights + optax.adam, term by term.
    def leaf(g, m, v, p):
      table = is_table(p, num_rows)
      old = [take_rows(x, rows) for x in (m, v, p)] if table else [m, v, p]
      g = g + weight_decay * old[2]
      m_new = (1 - b1) * g + b1 * old[0]
      v_new = (1 - b2) * g**2 + b2 * old[1]
      m_hat = m_new / bc1.astype(m_new.dtype)
      v_hat = v_new / bc2.astype(v_new.dtype)
      u = m_hat / (jnp.sqrt(v_hat) + eps) * -learning_rate
      if table:
        m_new = m.at[rows].set(m_new, mode='drop')
        v_new = v.at[rows].set(v_new, mode='drop')
      return u, m_new, v_new

    treedef = jax.tree.structure(params)
    flat = (treedef.flatten_up_to(t) for t in (grads, state.mu, state.nu))
    out = [
      leaf(*xs) for xs in zip(*flat, treedef.flatten_up_to(params), strict=True)
    ]
    updates, mu, nu = (treedef.unflatten(x) for x in zip(*out, strict=True))
    return updates, LazyAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init, update)


def create_optimizer(
  config: ml_collections.ConfigDict, num_rows: int = 0
) -> optax.GradientTransformation:
  """`config.optimizer`: 'adam' (torch's Adam with L2) or 'lazy_adam'.

  Args:
    config: the run's config.
    num_rows: rows of the shared embedding tables, `sum(field_dims)`
      (needed by 'lazy_adam').
  """
  if config.optimizer == 'adam':
    return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.adam(config.learning_rate),
    )
  if config.optimizer == 'lazy_adam':
    if num_rows <= 0:
      raise ValueError('config.optimizer=lazy_adam needs num_rows.')
    return lazy_adam(config.learning_rate, config.weight_decay, num_rows)
  raise ValueError(
    f'config.optimizer: unknown {config.optimizer!r}; choose adam or lazy_adam.'
  )


def create_train_state(
  rng: jax.Array, config: ml_collections.ConfigDict, model, num_fields: int
) -> TrainState:
  """Initialises parameters, BatchNorm statistics and the optimizer."""
  ids = jnp.zeros((2, num_fields), jnp.int32)
  # One compiled init instead of dozens of op-by-op compilations (2-4x
  # faster start; the values are bit-identical).
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init({'params': rng, 'dropout': rng}, ids)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    tx=create_optimizer(config, num_rows=sum(model.field_dims)),
    batch_stats=variables.get('batch_stats', {}),
  )


def warm_start(state: TrainState, workdir: str) -> TrainState:
  """Copies every parameter whose path and shape match from another run.

  Used e.g. for FNN's FM pre-training: `--config.init_from=<fm workdir>`.
  """
  manager = ocp.CheckpointManager(
    os.path.join(workdir, 'checkpoints', 'best'),
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )
  step = manager.latest_step()
  if step is None:
    raise ValueError(f'config.init_from: no checkpoint in {workdir}')
  restored = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )['state']['params']
  source = {
    jax.tree_util.keystr(p): v
    for p, v in jax.tree_util.tree_leaves_with_path(restored)
  }
  copied = []

  def take(path, value):
    key = jax.tree_util.keystr(path)
    if key in source and np.shape(source[key]) == np.shape(value):
      copied.append(key)
      return jnp.asarray(source[key], value.dtype)
    return value

  params = jax.tree_util.tree_map_with_path(take, state.params)
  if not copied:
    raise ValueError(
      f'config.init_from: no parameter of {workdir} matches this model.'
    )
  logging.info('Warm start from %s: %s', workdir, ', '.join(copied))
  return state.replace(params=params, opt_state=state.tx.init(params))


# --------------------------------------------------------------------------
# Steps (per device; pmapped in train_and_evaluate).


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model,
  seed: int,
  axis_name: str = AXIS,
) -> tuple[TrainState, jax.Array]:
  """One optimizer step on this device's shard of the global batch.

  Returns:
    The new state and the global mean loss of the batch.
  """
  # A different dropout key for every step and every device.
  dropout_rng = jax.random.fold_in(
    jax.random.fold_in(jax.random.key(seed), state.step),
    lax.axis_index(axis_name),
  )

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['ids'],
      train=True,
      rngs={'dropout': dropout_rng},
      mutable=['batch_stats', 'losses'],
    )
    loss = optax.sigmoid_binary_cross_entropy(logits, batch['label']).mean()
    # Regularisers that a model sows (e.g. AFM's attention L2).
    extra = sum(jnp.sum(x) for x in jax.tree.leaves(updates.get('losses', {})))
    return loss + extra, (loss, updates.get('batch_stats', {}))

  grads, (loss, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  if isinstance(state.opt_state, LazyAdamState):
    # Only the rows that some device touched cross devices and get updated;
    # every device sees the same rows, so the replicas stay identical.
    num_rows = sum(model.field_dims)
    rows = touched_rows(batch['ids'], model.field_dims, axis_name)
    grads = lax.pmean(gather_rows(grads, rows, num_rows), axis_name)
    updates, opt_state = state.tx.update(
      grads, state.opt_state, state.params, rows=rows
    )
    state = state.replace(
      step=state.step + 1,
      params=apply_row_updates(state.params, updates, rows, num_rows),
      opt_state=opt_state,
      batch_stats=batch_stats,
    )
    return state, lax.pmean(loss, axis_name)
  # Devices hold equal shares of the global batch, so the mean of their
  # gradients is the gradient of the global mean loss.
  grads = lax.pmean(grads, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, lax.pmean(loss, axis_name)


def eval_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model,
  axis_name: str = AXIS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Logits of this device's shard and global masked loss sums.

  Returns:
    Logits `[batch / devices]`, the psum of the masked loss and of the mask.
  """
  logits = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats},
    batch['ids'],
    train=False,
  )
  losses = optax.sigmoid_binary_cross_entropy(logits, batch['label'])
  loss_sum = lax.psum(jnp.sum(losses * batch['mask']), axis_name)
  count = lax.psum(jnp.sum(batch['mask']), axis_name)
  return logits, loss_sum, count


# --------------------------------------------------------------------------
# Host-side helpers.


def replicate(tree: Any) -> Any:
  """Copies `tree` to every local device, sharded as pmap's outputs are.

  pmap lays its outputs out on a mesh named after its axis; inputs laid out
  on another mesh would make the second step compile the step again.
  """
  return jax_utils.replicate(tree, axis_name=AXIS)


def state_donation(optimizer: str = 'adam') -> tuple[int, ...]:
  """`donate_argnums` of the pmapped train step: the state, except on CPU.

  The old state is never read after a step, so XLA may reuse its buffers.
  But on XLA:CPU, donating the stacked (replicated) state makes the compiled
  step first copy the donated parameters and Adam moments: measured with
  benchmarks/throughput.py on ids shaped as MovieLens-20M (165K table rows),
  a step of FM, FNN, W&D, DeepFM, AFM or NCF takes 2.3-3x longer donated
  (FM 14.4 ms against 4.6 ms); only the models with tiny tables (LR, FFM,
  FNFM) gain 10-30% from donating.

  `optimizer='lazy_adam'` donates everywhere: it writes only the touched rows
  of the tables and their moments, in place when donated; without donation
  XLA copies the whole tables first (on the same data and CPU, a step of FM,
  FNN, DeepFM or NCF took 1.6-2.8 ms donated against 3.5-6.8 ms not).
  """
  if optimizer == 'lazy_adam':
    return (0,)
  return () if jax.default_backend() == 'cpu' else (0,)


def evaluate(
  p_eval_step: Callable,
  state: TrainState,
  split: data.Split,
  batch_size: int,
) -> dict[str, float]:
  """Exact AUC and logloss of `state` on `split`, over all processes."""
  num_devices = jax.local_device_count()
  logits, labels, masks = [], [], []
  loss_sum = count = 0.0
  batches = data.eval_batches(
    split,
    batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  pending = []
  for batch in utils.prefetch(batches):
    pending.append((p_eval_step(state, data.shard(batch, num_devices)), batch))
  for (out_logits, out_loss, out_count), batch in pending:
    logits.append(np.asarray(out_logits).reshape(-1))
    labels.append(batch['label'])
    masks.append(batch['mask'])
    loss_sum += float(out_loss[0])
    count += float(out_count[0])
  logits, labels, masks = map(np.concatenate, (logits, labels, masks))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    logits, labels, masks = (
      np.asarray(multihost_utils.process_allgather(x)).reshape(-1)
      for x in (logits, labels, masks)
    )
  keep = masks > 0
  return {
    'auc': roc_auc(labels[keep], logits[keep]),
    'logloss': loss_sum / max(count, 1.0),
    'num_examples': int(keep.sum()),
  }


def _check_batch_sizes(config: ml_collections.ConfigDict) -> None:
  devices = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] <= 0 or config[key] % devices:
      raise ValueError(
        f'config.{key}={config[key]} must be a positive multiple of the'
        f' number of devices ({devices}: {jax.process_count()} process(es)'
        f' x {jax.local_device_count()} local device(s)).'
      )


def _checkpoint_managers(workdir: str):
  """Managers of the latest (for resuming) and the best (for test) state."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=1,
    create=True,
    # A process killed while saving leaves a temporary directory behind.
    cleanup_tmp_directories=True,
  )
  root = os.path.join(os.path.abspath(workdir), 'checkpoints')
  return (
    ocp.CheckpointManager(os.path.join(root, 'latest'), options=options),
    ocp.CheckpointManager(os.path.join(root, 'best'), options=options),
  )


def _save(manager, step: int, state: TrainState, meta: dict) -> None:
  if step in manager.all_steps():
    manager.delete(step)  # A redone epoch after a crash between two saves.
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
    ),
  )


def _restore(manager, step: int, target: TrainState) -> tuple[TrainState, dict]:
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
    ),
  )
  return restored['state'], restored['meta']


# --------------------------------------------------------------------------
# Multi-process runs (one process per host, joined by jax.distributed).


def setup_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  heartbeat_timeout_seconds: int = 100,
  initialization_timeout_seconds: int = 300,
) -> None:
  """Joins a multi-process run with `jax.distributed.initialize`.

  Call it before anything else touches JAX. Arguments left as None are
  detected by JAX on Slurm, Open MPI and Cloud TPU (and `coordinator_address`
  also from `$JAX_COORDINATOR_ADDRESS`).

  Args:
    coordinator_address: `host:port` where process 0 serves the JAX
      coordination service.
    num_processes: number of processes in the run.
    process_id: this process, in `[0, num_processes)`.
    heartbeat_timeout_seconds: a process that sends no heartbeat to the
      coordination service for this long is declared dead, and every other
      process stops with an error naming it.
    initialization_timeout_seconds: how long the processes wait for each other
      to connect at start-up.

  Raises:
    ValueError: the run is not described by the arguments or the cluster.
  """
  # Cross-process collectives of the CPU backend (the 2-process tests on one
  # machine). gloo is JAX 0.10's default but not older versions'; GPU and
  # TPU backends ignore the option.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=initialization_timeout_seconds,
      heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
  except ValueError as e:
    raise ValueError(
      f'Cannot join a multi-process run: {e} JAX detects the run on Slurm,'
      ' Open MPI and Cloud TPU; elsewhere pass --coordinator_address,'
      ' --num_processes and --process_id.'
    ) from e


def _live_processes(timeout: float) -> set[int] | Exception | None:
  """The processes the JAX coordination service holds alive.

  The service answers once every live process has asked, or once the others
  are declared dead (no heartbeat for the heartbeat timeout).

  Returns:
    Their indices; the exception when the service cannot be reached (it runs
    in process 0); or None when no answer came within `timeout` seconds
    (some process is still busy, e.g. waiting in a collective).
  """
  # The client's get_live_nodes is what the (unstable, public)
  # jax.experimental.multihost_utils.live_devices calls underneath.
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = distributed.global_state.client
  answer = {}

  def ask():
    try:
      answer['live'] = set(
        client.get_live_nodes(list(range(jax.process_count())))
      )
    except Exception as e:  # pylint: disable=broad-except
      answer['error'] = e

  thread = threading.Thread(target=ask, daemon=True)
  thread.start()
  thread.join(timeout)
  return answer.get('live', answer.get('error'))


def stop_after_failure(
  error: BaseException, heartbeat_timeout_seconds: float
) -> None:
  """Ends this process of a multi-process run that failed with `error`.

  A process that dies leaves the others waiting in a collective or failing in
  one; this names the lost processes and exits with status 1 instead of
  hanging, and without JAX's shutdown barrier, which would wait for the dead.
  Within about `heartbeat_timeout_seconds` the coordination service declares
  a silent process dead: the wait for its answer is bounded by that, and JAX
  itself then terminates every process (its log also names the dead task).

  Returns (for the caller to re-raise `error`) in a single-process run, and
  when every process is alive and failed too (e.g. a bad config): then they
  all leave through JAX's normal shutdown.

  Args:
    error: what stopped this process.
    heartbeat_timeout_seconds: as given to `setup_distributed`.
  """
  if jax.process_count() == 1:
    return
  me, count = jax.process_index(), jax.process_count()
  if isinstance(error, KeyboardInterrupt):
    message = (
      f'Process {me} of {count} interrupted; the others stop when the'
      ' coordination service misses its heartbeats.'
    )
  else:
    # Long enough for the service to declare a dead peer dead.
    wait = heartbeat_timeout_seconds + 10
    logging.error(
      'Process %d of %d stopped: %s: %s. Asking the JAX coordination service'
      ' which processes are alive (at most %s s).',
      me,
      count,
      type(error).__name__,
      error,
      wait,
    )
    live = _live_processes(wait)
    if isinstance(live, set) and len(live) == count:
      return  # All failed alike: re-raise everywhere, shut down normally.
    if live is None:
      message = (
        f'Process {me} of {count} failed alone while the others still run;'
        ' stopping it, which stops them.'
      )
    elif isinstance(live, Exception):
      message = (
        f'Lost process 0 of {count}: the JAX coordination service it runs is'
        f' unreachable ({live}). Process {me} stops.'
      )
    else:
      lost = sorted(set(range(count)) - live)
      message = (
        f'Lost process(es) {", ".join(map(str, lost))} of {count}: no'
        f' heartbeat for {heartbeat_timeout_seconds} s. Process {me} stops.'
      )
  logging.error(
    '%s Start all %d processes again with the same flags to resume from the'
    ' latest checkpoint.',
    message,
    count,
    exc_info=error,
  )
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)


def _check_shared_workdir(workdir: str) -> None:
  """Raises on every process unless all of them see process 0's files.

  Orbax writes the replicated state once and every process restores it from
  the files, so a multi-process run needs its workdir on storage that all
  hosts share. A fresh name is checked (no stale NFS lookup cache).
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  token = multihost_utils.broadcast_one_to_all(
    np.frombuffer(os.urandom(8), np.uint8)
  )
  path = os.path.join(workdir, f'.shared-{np.asarray(token).tobytes().hex()}')
  if jax.process_index() == 0:
    with open(path, 'w'):
      pass
  multihost_utils.sync_global_devices('flax_fm: workdir check file written')
  seen = np.asarray(
    multihost_utils.process_allgather(np.int32(os.path.exists(path)))
  ).reshape(-1)
  if jax.process_index() == 0:
    os.remove(path)
  blind = [i for i, ok in enumerate(seen.tolist()) if not ok]
  if blind:
    raise ValueError(
      f'--workdir {workdir} is not shared: process(es)'
      f' {", ".join(map(str, blind))} do not see the files process 0 writes'
      ' there. Put the workdir on storage that every host mounts at the same'
      ' path (e.g. NFS); orbax restores checkpoints from it on every process.'
    )


def _or_minus_one(step: int | None) -> int:
  return -1 if step is None else step


def _assert_same_on_all_processes(value: int, what: str, workdir: str) -> None:
  """Raises on every process if the processes see different `value`s."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  values = np.asarray(
    multihost_utils.process_allgather(np.int32(value))
  ).reshape(-1)
  if (values != values[0]).any():
    raise ValueError(
      f'The processes see different {what} in {workdir}:'
      f' {dict(enumerate(values.tolist()))} (-1: none). Every process must'
      ' see the same workdir: put it on storage that all hosts share.'
    )


# --------------------------------------------------------------------------
# The loop.


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, float]:
  """Trains, early-stops on validation AUC, and evaluates the best on test.

  Args:
    config: the run's config (see configs/default.py).
    workdir: where checkpoints, metrics.jsonl and config.json go.

  Returns:
    The test metrics of the best state: `auc`, `logloss`, `num_examples`.
  """
  utils.quiet_orbax_logs()
  _check_batch_sizes(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  _check_shared_workdir(workdir)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  dataset = data.load_dataset(config.dataset)
  logging.info(
    'Dataset %s: fields %s, field_dims %s, %d/%d/%d examples',
    dataset.name,
    dataset.field_names,
    dataset.field_dims,
    len(dataset.train),
    len(dataset.valid),
    len(dataset.test),
  )
  steps_per_epoch = data.num_train_steps(dataset.train, config.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(
      f'config.batch_size={config.batch_size} exceeds the'
      f' {len(dataset.train)} training examples.'
    )

  model = create_model(config, dataset.field_dims, axis_name=AXIS)
  state = create_train_state(
    jax.random.key(config.seed), config, model, len(dataset.field_dims)
  )
  logging.info(
    'Model %s: %d parameters',
    config.model_name,
    sum(x.size for x in jax.tree.leaves(state.params)),
  )
  if config.get('init_from'):
    state = warm_start(state, config.init_from)

  latest, best = _checkpoint_managers(workdir)
  meta = {'epoch': 0, 'best_auc': -1.0, 'best_epoch': 0, 'bad_epochs': 0}
  # Every process restores the files process 0 wrote; a process that saw
  # none would start over and run other steps than the rest.
  _assert_same_on_all_processes(
    _or_minus_one(latest.latest_step()), 'latest checkpoints', workdir
  )
  if latest.latest_step() is not None:
    state, meta = _restore(latest, latest.latest_step(), state)
    logging.info('Resumed from epoch %d of %s', meta['epoch'], workdir)
  writer = utils.MetricsWriter(
    workdir, enabled=is_main, wall_time_offset=meta.get('wall_time', 0.0)
  )
  writer.truncate(meta['epoch'])

  p_train_step = jax.pmap(
    functools.partial(train_step, model=model, seed=config.seed),
    axis_name=AXIS,
    donate_argnums=state_donation(config.optimizer),
  )
  p_eval_step = jax.pmap(
    functools.partial(eval_step, model=model), axis_name=AXIS
  )
  num_devices = jax.local_device_count()
  replicated = replicate(state)

  epoch = meta['epoch']
  while epoch < config.num_epochs and meta['bad_epochs'] < config.patience:
    bar = utils.ProgressBar(
      f'epoch {epoch + 1}',
      steps_per_epoch,
      'ex',
      enabled=config.progress_bar and is_main,
    )
    batches = data.train_batches(
      dataset.train,
      config.batch_size,
      seed=config.seed,
      epoch=epoch,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    losses = []
    start = None
    for step, batch in enumerate(utils.prefetch(batches), start=1):
      replicated, loss = p_train_step(
        replicated, data.shard(batch, num_devices)
      )
      losses.append(loss)
      if step == 1:
        loss.block_until_ready()  # Exclude compilation from the rate.
        start = time.perf_counter()
      if step % config.log_every_steps == 0 or step == steps_per_epoch:
        recent = float(
          np.mean(jax.device_get(losses[-config.log_every_steps :]))
        )
        bar.update(step, (step - 1) * config.batch_size, f'loss {recent:.4f}')
    epoch_loss = float(np.mean(jax.device_get(losses)))
    elapsed = time.perf_counter() - start
    bar.close()
    epoch += 1
    global_step = epoch * steps_per_epoch
    rate = (steps_per_epoch - 1) * config.batch_size / max(elapsed, 1e-9)
    writer.write(
      split='train',
      epoch=epoch,
      step=global_step,
      loss=epoch_loss,
      examples_per_sec=rate,
    )
    valid = evaluate(
      p_eval_step, replicated, dataset.valid, config.eval_batch_size
    )
    writer.write(split='valid', epoch=epoch, step=global_step, **valid)
    if not math.isfinite(epoch_loss):
      raise FloatingPointError(
        f'Training loss is {epoch_loss} at epoch {epoch}'
      )

    host_state = jax.device_get(jax_utils.unreplicate(replicated))
    if valid['auc'] > meta['best_auc']:
      meta.update(best_auc=valid['auc'], best_epoch=epoch, bad_epochs=0)
      _save(best, epoch, host_state, dict(meta, epoch=epoch))
    else:
      meta['bad_epochs'] += 1
    meta['epoch'] = epoch
    meta['wall_time'] = writer.wall_time()
    # Best before latest: a kill between the two redoes this epoch.
    best.wait_until_finished()
    _save(latest, epoch, host_state, meta)
    latest.wait_until_finished()

  if meta['bad_epochs'] >= config.patience:
    logging.info(
      'Early stop after epoch %d: best validation AUC %.5f at epoch %d',
      epoch,
      meta['best_auc'],
      meta['best_epoch'],
    )
  _assert_same_on_all_processes(
    _or_minus_one(best.latest_step()), 'best checkpoints', workdir
  )
  if best.latest_step() is None:
    raise ValueError(
      'No checkpoint to evaluate: config.num_epochs must be at least 1.'
    )
  best_state, _ = _restore(best, best.latest_step(), state)
  test = evaluate(
    p_eval_step,
    replicate(best_state),
    dataset.test,
    config.eval_batch_size,
  )
  writer.write(
    split='test',
    epoch=meta['best_epoch'],
    step=meta['best_epoch'] * steps_per_epoch,
    **test,
  )
  latest.close()
  best.close()
  return test
