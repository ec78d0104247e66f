"""Exports a run's best model for serving: jax.export, ONNX and the encoder.

python export.py --workdir=/tmp/fm --output=/tmp/fm_export
python export.py --workdir=/tmp/fm --output=/tmp/fm_export --platforms=cpu,cuda

writes into the output directory:

- `model.jax`: the inference function serialized with `jax.export`, the
  parameters inside: int32 ids `[batch, fields]` (any batch > 0: a symbolic
  dimension of jax.export is at least 1) in, float32 probabilities
  `[batch]` out, for the `--platforms` asked (cpu, cuda, rocm, tpu). A
  process with jax and numpy alone (no flax, no project code) runs it:

    import jax
    import numpy as np

    with open('model.jax', 'rb') as f:
      model = jax.export.deserialize(bytearray(f.read()))
    ids = np.array([[0, 3], [5, 1]], np.int32)  # [batch, fields]
    probabilities = np.asarray(model.call(ids))  # float32 [batch]

  A run with multi-hot or numeric fields takes them too, in this order:
  `model.call(ids, multi_ids, dense)`, with int32 `multi_ids` `[batch,
  multi_fields, max_len]` (the ids of each list, padded with -1) and
  float32 `dense` `[batch, dense_fields]` (standardised values), each only
  when the run has such fields. A row with an id outside its field's `[0,
  field_dims)` (in `multi_ids`, or -1) gets NaN.

- `model.onnx`: the same function as ONNX (inputs `ids`, and `multi_ids`
  and `dense` when present, output `probability`, batch dimension `batch`),
  for onnxruntime >= 1.18 (opset 21, `onnx_export.OPSET`). It needs the
  optional converter: `pip install jax2onnx onnxruntime
  "orbax-checkpoint>=0.12.8"` (jax2onnx's newest releases would downgrade
  orbax otherwise; see requirements-dev.txt). Without it, with
  `--noonnx`, or when onnxruntime (if installed) cannot run the converted
  model or gets other numbers than the JAX function on sample rows
  (`onnx_export.check`), it is left out, and signature.json says why.
- `signature.json`: inputs (name, dtype, shape) and outputs,
  `field_names`, `field_dims`, the out-of-vocabulary ids, the multi-hot
  and numeric fields (`multi_field_names`, `multi_field_dims`, `max_len`,
  `dense_names`), the model and the files.
- `encoder/`: the run's encoder (encoder.py), to encode raw rows.
"""

from collections.abc import Callable, Sequence
import contextlib
import json
import os
import shutil
import threading
import time
from typing import Any

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import encoder as encoder_lib
import entry
import onnx_export
import predict
import utils

VERSION = 2
INPUT = 'ids'
INPUTS = ('ids', 'multi_ids', 'dense')
OUTPUT = onnx_export.OUTPUT
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
# Weights that model.jax and model.onnx hold: their formats' 2 GiB, less room
# for the program.
MAX_WEIGHT_BYTES = 2**31 - 2**26
# Staged copies this old in an output are a killed export's: no export
# takes an hour.
STALE_S = 3600

# The inputs of an export: int (ids only, the number of fields) or a dict
# {name: shape after the batch}, names among INPUTS in that order.
Inputs = int | dict[str, tuple[int, ...]]


def model_inputs(model, max_len: int = 1) -> dict[str, tuple[int, ...]]:
  """`{name: shape after the batch}` of the inputs that `model` takes."""
  out = {'ids': (len(model.field_dims),)}
  if getattr(model, 'multi_field_dims', ()):
    out['multi_ids'] = (len(model.multi_field_dims), max_len)
  if getattr(model, 'num_dense', 0):
    out['dense'] = (model.num_dense,)
  return out


def _named(inputs: Inputs) -> dict[str, tuple[int, ...]]:
  return {'ids': (inputs,)} if isinstance(inputs, int) else dict(inputs)


def input_specs(inputs: Inputs) -> list[jax.ShapeDtypeStruct]:
  """The specs of `inputs`, sharing one symbolic batch dimension."""
  (batch,) = jax.export.symbolic_shape('batch')
  return [
    jax.ShapeDtypeStruct(
      (batch, *shape), jnp.float32 if name == 'dense' else jnp.int32
    )
    for name, shape in _named(inputs).items()
  ]


def inference_function(
  model, variables: dict, names: Sequence[str] = ('ids',)
) -> Callable:
  """`(*inputs) -> probabilities` of `model`, `variables` closed over.

  Args:
    model: the flax module.
    variables: its variables.
    names: the names of the positional inputs, among INPUTS in that order.
  """
  names = tuple(names)

  def fn(*inputs):
    named = dict(zip(names, inputs, strict=True))
    probabilities = predict.probabilities(model, variables, **named)
    return jnp.where(ids_outside(model, **named) == 0, probabilities, jnp.nan)

  return fn


