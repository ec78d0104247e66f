"""Exports a run's best model for serving: jax.export, ONNX and the encoder.

python export.py --workdir=/tmp/fm --output=/tmp/fm_export
python export.py --workdir=/tmp/fm --output=/tmp/fm_export --platforms=cpu,cuda

writes into the output directory:

- `model.jax`: the inference function serialized with `jax.export`, the
  parameters inside: int32 ids `[batch, fields]` (any batch) in, float32
  probabilities `[batch]` out, for the `--platforms` asked (cpu, cuda, rocm,
  tpu). A process with jax and numpy alone (no flax, no project code) runs
  it:

    import jax
    import numpy as np

    with open('model.jax', 'rb') as f:
      model = jax.export.deserialize(bytearray(f.read()))
    ids = np.array([[0, 3], [5, 1]], np.int32)  # [batch, fields]
    probabilities = np.asarray(model.call(ids))  # float32 [batch]

- `model.onnx`: the same function as ONNX (input `ids`, output
  `probability`, batch dimension `batch`), for onnxruntime. It needs the
  optional converter: `pip install jax2onnx onnxruntime
  "orbax-checkpoint>=0.12.8"` (jax2onnx's newest releases would downgrade
  orbax otherwise; see requirements-dev.txt). Without it, or with
  `--noonnx`, it is left out, and signature.json says why.
- `signature.json`: inputs and outputs, `field_names`, `field_dims`, the
  out-of-vocabulary ids, the model and the files.
- `encoder/`: the run's encoder (encoder.py), to encode raw rows.
"""

from collections.abc import Callable, Sequence
import functools
import importlib.abc
import json
import logging as std_logging
import os
import sys

from absl import flags
from absl import logging
import jax
from jax import lax
import jax.numpy as jnp

import encoder as encoder_lib
import predict
import utils

VERSION = 1
INPUT = 'ids'
OUTPUT = 'probability'
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def ids_spec(num_fields: int) -> jax.ShapeDtypeStruct:
  """int32 ids `[batch, num_fields]`, the batch a symbolic dimension."""
  shape = jax.export.symbolic_shape(f'batch, {num_fields}')
  return jax.ShapeDtypeStruct(shape, jnp.int32)


def inference_function(model, variables: dict) -> Callable:
  """`ids -> probabilities` of `model` with `variables` closed over."""
  return functools.partial(predict.probabilities, model, variables)


def export_jax(
  fn: Callable, num_fields: int, platforms: Sequence[str] = ('cpu',)
) -> bytes:
  """`fn` serialized by `jax.export` for `platforms`, any batch size."""
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
    ids_spec(num_fields)
  )
  return bytes(exported.serialize())


def _inline(jaxpr, consts: Sequence, *args) -> list:
  """Evaluates `jaxpr` with nested calls inlined and integer `rem` rewritten.

  jax2onnx cannot lower an integer remainder with a symbolic batch
  dimension (W&D's hashed crosses take one); `x - (x / y) * y`, with
  truncating division, is the same remainder and lowers. Only functions
  with such a remainder take this path: tracing first, outside jax2onnx,
  turns `jnp.einsum` into `dot_general`s, some of which it lowers to an
  invalid ONNX Einsum (xDeepFM's).
  """
  env = {}

  def read(v):
    return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    params = eqn.params
    inner = params.get('jaxpr', params.get('call_jaxpr'))
    if eqn.primitive.name == 'rem' and jnp.issubdtype(
      eqn.invars[0].aval.dtype, jnp.integer
    ):
      x, y = invals
      outs = [x - lax.div(x, y) * y]
    elif inner is not None and eqn.primitive.name in (
      'pjit',
      'jit',
      'closed_call',
      'custom_jvp_call',
    ):
      closed = getattr(inner, 'jaxpr', inner)
      outs = _inline(closed, getattr(inner, 'consts', ()), *invals)
    else:
      bind_params = eqn.primitive.get_bind_params(params)
      subfuns = []
      if isinstance(bind_params, tuple):  # jax < 0.8: (subfuns, params).
        subfuns, bind_params = bind_params
      outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, value in zip(eqn.outvars, outs, strict=True):
      env[v] = value
  return [read(v) for v in jaxpr.outvars]


