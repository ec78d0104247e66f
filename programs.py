"""What the pmapped train and eval programs are called with, compiled ahead.

`jax.pmap` runs one copy of a program on each local device, on arrays with a
leading device axis laid out on a mesh named after the pmap axis. Moving a
tree there with `jnp.stack` (as `flax.jax_utils.replicate` does) compiles one
small program per array shape, and taking one replica back compiles a
squeeze per shape: dozens of compilations, a good part of a short run's
start-up. `replicate` and `first_replica` go through host memory and compile
nothing.

`epoch_stacks` gives the train program its stacks of batches, each of one
shape, and `state_donation` says whether it may reuse the state's buffers.
`with_options` compiles a program with XLA options, which `jax.pmap` does
not take (on CPU, `CPU_COMPILER_OPTIONS`). `compile_train_and_eval`
compiles the train and eval programs on threads while the host initialises
the state and restores checkpoints: it needs only their shapes
(`replicated_shapes`).

`check_state_fits` refuses a train state that the memory left cannot
hold. `train_epoch` runs the train program over an epoch of a split, with
the arguments `hyperparameters` gives it; `evaluate` runs the eval program
over a split and returns its metrics.
"""

from collections.abc import Callable, Iterator
import concurrent.futures
import math
import os
import resource
import threading
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import batching
import data
import metrics
import multihost
import optim
import utils

# The pmap axis of the devices; models name it for BatchNorm's statistics.
AXIS = 'batch'
# XLA options of a run's programs on CPU: LLVM's default optimisation level
# (2) rather than XLA's (3). Training steps run faster for 16 of 18 models
# on the embedded data and for the models tried on the Criteo and
# MovieLens-20M shapes, with each optimizer (benchmarks/README.md, "LLVM's
# level 2"), and programs compile faster.
CPU_COMPILER_OPTIONS = {'xla_backend_optimization_level': '2'}
# Dispatches that may run ahead of the oldest unfinished one where the host
# sends batches (not rows of a resident split): each is copied to the
# devices as it is dispatched, and an epoch (or a split) queued at once
# would hold them all.
IN_FLIGHT = 2


def sharding() -> jax.sharding.NamedSharding:
  """Where pmap puts its replicated outputs: split over the local devices.

  Inputs laid out otherwise would make a program's second call compile it
  again.
  """
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree: Any) -> Any:
  """A copy of each array `[...]` on every local device: `[devices, ...]`.

  Device arrays are copied to the host first, then to each device: no
  program compiles, and no device holds more than its own copy.
  """
  layout = sharding()
  devices = list(layout.mesh.devices.flat)

  def put(x):
    x = np.asarray(x)[None]
    shards = [jax.device_put(x, d) for d in devices]
    shape = (len(devices),) + x.shape[1:]
    return jax.make_array_from_single_device_arrays(shape, layout, shards)

  return jax.tree.map(put, tree)


def first_replica(tree: Any) -> Any:
  """Host copies (numpy) of device 0's replica of each `[devices, ...]` array.

  A copy, never a view: the device buffers may be donated to the next step.
  """
  return jax.tree.map(lambda x: np.array(x.addressable_data(0))[0], tree)


def replicated_shapes(shapes: Any) -> Any:
  """`replicate`'s output shapes for a tree of shapes (`jax.eval_shape`'s)."""
  layout, count = sharding(), jax.local_device_count()
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((count, *x.shape), x.dtype, sharding=layout),
    shapes,
  )


class OptionedProgram:
  """A pmapped program compiled with XLA options, once per argument shapes.

  Called as the program is: the first call with arguments of new shapes
  (or `compile` with their `jax.ShapeDtypeStruct`s) lowers and compiles
  it with `options` (`jax.stages.Lowered.compile`); later calls run that
  executable.
  """

  def __init__(self, program: Callable, options: dict[str, str]):
    self.program = program
    self.options = dict(options)
    self._compiled = {}
    self._lock = threading.Lock()

  def lower(self, *args) -> jax.stages.Lowered:
    return self.program.lower(*args)

  def compile(self, *args) -> jax.stages.Compiled:
    """The executable for arguments of the shapes of `args`."""
    leaves, tree = jax.tree.flatten(args)
    key = (tree, tuple((np.shape(x), np.dtype(x.dtype)) for x in leaves))
    with self._lock:
      compiled = self._compiled.get(key)
    if compiled is None:
      compiled = self.lower(*args).compile(compiler_options=self.options)
      with self._lock:
        compiled = self._compiled.setdefault(key, compiled)
    return compiled

  def __call__(self, *args):
    return self.compile(*args)(*args)


