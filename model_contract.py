"""The model contract of DESIGN.md 2, checked when a run builds its model.

A model file that breaks the contract would otherwise train wrongly and say
nothing: logits `[batch, 1]` broadcast against labels `[batch]` into a
`[batch, batch]` loss, probabilities take a second sigmoid in the loss, a
BatchNorm without the pmap axis keeps each device's own statistics.
`create_model` and `check` refuse such a file at start-up with a
`ValueError` that says what to write (the trainer turns it into one line
naming the file); they read only shapes, so nothing runs. `check` costs one
trace of the model, which also finds its tables, and every run pays it: the
training call's logits and BatchNorms are checked in the train program's
own trace (`check_logits`, `batch_norms_checked`), on its compiling thread.
"""

import contextlib
import dataclasses
import importlib
import inspect

from flax import traverse_util
import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import ml_collections
import numpy as np

import models
import sparse

# What the README tells a model file to copy from: the arguments that
# describe the dataset's inputs, in the words of models/fm.py.
_DECLARATIONS = {
  'field_dims': 'field_dims: Sequence[int]',
  'multi_field_dims': 'multi_field_dims: Sequence[int] = ()',
  'num_dense': 'num_dense: int = 0',
  'axis_name': 'axis_name: str | None = None',
}


def model_class(name: str) -> type[nn.Module]:
  """The `Model` of `models/<name>.py`.

  Raises:
    ValueError: no such file, or it has no `Model` linen module.
  """
  if name not in models.names():
    raise ValueError(
      f'config.model_name: no model {name!r} in models/;'
      f' choose one of {", ".join(models.names())}.'
    )
  model = getattr(importlib.import_module(f'models.{name}'), 'Model', None)
  if not (isinstance(model, type) and issubclass(model, nn.Module)):
    raise ValueError(
      f'models/{name}.py must end with `Model = <ClassName>`, naming its'
      ' linen module (see models/fm.py; README.md: Models);'
      f' its Model is {model!r}.'
    )
  return model


def create_model(
  config: ml_collections.ConfigDict,
  field_dims: tuple[int, ...],
  axis_name: str | None = None,
  **inputs,
) -> nn.Module:
  """The `Model` of models/<config.model_name>.py; `inputs`: model_fields.

  Raises:
    ValueError: the file has no `Model`, or its `Model` (or its `__call__`,
      `train`) lacks an argument that the trainer or the dataset's inputs
      (`inputs`) pass.
  """
  model = model_class(config.model_name)
  fields = {f.name for f in dataclasses.fields(model)}
  missing = [
    key
    for key in ('field_dims', 'axis_name', *inputs)
    if key in _DECLARATIONS and key not in fields
  ]
  params = inspect.signature(model.__call__).parameters.values()
  if not any(p.name == 'train' or p.kind == p.VAR_KEYWORD for p in params):
    raise ValueError(
      'Model.__call__ has no argument `train`, which the trainer passes'
      ' (True in training, False in evaluation): declare'
      ' `train: bool = False` and use it for dropout and BatchNorm as'
      ' models/fm.py does (README.md: Models).'
    )
  if missing:
    why = ' (the dataset has multi-hot or numeric fields)' if inputs else ''
    raise ValueError(
      f'Model has no argument {" or ".join(missing)}, which the trainer'
      f' passes{why}: declare'
      f' {" and ".join(f"`{_DECLARATIONS[k]}`" for k in missing)} and use'
      f' {"it" if len(missing) == 1 else "them"} as models/fm.py does'
      ' (README.md: Models).'
    )
  return model(
    field_dims=tuple(field_dims), axis_name=axis_name, **config.model, **inputs
  )


class ContractError(ValueError):
  """A model breaks the contract of DESIGN.md 2; says what to write."""


