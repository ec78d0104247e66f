"""Rows of a file to score that cannot be encoded, scored NaN instead.

predict.py's `--bad_rows=nan` (and `Predictor.predict_file`'s): a row
that the run's encoder cannot encode (wrong column count, a number that
does not parse, a missing label, a numeric value beyond float32 once
standardised) gets `nan` as its probability, in its place among the
output's rows, instead of stopping the file (`error`, the default).
`chunks` reads a file's rows as `Encoder.chunks` does, the bad rows left
out of each chunk's `Kept` and their places kept in its `bad`; `Count`
counts them for one log line at the end; `placed_chunks` puts NaN in
their places. The good rows are scored as they are in a file without the
bad ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
import os
from typing import Any

from absl import logging
import numpy as np

from datasets import core
from datasets import side
from datasets import streaming
import encoder as encoder_lib

# predict.py's `--bad_rows`.
MODES = ('error', 'nan')


@dataclasses.dataclass(frozen=True)
class Kept(encoder_lib.Rows):
  """A chunk's encoded rows less those that could not be encoded.

  Attributes:
    bad: int64 `[k]`, sorted: the places of the rows left out, among the
      chunk's rows counted with them.
  """

  bad: np.ndarray = dataclasses.field(
    default_factory=lambda: np.zeros(0, np.int64)
  )


class Count:
  """The bad rows of a file: called as a reader's `core.BadLine`, in line
  order (`chunks`), so that the first is the lowest line."""

  def __init__(self):
    self.count = 0
    self.first: tuple[str, str] | None = None  # (where, why) of the first.

  def __call__(self, where: str, reason: str) -> None:
    self.count += 1
    if self.first is None:
      self.first = where, reason

  def log(self, rows: int) -> None:
    """Logs one line of the bad rows among `rows`, if there were any."""
    if self.count:
      logging.warning(
        '%d of %d rows could not be encoded and were scored nan'
        ' (--bad_rows=nan); the first, %s: %s',
        self.count,
        rows,
        *self.first,
      )


def count(mode: str) -> Count | None:
  """The `Count` of mode 'nan'; None for 'error', which stops at a bad row.

  Raises:
    ValueError: `mode` is neither.
  """
  if mode not in MODES:
    raise ValueError(f'bad_rows must be error or nan, got {mode!r}.')
  return Count() if mode == 'nan' else None


def placed(
  probabilities: np.ndarray, labels: np.ndarray | None, bad: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
  """The good rows' probabilities and labels with NaN at the places `bad`."""
  if not len(bad):
    return probabilities, labels
  keep = np.ones(len(probabilities) + len(bad), bool)
  keep[bad] = False
  out = []
  for values in (probabilities, labels):
    full = None
    if values is not None:
      full = np.full(len(keep), np.nan, np.float32)
      full[keep] = values
    out.append(full)
  return tuple(out)


