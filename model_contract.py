"""The model contract of DESIGN.md 2, checked when a run builds its model.

A model file that breaks the contract would otherwise train wrongly and say
nothing: logits `[batch, 1]` broadcast against labels `[batch]` into a
`[batch, batch]` loss, a BatchNorm without the pmap axis keeps each
device's own statistics. `create_model` and `check` refuse such a file at
start-up with a `ValueError` that says what to write (the trainer turns it
into one line naming the file); they read only shapes, so nothing runs.
"""

import dataclasses
import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import models

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
      ' linen module (DESIGN.md 2; see models/fm.py);'
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
    ValueError: the file has no `Model`, or its `Model` lacks an argument
      that the trainer or the dataset's inputs (`inputs`) pass.
  """
  model = model_class(config.model_name)
  fields = {f.name for f in dataclasses.fields(model)}
  missing = [
    key
    for key in ('field_dims', 'axis_name', *inputs)
    if key in _DECLARATIONS and key not in fields
  ]
  if missing:
    why = ' (the dataset has multi-hot or numeric fields)' if inputs else ''
    raise ValueError(
      f'Model has no argument {" or ".join(missing)}, which the trainer'
      f' passes{why}: declare'
      f' {" and ".join(f"`{_DECLARATIONS[k]}`" for k in missing)} and use'
      f' {"it" if len(missing) == 1 else "them"} as models/fm.py does'
      ' (DESIGN.md 2).'
    )
  return model(
    field_dims=tuple(field_dims), axis_name=axis_name, **config.model, **inputs
  )


def check(model: nn.Module, variables, inputs: dict) -> None:
  """Refuses a model whose call breaks the contract, from shapes alone.

  In both modes the output must be float32 logits `[batch]`, and in
  training mode every BatchNorm must average its statistics over the
  model's `axis_name` (when it has one).

  Args:
    model: the model, as the trainer builds it.
    variables: the shapes of its variables (`params`, `batch_stats`).
    inputs: keyword inputs of one call (`batching.example_inputs`).

  Raises:
    ValueError: what breaks the contract and what to write instead.
  """
  batch = len(inputs['ids'])
  axis_name = getattr(model, 'axis_name', None)
  unsynced = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
      isinstance(module, nn.BatchNorm)
      and context.method_name == '__call__'
      and module.axis_name != axis_name
    ):
      path = '/'.join(module.scope.path)
      unsynced.append(f'{path} (axis_name={module.axis_name!r})')
    return next_fun(*args, **kwargs)

  def call(variables, train):
    rngs = {'dropout': jax.random.key(0)}
    with nn.intercept_methods(interceptor):
      out = model.apply(
        variables, train=train, rngs=rngs, mutable=['batch_stats'], **inputs
      )
    return out[0]

  axis_env = [(axis_name, 1)] if axis_name else []
  for train in (False, True):
    trace = jax.make_jaxpr(
      functools.partial(call, train=train),
      axis_env=axis_env,
      return_shape=True,
    )
    _, out = trace(variables)
    if getattr(out, 'shape', None) != (batch,) or out.dtype != jnp.float32:
      got = (
        f'{out.dtype}{list(out.shape)}' if hasattr(out, 'shape') else repr(out)
      )
      raise ValueError(
        f'Model(...).apply(ids [{batch}, fields], train={train}) returned'
        f' {got}; the trainer needs float32 logits [{batch}] (DESIGN.md 2:'
        ' one logit per example, before the sigmoid; e.g. squeeze a last'
        ' axis of 1 and end with .astype(jnp.float32)).'
      )
  if axis_name and unsynced:
    raise ValueError(
      f'BatchNorm {", ".join(sorted(set(unsynced)))} does not average its'
      f' statistics over axis_name={axis_name!r}, so each device would keep'
      ' its own: pass `nn.BatchNorm(..., axis_name=self.axis_name)`'
      ' (DESIGN.md 2).'
    )
