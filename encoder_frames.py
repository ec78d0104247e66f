"""A DataFrame of raw values as lines of the run's format (see encoder.py).

`frame_lines` turns the rows of a pandas DataFrame into the lines that the
run's source reader (datasets/<format>.py) parses, so that a row gets the
keys it would get in a file: the columns the run reads are picked by name
(MovieLens `user`, `item` and `rating`, or GroupLens's `userId` and
`movieId` for the first two; libFM `label`, `field0`, ...; the other
formats the names of their files' header) and written in the format's
order, multi-hot lists joined by the run's separator and whole-number
floats as integers. A frame without a column that the run reads is a
DataError that names it, and so is a cell holding a collection that is not
a multi-hot list (a list in another column, a set): its text would be keyed
as one value.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

import data
from datasets import core
from datasets import csv
from datasets import libfm
from datasets import movielens

if TYPE_CHECKING:
  import pandas as pd

  import encoder

# GroupLens's names of the MovieLens columns (ratings.csv of ml-20m, ml-25m
# and ml-latest), taken where the frame lacks ours.
GROUPLENS = {'user': 'userId', 'item': 'movieId'}


def _movielens_column(field: str, names: list[str]) -> str:
  """The frame's column of MovieLens `field`: `field`, or GroupLens's name
  of it when the frame has only that (a frame with both is refused)."""
  theirs = GROUPLENS[field]
  if field in names and theirs in names:
    raise core.DataError(
      f'The DataFrame has both a {field} and a {theirs} column, two names'
      ' of one field: drop one of them.'
    )
  return theirs if theirs in names else field


def _check_cells(
  frame: pd.DataFrame, columns: list[str], multi: dict[str, str]
) -> None:
  """Refuses a cell holding a collection, which its row's text would key as
  one value (`['a', 'b']`), out of vocabulary.

  Args:
    frame: the rows, multi-hot lists already joined (`csv.joined_lists`).
    columns: the columns the run reads.
    multi: the multi-hot columns, each with its separator.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top

  for column in columns:
    cells = frame[column]
    if cells.dtype != object:  # Numbers or strings: one value a cell.
      continue
    kinds = {type(c) for c in cells.to_numpy()}  # Fast: few kinds to check.
    if not any(k is not str and hasattr(k, '__iter__') for k in kinds):
      continue
    held = cells.map(
      lambda c: not isinstance(c, str) and pd.api.types.is_list_like(c)
    ).to_numpy(bool)
    if not held.any():
      continue
    row = int(np.argmax(held))
    kind = type(cells.iloc[row]).__name__
    if column in multi:
      fix = (
        f'give a list (its order decides which values a long list keeps) or'
        f' a string of values joined by {multi[column]!r}'
      )
    else:
      fix = (
        "give one value a cell: only a multi-hot field (training's"
        ' config.dataset.csv.multi_hot_columns) reads a list'
      )
    raise core.DataError(
      f'DataFrame row {row}: column {column} holds a {kind}'
      f' {core.shown(cells.iloc[row])}; {fix}.'
    )


def frame_lines(
  enc: encoder.Encoder, frame: pd.DataFrame
) -> tuple[Any, list[bytes]]:
  """The source's reader of `frame` and its rows as lines of that format.

  Args:
    enc: the run's encoder.
    frame: raw rows, columns as `encoder.Encoder.encode` says.

  Raises:
    DataError: a column that the run reads is missing, or the frame's
      fields differ from the run's.
  """
  options = enc.row_options()
  names = [str(c) for c in frame.columns]
  sep, quoting, multi = ' ', False, {}
  if enc.format == 'movielens':
    labeled = 'rating' in names
    reader = movielens.Reader(',', labeled)
    frame = frame.assign(timestamp=0)
    needed = [_movielens_column(f, names) for f in GROUPLENS]
    needed += ['rating'] * labeled
    columns = needed + ['timestamp'] * labeled
    sep = ','
  elif enc.format == 'libfm':
    labeled = 'label' in names
    dims = tuple(int(d) for d in options.field_dims)
    reader = libfm.Reader(len(enc.field_names), dims, labeled)
    needed = columns = ['label'] * labeled + list(enc.field_names)
  else:
    multi_sep = options.get('multi_hot_sep', '|')
    multi = dict.fromkeys(enc.side.multi_field_names, multi_sep)
    frame = csv.joined_lists(frame, list(multi), multi_sep)
    if enc.format == 'csv':
      table = enc.in_order(
        csv.table(options, names, 'the DataFrame', require_label=False)
      )
    else:
      table = data.SOURCES[enc.format].reader(options, '')
      if table.label not in names:
        table = table.without_label()
    reader = dataclasses.replace(table, header=False)
    needed = [table.label] if table.label else []
    needed += [f.column for f in table.fields]  # Avazu's hour: 2 fields.
    needed = list(dict.fromkeys(needed))
    frame = frame.reindex(columns=list(table.columns), fill_value='')
    columns, sep = list(table.columns), table.sep
    quoting = table.quoting
  missing = [c for c in needed if c not in names]
  if missing:  # Its own columns too: raw names (userId) are a common slip.
    raise core.DataError(
      f'The DataFrame has no column {", ".join(missing)}; the run reads'
      f' {", ".join(needed)}, and its columns are'
      f' {", ".join(names) or "none"}.'
    )
  enc.check_fields(reader, 'The DataFrame')
  _check_cells(frame, needed, multi)
  frame = frame[columns].apply(csv.integral)
  label = 'label' if enc.format == 'libfm' else getattr(reader, 'label', '')
  if label in frame and frame[label].dtype == bool:  # False/True: 0/1.
    frame[label] = frame[label].astype(np.int64)
  return reader, csv.frame_rows(frame, sep, quoting, enc.format)
