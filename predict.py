"""Click probabilities of raw rows, from a trained run's workdir alone.

python predict.py --workdir=/tmp/fm --input=ratings.csv --output=out.csv

The input is in the format the run was trained on (a MovieLens ratings file,
Criteo TSV, Avazu CSV, libFM, or CSV/Parquet with a header), with or without
its label column. Rows are encoded with the run's saved encoder (a value
that training did not keep gets its field's out-of-vocabulary id) and scored
by the best checkpoint. The output CSV has a `probability` column, and
`label` when the input has one: one line per input row (blank lines carry no
row), in input order, written beside `--output` and renamed over it at the
end (a killed run's copy is removed by the next); `-` is standard output,
and /dev paths and FIFOs are written in place. The file is read in chunks
of `--chunk_rows` lines, so memory does not grow with it, and each batch is
split over every local device (XLA compiles each batch shape apart, so
`--batch_size` and `--chunk_rows` may move a probability by a float32
ulp). A malformed row stops with its file and line (`--bad_rows=nan`: it
is scored nan, and counted in the log: bad_rows.py). The log counts the
rows with values that training did not keep, per field (many mean a model
out of date), and warns of rows scored NaN (numbers so far outside
training's range that the model overflows). With labels, it also gives the
AUC and logloss, from the logits as training's evaluation (a probability
saturates in float32); logits and labels stay in memory, 5 bytes a row
(about 12 while the metrics are computed, at the end).

A run with multi-hot or numeric fields (CSV `float_columns` and
`multi_hot_columns`, Criteo `numeric='dense'`, MovieLens `side_features`)
reads them from the same rows (MovieLens looks them up by user and movie)
and feeds the model `multi_ids` and `dense` too.

From Python:

  predictor = predict.load('/tmp/fm')
  probabilities = predictor(frame)  # a DataFrame of raw values
  probabilities = predictor.predict_ids(ids)  # [n, fields]; multi_ids, dense
  probabilities, logits = predictor.score_ids(ids)
  unseen = predictor.unseen(ids)  # bool [n, fields]: out-of-vocabulary ids
"""

from collections.abc import Iterator
import errno
import json
import os
from typing import Any

from absl import flags
from absl import logging
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import pandas as pd

import bad_rows as bad_rows_lib
import best_reader
from datasets import core
from datasets import remote
from datasets import side
import encoder as encoder_lib
import entry
import orbax_logs
import predict_output
import train
import utils