def placed_chunks(
  chunks: Iterator[tuple[encoder_lib.Rows, np.ndarray, np.ndarray]],
  bad: Count | None,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
  """`(probabilities, labels)` of `Predictor.score_chunks`' chunks, NaN at
  the places of the rows not encoded (`Kept.bad`); `bad` logged after."""
  rows = 0
  for kept, probs, _ in chunks:
    places = getattr(kept, 'bad', ())
    rows += len(probs) + len(places)
    yield placed(probs, kept.labels, places)
  if bad is not None:
    bad.log(rows)


@dataclasses.dataclass(frozen=True)
class _Lines:
  """Where a chunk's rows are in its file, as `_Placing.parse` found them.

  Attributes:
    first: the number of the chunk's first line.
    blank: int64, sorted: the offsets from `first` of the lines that carry
      no row.
    bad: int64 `[k]`, sorted: the places, among the chunk's rows, of its
      malformed lines' (left out by the reader).
    issues: `(place, where, why)` of each malformed line, in line order.
    where: `where(number)` names a line (a row of a Parquet file).
  """

  first: int
  blank: np.ndarray
  bad: np.ndarray
  issues: list[tuple[int, str, str]]
  where: Callable[[int], str]

  def name(self, place: int) -> str:
    """Where the row at `place` among the chunk's rows is."""
    offsets = np.setdiff1d(np.arange(place + len(self.blank) + 1), self.blank)
    return self.where(self.first + int(offsets[place]))


class _Placing:
  """A reader whose `parse` also returns where the rows are (`_Lines`).

  The malformed lines that the reader leaves out are not reported to its
  `bad` but returned, to be reported with the rows that the encoder refuses
  in line order. Picklable, for the parse workers, where the reader is.
  """

  def __init__(self, reader: core.Reader):
    self.reader = reader

  def __getattr__(self, name: str) -> Any:  # has_header, line_batches, ...
    if name == 'reader':  # Not set yet: as pickle loads this.
      raise AttributeError(name)
    return getattr(self.reader, name)

  def parse(self, lines, first, where, bad) -> tuple:
    del bad  # Reported by `chunks`.
    found = []
    parsed = self.reader.parse(
      lines, first, where, lambda *issue: found.append(issue)
    )
    number = {}
    if found:
      number = {where(n): n - first for n in range(first, first + len(lines))}
    lost = sorted({number[w] for w, _ in found})
    rows = len(parsed[0]) + len(lost)
    blank = []
    if rows < len(lines):  # Blank lines carry no row, by the reader's rule.
      bad_lines = set(lost)
      blank = [
        i
        for i, line in enumerate(lines)
        if not (
          line.strip() or i in bad_lines or self._rows(line, first + i, where)
        )
      ]
    kept = np.delete(np.arange(len(lines)), blank)
    if len(kept) != rows:
      raise RuntimeError(f'{where(first)}: bad rows placed wrong')
    places = np.searchsorted(kept, lost).astype(np.int64)
    issues = [(int(np.searchsorted(kept, number[w])), w, r) for w, r in found]
    blank = np.array(blank, np.int64)
    return *parsed, _Lines(first, blank, places, issues, where)

  def _rows(self, line: bytes, number: int, where) -> int:
    """How many rows the reader reads from line `number` alone."""
    return len(self.reader.parse([line], number, where, lambda *_: None)[0])


def _drop(value: Any, i: int) -> Any:
  """`value` (an array, a `core.Side` of them, None) without row `i`."""
  if value is None:
    return None
  if isinstance(value, core.Side):
    return core.Side(*(_drop(v, i) for v in value))
  return np.delete(value, i, axis=0)


def chunks(
  encoder: encoder_lib.Encoder,
  path: str,
  chunk_rows: int,
  parse_workers: int,
  bad: Count,
) -> Iterator[Kept]:
  """`encoder.chunks(path, chunk_rows, parse_workers)`, each chunk's rows
  that cannot be encoded counted in `bad` (in line order) and left out
  (`Kept.bad`)."""
  reader = _Placing(encoder.reader(path))
  labeled = encoder_lib.is_labeled(reader)
  desc = f'predict {os.path.basename(path)}'
  parsed = streaming.chunks(reader, path, chunk_rows, bad, desc, parse_workers)
  empty = True
  for keys, labels, *rest in parsed:
    *extra, lines = rest
    part = [keys, labels if labeled else None, *extra]
    places, issues = lines.bad, list(lines.issues)
    while True:
      try:
        rows = encoder.encode_parsed(*part)
        break
      except side.OutOfRange as e:  # Standardised beyond float32.
        good = np.delete(np.arange(len(part[0]) + len(places)), places)
        place = int(good[e.row])
        issues.append((place, lines.name(place), str(e)))
        places = np.sort(np.append(places, place))
        part = [_drop(value, e.row) for value in part]
    for _, where, reason in sorted(issues):
      bad(where, reason)
    empty = False
    yield _kept(rows, places)
  if empty:  # A chunk of no rows all the same: it says if rows have labels.
    keys = np.zeros((0, len(encoder.raw_field_names)), np.int64)
    labels = np.zeros(0, np.float32) if labeled else None
    yield _kept(encoder.encode_parsed(keys, labels), np.zeros(0, np.int64))


def name_row(
  encoder: encoder_lib.Encoder, path: str, chunk_rows: int, row: int
) -> str:
  """Where row `row` of `path` is (0 first; blank lines hold no row): its
  `file:line`, found by reading the file again, for an error's message."""
  reader = _Placing(encoder.reader(path))
  desc = f'find row {row + 1} of {os.path.basename(path)}'
  for keys, *_, lines in streaming.chunks(
    reader, path, chunk_rows, lambda *_: None, desc
  ):
    rows = len(keys) + len(lines.bad)
    if row < rows:
      return lines.name(row)
    row -= rows
  return f'{path}: row {row + 1}'


def _kept(rows: encoder_lib.Rows, places: np.ndarray) -> Kept:
  fields = {f.name: getattr(rows, f.name) for f in dataclasses.fields(rows)}
  return Kept(**fields, bad=places)
