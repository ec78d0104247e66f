"""Your own CSV (or Parquet) file: a 0/1 label column and feature columns.

A label may also be True or False, in any letter case (pandas' `to_csv` of
a bool column), or a Parquet boolean: 1 or 0.

The header names the columns. Categorical columns are encoded like Criteo's
(a field each); numeric columns hold integers, bucketed as Criteo's by
default. Values may be quoted. A file ending in `.parquet` or `.pq` is read
in record batches with pyarrow.

Two more kinds of column feed the model other inputs than one id:

- `float_columns`: numbers, each a numeric field (`dense`), standardised
  with the mean and standard deviation of the training split's values
  (kept in the cache's meta.json). An empty or NaN cell is missing and
  becomes 0 after standardisation, i.e. the training mean; a value that is
  not a number (or is infinite, or beyond float32's range) is a malformed
  line.
- `multi_hot_columns`: lists of categorical values separated by
  `multi_hot_sep` (`horror|drama`), each a multi-hot field (`multi_ids`)
  with its own vocabulary: values seen fewer than `min_count` times share
  an out-of-vocabulary id, as in a categorical field. Values are stripped,
  empty ones dropped (an empty cell is an empty list); a list longer than
  `multi_hot_max_len` keeps its first `multi_hot_max_len` values. A
  Parquet (or DataFrame) list cell holds the values themselves, none of
  which may hold `multi_hot_sep`.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
import csv as csv_lib
import dataclasses
import math
from typing import TYPE_CHECKING

import ml_collections
import numpy as np

from datasets import core
from datasets import encode
from datasets import keying
from datasets import text
import utils

if TYPE_CHECKING:
  import pandas as pd

NAMES = ('csv',)
MIN_COUNT = 1
DEFAULTS = {
  # The 0/1 (or True/False) label column (required).
  'label_column': '',
  # Integer columns (bucketed as criteo's when log_bucket).
  'numeric_columns': (),
  # Categorical columns; empty: every column but the label and numeric ones.
  'categorical_columns': (),
  'sep': ',',
  # Integers v > 2 of numeric columns become int(log(v)**2).
  'log_bucket': True,
  # Number columns fed as standardised values; empty or NaN: the mean.
  'float_columns': (),
  # Columns of value lists, e.g. 'horror|drama', one multi-hot field each.
  'multi_hot_columns': (),
  'multi_hot_sep': '|',
  # A longer list keeps its first multi_hot_max_len values.
  'multi_hot_max_len': 16,
}

# Column names of a config value: `('a', 'b')`, or `'a,b'` from a flag.
column_list = core.name_list

# The keys of config.dataset.csv that name columns: one, then lists of them
# (data.resolve splits a flag's 'a,b' into names).
NAME_LISTS = (
  *('categorical_columns', 'numeric_columns'),
  *('float_columns', 'multi_hot_columns'),
)
COLUMN_KEYS = ('label_column', *NAME_LISTS)


# What config.dataset.csv.sep must be (config_check.py says the same).
SEP_RULE = (
  'a string of one character other than a quote or a newline, e.g. "," or'
  ' ";" or a tab (also written \\t)'
)


def separator(options: ml_collections.ConfigDict) -> str:
  """`config.dataset.csv.sep`: one character; a typed `\\t` is a tab."""
  sep = options.get('sep') or ','
  sep = '\t' if sep == '\\t' else sep
  if not isinstance(sep, str) or len(sep) != 1 or sep in '"\r\n':
    raise core.DataError(f'config.dataset.csv.sep={sep!r} must be {SEP_RULE}.')
  return sep


def _is_parquet(path: str) -> bool:
  return path.lower().endswith(('.parquet', '.pq'))


def _parquet_file(path: str):
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise core.DataError(
      f'{path}: reading Parquet needs pyarrow (pip install pyarrow).'
    ) from e
  return pq.ParquetFile(path)


def rows_of(body: bytes) -> list[bytes]:
  """The rows of CSV text that pandas' `to_csv` wrote.

  A row whose quoted value holds a newline is one row: quotes come in pairs
  in a row (`""` inside a quoted value), so a line ends a row when the
  quotes so far are even. With `lineterminator='\\r\\n'` every value
  with a CR or LF is quoted: a CR at the end of a value is kept.
  """
  lines = [line + b'\n' for line in body.split(b'\n')[:-1]]
  if b'"' not in body:
    return lines
  rows, row = [], b''
  for line in lines:
    row += line
    if not row.count(b'"') % 2:
      rows.append(row)
      row = b''
  return rows


def frame_rows(
  frame: pd.DataFrame, sep: str, quoting: bool, source: str
) -> list[bytes]:
  """The rows of `frame` as lines of text, its values separated by `sep`.

  With `quoting` (CSV), a value with a newline, a CR or a quote is quoted
  (its row is one row, see `rows_of`). Without it, a value holding a
  newline or `sep` is a DataError naming its row and column: a `source`
  row cannot carry it.
  """
  if quoting:
    body = frame.to_csv(
      sep=sep, header=False, index=False, lineterminator='\r\n'
    )
    return rows_of(body.encode())
  try:
    body = frame.to_csv(
      sep=sep,
      header=False,
      index=False,
      lineterminator='\n',
      quoting=csv_lib.QUOTE_NONE,
    )
  except csv_lib.Error as e:  # Need to escape: find the first such value.
    cells = frame.astype(str).to_numpy(str)
    bad = (np.char.find(cells, sep) >= 0) | (np.char.find(cells, '\n') >= 0)
    if not bad.any():
      raise core.DataError(f'The DataFrame: {e}') from e
    row, column = (int(i) for i in np.argwhere(bad)[0])
    value = cells[row, column]
    what = 'a newline' if '\n' in value else f'the separator {sep!r}'
    raise core.DataError(
      f'DataFrame row {row}: column {frame.columns[column]}'
      f' {core.shown(value)} holds {what}, which a {source} row cannot'
      ' carry; remove it from the value.'
    ) from None
  return [line + b'\n' for line in body.encode().split(b'\n')[:-1]]


def integral(column: pd.Series) -> pd.Series:
  """A float column of whole numbers (NaN: missing) as nullable integers.

  pandas turns an integer column with a missing value into floats, written
  `3.0`, which the integer parsers reject.
  """
  if column.dtype.kind != 'f':
    return column
  values = column.to_numpy()
  present = values[~np.isnan(values)]  # inf: left a float, which fails parsing.
  if np.all(present == np.round(present)) and np.all(
    np.abs(present) < keying.INT_LIMIT
  ):
    return column.astype('Int64')
  return column


@dataclasses.dataclass(frozen=True)
class ParquetTable(text.Table):
  """A Parquet file, its record batches read as CSV rows of `columns`."""

  def line_batches(self, path: str, chunk_rows: int) -> Iterator[list[bytes]]:
    columns = list(self.columns)
    multi = [f.column for f in self.fields if f.kind == 'multi']
    batches = _parquet_file(path).iter_batches(
      batch_size=chunk_rows, columns=columns
    )
    first = 1  # The rows' numbers, as datasets/streaming.py gives them.
    for batch in batches:
      # An integer column with a null stays integers (pandas would make it
      # floats, written `1.0` in this batch and `1` in the next), and a list
      # column holds a multi-hot field's values.
      frame = batch.to_pandas(integer_object_nulls=True)[columns]
      frame = joined_lists(frame, multi, self.multi_sep, f'{path}:', first)
      first += len(frame)
      if self.label and _is_boolean(batch.schema.field(self.label).type):
        # True/False as 1/0 (a null stays a missing label), as a DataFrame's.
        frame[self.label] = frame[self.label].astype('boolean').astype('Int64')
      yield frame_rows(frame, ',', True, 'CSV')


def _is_boolean(kind) -> bool:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top

  return pa.types.is_boolean(kind)


def _missing(value) -> bool:
  import pandas as pd  # pylint: disable=g-import-not-at-top

  return pd.api.types.is_scalar(value) and bool(pd.isna(value))


# What a multi-hot cell holds as a list.
LISTS = (list, tuple, np.ndarray)


def joined_lists(
  frame: pd.DataFrame,
  columns: Sequence[str],
  sep: str,
  where: str = 'DataFrame',
  first_row: int = 0,
) -> pd.DataFrame:
  """`frame` with the list cells of multi-hot `columns` joined by `sep`.

  A missing value in a list (None, NaN) is dropped, as an empty value
  between two separators of a text cell is.

  Raises:
    DataError: a value in a list holds `sep`, and joined would be split
      there; the message names it, its column and `{where} row {n}`,
      the frame's rows numbered from `first_row`.
  """
  columns = [c for c in columns if c in frame.columns]

  def join(cell):
    if not isinstance(cell, LISTS):
      return cell
    values = [str(v) for v in cell if not _missing(v)]
    if held := [v for v in values if sep in v]:
      raise _SeparatorInList(held[0])
    return sep.join(values)

  joined = {}
  for c in columns:
    try:
      joined[c] = frame[c].map(join)
    except _SeparatorInList as e:
      value = e.args[0]  # Its row: the first list that holds it.
      row = next(
        i
        for i, cell in enumerate(frame[c])
        if isinstance(cell, LISTS) and value in map(str, cell)
      )
      raise core.DataError(
        f'{where} row {first_row + row}: column {c} holds a list with the'
        f' value {core.shown(value)}, which holds the multi-hot separator'
        f' {sep!r} and would be read as {len(value.split(sep))} values.'
        f' Remove {sep!r} from the value, or train with a'
        ' config.dataset.csv.multi_hot_sep that no value holds.'
      ) from None
  return frame.assign(**joined)


class _SeparatorInList(Exception):
  """A multi-hot list's value holds the separator (`joined_lists`)."""