def check(
  model: nn.Module, variables, inputs: dict
) -> frozenset[tuple[str, ...]]:
  """Refuses a model whose call breaks the contract; returns its tables.

  One trace (`jax.make_jaxpr`; nothing runs) of the call that the eval
  program makes tells all: its output must be float32 logits `[batch]`,
  not made by a sigmoid (probabilities), every BatchNorm must average its
  statistics over the model's `axis_name` (when it has one), and a
  parameter read at rows that the ids name must be a declared table
  (`take_rows`), or the row-wise optimizers would update it as a dense
  leaf. The training call is checked where the train program traces it
  (`check_logits` and `batch_norms_checked` in `train.loss_fn`).

  Args:
    model: the model, as the trainer builds it.
    variables: the shapes of its variables (`params`, `batch_stats`).
    inputs: keyword inputs of one call (`batching.example_inputs`).

  Returns:
    The params paths of its declared tables, as `sparse.declared_tables`.

  Raises:
    ContractError: what breaks the contract and what to write instead.
  """
  axis_name = getattr(model, 'axis_name', None)
  unsynced = []
  # A BatchNorm's axis_name is an attribute: the eval call meets it too.
  interceptor = _batch_norms(axis_name, unsynced)

  params = traverse_util.flatten_dict(variables['params'])
  paths = list(params)
  others = {k: v for k, v in variables.items() if k != 'params'}

  def call(leaves, others, inputs):
    tree = traverse_util.unflatten_dict(dict(zip(paths, leaves, strict=True)))
    with nn.intercept_methods(interceptor):
      return model.apply(
        {'params': tree, **others},
        train=False,
        mutable=[sparse.ROWS],
        **inputs,
      )

  trace = jax.make_jaxpr(call, return_shape=True)
  closed, (logits, state) = trace([params[p] for p in paths], others, inputs)
  check_logits(logits, len(inputs['ids']), train=False)
  if _is_sigmoid(closed.jaxpr, closed.jaxpr.outvars[0]):
    raise ContractError(
      f'Model(...).apply(ids [{len(inputs["ids"])}, fields], train=False)'
      ' returns probabilities (its output is a sigmoid); the trainer needs'
      ' the logits before it: drop the sigmoid, as the loss applies it'
      ' (sigmoid_binary_cross_entropy; README.md: Models).'
    )
  _refuse_unsynced(unsynced, axis_name)
  tables = frozenset(traverse_util.flatten_dict(state.get(sparse.ROWS, {})))
  undeclared = sorted(set(_read_by_ids(closed.jaxpr, paths, inputs)) - tables)
  if undeclared:
    raise ContractError(
      f'{", ".join("/".join(p) for p in undeclared)} is read at the rows'
      ' that the ids name but not declared as a table, so lazy_adam and'
      ' rowwise_adagrad would update it whole: read it with'
      " `take_rows(table, rows, self, '<its param name>')`, copied from"
      ' models/fm.py (README.md: Models).'
    )
  return tables


def batch_norms_checked(model: nn.Module) -> contextlib.AbstractContextManager:
  """Within it, the training call of `model` (traced) refuses a BatchNorm
  that `check`'s eval call does not meet: one off the model's `axis_name`
  in training alone, or one built in training alone.

  Raises:
    ContractError: from the call, naming the BatchNorm and what to write.
  """
  axis_name = getattr(model, 'axis_name', None)
  return nn.intercept_methods(_batch_norms(axis_name, [], train=True))


