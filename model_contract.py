"""The model contract of DESIGN.md 2, checked when a run builds its model.

A model file that breaks the contract is refused at start-up with a
`ValueError` that says what to write (the trainer turns it into one line
naming the file), not with a traceback from inside the trainer.
"""

import dataclasses
import importlib

import flax.linen as nn
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