def reader(
  options: ml_collections.ConfigDict, path: str, require_label: bool = True
) -> text.Table:
  """The table of one CSV (or Parquet) file, from its header.

  Args:
    options: `config.dataset.csv`.
    path: the file.
    require_label: False accepts a file without the label column (rows to
      predict); its table has no label.
  """
  sep = separator(options)
  schema = None
  if _is_parquet(path):
    schema = _parquet_file(path).schema_arrow
    header = list(schema.names)
  else:
    f, raw = utils.open_binary(path)
    with raw, f:
      first = f.readline()
    if not first.strip():
      raise core.DataError(
        f'{path}:1: expected a header line with column names'
      )
    if b'\r' in first.rstrip(b'\r\n'):
      raise core.DataError(
        f'{path}:1: a carriage return (CR) inside the header line: lines must'
        ' end with LF or CRLF. Convert the file (e.g. with mac2unix).'
      )
    if text.quoted_columns(first, sep) is None:
      raise core.DataError(
        f'{path}:1: a quoted column name is not closed on the header line.'
      )
    header = [c.strip() for c in text.split_line(first, sep, True)]
    _check_unique(header, f'{path}:1')
  out = table(options, header, path, require_label)
  if schema is not None:
    _check_list_columns(out, schema, path)
  return out