def ids_outside(
  model, ids: jax.Array, multi_ids: jax.Array | None = None, dense=None
) -> jax.Array:
  """How many of each row's ids are no id of their field: int32 `[batch]`.

  The model would read another field's row for them (a traced array cannot
  raise): the exported function gives such a row NaN. `multi_ids` may be -1
  (padding); `dense` has no range.
  """
  del dense
  dims = np.asarray(model.field_dims, np.int32)
  count = jnp.sum((ids < 0) | (ids >= dims), axis=1, dtype=jnp.int32)
  if multi_ids is not None:
    dims = np.asarray(model.multi_field_dims, np.int32)[:, None]
    bad = (multi_ids < -1) | (multi_ids >= dims)
    count += jnp.sum(bad, axis=(1, 2), dtype=jnp.int32)
  return count


def export_jax(
  fn: Callable, inputs: Inputs, platforms: Sequence[str] = ('cpu',)
) -> bytes:
  """`fn` serialized by `jax.export` for `platforms`, any batch size > 0."""
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
    *input_specs(inputs)
  )
  return bytes(exported.serialize())


def export_onnx(
  fn: Callable, inputs: Inputs, feeds: dict[str, np.ndarray] | None = None
) -> bytes:
  """`fn` as an ONNX model (inputs named as `inputs`, output `probability`),
  checked on `feeds` (`onnx_export.check`) when given.

  Raises:
    ImportError: jax2onnx is not installed.
    Exception: whatever the converter raises for an unsupported model, or
      the check's ValueError.
  """
  return onnx_export.convert(
    fn, input_specs(inputs), list(_named(inputs)), feeds
  )


def sample_inputs(model, inputs: Inputs, rows: int = 8) -> dict:
  """Seeded random inputs of `model`, `{name: [rows, ...]}` as `inputs`."""
  rng = np.random.default_rng(0)
  out = {}
  for name, shape in _named(inputs).items():
    if name == 'dense':
      out[name] = rng.normal(size=(rows, *shape)).astype(np.float32)
      continue
    dims = model.field_dims if name == 'ids' else model.multi_field_dims
    low = 0 if name == 'ids' else -1  # -1 pads a list.
    ids = [rng.integers(low, d, (rows, *shape[1:])) for d in dims]
    out[name] = np.stack(ids, 1).astype(np.int32)
  return out


def _publish(
  output: str, payloads: dict[str, bytes | str], enc: encoder_lib.Encoder
) -> None:
  """Writes `payloads` and `enc` to temporary copies, then renames them.

  The copies sit in `output` (one file system: a rename needs no space),
  named `<name>.tmp-<pid>-<thread>` (each call its own); a failure while
  writing them removes them and leaves `output`'s files as they were. The
  copies then replace the files in order, the encoder's file by file
  (encoder.json last), signature.json last of all. Copies older than
  `STALE_S`, which a killed export left, are removed.
  """
  suffix = f'.tmp-{os.getpid()}-{threading.get_ident()}'
  encoder_dir = os.path.join(output, encoder_lib.DIRECTORY)
  staged_encoder = encoder_dir + suffix
  try:
    for name, payload in payloads.items():
      mode = 'wb' if isinstance(payload, bytes) else 'w'
      with open(os.path.join(output, name + suffix), mode) as f:
        f.write(payload)
    enc.write(staged_encoder)
    os.makedirs(encoder_dir, exist_ok=True)  # Not a file: before any rename.
  except BaseException:
    for name in payloads:
      with contextlib.suppress(OSError):
        os.remove(os.path.join(output, name + suffix))
    shutil.rmtree(staged_encoder, ignore_errors=True)
    raise
  for name in payloads:
    if name != 'signature.json':
      os.replace(
        os.path.join(output, name + suffix), os.path.join(output, name)
      )
  names = sorted(os.listdir(staged_encoder), key=lambda n: n == 'encoder.json')
  for name in names:
    os.replace(
      os.path.join(staged_encoder, name), os.path.join(encoder_dir, name)
    )
  os.rmdir(staged_encoder)
  for name in set(os.listdir(encoder_dir)) - set(names):
    with contextlib.suppress(OSError):  # An earlier encoder's, now unused.
      os.remove(os.path.join(encoder_dir, name))
  name = os.path.join(output, 'signature.json')
  os.replace(name + suffix, name)
  for name in os.listdir(output):  # What a killed export left, long ago.
    path = os.path.join(output, name)
    with contextlib.suppress(OSError):
      if '.tmp-' not in name or time.time() - os.lstat(path).st_mtime < STALE_S:
        continue
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)


def check_size(variables: Any) -> None:
  """Raises a UserError if the weights overflow the exports' 2 GiB.

  model.jax (a flatbuffer) and model.onnx (a protobuf) embed the weights,
  and neither format holds more than 2 GiB.
  """
  size = sum(np.asarray(x).nbytes for x in jax.tree.leaves(variables))
  if size >= MAX_WEIGHT_BYTES:
    raise utils.UserError(
      f'The model has {size / 2**30:.2f} GiB of weights; model.jax and'
      f' model.onnx embed them and hold {MAX_WEIGHT_BYTES / 2**30:.2f} GiB at'
      ' most (2 GiB with the program). Serve it with'
      ' predict.py from the workdir, or train a smaller one (a larger'
      ' config.dataset.min_count or a smaller config.model.embed_dim).'
    )


