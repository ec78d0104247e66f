"""Data-parallel training and evaluation with `jax.pmap`.

`train_and_evaluate(config, workdir)` loads the dataset, builds
`models/<config.model_name>.py`, trains with the global batch split over all
local devices (and processes), evaluates AUC and logloss on the validation
split after every epoch, keeps the best checkpoint, stops early, and scores
the best state on the test split. Rerun in its workdir, it resumes.
"""

from collections.abc import Callable
import contextlib
import functools
from typing import Any

from absl import logging
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import optax

import batching
import best_reader
import checkpoints
import config_check
import data
import data_checks
import encoder
import metrics
import model_contract
import multihost
import optim
import orbax_logs
import programs
import sources
import sparse
import threefry
import utils
from utils import UserError
import workdir as workdir_lib

# The pmap axis of the devices; models name it for BatchNorm's statistics.
AXIS = programs.AXIS

# Random bits hashed in one pass on CPU, same bits; process-wide (threefry.py).
threefry.unroll_on_cpu()


class TrainState(train_state.TrainState):
  """Params, optimizer state and BatchNorm statistics (`{}` if none)."""

  batch_stats: Any = None


# The `Model` of models/<config.model_name>.py; `inputs`: model_fields.
create_model = model_contract.create_model


def _table_rows(model) -> int:
  """The rows of `model`'s tables: its one-hot and multi-hot fields' ids."""
  return sum(model.field_dims) + sum(getattr(model, 'multi_field_dims', ()))


def resolve_optimizer(
  config: ml_collections.ConfigDict, model
) -> ml_collections.ConfigDict:
  """`config`, with an `optimizer` of 'auto' replaced by what it is here.

  'auto' depends on the rows of `model`'s tables (`optim.resolve`): the
  one-hot and multi-hot ids of its fields. The same data gives the same
  optimizer, so a resumed run restores the state it saved.
  """
  name = optim.resolve(config.optimizer, _table_rows(model))
  if name == config.optimizer:
    return config
  config = config.copy_and_resolve_references()
  config.optimizer = name
  return config


def state_initializer(
  config: ml_collections.ConfigDict, model
) -> Callable[[jax.Array], TrainState]:
  """`init(rng) -> TrainState`: parameters, BatchNorm statistics and
  optimizer state in one compiled program (not one per initializer)."""
  config = resolve_optimizer(config, model)
  inputs = batching.example_inputs(model)

  @jax.jit  # Traced once: its shapes' trace is the state's too.
  def variables(rng):
    return model.init({'params': rng, 'dropout': rng}, train=False, **inputs)

  shapes = jax.eval_shape(variables, threefry.key(0))
  tables = model_contract.check(model, shapes, inputs)  # Before it trains.
  tx = optim.create_optimizer(config, tables)

  @jax.jit
  def init(rng):
    initial = variables(rng)
    return TrainState.create(
      apply_fn=model.apply,
      params=initial['params'],
      tx=tx,
      batch_stats=initial.get('batch_stats', {}),
    )

  options = utils.init_compiler_options()

  def initialise(rng: jax.Array) -> TrainState:
    # Each initialiser reads its random words once: the hash inline compiles
    # faster than in its loop, with the same bits (threefry.py).
    with threefry.inline():
      if options is None or isinstance(rng, jax.core.Tracer):  # eval_shape
        return init(rng)
      return init.lower(rng).compile(compiler_options=options)(rng)

  return initialise