class Predictor:
  """The best model of a run and its encoder: raw rows in, probabilities out.

  Batches are split over every local device (a 1-D mesh; the parameters
  are replicated). A batch shorter than `batch_size` is padded to a power
  of two, so any input compiles at most a few shapes.
  """

  def __init__(
    self,
    encoder: encoder_lib.Encoder,
    model: Any,
    variables: dict,
    batch_size: int = 8192,
  ):
    """Places the parameters on every local device.

    Args:
      encoder: the run's encoder.
      model: the flax module, built for `encoder.field_dims`.
      variables: its `params` (and `batch_stats`).
      batch_size: rows per device step (rounded up to the device count).

    Raises:
      ValueError: `batch_size` is below 1.
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be at least 1, got {batch_size}.')
    self.encoder = encoder
    self.model = model
    devices = jax.local_devices()
    self.num_devices = len(devices)
    self.batch_size = -(-batch_size // self.num_devices) * self.num_devices
    mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
    self._rows = NamedSharding(mesh, PartitionSpec('batch'))
    replicated = NamedSharding(mesh, PartitionSpec())
    self.variables = jax.device_put(variables, replicated)
    self._scores = jax.jit(
      lambda variables, inputs: scores(model, variables, **inputs),
      in_shardings=(replicated, self._rows),
      out_shardings=(self._rows, self._rows),
    )
    side = encoder.side
    # The shape after the batch, the padding value and dtype of each input.
    self._inputs = {'ids': ((len(encoder.field_dims),), 0, np.int32)}
    if side.multi_field_names:
      shape = (len(side.multi_field_names), side.max_len)
      self._inputs['multi_ids'] = (shape, -1, np.int32)
    if side.dense_names:
      self._inputs['dense'] = ((len(side.dense_names),), 0, np.float32)

  def _problem(self, name: str, raw: np.ndarray) -> str | None:
    """What is wrong with the values of encoded input `name`, if anything."""
    if name == 'dense':
      with np.errstate(over='ignore'):  # Beyond float32's range: inf.
        problem = side.dense_problem(raw.astype(np.float32))
      return problem and (
        f'{problem} as float32 (inf, nan, or beyond +-{side.FLOAT32_MAX:.4g})'
      )
    if raw.size and raw.dtype.kind not in 'iu':
      return f'ids must be integers, got {raw.dtype}'
    if name == 'multi_ids':
      dims = np.array(self.encoder.side.multi_field_dims, np.int64)
      return side.multi_problem(raw, dims)
    outside = (raw < 0) | (raw >= np.array(self.encoder.field_dims))
    if not outside.any():
      return None
    fields = np.flatnonzero(outside.any(axis=0)).tolist()
    return f'ids outside [0, field_dims) in field(s) {fields}'

  def _padded_size(self, n: int) -> int:
    if n >= self.batch_size:
      return self.batch_size
    size = max(self.num_devices, 1 << max(n - 1, 0).bit_length())
    return min(-(-size // self.num_devices) * self.num_devices, self.batch_size)

  def predict_ids(
    self,
    ids: np.ndarray,
    multi_ids: np.ndarray | None = None,
    dense: np.ndarray | None = None,
  ) -> np.ndarray:
    """Probabilities float32 `[n]` of encoded inputs.

    Args:
      ids: int32 `[n, fields]`.
      multi_ids: int32 `[n, multi_fields, max_len]`, -1 padding; required
        exactly when the run has multi-hot fields.
      dense: float32 `[n, dense_fields]`, standardised; required exactly
        when the run has numeric fields.

    Raises:
      ValueError: see `score_ids`.
    """
    return self.score_ids(ids, multi_ids, dense)[0]

  def score_ids(
    self,
    ids: np.ndarray,
    multi_ids: np.ndarray | None = None,
    dense: np.ndarray | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and logits, float32 `[n]` each, of encoded inputs.

    The logits rank and score rows as training's evaluation does: a
    probability saturates to 0 or 1 in float32 (|logit| above about 17 on
    the side of 1), where rows tie and the logloss is cut.

    Args:
      ids: as `predict_ids`.
      multi_ids: as `predict_ids`.
      dense: as `predict_ids`.

    Raises:
      ValueError: a missing or extra input, a wrong shape, ids that are
        not integers or outside the run's ranges, or a number not finite
        in float32.
    """
    given = {'ids': ids, 'multi_ids': multi_ids, 'dense': dense}
    inputs = {}
    for name, value in given.items():
      if (value is None) != (name not in self._inputs):
        raise ValueError(
          f'{name}: this run takes {", ".join(self._inputs)}; got'
          f' {", ".join(k for k, v in given.items() if v is not None)}.'
        )
      if value is None:
        continue
      shape, _, dtype = self._inputs[name]
      raw = np.asarray(value)
      # What the cast overflows (1e300 to float32: inf; 1e300 or NaN to
      # int32) is refused below from `raw`, without numpy's warnings.
      with np.errstate(over='ignore', invalid='ignore'):
        inputs[name] = raw.astype(dtype, copy=False)
      rows = len(inputs['ids']) if inputs['ids'].ndim else -1
      if inputs[name].shape[1:] != shape or len(inputs[name]) != rows:
        want = ', '.join(str(d) for d in ('n',) + shape)
        raise ValueError(f'{name} must be [{want}], got {np.shape(value)}.')
      if problem := self._problem(name, raw):  # The gathers would clamp.
        raise ValueError(f'{name}: {problem}.')
    n = len(inputs['ids'])
    outs = []
    for start in range(0, n, self.batch_size):  # Dispatch all first.
      size = min(self.batch_size, n - start)
      batch = {}
      for name, value in inputs.items():
        shape, fill, dtype = self._inputs[name]
        padded = np.full((self._padded_size(size),) + shape, fill, dtype)
        padded[:size] = value[start : start + size]
        batch[name] = padded
      placed = jax.device_put(batch, self._rows)
      outs.append((self._scores(self.variables, placed), size))
    if not outs:
      return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return tuple(
      np.concatenate([np.asarray(out[i])[:k] for out, k in outs])
      for i in range(2)
    )

  def __call__(self, frame: pd.DataFrame | dict | list) -> np.ndarray:
    """Probabilities float32 `[n]` of a DataFrame of raw values (or what
    makes one: a dict of columns, a list of dicts of a row's values).

    See `encoder.Encoder.encode` for its columns.
    """
    frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
    try:
      rows = self.encoder.encode(frame)
    except side.OutOfRange as e:
      raise core.DataError(f'DataFrame row {e.row}: {e}') from e
    return self.predict_ids(**rows.inputs())

  def predict_file(
    self,
    path: str,
    chunk_rows: int = 100_000,
    parse_workers: int = -1,
    bad_rows: str = 'error',
  ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """`(probabilities [n], labels [n] or None)` of each chunk of `path`.

    The next chunk is parsed in the background while this one is scored;
    `parse_workers` as `config.dataset.parse_workers`, `bad_rows` as
    `predict_output.write_predictions`' (nan: the label too).

    Raises:
      ValueError: `bad_rows` is not 'error' or 'nan'.
    """
    bad = bad_rows_lib.count(bad_rows)
    chunks = self.score_chunks(path, chunk_rows, parse_workers, bad)
    yield from bad_rows_lib.placed_chunks(chunks, bad)

  def score_chunks(
    self,
    path: str,
    chunk_rows: int,
    parse_workers: int = -1,
    bad: bad_rows_lib.Count | None = None,
  ) -> Iterator[tuple[encoder_lib.Rows, np.ndarray, np.ndarray]]:
    """`(encoded rows, probabilities, logits)` of each chunk of `path`.

    With `bad` (`--bad_rows=nan`), the rows that cannot be encoded are
    counted there instead of stopping, and left out: the encoded rows are
    a `bad_rows.Kept`, whose `bad` says where they were.
    """
    done, args = 0, (path, chunk_rows, parse_workers)  # Rows done before.
    chunks = self.encoder.chunks(*args)
    if bad is not None:
      chunks = bad_rows_lib.chunks(self.encoder, *args, bad)
    try:
      with utils.interrupts_heard():  # A decorator's ends before the loop.
        for rows in utils.prefetch(chunks):
          yield rows, *self.score_ids(**rows.inputs())
          done += len(rows.ids)
    except side.OutOfRange as e:
      row = done + e.row  # Among the file's rows: named by its line.
      where = bad_rows_lib.name_row(self.encoder, path, chunk_rows, row)
      raise core.DataError(f'{where}: {e}') from e

  def unseen(self, ids: np.ndarray) -> np.ndarray:
    """Which `ids` `[n, fields]` are their field's out-of-vocabulary id.

    Such a value was not kept in training (unseen there, or rarer than
    `min_count`); a field without an OOV id is never marked.

    Returns:
      bool `[n, fields]`.
    """
    oov = np.array([-1 if i is None else i for i in self.encoder.oov_ids])
    return np.asarray(ids) == oov

  def unseen_lists(self, multi_ids: np.ndarray) -> np.ndarray:
    """Which lists of `multi_ids` `[n, multi_fields, max_len]` hold a value
    that training did not keep (their field's out-of-vocabulary id).

    Returns:
      bool `[n, multi_fields]`.
    """
    oov = np.array(self.encoder.side.multi_field_dims) - 1  # [M]
    return (np.asarray(multi_ids) == oov[:, None]).any(2)


def scores(
  model: Any,
  variables: dict,
  ids: jax.Array,
  multi_ids: jax.Array | None = None,
  dense: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`(sigmoid(logits), logits)` float32 `[batch]` of `model(ids[,
  multi_ids][, dense])` in inference mode; the inputs as `encoder.Rows`
  holds them."""
  side = {'multi_ids': multi_ids, 'dense': dense}
  side = {k: v for k, v in side.items() if v is not None}
  logits = model.apply(variables, ids, train=False, **side).astype(np.float32)
  return jax.nn.sigmoid(logits), logits


def probabilities(
  model: Any,
  variables: dict,
  ids: jax.Array,
  multi_ids: jax.Array | None = None,
  dense: jax.Array | None = None,
) -> jax.Array:
  """`sigmoid(model(ids[, multi_ids][, dense]))` float32 `[batch]`, in
  inference mode; the inputs as `encoder.Rows` holds them."""
  return scores(model, variables, ids, multi_ids, dense)[0]


@utils.interrupts_heard()  # A Ctrl-C in a gc callback is not lost.
def load(workdir: str, batch_size: int = 8192) -> Predictor:
  """The predictor of the best checkpoint of run `workdir`.

  Raises:
    UserError: `workdir` has no encoder or no readable best checkpoint, or
      is an export (export.py).
  """
  workdir = os.path.expanduser(workdir)  # As main.py's --workdir.
  if os.path.isfile(os.path.join(workdir, 'signature.json')):
    raise utils.UserError(
      f'{workdir} is an export (export.py), not a training run: serve its'
      ' model.jax or model.onnx, or give the workdir of the run it was'
      ' exported from.'
    )
  orbax_logs.quiet_info()
  encoder = encoder_lib.load(workdir)
  model = train.create_model(encoder.model_config(), encoder.field_dims)
  state, meta = best_reader.load_best(workdir)
  variables = {'params': state['params']}
  if state.get('batch_stats'):
    variables['batch_stats'] = state['batch_stats']
  logging.info(
    'Restored the best checkpoint of %s (epoch %s)',
    workdir,
    meta.get('best_epoch', meta.get('epoch')),
  )
  predictor = Predictor(encoder, model, variables, batch_size)
  _check_fits(predictor, state['params'], workdir)
  return predictor


def _check_fits(predictor: Predictor, params: Any, workdir: str) -> None:
  """Refuses parameters that are not the shapes the encoder's model takes.

  Raises:
    UserError: `encoder/` and the checkpoints come from different runs.
  """
  inputs = {
    name: jax.ShapeDtypeStruct((1,) + shape, dtype)
    for name, (shape, _, dtype) in predictor._inputs.items()
  }
  want = jax.eval_shape(
    lambda x: predictor.model.init(jax.random.key(0), **x, train=False),
    inputs,
  )['params']
  got, want = (
    {
      jax.tree_util.keystr(path): np.shape(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    for tree in (params, want)
  )
  if got == want:
    return
  name = next(k for k in [*want, *got] if got.get(k) != want.get(k))
  diff = f'{name} is {got.get(name)}, not {want.get(name)}'
  if _layout(workdir) == 1:  # Same run: its side inputs were not saved.
    raise utils.UserError(
      f'{workdir}/encoder/ was saved by an older version (layout 1), which'
      ' kept no multi-hot or numeric inputs, and its checkpoints take some'
      f" ({diff}): run main.py again with the run's config and"
      f' --workdir={workdir} (no epoch is trained again) to save encoder/ in'
      ' the current layout.'
    )
  raise utils.UserError(
    f'The best checkpoint of {workdir} does not fit its encoder/ ({diff}):'
    ' they come from different runs. Restore the encoder/ of the run that'
    ' saved the checkpoints, or train again.'
  )


def _layout(workdir: str) -> int | None:
  """The layout version of `workdir`'s encoder.json (None: unreadable)."""
  path = os.path.join(workdir, 'encoder.json')
  if not os.path.isfile(path):
    path = os.path.join(workdir, encoder_lib.DIRECTORY, 'encoder.json')
  try:
    with open(path) as f:
      return json.load(f).get('version')
  except (OSError, ValueError, AttributeError):
    return None


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags (not at import: `load` is a library call)."""
  for name, help_ in (
    ('workdir', 'Workdir of a finished training run.'),
    ('input', 'Rows to score, in the run format.'),
    ('output', 'CSV to write: probability[,label]; - for standard output.'),
  ):
    flags.DEFINE_string(name, None, help_, flag_values=values)
  # lower_bound: a value below 1 is a one-line error naming the flag.
  for name, default, help_ in (
    ('batch_size', 8192, 'Rows per step, over all devices.'),
    ('chunk_rows', 100_000, 'Lines read at a time.'),
  ):
    flags.DEFINE_integer(
      name, default, help_, lower_bound=1, flag_values=values
    )
  flags.DEFINE_integer(
    'parse_workers',
    -1,
    'Processes that parse the input beside this one: -1, one per core for'
    ' files of 128 MiB or more; 0, none (config.dataset.parse_workers).',
    lower_bound=-1,
    flag_values=values,
  )
  flags.DEFINE_enum(
    'bad_rows',
    'error',
    bad_rows_lib.MODES,
    'A row that cannot be encoded: error, stop with its file and line; nan,'
    ' score it nan and count such rows in the log.',
    flag_values=values,
  )
  flags.mark_flags_as_required(['workdir', 'input', 'output'], values)


def main(argv):
  if len(argv) > 1:
    raise utils.UserError(f'Unexpected arguments: {" ".join(argv[1:])}')
  args = flags.FLAGS
  workdir, source, output = entry.path_flags('workdir', 'input', 'output')
  if not os.path.isfile(source):
    raise utils.UserError(f'--input: {source} is not a file.')
  if remote.archive_kind(source):  # Else read as text: a tar header's line.
    raise utils.UserError(
      f'--input: {source} is an archive; unpack it (tar xf, unzip) and name'
      ' the file it holds.'
    )
  predict_output.check_output(output, source, workdir)
  predictor = load(workdir, args.batch_size)
  try:
    rows = predict_output.write_predictions(
      predictor,
      source,
      output,
      args.chunk_rows,
      args.parse_workers,
      args.bad_rows,
    )
  except OSError as e:
    mine = (output, os.path.realpath(output))  # Beside a link's file.
    if e.filename and not str(e.filename).startswith(mine):
      raise  # Not the output's.
    todo = 'choose a path in a directory you can write'
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      todo = 'free space on its disk, or write it to another (.gz: gzipped)'
    elif e.errno == errno.EFBIG:  # The file system's or `ulimit -f`'s cap.
      todo = 'a file there cannot be that large: write it to another disk,'
      todo += ' or name it .gz to gzip it'
    raise utils.UserError(
      f'--output: cannot write {output} ({e.strerror or e}); {todo}.'
    ) from e
  logging.info('Wrote %d rows to %s', rows, output)


if __name__ == '__main__':
  define_flags()
  entry.run_main(main)