def with_options(program: Callable, options: dict[str, str] | None) -> Any:
  """`program` (pmapped) compiled with XLA `options`; itself if None or {}.

  Only in a single-process run: with several processes pmap lowers at the
  first call (see `compile_train_and_eval`), and every process must run the
  same programs.
  """
  if not options or jax.process_count() > 1:
    return program
  return OptionedProgram(program, options)


def compile_ahead(
  *programs: tuple[Callable, Callable[[], tuple]],
) -> Callable[..., None]:
  """Compiles each `(program, args)` pair on a thread of its own.

  `args()`, run on the thread, returns the program's arguments or their
  shapes (`jax.ShapeDtypeStruct`, with the sharding of device arrays). A
  later call with arguments of those shapes runs without compiling.

  Returns:
    `wait(traced=False)`: waits for the compilations (`traced`: for their
    traces alone), raising what they raised. Python waits for them at exit.
  """
  traces = [concurrent.futures.Future() for _ in programs]

  def compile_one(program, args, traced):
    try:  # pmap keeps the lowering: compiling lowers it no more.
      lowered = program.lower(*(args := args()))
    except BaseException as e:
      traced.set_exception(e)
      raise
    traced.set_result(None)
    optioned = isinstance(program, OptionedProgram)
    return program.compile(*args) if optioned else lowered.compile()

  pool = concurrent.futures.ThreadPoolExecutor(len(programs), 'compile_ahead')
  pairs = zip(programs, traces, strict=True)
  futures = [pool.submit(compile_one, *p, t) for p, t in pairs]
  pool.shutdown(wait=False)

  def wait(traced: bool = False):
    for future in traces if traced else futures:
      future.result()

  return wait


def state_donation(optimizer: str = 'adam') -> tuple[int, ...]:
  """`donate_argnums` of the pmapped train step: the state, except on CPU.

  The old state is never read after a step, so XLA may reuse its buffers.
  But on XLA:CPU, donating the replicated state makes the compiled step copy
  the donated parameters and Adam moments first, a loss for every model with
  large tables. The row-wise optimizers donate everywhere: they write only
  the rows read of the tables and of their state, in place when donated
  (else XLA copies the whole tables first).
  """
  if optimizer != 'adam':
    return (0,)
  return () if jax.default_backend() == 'cpu' else (0,)