def loss_fn(
  params: Any,
  batch_stats: Any,
  batch: dict[str, jax.Array],
  dropout_rng: jax.Array,
  *,
  model,
  perturbations: Any = None,
) -> tuple[jax.Array, tuple[Any, Any]]:
  """The training loss of one device's batch and the new BatchNorm statistics.

  The loss is the mean binary cross-entropy plus the penalties that the model
  sows into its `losses` collection (e.g. AFM's attention L2). Also returned:
  the rows that the model's tables read (the `sparse.ROWS` collection), and
  `perturbations`, if given, are added to them (`sparse.value_and_grad`).
  """
  variables = {'params': params, 'batch_stats': batch_stats}
  if perturbations:
    variables[sparse.PERTURBATIONS] = perturbations
  with model_contract.batch_norms_checked(model):  # Not seen in eval mode.
    logits, updates = model.apply(
      variables,
      **batching.model_inputs(batch),
      train=True,
      rngs={'dropout': dropout_rng},
      mutable=['batch_stats', 'losses', sparse.ROWS],
    )
  model_contract.check_logits(logits, len(batch['label']), train=True)
  loss = optax.sigmoid_binary_cross_entropy(logits, batch['label']).mean()
  loss += sum(jnp.sum(x) for x in jax.tree.leaves(updates.get('losses', {})))
  return loss, (updates.get('batch_stats', {}), updates.get(sparse.ROWS, {}))


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  hyper: dict[str, jax.Array],
  *,
  model,
  config: ml_collections.ConfigDict,
  axis_name: str = AXIS,
) -> tuple[TrainState, jax.Array]:
  """One optimizer step; returns the new state and the global batch's loss.

  `hyper` is `hyperparameters(config)`; `config` names the optimizer.
  """
  # A different dropout key for every step and every device.
  dropout_rng = jax.random.fold_in(
    jax.random.fold_in(jax.random.key(hyper['seed']), state.step),
    lax.axis_index(axis_name),
  )
  rates = {name: hyper[name] for name in optim.RATES}
  config = resolve_optimizer(config, model)
  tx = optim.create_optimizer(config, optim.model_tables_of(state.tx), rates)
  tables = optim.tables_of(tx)
  # The tables of a row-wise optimizer get the gradients of the rows read.
  (loss, batch_stats), grads = sparse.value_and_grad(
    lambda params, perturbations: loss_fn(
      params,
      state.batch_stats,
      batch,
      dropout_rng,
      model=model,
      perturbations=perturbations,
    ),
    state.params,
    tables,
  )
  params, opt_state = optim.apply_gradients(
    tx, grads, state.opt_state, state.params, axis_name=axis_name
  )
  state = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    batch_stats=batch_stats,
  )
  return state, lax.pmean(loss, axis_name)


def train_steps(
  state: TrainState,
  batches: dict[str, jax.Array] | jax.Array,
  hyper: dict[str, jax.Array],
  resident: dict[str, jax.Array] | None = None,
  num_steps: jax.Array | None = None,
  **kwargs,
) -> tuple[TrainState, jax.Array]:
  """`train_step` on each of a stack of batches `[steps, ...]`, one dispatch.

  With `resident` (`batching.resident_split`), `batches` are its rows `[steps,
  batch]`. With `num_steps`, a traced count, only the first `num_steps`
  batches train: a shorter stack padded to the same shape runs in the same
  compiled program. Returns the new state and the losses `[steps]` (zero past
  `num_steps`); `hyper` and `kwargs` go to `train_step`.
  """
  length = jax.tree.leaves(batches)[0].shape[0]

  def body(i, carry):
    state, losses = carry
    batch = jax.tree.map(lambda x: x[i], batches)
    if resident is not None:
      batch = jax.tree.map(lambda x: x[batch], resident)
    state, loss = train_step(state, batch, hyper, **kwargs)
    return state, losses.at[i].set(loss)

  num_steps = length if num_steps is None else num_steps
  losses = jnp.zeros([length], jnp.float32)
  return lax.fori_loop(0, num_steps, body, (state, losses))


