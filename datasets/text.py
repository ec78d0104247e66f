"""Delimited text files (Criteo, Avazu, CSV): columns to int64 keys per field.

Every value becomes an int64 key (datasets/keying.py), so that counting and
encoding (datasets/encode.py) never hold strings. A multi-hot column holds
a list of categorical values (`a|b|c`), each keyed as a categorical string;
a float column stays a number (`core.Side`). A label is 0 or 1 (-1: 0), or
True or False in any case (pandas' `to_csv` of a bool column). A line is one
row: a line that is not (wrong columns, an unclosed quote, bytes that are not
UTF-8, a value that does not parse) is a bad line, named by its file and
number.
"""

from __future__ import annotations

from collections.abc import Callable
import csv
import dataclasses
import io
import re
from typing import TYPE_CHECKING

import numpy as np

from datasets import core
from datasets import keying
from datasets import labels
from datasets import side

if TYPE_CHECKING:
  import pandas as pd


def _fit_field_limit(text: str) -> None:
  """Lets Python's csv module read a field as long as `text` (its default
  limit, 128 KiB, is not pandas'): the limit only ever grows."""
  if len(text) >= csv.field_size_limit():
    csv.field_size_limit(len(text) + 1)


def split_line(line: bytes, sep: str, quoting: bool) -> list[str]:
  text = line.decode('utf-8-sig', 'replace').rstrip('\r\n')
  if quoting:
    _fit_field_limit(text)
    return next(csv.reader([text], delimiter=sep))
  return text.split(sep)


def quoted_columns(line: bytes, sep: str) -> int | None:
  """Columns of a CSV line as pandas reads them; None: a quote stays open.

  A quote opens a quoted field only at the start of a field (elsewhere it
  is data), as in pandas and Python's csv module.
  """
  text = line.decode('utf-8', 'replace').rstrip('\r\n').replace('\r', ' ')
  _fit_field_limit(text)
  rows = csv.reader([text, ''], delimiter=sep)
  found = len(next(rows))
  return None if rows.line_num > 1 else found


def _not_utf8(line: bytes) -> str | None:
  """Why `line` is not UTF-8 text; None if it is.

  Undecodable bytes are not read as a replacement character: values that
  differ only in them (Latin-1's `ä` and `ö`) would share an id.
  """
  try:
    line.decode('utf-8')
  except UnicodeDecodeError as e:
    return (
      f'byte {line[e.start]:#04x} at column {e.start + 1} is not UTF-8:'
      ' convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)'
    )
  return None


def _written_int(cell: str, value):
  """The integer written in `cell` if it is one in range, else `value`."""
  if (
    re.fullmatch(r'\s*[+-]?[0-9]+\s*', cell)
    and abs(int(cell)) < keying.INT_LIMIT
  ):
    return int(cell)
  return value


@dataclasses.dataclass(frozen=True)
class Field:
  """One field of a table and the column it is made from.

  Attributes:
    name: the field's name.
    column: its source column.
    kind: 'cat' (a string), 'int' (an integer, bucketed when the table's
      `log_bucket`), 'derived' (an integer turned into keys by `derive`),
      'multi' (a list of strings split at the table's `multi_sep`: a
      multi-hot field) or 'float' (a number: a numeric field).
    derive: int64 values `[n]` -> (int64 keys `[n]`, bool valid `[n]`).
    expects: what a valid value of a derived field looks like (messages).
    transform: float64 values `[n]` -> the values a 'float' field keeps
      (e.g. Criteo's `log(1 + max(x, 0))`); None keeps them.
  """

  name: str
  column: str
  kind: str = 'cat'
  derive: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
  expects: str = ''
  transform: Callable[[np.ndarray], np.ndarray] | None = None


# Kinds of the fields that are not one-hot ids.
SIDE_KINDS = ('multi', 'float')