def epoch_stacks(
  split: data.Split,
  config: ml_collections.ConfigDict,
  epoch: int,
  resident: dict[str, jax.Array] | None = None,
) -> tuple[list[int], Iterator[dict[str, np.ndarray] | np.ndarray]]:
  """The steps of each dispatch of an epoch, and the stacks they train on.

  Stacks of `config.steps_per_dispatch` batches (rows of `resident`, if
  given), a shorter remainder first and padded to their shape: one program.
  """
  steps = batching.num_train_steps(split, config.batch_size)
  batches = (
    batching.train_batches if resident is None else batching.train_rows
  )(
    split,
    config.batch_size,
    seed=config.seed,
    epoch=epoch,
    shuffle=config.shuffle,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  size = min(config.steps_per_dispatch, steps)
  sizes = [steps % size] * (steps % size > 0) + [size] * (steps // size)
  stack = batching.stack_batches if resident is None else batching.stack_rows
  return sizes, stack(batches, sizes, jax.local_device_count())


def check_state_fits(shapes: Any) -> None:
  """Raises a UserError if the train state cannot fit in memory.

  On CPU every device's copy is in the host's memory: what the kernel says
  is available (and what an address-space limit leaves); elsewhere, a
  device's own. A state beyond it would stop XLA in an allocation that
  never returns (under `ulimit -v`), or be killed by the kernel.
  """
  need = sum(
    math.prod(x.shape) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(shapes)
  )
  device = jax.local_devices()[0]
  if device.platform == 'cpu':
    need *= jax.local_device_count()
    have, where = host_memory(), "this host's available memory"
  else:
    have = (device.memory_stats() or {}).get('bytes_limit')
    where = f'the memory of {device.device_kind} {device.id}'
  if have is not None and need > have:
    raise utils.UserError(
      f'The train state (parameters and optimizer slots) needs'
      f' {need / 2**30:.2f} GiB, more than the {have / 2**30:.2f} GiB of'
      f' {where}. Make the tables smaller (a larger config.dataset.min_count'
      ' or a smaller config.model.embed_dim), or run where memory is free.'
    )


def host_memory() -> int | None:
  """Bytes this process may still use: MemAvailable, under RLIMIT_AS."""
  try:
    with open('/proc/meminfo') as f:
      info = {k: v.split() for k, v in (line.split(':', 1) for line in f)}
    have = int(info['MemAvailable'][0]) * 1024
  except (OSError, KeyError, ValueError, IndexError):
    return None
  limit, _ = resource.getrlimit(resource.RLIMIT_AS)
  if limit != resource.RLIM_INFINITY:
    try:
      with open('/proc/self/statm') as f:
        used = int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
      used = 0
    have = min(have, max(limit - used, 0))
  return have


def compile_train_and_eval(
  p_train_step: Callable,
  p_eval_step: Callable,
  shapes: Any,
  hyper: Any,
  train_split: data.Split,
  valid_split: data.Split,
  config: ml_collections.ConfigDict,
  resident: dict[str, jax.Array] | None = None,
) -> Callable[..., None]:
  """Compiles the train and eval programs on threads, while the host goes on.

  Args:
    p_train_step: the pmapped `train.train_steps`.
    p_eval_step: the pmapped `train.eval_step`.
    shapes: the shapes of the (unreplicated) train state.
    hyper: the (unreplicated) `hyperparameters`, numpy scalars.
    train_split: the training split; its first stack gives the shapes.
    valid_split: the validation split; its first batch gives the shapes.
    config: the run's config.
    resident: `train_split` on the devices (`batching.resident_split`), if it is
      kept there.

  Returns:
    `compile_ahead`'s `wait`. With several processes it returns at once
    and the programs compile (and trace) at their first call: there
    pmap's lowering of `jax.ShapeDtypeStruct` arguments fails (an
    IndexError in jax 0.10's `mesh_local_to_global`).
  """
  if jax.process_count() > 1:
    return lambda traced=False: None
  state = replicated_shapes(shapes)
  count = replicated_shapes(jax.ShapeDtypeStruct((), jnp.int32))
  hyper = replicated_shapes(
    jax.tree.map(lambda x: jax.ShapeDtypeStruct((), np.result_type(x)), hyper)
  )

  def train_args():
    _, stacks = epoch_stacks(train_split, config, 0, resident)
    return state, next(stacks), hyper, resident, count

  def eval_args():
    batches = batching.eval_batches(
      valid_split,
      eval_batch_size(valid_split, config.eval_batch_size),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    return state, batching.shard(next(batches), jax.local_device_count())

  return compile_ahead((p_train_step, train_args), (p_eval_step, eval_args))


def hyperparameters(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the train program takes as arguments rather than constants.

  The seed of the dropout masks and the optimizer's rates
  (`optim.rates_of`), as numpy scalars: runs that differ only in them (a
  sweep over seeds or learning rates) share one compiled train program,
  found in the persistent compilation cache after the first.
  """
  # jax.random.key keeps a seed's low 32 bits (without jax_enable_x64).
  seed = np.uint32(config.seed % 2**32)
  return {'seed': seed, **optim.rates_of(config)}


def eval_batch_size(split: data.Split, batch_size: int) -> int:
  """`batch_size` rounded up to split evenly over the devices, or less where
  it would pad `split` more than twice over.

  Evaluation pads and masks, so `config.eval_batch_size` need not divide by
  the device count (8192 on 3 devices: 8193). The last batch is padded to
  the whole size, so a `config.eval_batch_size` far above the split's rows
  (10**8 for the embedded data's 10,084) costs that many rows of time and
  memory for nothing. The smaller size is the devices times a power of two,
  so that splits of about the same rows (a random split's validation and
  test) share one program.
  """
  devices = jax.device_count()
  per_device = math.ceil(max(len(split), 1) / devices)
  smallest = 2 ** math.ceil(math.log2(per_device))
  return devices * min(math.ceil(batch_size / devices), smallest)


def evaluate(
  p_eval_step: Callable,
  state: Any,
  split: data.Split,
  batch_size: int,
) -> dict[str, float]:
  """`auc`, `logloss` and `num_examples` of replicated `state` on `split`.

  Each process scores its slice of `split` with the pmapped
  `train.eval_step` in padded global batches of `eval_batch_size(split,
  batch_size)` rows; the padding is masked out. Both metrics come from the
  gathered logits, in float64 (as predict.py's): the eval program's float32
  psums of the loss are summed in another order for each batch size and
  device count.
  """
  num_devices = jax.local_device_count()
  batches = batching.eval_batches(
    split,
    eval_batch_size(split, batch_size),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  # Results are read back at the end; a batch waits for the one
  # `IN_FLIGHT` before it, so that the host does not queue the whole split.
  outs, labels, masks = [], [], []
  for batch in utils.prefetch(batches):
    outs.append(p_eval_step(state, batching.shard(batch, num_devices)))
    labels.append(batch['label'])
    masks.append(batch['mask'])
    if len(outs) > IN_FLIGHT:
      outs[-1 - IN_FLIGHT][0].block_until_ready()
  logits = np.concatenate([np.asarray(out[0]).reshape(-1) for out in outs])
  labels, masks = np.concatenate(labels), np.concatenate(masks)
  # AUC is not a sum: every process gets the whole split's scores.
  logits, labels, masks = map(multihost.allgather, (logits, labels, masks))
  keep = masks > 0
  return {
    'auc': metrics.roc_auc(labels[keep], logits[keep]),
    'logloss': metrics.logit_log_loss(labels[keep], logits[keep]),
    'num_examples': int(keep.sum()),
  }


def _first(losses: list[np.ndarray], sizes: list[int]) -> np.ndarray:
  """The losses of the steps that ran: `sizes[i]` of each padded stack."""
  return np.concatenate(
    [np.reshape(x, -1)[:n] for x, n in zip(losses, sizes, strict=False)]
  )


def check_finite(epoch: int, loss: float, valid: dict[str, float]) -> None:
  """Raises a UserError if an epoch's loss or validation metrics are not
  finite: NaN logits. A NaN loss is a diverged run; NaN validation scores
  after a finite loss are a divergence in the epoch's last step, or
  validation rows that the model overflows on."""
  scores = f'validation AUC {valid["auc"]}, logloss {valid["logloss"]}'
  retry = (
    'Lower config.learning_rate and train again (in a new workdir if this'
    ' one holds checkpoints: a resume keeps the learning rate).'
  )
  if not math.isfinite(loss):
    raise utils.UserError(
      f'Training diverged at epoch {epoch}: loss {loss}, {scores}. {retry}'
    )
  if not all(map(math.isfinite, (valid['auc'], valid['logloss']))):
    raise utils.UserError(
      f'Validation scores are not finite at epoch {epoch} (loss {loss},'
      f' {scores}): the run diverged in its last step, or validation rows'
      " hold inputs far outside training's range that the model overflows"
      ' on (a huge number in a numeric field: predict.py on the validation'
      f' file counts the rows scored NaN). Fix those rows, or: {retry}'
    )


def warn_not_finite(split: str, scores: dict[str, float]) -> None:
  """Logs a warning if `split`'s AUC or logloss is not finite (written as
  null in metrics.jsonl): some of its rows overflow the model."""
  if not all(map(math.isfinite, (scores['auc'], scores['logloss']))):
    logging.warning(
      'The %s split scored NaN (AUC %s, logloss %s; null in metrics.jsonl):'
      " some of its rows hold inputs far outside training's range that the"
      ' model overflows on; predict.py on its file counts them.',
      split,
      scores['auc'],
      scores['logloss'],
    )


def train_epoch(
  p_train_step: Callable,
  state: Any,
  split: data.Split,
  config: ml_collections.ConfigDict,
  epoch: int,
  resident: dict[str, jax.Array] | None = None,
) -> tuple[Any, float, float]:
  """Trains one epoch of `split` in shuffled global batches.

  With `resident`, `split` kept on the devices, the host sends only rows.

  Returns:
    The new state, the mean loss, and examples/s: of the dispatches after the
    first (which may compile), or of the whole epoch when it is one dispatch.
  """
  steps = batching.num_train_steps(split, config.batch_size)
  show = config.progress_bar and jax.process_index() == 0
  bar = utils.ProgressBar(f'epoch {epoch + 1}', steps, 'ex', enabled=show)
  sizes, batches = epoch_stacks(split, config, epoch, resident)
  # The step counts and hyperparameters, on the devices once rather than
  # sent with every stack.
  counts = {n: replicate(np.int32(n)) for n in set(sizes)}
  hyper = replicate(hyperparameters(config))
  # Each stack's losses stay on the device until read, once: the bar reads
  # the new ones (waiting for them) only when it is drawn.
  losses, fetched, done, every = [], [], 0, config.log_every_steps
  start, timed = time.perf_counter(), 0
  for group, batch in enumerate(utils.prefetch(batches)):
    state, loss = p_train_step(
      state, batch, hyper, resident, counts[sizes[group]]
    )
    losses.append(loss.addressable_data(0))  # [1, steps]
    if resident is None and group >= IN_FLIGHT:  # Not the epoch's rows
      losses[group - IN_FLIGHT].block_until_ready()  # queued at once.
    done += sizes[group]
    if group == 0 and len(sizes) > 1:
      loss.block_until_ready()  # Exclude compilation from the rate.
      start, timed = time.perf_counter(), done
    logs = done // every > (done - sizes[group]) // every or done == steps
    if logs and bar.due():
      fetched += jax.device_get(losses[len(fetched) :])
      recent = np.mean(_first(fetched, sizes)[-every:])
      bar.update(done, (done - 1) * config.batch_size, f'loss {recent:.4f}')
  fetched += jax.device_get(losses[len(fetched) :])
  loss = float(np.mean(_first(fetched, sizes)))
  elapsed = max(time.perf_counter() - start, 1e-9)
  bar.close()
  return state, loss, (steps - timed) * config.batch_size / elapsed