def eval_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model,
  axis_name: str = AXIS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Logits `[batch / devices]`, the psums of the masked loss and the mask."""
  # Collecting the rows (then dropped) makes this a trainer's program, in
  # which a model's `take_rows(apart=True)` gathers apart on CPU.
  logits, _ = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats},
    **batching.model_inputs(batch),
    train=False,
    mutable=[sparse.ROWS],
  )
  losses = optax.sigmoid_binary_cross_entropy(logits, batch['label'])
  loss_sum = lax.psum(jnp.sum(losses * batch['mask']), axis_name)
  count = lax.psum(jnp.sum(batch['mask']), axis_name)
  return logits, loss_sum, count


# programs.py's and best_reader's, under the names that others call them by.
replicate = programs.replicate
hyperparameters = programs.hyperparameters
evaluate = programs.evaluate
train_epoch = programs.train_epoch
warm_start = best_reader.warm_start


def pmapped_steps(model, config: ml_collections.ConfigDict) -> tuple:
  """The run's pmapped `train_steps` and `eval_step` of `model`.

  The train program is called as `p_train_step(state, batches, hyper,
  resident, num_steps)`, with `hyper` the replicated
  `hyperparameters(config)`. On CPU both compile with
  `programs.CPU_COMPILER_OPTIONS`.
  """
  config = resolve_optimizer(config, model)
  p_train_step = jax.pmap(
    functools.partial(train_steps, model=model, config=config),
    axis_name=AXIS,
    donate_argnums=programs.state_donation(config.optimizer),
  )
  p_eval_step = jax.pmap(functools.partial(eval_step, model=model), AXIS)
  cpu = jax.default_backend() == 'cpu'
  options = programs.CPU_COMPILER_OPTIONS if cpu else None
  return (
    programs.with_options(p_train_step, options),
    programs.with_options(p_eval_step, options),
  )


@utils.interrupts_heard()  # A Ctrl-C in a gc callback is not lost.
def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, float]:
  """Trains, early-stops on validation AUC, and evaluates the best on test.

  The config is checked before anything else; the workdir is locked for the
  whole run, and a restart must continue the run its checkpoints come from
  (see workdir.py). It leaves JAX's compilation cache set and orbax's logs
  filtered for the process (`utils.enable_compilation_cache`, `orbax_logs`),
  and `jax.pmap` keeps each call's programs (NFM: about 40 MB): a sweep in
  one process frees them with `jax.clear_caches()` between runs.

  Args:
    config: the run's config (see configs/default.py).
    workdir: where checkpoints, metrics.jsonl and config.json go.

  Returns:
    The test metrics of the best state: `auc`, `logloss`, `num_examples`.

  Raises:
    UserError: a bad config, workdir or dataset, or a workdir in use.
  """
  config = config_check.thawed(config)  # A FrozenConfigDict is copied.
  orbax_logs.quiet_info()
  multihost.assert_same_config(workdir_lib.flatten(config))
  with multihost.errors_shared():  # A host's own paths may fail alone.
    config_check.validate_config(
      config,
      dataset_names=tuple(data.FORMAT_OF),
      optimizers=optim.NAMES,
      num_devices=jax.device_count(),
      resuming=workdir_lib.has_checkpoints(workdir),
    )
    utils.enable_compilation_cache(data.cache_dir(config.dataset))
    workdir = workdir_lib.prepare(workdir)
  is_main = jax.process_index() == 0
  multihost.check_shared_workdir(workdir)
  with multihost.lock_workdir(workdir, is_main):
    try:  # Also from the train program's trace (`loss_fn`), on a thread.
      return _run(config, workdir, is_main)
    except model_contract.ContractError as e:
      raise UserError(f'models/{config.model_name}.py: {e}') from e


def _run(
  config: ml_collections.ConfigDict, workdir: str, is_main: bool
) -> dict[str, float]:
  """`train_and_evaluate` in its prepared, locked workdir."""
  with multihost.errors_shared():  # Refused by one process: by all.
    config = workdir_lib.resumed_optimizer(workdir, config, optim.NAMES)
    changes = workdir_lib.check_resume(
      workdir, config, write=is_main, record=False, moved=True
    )

    # A resume's files must hold the recorded bytes: compared before any
    # encoding, on the digests that also key the cache (hashed once).
    def check(digests):
      if is_main:
        sources.check(workdir, changes, lambda: digests)

    dataset = data.load_dataset(config.dataset, check)
  multihost.assert_same_data(dataset)
  logging.info('%s', data.describe(dataset))
  data_checks.check(dataset, config, workdir_lib.has_checkpoints(workdir))
  try:  # A model checks what depends on several arguments (or the data).
    model = create_model(
      config, dataset.field_dims, AXIS, **batching.model_fields(dataset)
    )
    init = state_initializer(config, model)  # Traces the model once.
  except ValueError as e:
    raise UserError(f'models/{config.model_name}.py: {e}') from e
  steps_per_epoch = batching.num_train_steps(dataset.train, config.batch_size)
  if auto := config.optimizer == 'auto':
    config = resolve_optimizer(config, model)
    logging.info(
      "config.optimizer 'auto': %s (%d table rows; 'lazy_adam' from %d)",
      config.optimizer,
      _table_rows(model),
      optim.AUTO_SPARSE_ROWS,
    )
  resuming = workdir_lib.has_checkpoints(workdir)  # Same data, same ids.
  p_train_step, p_eval_step = pmapped_steps(model, config)
  # The programs compile on threads, from shapes, as the state initialises.
  rng = threefry.key(config.seed)
  resident = replicate(batching.resident_split(dataset.train, config))
  shapes = jax.eval_shape(init, rng)
  with multihost.errors_shared():  # Before XLA allocates the state; a
    programs.check_state_fits(shapes)  # host's own memory may refuse it.
  wait_compiled = programs.compile_train_and_eval(
    p_train_step,
    p_eval_step,
    shapes,
    hyperparameters(config),
    dataset.train,
    dataset.valid,
    config,
    resident,
  )
  with contextlib.ExitStack() as stack:
    try:  # On an error too, the compilations end before the call does.
      state = init(rng)
      num_params = sum(x.size for x in jax.tree.leaves(state.params))
      logging.info('Model %s: %d parameters', config.model_name, num_params)
      # The model's programs traced (a refused one writes nothing), process 0
      # records the encoder, changes and 'auto'; its error stops all.
      wait_compiled(traced=True)
      with multihost.errors_shared():
        if is_main:
          with utils.writing('the encoder', f'{workdir}/encoder', '*.tmp'):
            encoder.save(workdir, dataset, config, resuming)
          workdir_lib.record_history(workdir, changes)  # Accepted: same data.
          sources.record(workdir, dataset.sources)
          if auto and not resuming:
            workdir_lib.record_resolved_optimizer(workdir, config.optimizer)

      # Single-host saves run on a thread while training goes on (multi-host
      # ones end in a collective); leaving `stack` waits for them, inside the
      # lock, and closes the managers on any error, an early one too.
      ckpt = stack.enter_context(
        checkpoints.Checkpoints(workdir, background=jax.process_count() == 1)
      )
      # All restore process 0's files; one that saw none would run other steps.
      multihost.assert_same_on_all_processes(
        ckpt.latest.latest_step(), 'latest checkpoints', workdir
      )
      state, meta = ckpt.restore_latest(state)
      if meta is None and config.get('init_from'):  # A resume has its weights.
        state = warm_start(state, config.init_from)
      meta = checkpoints.run_meta(meta, workdir)  # Logs a resume.
      writer = metrics.MetricsWriter(  # Process 0 writes; its error stops all.
        workdir, is_main, meta.get('wall_time', 0.0), multihost.errors_shared
      )
      epochs, patience = config.num_epochs, config.patience
      done = meta['epoch'] >= epochs or meta['bad_epochs'] >= patience
      writer.truncate(meta['epoch'], keep_test=done)  # Done: only scored again.

      replicated = replicate(state)
    except BaseException:
      with contextlib.suppress(Exception):  # The first error is raised.
        wait_compiled()
      raise
    wait_compiled()

    epoch = meta['epoch']
    while epoch < epochs and meta['bad_epochs'] < patience:
      rates = optim.on_plateau(config, meta.get('lr_scale', 1.0))
      replicated, loss, rate = train_epoch(
        p_train_step, replicated, dataset.train, rates, epoch, resident
      )
      epoch += 1
      step = epoch * steps_per_epoch
      writer.write(
        split='train', epoch=epoch, step=step, loss=loss, examples_per_sec=rate
      )
      valid = evaluate(
        p_eval_step, replicated, dataset.valid, config.eval_batch_size
      )
      writer.write(split='valid', epoch=epoch, step=step, **valid)
      programs.check_finite(epoch, loss, valid)  # Before any save.
      host_state = programs.first_replica(replicated)
      if improved := valid['auc'] > meta['best_auc']:
        meta.update(best_auc=valid['auc'], best_epoch=epoch, bad_epochs=0)
      else:
        meta['bad_epochs'] += 1
        # Even at a stop: a resume with more patience goes on at the rates
        # of a run begun with it.
        meta['lr_scale'] = optim.plateau_scale(meta.get('lr_scale', 1), config)
      meta.update(epoch=epoch, wall_time=writer.wall_time())
      if improved:  # Before latest: a kill between the two redoes the epoch.
        ckpt.save_best(epoch, host_state, meta)  # Latest copies its files.
      ckpt.save_latest(epoch, host_state, meta)

    if meta['bad_epochs'] >= patience:
      logging.info(
        'Early stop after epoch %d: best validation AUC %.5f at epoch %d',
        epoch,
        meta['best_auc'],
        meta['best_epoch'],
      )
    logging.info('Scoring epoch %d on the test split', meta['best_epoch'])
    best_state = ckpt.restore_best(meta, state)
    test = evaluate(
      p_eval_step, replicate(best_state), dataset.test, config.eval_batch_size
    )
    best = meta['best_epoch']
    writer.write(split='test', epoch=best, step=best * steps_per_epoch, **test)
    programs.warn_not_finite('test', test)
  return test