# Cells of a float column that are a missing value.
FLOAT_MISSING = ('', 'nan', 'NaN', 'NAN', 'Nan')
BEYOND_FLOAT32 = f'beyond float32 range (+-{side.FLOAT32_MAX:.4g})'

# What a label may be (messages).
LABELS = '0 or 1 (or -1, True, False)'


@dataclasses.dataclass(frozen=True)
class Table:
  """A delimited text layout: its columns and the fields made from them.

  Attributes:
    columns: every column of a line, in order.
    label: the 0/1 label column; '' for rows without one (prediction
      input), whose labels are then NaN.
    fields: the fields, in order.
    sep: column separator.
    quoting: whether fields may be quoted (generic CSV; never Criteo/Avazu).
    log_bucket: bucket 'int' fields as pytorch-fm's Criteo loader.
    hint: what the columns are, for error messages.
    header: whether files start with a header line (None: when the first
      field of the first line is the first column's name).
    multi_sep: separator of the values of a 'multi' field's list.
    max_len: a longer list keeps its first `max_len` values.
    scored: rows to score (`for_rows`), which may lack the label.
  """

  columns: tuple[str, ...]
  label: str
  fields: tuple[Field, ...]
  sep: str
  quoting: bool
  log_bucket: bool
  hint: str
  header: bool | None
  multi_sep: str = '|'
  max_len: int = 16
  scored: bool = False

  @property
  def field_names(self) -> tuple[str, ...]:
    """The one-hot fields' names."""
    return tuple(f.name for f in self.fields if f.kind not in SIDE_KINDS)

  @property
  def multi_field_names(self) -> tuple[str, ...]:
    return tuple(f.name for f in self.fields if f.kind == 'multi')

  @property
  def dense_names(self) -> tuple[str, ...]:
    return tuple(f.name for f in self.fields if f.kind == 'float')

  def without_label(self) -> Table:
    """The same layout without its label column (rows to predict)."""
    columns = tuple(c for c in self.columns if c != self.label)
    return dataclasses.replace(self, columns=columns, label='')

  def for_rows(self, first_line: bytes) -> Table:
    """This table, or `without_label()` if `first_line` lacks the label.

    A header names its columns; a line of data without the label column
    has one column less (a later line's column error then names the choice).
    """
    names = [c.strip() for c in split_line(first_line, self.sep, self.quoting)]
    table, n = dataclasses.replace(self, scored=True), len(names)
    if self.header or (self.header is None and names[0] == self.columns[0]):
      labeled = self.label in names
    else:
      labeled = n != len(self.columns) - 1
      if self.label and n in (len(self.columns) - 1, len(self.columns)):
        how = 'with' if labeled else 'without'
        hint = f'{self.hint}; read {how} the {self.label} column, as the'
        hint += f' first line has {n} columns'
        table = dataclasses.replace(table, hint=hint)
    return table if labeled or not self.label else table.without_label()

  def has_header(self, first_line: bytes, path: str) -> bool:
    """Whether `first_line` of `path` is a header (checked if it is)."""
    if self.header is not None:
      return self.header
    names = [c.strip() for c in split_line(first_line, self.sep, self.quoting)]
    if names[0] != self.columns[0]:
      return False
    if tuple(names) != self.columns:
      raise core.DataError(
        f'{path}:1: header {",".join(names)} differs from the expected'
        f' {",".join(self.columns)}'
      )
    return True

  def parse(self, lines: list[bytes], first: int, where, bad: core.BadLine):
    """Parses lines `first, first + 1, ...` (see `core.Reader.parse`).

    Returns:
      keys int64 `[n, fields]`, labels float32 `[n]`, and the `core.Side`
      when the table has multi-hot or float fields.
    """
    numbers = np.arange(first, first + len(lines))
    # (line number, reason) of every malformed line, reported in line order
    # at the end, so that an error names the chunk's first bad line.
    issues = []
    sep = self.sep.encode()
    counts = np.array([line.count(sep) for line in lines], np.int64)
    good = counts == len(self.columns) - 1
    check = ~good
    if self.quoting:  # Quotes may hide separators, or leave a field open.
      check |= np.fromiter((b'"' in line for line in lines), bool, len(lines))
    for i in np.flatnonzero(check):
      if not (counts[i] or lines[i].strip()):
        continue  # A blank line (no separator) carries no example.
      reason = self._column_problem(lines[i], counts[i])
      good[i] = reason is None
      if reason:
        issues.append((numbers[i], reason))
    body = b''.join(lines)
    try:  # One check of the chunk; line by line only if it fails.
      if not body.isascii():
        body.decode('utf-8')
    except UnicodeDecodeError:
      for i in np.flatnonzero(good):
        if reason := _not_utf8(lines[i]):
          good[i] = False
          issues.append((numbers[i], reason))
    lines, numbers = [lines[i] for i in np.flatnonzero(good)], numbers[good]
    keys = np.zeros((0, len(self.field_names)), np.int64)
    labels = np.zeros(0, np.float32)
    side = self._side(None)
    if lines:
      try:
        frame = self._read(lines, typed=True)
      except (ValueError, TypeError, OverflowError) as e:
        keep = self._find_unparsable(lines, numbers, issues)
        lines, numbers = [lines[i] for i in keep], numbers[keep]
        try:
          frame = self._read(lines, typed=True)
        except (ValueError, TypeError, OverflowError):
          raise core.DataError(
            f'{where(numbers[0])} to line {numbers[-1]}: could not parse ({e})'
          ) from e
      if len(frame) != len(lines):  # Each line must be one row.
        raise core.DataError(
          f'{where(numbers[0])} to line {numbers[-1]}: {len(lines)} lines'
          f' parsed as {len(frame)} rows'
        )
      keys, labels, side = self._keys(frame, numbers, issues)
    for number, reason in sorted(issues):
      bad(where(number), reason)
    if self.multi_field_names or self.dense_names:
      return keys, labels, side
    return keys, labels

  def _column_problem(self, line: bytes, count: int) -> str | None:
    """Why `line` (`count` separators) is not one row; None if it is."""
    found = count + 1
    if self.quoting:
      try:
        found = quoted_columns(line, self.sep)
      except csv.Error as e:
        return f'is not a CSV line ({e})'
      if found is None:
        return (
          'a quoted field is not closed on its line (a value spanning lines'
          ' is not supported)'
        )
    if found == len(self.columns):
      return None
    problem = (
      f'expected {len(self.columns)} columns ({self.hint}), found {found}'
    )
    if found < len(self.columns) and not line.endswith(b'\n'):
      return f'{problem}; the last line, with no line end: a cut-short file?'
    if self.label and not self.scored and found == len(self.columns) - 1:
      problem += (
        "; a file without its label column (as Kaggle's test.txt) can only"
        ' be scored, by predict.py'
      )
    if self.sep == '\t' and 1 < found < len(self.columns):
      # E.g. a Criteo copy whose empty last columns lost their tabs.
      problem += (
        '; empty columns at the end of a line keep their tabs, which a tool'
        ' that strips trailing whitespace drops'
      )
    return problem

  def _integer_columns(self) -> list[str]:
    ints = [f.column for f in self.fields if f.kind in ('int', 'derived')]
    return list(dict.fromkeys(([self.label] if self.label else []) + ints))

  def _float_columns(self) -> list[str]:
    return [f.column for f in self.fields if f.kind == 'float']

  def _side(self, frame: pd.DataFrame | None) -> core.Side:
    """The multi-hot keys and float values of `frame`'s rows (None: none)."""
    multi = dense = None
    n = 0 if frame is None else len(frame)
    fields = [f for f in self.fields if f.kind == 'multi']
    if fields:
      multi = np.full((n, len(fields), self.max_len), core.PAD_KEY, np.int64)
      for m, field in enumerate(fields):
        if n:
          cells = frame[field.column].to_numpy(object)
          multi[:, m] = keying.multi_hot_keys(
            cells, self.multi_sep, self.max_len
          )
    fields = [f for f in self.fields if f.kind == 'float']
    if fields:
      dense = np.empty((n, len(fields)), np.float64)
      for d, field in enumerate(fields):
        if n:
          values = frame[field.column].to_numpy(np.float64, na_value=np.nan)
          dense[:, d] = field.transform(values) if field.transform else values
    return core.Side(multi, dense)

  def _read(self, lines: list[bytes], typed: bool) -> pd.DataFrame:
    import pandas as pd  # pylint: disable=g-import-not-at-top

    integers, floats = self._integer_columns(), self._float_columns()
    needed = set(integers) | {field.column for field in self.fields}
    if typed:
      dtype = {
        c: 'Int64' if c in integers else 'float64' if c in floats else object
        for c in needed
      }
      na = {c: [''] for c in integers}
      na.update({c: list(FLOAT_MISSING) for c in floats})
    else:
      dtype, na = object, None
    body = b''.join(lines)
    if b'\r' in body:  # Strip CRLF line ends; a bare CR is data.
      body = b''.join(re.sub(rb'\r(\n?)\Z', rb'\1', x) for x in lines)

    def read(dtype) -> pd.DataFrame:
      # inf in an integer column fails its cast, named, without a warning.
      with np.errstate(invalid='ignore'):
        return pd.read_csv(
          io.BytesIO(body),
          sep=self.sep,
          lineterminator='\n',
          header=None,
          names=list(self.columns),
          usecols=[c for c in self.columns if c in needed],
          dtype=dtype,
          keep_default_na=False,
          na_filter=typed,
          na_values=na,
          quoting=csv.QUOTE_MINIMAL if self.quoting else csv.QUOTE_NONE,
          engine='c',
          skip_blank_lines=False,
          encoding_errors='replace',
        )

    # A label written True or False: read as text, then as 1 or 0 (other
    # text still raises: `_find_unparsable` names its line). A chunk whose
    # first label is a word skips the typed read that would fail.
    as_text = bool(typed and self.label) and labels.first_is_text(
      lines, self.sep, self.columns.index(self.label)
    )
    try:
      frame = None if as_text else read(dtype)
    except (ValueError, TypeError, OverflowError):
      if not (typed and self.label):
        raise
      frame = None
    if frame is None:
      frame = read(dict(dtype, **{self.label: object}))
      frame[self.label] = labels.numbers(frame[self.label])
    for column in integers if typed else ():  # A `1e2` makes floats of all:
      if (frame[column].abs() >= 2**53).any():  # digits from 2**53 are lost.
        cells = self._read(lines, typed=False)[column]
        exact = map(_written_int, cells, frame[column])
        frame[column] = pd.array(list(exact), 'Int64')
    return frame

  def _find_unparsable(self, lines, numbers, issues) -> np.ndarray:
    """Adds the lines whose number columns do not parse to `issues`.

    Returns:
      The indices of the other lines.
    """
    import pandas as pd  # pylint: disable=g-import-not-at-top

    frame = self._read(lines, typed=False)
    wrong = np.zeros(len(lines), bool)
    floats = self._float_columns()
    for column in self._integer_columns() + floats:
      text = frame[column].to_numpy(object)
      if column == self.label:
        text = labels.text_labels(frame[column]).to_numpy(object)
      number = pd.to_numeric(
        pd.Series(text).replace('', None), errors='coerce'
      ).to_numpy(np.float64)
      if column in floats:  # Empty and NaN cells are missing values.
        ok = ~np.isnan(number) | np.isin(text.astype(str), FLOAT_MISSING)
        integral = np.zeros(len(text), bool)  # Not the last integer column's.
        what, kind = f'float column {column}', 'a number'
      else:
        integral = np.isfinite(number) & (number == np.round(number))
        ok = integral & (np.abs(number) <= keying.INT_LIMIT)  # _keys: exactly.
        ok |= (text == '') & (column != self.label)
        what, kind = f'integer column {column}', 'an integer'
        integral &= column != self.label
      if column == self.label:
        what, kind = 'label', LABELS
      for i in np.flatnonzero(~ok & ~wrong):
        problem = 'is out of range' if integral[i] else f'is not {kind}'
        problem = f'{what} {core.shown(text[i])} {problem}'
        if column == self.label and text[i] == '':
          problem = 'missing label'  # As `_keys` says after a typed read.
        elif column == self.label and numbers[i] == 1 and self.header is False:
          problem += '; a header line? This format has none: delete it'
        elif column == self.label and text[i] == self.label:
          problem += '; a header line amid the rows (files joined?): delete it'
        issues.append((numbers[i], problem))
      wrong |= ~ok
    return np.flatnonzero(~wrong)

  def _keys(self, frame, numbers, issues):
    """Keys and labels of the good rows; the others are added to `issues`."""
    n = len(frame)
    wrong = np.zeros(n, bool)
    reasons = {}

    def flag(mask, reason):
      for i in np.flatnonzero(mask & ~wrong):
        reasons[i] = reason(i)
      wrong[mask] = True

    label, label_na = np.full(n, np.nan), np.zeros(n, bool)  # Rows to score.
    if self.label:
      label_na = frame[self.label].isna().to_numpy()
      label = frame[self.label].to_numpy(np.int64, na_value=0)
    flag(
      label_na | ~(np.isin(label, (-1, 0, 1)) | np.isnan(label)),
      lambda i: (
        'missing label' if label_na[i] else f'label {label[i]} is not {LABELS}'
      ),
    )
    for field in (f for f in self.fields if f.kind == 'float'):
      values = frame[field.column].to_numpy(np.float64, na_value=np.nan)
      kept = field.transform(values) if field.transform else values
      flag(  # A kept value must fit float32 (side.py); inf is not finite.
        np.isinf(values) | (np.abs(kept) > side.FLOAT32_MAX),
        lambda i, c=field.column, v=values: (
          f'float column {c} {v[i]} is '
          + ('not finite' if np.isinf(v[i]) else BEYOND_FLOAT32)
        ),
      )
    one_hot = [field for field in self.fields if field.kind not in SIDE_KINDS]
    keys = np.empty((n, len(one_hot)), np.int64)
    for f, field in enumerate(one_hot):
      column = field.column
      if field.kind == 'cat':
        keys[:, f] = keying.string_keys(frame[column].to_numpy(object))
        continue
      series = frame[column]
      missing = series.isna().to_numpy()
      values = series.to_numpy(np.int64, na_value=0)
      flag(  # Not np.abs: it overflows at the int64 minimum.
        (values >= keying.INT_LIMIT) | (values <= -keying.INT_LIMIT),
        lambda i, c=column, v=values: f'{c} {v[i]} is out of range',
      )
      if field.kind == 'int':
        keys[:, f] = keying.int_feature_keys(values, missing, self.log_bucket)
      else:
        derived, valid = field.derive(values)
        flag(
          missing | ~valid,
          lambda i, c=column, s=series, m=missing, e=field.expects: (
            f'{c} is empty, not {e}'
            if m[i]
            else f'{c} {core.shown(s.iloc[i])} is not {e}'
          ),
        )
        keys[:, f] = derived
    issues.extend((numbers[i], reason) for i, reason in reasons.items())
    keep = ~wrong
    labels = np.where(np.isnan(label[keep]), np.nan, label[keep] == 1)
    rows = frame[keep] if not keep.all() else frame
    return keys[keep], labels.astype(np.float32), self._side(rows)