def check_platforms(platforms: Sequence[str]) -> list[str]:
  """`platforms` once each, empty names dropped (`--platforms=cpu,`).

  Raises:
    UserError: a platform unknown to jax.export, or none.
  """
  platforms = list(dict.fromkeys(p for p in platforms if p))
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise utils.UserError(
      f'--platforms: {",".join(unknown) or "none"}; choose among'
      f' {",".join(PLATFORMS)}.'
    )
  return platforms


def check_output(output: str) -> None:
  """Raises a UserError if `output` is a file, or holds files and is not an
  export.

  An export is written over an earlier one (its signature.json), but not
  among other files: into a training workdir it would mix with the run's
  own encoder, and into any other directory with what is there.
  """
  if os.path.lexists(output) and not os.path.isdir(output):
    raise utils.UserError(
      f'--output: {output} is a file, not a directory; give a new or empty'
      ' directory, or an earlier export to replace.'
    )
  if not os.path.isdir(output):
    return
  # `<name>.tmp-<pid>-<thread>`: another export's copies, being published.
  names = sorted(n for n in os.listdir(output) if '.tmp-' not in n)
  if not names or 'signature.json' in names:
    return
  shown = ', '.join(names[:4]) + (', ...' if len(names) > 4 else '')
  raise utils.UserError(
    f'--output: {output} holds other files ({shown}) and no earlier export;'
    ' give a new or empty directory, or an earlier export to replace.'
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

  Raises:
    UserError: `output` holds files and is not an export (a workdir, say).
  """
  check_platforms(platforms)
  check_output(output)
  enc = predictor.encoder
  inputs = model_inputs(predictor.model, enc.side.max_len)
  variables = jax.device_get(predictor.variables)
  check_size(variables)
  fn = inference_function(predictor.model, variables, tuple(inputs))
  serialized = export_jax(fn, inputs, platforms)
  files = {'jax': 'model.jax', 'onnx': None, 'encoder': 'encoder'}
  onnx_error = onnx_model = None
  if onnx:
    try:
      feeds = sample_inputs(predictor.model, inputs)
      onnx_model = export_onnx(fn, inputs, feeds)
      files['onnx'] = 'model.onnx'
    except ImportError as e:
      onnx_error = (
        f'the ONNX converter is not installed ({e}); pip install jax2onnx'
        ' onnxruntime "orbax-checkpoint>=0.12.8" (see requirements-dev.txt)'
      )
    except Exception as e:  # pylint: disable=broad-except
      lines = str(e).splitlines()  # None: a bare `assert` of jax2onnx's.
      onnx_error = type(e).__name__ + (f': {lines[0][:300]}' if lines else '')
    if onnx_error:
      logging.warning('No model.onnx for %s: %s', enc.model_name, onnx_error)
  else:
    onnx_error = 'not asked for (onnx=False, --noonnx)'
  signature = {
    'version': VERSION,
    'inputs': [
      {
        'name': name,
        'dtype': 'float32' if name == 'dense' else 'int32',
        'shape': ['batch', *shape],
      }
      for name, shape in inputs.items()
    ],
    'outputs': [{'name': OUTPUT, 'dtype': 'float32', 'shape': ['batch']}],
    'field_names': list(enc.field_names),
    'field_dims': list(enc.field_dims),
    'oov_ids': list(enc.oov_ids),
    # multi_ids: the ids of each list, -1 after its values; dense: values
    # standardised with the training split's dense_mean and dense_std.
    'multi_field_names': list(enc.side.multi_field_names),
    'multi_field_dims': list(enc.side.multi_field_dims),
    'max_len': enc.side.max_len,
    'dense_names': list(enc.side.dense_names),
    'model_name': enc.model_name,
    'model': enc.model,
    'platforms': list(platforms),
    'files': files,
    'onnx_error': onnx_error,
    'jax_version': jax.__version__,
  }
  # Every file is ready: each is written beside its place first, so that a
  # disk that fills up leaves an earlier export as it was; then renames
  # alone replace its files, signature.json last (a server reading it sees
  # the files it lists), and a model.onnx it no longer lists goes.
  os.makedirs(output, exist_ok=True)
  payloads = {'model.jax': serialized}
  if onnx_model is not None:
    payloads['model.onnx'] = onnx_model
  payloads['signature.json'] = json.dumps(signature, indent=1)
  _publish(output, payloads, enc)
  onnx_path = os.path.join(output, 'model.onnx')
  if onnx_model is None and os.path.exists(onnx_path):
    os.remove(onnx_path)
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
  platforms = check_platforms(args.platforms)
  workdir, output = entry.path_flags('workdir', 'output')
  predictor = predict.load(workdir)
  try:
    signature = export(predictor, output, platforms, args.onnx)
  except OSError as e:
    raise utils.UserError(
      f'--output: cannot write {e.filename or output} ({e.strerror or e});'
      ' choose a directory you can write.'
    ) from e
  logging.info(
    'Exported %s to %s: %s',
    workdir,
    output,
    ', '.join(f for f in signature['files'].values() if f),
  )


if __name__ == '__main__':
  define_flags()
  entry.run_main(main)