def _has_integer_rem(jaxpr) -> bool:
  """Whether `jaxpr` (or one nested in it) takes an integer remainder."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'rem' and jnp.issubdtype(
      eqn.invars[0].aval.dtype, jnp.integer
    ):
      return True
    for value in eqn.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns') and _has_integer_rem(inner):
        return True
  return False


class _SkipPlugins(importlib.abc.MetaPathFinder):
  """Refuses to import jax2onnx's plugins for other libraries.

  jax2onnx imports every plugin module on its first conversion; those of
  its examples and of equinox run and compile JAX code as they load, which
  makes the first export of a process many times slower. A model is traced
  as JAX primitives, which only the `jax` plugins convert.
  """

  SKIPPED = tuple(
    f'jax2onnx.plugins.{tree}' for tree in ('examples', 'equinox', 'dm_pix')
  )

  def find_spec(self, name, path, target=None):
    del path, target
    if name.startswith(self.SKIPPED):
      raise ImportError(f'{name}: not needed to export a model')
    return None


def export_onnx(fn: Callable, num_fields: int) -> bytes:
  """`fn` as an ONNX model (input `ids`, output `probability`).

  Raises:
    ImportError: jax2onnx is not installed.
    Exception: whatever the converter raises for an unsupported model.
  """
  from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top

  spec = ids_spec(num_fields)
  closed = jax.make_jaxpr(fn)(spec)
  traced = fn
  if _has_integer_rem(closed.jaxpr):

    def traced(ids):
      return _inline(closed.jaxpr, closed.consts, ids)[0]

  finder = _SkipPlugins()
  loggers = [std_logging.getLogger(n) for n in ('jax2onnx', 'onnx_ir')]
  levels = [logger.level for logger in loggers]
  sys.meta_path.insert(0, finder)
  try:
    # They log a warning per skipped plugin and per untyped constant.
    for logger in loggers:
      logger.setLevel(std_logging.ERROR)
    proto = to_onnx(
      traced,
      [spec],
      model_name='flax_fm',
      input_names=[INPUT],
      output_names=[OUTPUT],
    )
  finally:
    sys.meta_path.remove(finder)
    for logger, level in zip(loggers, levels, strict=True):
      logger.setLevel(level)
  return proto.SerializeToString()


def _write(path: str, payload: bytes | str) -> None:
  mode = 'wb' if isinstance(payload, bytes) else 'w'
  with open(path + '.tmp', mode) as f:
    f.write(payload)
  os.replace(path + '.tmp', path)


def check_platforms(platforms: Sequence[str]) -> None:
  """Raises a UserError unless `platforms` are known to jax.export."""
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise utils.UserError(
      f'--platforms: {",".join(unknown) or "none"}; choose among'
      f' {",".join(PLATFORMS)}.'
    )


def export(
  predictor: predict.Predictor,
  output: str,
  platforms: Sequence[str] = ('cpu',),
  onnx: bool = True,
) -> dict:
  """Writes model.jax, model.onnx, signature.json and the encoder to `output`.

  Args:
    predictor: the model, its parameters and its encoder.
    output: the directory to write (created).
    platforms: the platforms of model.jax.
    onnx: write model.onnx too.

  Returns:
    The signature, as written to signature.json. Its `onnx_error` says why
    model.onnx is missing, if it is.
  """
  check_platforms(platforms)
  enc = predictor.encoder
  num_fields = len(enc.field_dims)
  variables = jax.device_get(predictor.variables)
  fn = inference_function(predictor.model, variables)
  os.makedirs(output, exist_ok=True)
  serialized = export_jax(fn, num_fields, platforms)
  _write(os.path.join(output, 'model.jax'), serialized)
  files = {'jax': 'model.jax', 'onnx': None, 'encoder': 'encoder'}
  onnx_error = None
  onnx_path = os.path.join(output, 'model.onnx')
  if os.path.exists(onnx_path):
    os.remove(onnx_path)
  if onnx:
    try:
      _write(onnx_path, export_onnx(fn, num_fields))
      files['onnx'] = 'model.onnx'
    except ImportError as e:
      onnx_error = (
        f'the ONNX converter is not installed ({e}); pip install jax2onnx'
        ' onnxruntime "orbax-checkpoint>=0.12.8" (see requirements-dev.txt)'
      )
    except Exception as e:  # pylint: disable=broad-except
      onnx_error = f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
    if onnx_error:
      logging.warning('No model.onnx for %s: %s', enc.model_name, onnx_error)
  enc.write(os.path.join(output, encoder_lib.DIRECTORY))
  signature = {
    'version': VERSION,
    'inputs': [
      {'name': INPUT, 'dtype': 'int32', 'shape': ['batch', num_fields]}
    ],
    'outputs': [{'name': OUTPUT, 'dtype': 'float32', 'shape': ['batch']}],
    'field_names': list(enc.field_names),
    'field_dims': list(enc.field_dims),
    'oov_ids': list(enc.oov_ids),
    'model_name': enc.model_name,
    'model': enc.model,
    'platforms': list(platforms),
    'files': files,
    'onnx_error': onnx_error,
    'jax_version': jax.__version__,
  }
  _write(
    os.path.join(output, 'signature.json'), json.dumps(signature, indent=1)
  )
  return signature


def define_flags() -> None:
  """The command line's flags."""
  flags.DEFINE_string('workdir', None, 'Workdir of a finished training run.')
  flags.DEFINE_string('output', None, 'Directory to write the export to.')
  flags.DEFINE_list(
    'platforms', ['cpu'], f'Platforms of model.jax, among {PLATFORMS}.'
  )
  flags.DEFINE_bool('onnx', True, 'Also write model.onnx (needs jax2onnx).')
  flags.mark_flags_as_required(['workdir', 'output'])


def main(argv):
  if len(argv) > 1:
    raise utils.UserError(f'Unexpected arguments: {" ".join(argv[1:])}')
  args = flags.FLAGS
  check_platforms(args.platforms)
  predictor = predict.load(args.workdir)
  signature = export(predictor, args.output, args.platforms, args.onnx)
  logging.info(
    'Exported %s to %s: %s',
    args.workdir,
    args.output,
    ', '.join(f for f in signature['files'].values() if f),
  )


if __name__ == '__main__':
  define_flags()
  utils.run_main(main)