def _check_list_columns(out: text.Table, schema, path: str) -> None:
  """Refuses a Parquet list column read as anything but a multi-hot field.

  Any other field would key each list's printed array (`['a' 'b']`) as
  one value.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top

  lists = (pa.types.is_list, pa.types.is_large_list)
  lists += (pa.types.is_fixed_size_list,)
  for field in out.fields:
    kind = schema.field(field.column).type
    if field.kind != 'multi' and any(is_list(kind) for is_list in lists):
      raise core.DataError(
        f'{path}: column {field.column} holds lists, which only a multi-hot'
        ' field reads: name it in config.dataset.csv.multi_hot_columns, or'
        ' leave it out of categorical_columns (empty: every other column).'
      )


def _separator_hint(header: Sequence[str], sep: str) -> str:
  """Why a header of one column may lack a column: another separator."""
  if len(header) == 1:
    for other in (',', '\t', ';', '|', ' '):
      if other != sep and other in header[0]:
        return (
          f' The header is one column, with {other!r} in it: is the file'
          f' {other!r}-separated? config.dataset.csv.sep is {sep!r}.'
        )
  return ''


def _values_hint(header: Sequence[str]) -> str:
  """Why a header may lack a column: it is a row of values, no header."""
  for name in header:
    try:
      number = float(name)
    except (TypeError, ValueError):  # A name (or a DataFrame's int label).
      continue
    if isinstance(name, str) and math.isfinite(number):  # Not 'nan', 'inf'.
      return (
        f' {name!r} in the header is a number: is the first line a row of'
        ' values? Put a line naming the columns first.'
      )
  return ''


def _check_unique(header: Sequence[str], where: str) -> None:
  counts = collections.Counter(header)
  twice = [c for c in header if counts[c] > 1]
  if twice:
    raise core.DataError(
      f'{where}: column {twice[0]!r} appears twice in the header'
      f' ({", ".join(header)}); rename one of them.'
    )


def table(
  options: ml_collections.ConfigDict,
  header: Sequence[str],
  path: str,
  require_label: bool = True,
) -> text.Table:
  """The table of a file (or data frame) `path` whose columns are `header`.

  See `reader`.
  """
  label = options.label_column
  if not label:
    raise core.DataError(
      'config.dataset.csv.label_column: name the 0/1 label column of the CSV.'
    )
  sep = separator(options)
  given = list(header)
  _check_unique(given, path)
  unlabeled = not require_label and label not in given
  header = given + [label] if unlabeled else given  # Checked, dropped below.
  for key in COLUMN_KEYS:
    for column in column_list(options.get(key, ())):
      if column not in header and not require_label:  # Rows to predict.
        raise core.DataError(
          f'{path}: no column {column!r}, which the model reads (its'
          f' config.dataset.csv.{key}); the columns:'
          f' {", ".join(given) or "none"}.'
          ' Add it; an empty cell is '
          + {
            'float_columns': 'a missing number (the training mean).',
            'multi_hot_columns': 'an empty list.',
          }.get(key, 'a value training did not see.')
          + _separator_hint(given, sep)
          + _values_hint(given)
        )
      if column not in header:
        raise core.DataError(
          f'config.dataset.csv.{key}: column {column!r} is not in the header'
          f' of {path}: {", ".join(given)}.'
          + _separator_hint(given, sep)
          + _values_hint(given)
        )
  kinds = {'int': column_list(options.numeric_columns)}
  kinds['float'] = column_list(options.get('float_columns', ()))
  kinds['multi'] = column_list(options.get('multi_hot_columns', ()))
  named = [label, *(c for columns in kinds.values() for c in columns)]
  kinds['cat'] = column_list(options.categorical_columns) or tuple(
    c for c in header if c not in named
  )
  named += kinds['cat']
  twice = sorted({c for c in named if named.count(c) > 1})
  if twice:
    raise core.DataError(
      f'config.dataset.csv: column(s) {twice} named twice among'
      f' {", ".join(COLUMN_KEYS)}.'
    )
  sep_multi = options.get('multi_hot_sep', '|')
  if kinds['multi'] and (not sep_multi or sep_multi == sep):
    raise core.DataError(
      f'config.dataset.csv.multi_hot_sep={sep_multi!r} must be a non-empty'
      f' separator other than the column separator {sep!r}.'
    )
  kind_of = {c: kind for kind, columns in kinds.items() for c in columns}
  fields = tuple(
    text.Field(c, c, kind_of[c]) for c in header if c in kind_of and c != label
  )
  if not fields:
    raise core.DataError(f'{path}: no feature columns besides the label.')
  layout = dict(
    columns=tuple(header),
    label=label,
    fields=fields,
    sep=sep,
    quoting=True,
    log_bucket=options.log_bucket,
    hint=f'{sep!r}-separated, header of {path}',
    header=True,
    multi_sep=sep_multi,
    max_len=options.get('multi_hot_max_len', 16),
  )
  if _is_parquet(path):
    # Record batches come back as CSV text of just the used columns.
    columns = (label, *(field.column for field in fields))
    out = ParquetTable(**dict(layout, columns=columns, sep=',', header=False))
  else:
    out = text.Table(**layout)
  return out.without_label() if unlabeled else out


files = encode.source_files


def build(
  config: ml_collections.ConfigDict,
  options: ml_collections.ConfigDict,
  paths: dict[str, str],
) -> core.Encoded:
  """`encode.build_from(reader)`'s, each file's fields in the training's order.

  Columns are read by name, so a validation or test file may hold the same
  ones in another order (another tool's export), as rows to predict may.
  """
  train = reader(options, paths.get('train', paths.get('all')))
  order = {field.name: k for k, field in enumerate(train.fields)}

  def read(path: str) -> text.Table:
    out = reader(options, path)
    if sorted(order) == sorted(field.name for field in out.fields):
      fields = sorted(out.fields, key=lambda field: order[field.name])
      out = dataclasses.replace(out, fields=tuple(fields))
    return out

  return encode.encode(config, paths, read)
