"""Your own CSV (or Parquet) file: a 0/1 label column and feature columns.

The header names the columns. Categorical columns are encoded like Criteo's
(a field each); numeric columns hold integers, bucketed as Criteo's by
default. Values may be quoted. A file ending in `.parquet` or `.pq` is read
in record batches with pyarrow.
"""

from collections.abc import Iterator, Sequence
import dataclasses

import ml_collections

from datasets import core
from datasets import encode
from datasets import text
import utils

NAMES = ('csv',)
MIN_COUNT = 1
DEFAULTS = {
  # The 0/1 label column (required).
  'label_column': '',
  # Integer columns (bucketed as criteo's when log_bucket).
  'numeric_columns': (),
  # Categorical columns; empty: every column but the label and numeric ones.
  'categorical_columns': (),
  'sep': ',',
  # Integers v > 2 of numeric columns become int(log(v)**2).
  'log_bucket': True,
}


def column_list(value: str | Sequence[str]) -> tuple[str, ...]:
  """Column names of a config value: `('a', 'b')`, or `'a,b'` from a flag."""
  if isinstance(value, str):
    value = (value,)
  return tuple(
    name.strip() for item in value for name in item.split(',') if name.strip()
  )


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


@dataclasses.dataclass(frozen=True)
class ParquetTable(text.Table):
  """A Parquet file, its record batches read as CSV lines of `columns`."""

  def line_batches(self, path: str, chunk_rows: int) -> Iterator[list[bytes]]:
    columns = list(self.columns)
    batches = _parquet_file(path).iter_batches(
      batch_size=chunk_rows, columns=columns
    )
    for batch in batches:
      frame = batch.to_pandas()[columns]
      csv_text = frame.to_csv(header=False, index=False, lineterminator='\n')
      yield [line + b'\n' for line in csv_text.encode().split(b'\n')[:-1]]


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
  sep = options.sep or ','
  if _is_parquet(path):
    header = list(_parquet_file(path).schema_arrow.names)
  else:
    f, raw = utils.open_binary(path)
    with raw, f:
      first = f.readline()
    if not first.strip():
      raise core.DataError(
        f'{path}:1: expected a header line with column names'
      )
    header = [c.strip() for c in text.split_line(first, sep, True)]
  return table(options, header, path, require_label)


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
  sep = options.sep or ','
  header = list(header)
  unlabeled = not require_label and label not in header
  if unlabeled:
    header.append(label)  # Checked, then dropped below.
  for key in ('label_column', 'categorical_columns', 'numeric_columns'):
    for column in column_list(options[key]):
      if column not in header:
        raise core.DataError(
          f'config.dataset.csv.{key}: column {column!r} is not in the header'
          f' of {path}: {", ".join(header)}.'
        )
  numeric = column_list(options.numeric_columns)
  categorical = column_list(options.categorical_columns) or tuple(
    c for c in header if c != label and c not in numeric
  )
  both = set(numeric) & set(categorical) | {label} & (
    set(numeric) | set(categorical)
  )
  if both:
    raise core.DataError(
      f'config.dataset.csv: column(s) {sorted(both)} named twice among'
      ' label_column, numeric_columns and categorical_columns.'
    )
  fields = tuple(
    text.Field(c, c, 'int' if c in numeric else 'cat')
    for c in header
    if c in numeric or c in categorical
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
  )
  if _is_parquet(path):
    # Record batches come back as CSV text of just the used columns.
    columns = (label, *(field.column for field in fields))
    out = ParquetTable(**dict(layout, columns=columns, sep=',', header=False))
  else:
    out = text.Table(**layout)
  return out.without_label() if unlabeled else out


files = encode.source_files
build = encode.build_from(reader)
