"""Rows of a file to score that cannot be encoded, scored NaN instead.

predict.py's `--bad_rows=nan`: a row that the run's encoder cannot encode
(wrong column count, a number that does not parse, a missing label, a
numeric value beyond float32 once standardised) gets `nan` as its
probability, in its place among the output's rows, instead of stopping
the file (`error`, the default). `chunks` reads a file's rows as
`Encoder.chunks` does, the bad rows left out of each chunk's `Kept` and
their places kept in its `bad`; `Count` counts them for one log line at
the end. The good rows are scored as they are in a file without the bad
ones.
"""

from __future__ import annotations

from collections.abc import Iterator
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
  """The bad rows of a file: called as a reader's `core.BadLine`."""

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


class _Placing:
  """A reader whose `parse` also returns the places of its bad lines' rows.

  `parse` returns the reader's, then the places (int64, sorted), among the
  chunk's rows counted with them, of the malformed lines that the reader
  left out. Picklable, for the parse workers, where the reader is.
  """

  def __init__(self, reader: core.Reader):
    self.reader = reader

  def __getattr__(self, name: str) -> Any:  # has_header, line_batches, ...
    if name == 'reader':  # Not set yet: as pickle loads this.
      raise AttributeError(name)
    return getattr(self.reader, name)

  def parse(self, lines, first, where, bad) -> tuple:
    found = []
    parsed = self.reader.parse(
      lines, first, where, lambda *issue: found.append(issue)
    )
    for issue in found:
      bad(*issue)
    if not found:
      return *parsed, np.zeros(0, np.int64)
    number = {where(n): n - first for n in range(first, first + len(lines))}
    lost = sorted({number[w] for w, _ in found})
    places, row, start = [], 0, 0
    for end in [*lost, len(lines)]:
      run = lines[start:end]
      # Blank lines carry no row, by the reader's own rule: a run that may
      # hold one is counted by the reader.
      if any(not line.strip() for line in run):
        run = self.reader.parse(run, first + start, where, lambda *_: None)[0]
      row += len(run)
      places.append(row)
      row, start = row + 1, end + 1
    places.pop()  # The end of the chunk.
    if row - 1 - len(places) != len(parsed[0]):
      raise RuntimeError(f'{where(first)}: bad rows placed wrong')
    return *parsed, np.array(places, np.int64)


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
  that cannot be encoded counted in `bad` and left out (`Kept.bad`)."""
  reader = _Placing(encoder.reader(path))
  labeled = encoder_lib.is_labeled(reader)
  desc = f'predict {os.path.basename(path)}'
  parsed = streaming.chunks(reader, path, chunk_rows, bad, desc, parse_workers)
  done = 0  # Rows of the chunks before.
  empty = True
  for keys, labels, *rest in parsed:
    *extra, places = rest
    part = [keys, labels if labeled else None, *extra]
    while True:
      try:
        rows = encoder.encode_parsed(*part)
        break
      except side.OutOfRange as e:  # Standardised beyond float32.
        good = np.delete(np.arange(len(part[0]) + len(places)), places)
        bad(f'{path}: row {done + good[e.row] + 1}', str(e))
        places = np.sort(np.append(places, good[e.row]))
        part = [_drop(value, e.row) for value in part]
    empty = False
    yield _kept(rows, places)
    done += len(rows.ids) + len(places)
  if empty:  # A chunk of no rows all the same: it says if rows have labels.
    keys = np.zeros((0, len(encoder.raw_field_names)), np.int64)
    labels = np.zeros(0, np.float32) if labeled else None
    yield _kept(encoder.encode_parsed(keys, labels), np.zeros(0, np.int64))


def _kept(rows: encoder_lib.Rows, places: np.ndarray) -> Kept:
  fields = {f.name: getattr(rows, f.name) for f in dataclasses.fields(rows)}
  return Kept(**fields, bad=places)