def _batch_norms(axis_name: str | None, unsynced: list, train: bool = False):
  """A method interceptor that lists in `unsynced` each BatchNorm called off
  `axis_name`; in training it refuses the first at once, and a BatchNorm
  without statistics (not built by the eval call of `init`)."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.BatchNorm) and context.method_name == '__call__':
      path = '/'.join(module.scope.path)
      if train and not module.has_variable('batch_stats', 'mean'):
        raise ContractError(
          f'BatchNorm {path} is built in training alone: the trainer'
          ' initialises the model with train=False, which makes no'
          ' statistics (nor scale and bias) for it; build it in both modes,'
          ' as `nn.BatchNorm(use_running_average=not train,'
          ' axis_name=self.axis_name)` (README.md: Models).'
        )
      if module.axis_name != axis_name:
        unsynced.append(f'{path} (axis_name={module.axis_name!r})')
        if train:
          _refuse_unsynced(unsynced, axis_name)
    return next_fun(*args, **kwargs)

  return interceptor


def _refuse_unsynced(unsynced: list, axis_name: str | None) -> None:
  """Refuses the BatchNorms in `unsynced` (off the pmap axis `axis_name`)."""
  if axis_name and unsynced:
    raise ContractError(
      f'BatchNorm {", ".join(sorted(set(unsynced)))} does not average its'
      f' statistics over axis_name={axis_name!r}, so each device would keep'
      ' its own: pass `nn.BatchNorm(..., axis_name=self.axis_name)`'
      ' (README.md: Models).'
    )


def check_logits(logits, batch: int, *, train: bool) -> None:
  """Refuses a model's output other than float32 logits `[batch]` (from
  its shape alone: traced, it costs nothing).

  Raises:
    ContractError: what it returned and what the trainer needs.
  """
  if getattr(logits, 'shape', None) != (batch,) or logits.dtype != jnp.float32:
    got = (
      f'{logits.dtype}{list(logits.shape)}'
      if hasattr(logits, 'shape')
      else repr(logits)
    )
    raise ContractError(
      f'Model(...).apply(ids [{batch}, fields], train={train}) returned'
      f' {got}; the trainer needs float32 logits [{batch}]: one logit per'
      ' example, before the sigmoid; e.g. squeeze a last axis of 1 and end'
      ' with .astype(jnp.float32) (README.md: Models).'
    )


# Primitives whose output is their operand's values rearranged: a table
# read after them is still the parameter.
_VIEWS = frozenset(
  ('convert_element_type', 'reshape', 'squeeze', 'expand_dims', 'copy')
)


def _is_sigmoid(jaxpr, var) -> bool:
  """Whether `jaxpr` makes `var` as a sigmoid: `logistic` (`nn.sigmoid`) or
  `1 / (1 + exp(x))` (`div` or `integer_pow` -1), through views and calls."""
  eqn, jaxpr = _made_by(jaxpr, var)
  name = eqn and eqn.primitive.name
  if name == 'logistic':
    return True
  if name == 'div' and _is_one(eqn.invars[0]):
    eqn, jaxpr = _made_by(jaxpr, eqn.invars[1])
  elif name == 'integer_pow' and eqn.params['y'] == -1:
    eqn, jaxpr = _made_by(jaxpr, eqn.invars[0])
  else:
    return False
  if not eqn or eqn.primitive.name != 'add':
    return False
  one, other = sorted(eqn.invars, key=lambda v: not _is_one(v))
  eqn = _is_one(one) and _made_by(jaxpr, other)[0]
  return bool(eqn) and eqn.primitive.name == 'exp'


def _is_one(v) -> bool:
  return isinstance(v, jax_core.Literal) and bool(np.all(v.val == 1))


def _made_by(jaxpr, var) -> tuple:
  """`(eqn, jaxpr)`: the equation of `jaxpr` or of a call in it that makes
  `var`, seen through views (`_VIEWS`); `(None, None)` for an input or a
  literal."""
  if not isinstance(var, jax_core.Var):
    return None, None
  eqn = next((e for e in jaxpr.eqns if var in e.outvars), None)
  if eqn is None:
    return None, None
  if eqn.primitive.name in _VIEWS:
    return _made_by(jaxpr, eqn.invars[0])
  subs = _calls(eqn)
  if len(subs) == 1:
    sub, operands = subs[0]
    inner = sub.outvars[eqn.outvars.index(var)]
    if isinstance(inner, jax_core.Var) and inner in sub.invars:
      return _made_by(jaxpr, operands[sub.invars.index(inner)])
    return _made_by(sub, inner)
  return eqn, jaxpr


def _read_by_ids(jaxpr, paths: list, inputs: dict) -> list[tuple[str, ...]]:
  """The params paths that `jaxpr` gathers at indices computed from `ids` or
  `multi_ids` (a `gather` or `dynamic_slice`); its inputs are the params
  leaves in `paths`' order, then other variables, then `inputs` by sorted
  key (one leaf each)."""
  invars = jaxpr.invars
  origin = dict(zip(invars[: len(paths)], paths, strict=True))
  names = sorted(inputs)
  tainted = {
    v
    for name, v in zip(names, invars[-len(names) :], strict=True)
    if name in ('ids', 'multi_ids')
  }
  found = []
  _walk(jaxpr, origin, tainted, found)
  return found


def _walk(jaxpr, origin: dict, tainted: set, found: list) -> None:
  """Follows parameters (`origin`: var -> path) and id-derived values
  (`tainted`) through `jaxpr`, nested calls included; appends to `found`
  each path gathered at id-derived indices."""
  for eqn in jaxpr.eqns:
    ins = [v for v in eqn.invars if isinstance(v, jax_core.Var)]
    name = eqn.primitive.name
    if name in ('gather', 'dynamic_slice') and eqn.invars[0] in origin:
      if any(v in tainted for v in ins[1:]):
        found.append(origin[eqn.invars[0]])
    subs = _calls(eqn)
    for sub, operands in subs:
      pairs = [
        (v, w)
        for v, w in zip(operands, sub.invars, strict=True)
        if isinstance(v, jax_core.Var)
      ]
      inner_tainted = {w for v, w in pairs if v in tainted}
      inner_origin = {w: origin[v] for v, w in pairs if v in origin}
      _walk(sub, inner_origin, inner_tainted, found)
      for v, w in zip(eqn.outvars, sub.outvars, strict=True):
        if isinstance(w, jax_core.Var) and w in inner_tainted:
          tainted.add(v)
    if subs:
      continue
    if any(v in tainted for v in ins):
      tainted.update(eqn.outvars)
    if name in _VIEWS and ins and ins[0] in origin:
      origin[eqn.outvars[0]] = origin[ins[0]]


def _calls(eqn) -> list:
  """The jaxprs that `eqn` calls with its operands one to one (jit, custom
  derivatives, each branch of a cond), as `(jaxpr, operands)`; [] for
  others, whose outputs are then taken as depending on all their inputs."""
  inner = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
  if inner is not None:
    subs, operands = [inner], eqn.invars
  else:
    subs, operands = eqn.params.get('branches', ()), eqn.invars[1:]
  subs = [getattr(sub, 'jaxpr', sub) for sub in subs]
  if not subs or any(
    not hasattr(sub, 'eqns')
    or len(sub.invars) != len(operands)
    or len(sub.outvars) != len(eqn.outvars)
    for sub in subs
  ):
    return []
  return [(sub, operands) for sub in subs]
