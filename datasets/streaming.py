"""Streaming a text source file: its lines, and its lines parsed in chunks.

`chunks` reads a file `chunk_rows` lines at a time (its header, if the
reader finds one, left out; a Parquet reader gives its own batches of
lines), has the source's `core.Reader` parse each chunk, here or in worker
processes (datasets/parallel.py), and shows the progress. A malformed line
goes to a `BadLines`, which raises, or counts and skips it
(`config.dataset.skip_bad_lines`). Both passes of datasets/encode.py and
the rows that encoder.py scores are read this way.
"""

from collections.abc import Callable, Iterator
import functools
import itertools
import logging
import os
from typing import Any

from datasets import core
from datasets import parallel
import utils


class BadLines:
  """Raises on a malformed line, or counts and skips it (`skip_bad_lines`)."""

  def __init__(self, skip: bool, log: bool = True):
    self.skip = skip
    self.log = log
    self.count = 0

  def __call__(self, where: str, reason: str) -> None:
    if not self.skip:
      raise core.DataError(
        f'{where}: {reason} (set config.dataset.skip_bad_lines=True to'
        ' skip malformed lines)'
      )
    self.count += 1
    if self.log and self.count <= 5:
      logging.warning('Skipping %s: %s', where, reason)


def text_lines(path: str) -> Iterator[bytes]:
  """The lines of text file `path` (decompressed if `.gz`), as bytes."""
  with core.reading(path):
    f, raw = utils.open_binary(path)
    with raw, f:
      yield from f


def _progress(desc: str, path: str) -> utils.ProgressBar:
  return utils.ProgressBar(
    desc,
    os.path.getsize(path),
    'lines',
    scale=2**20,
    scale_unit='MiB',
    interval=0.5,
    log_summary=True,
  )


def chunks(
  reader: core.Reader,
  path: str,
  chunk_rows: int,
  bad: BadLines,
  desc: str,
  workers: int = 0,
  then: Callable[[tuple], Any] | None = None,
) -> Iterator[Any]:
  """Parsed chunks `(keys [n, fields], labels [n], ...)` of one source file.

  `workers`: `config.dataset.parse_workers` (datasets/parallel.py); 0
  parses in this process. `then` (picklable), if given, is applied to each
  parsed chunk where it is parsed, and its results are yielded instead.
  """
  with core.reading(path):
    yield from _chunks(reader, path, chunk_rows, bad, desc, workers, then)


def _line(path: str, number: int) -> str:
  return f'{path}:{number}'


def _chunks(reader, path, chunk_rows, bad, desc, workers, then):
  progress = _progress(desc, path)
  count = 0
  apply = then or (lambda part: part)
  if hasattr(reader, 'line_batches'):
    row = 1
    for lines in reader.line_batches(path, chunk_rows):
      yield apply(reader.parse(lines, row, lambda n: f'{path}: row {n}', bad))
      row += len(lines)
      count += len(lines)
      progress.update(0, count)
    progress.close()
    return
  workers = parallel.workers_for(workers, path)
  if workers and not parallel.picklable((reader, then)):
    workers = 0
  where = functools.partial(_line, path)
  f, raw = utils.open_binary(path)
  with raw, f:

    def line_chunks():  # (lines, first line's number, (bytes read, lines))
      number, read = 1, 0
      first = f.readline()
      if first and not reader.has_header(first, path):
        lines = [first, *itertools.islice(f, chunk_rows - 1)]
      else:
        number, lines = 2, list(itertools.islice(f, chunk_rows))
      while lines:
        read += len(lines)
        yield lines, number, (raw.tell(), read)
        number += len(lines)
        lines = list(itertools.islice(f, chunk_rows))

    if workers:
      parts = parallel.parsed(reader, line_chunks(), where, bad, workers, then)
    else:
      parts = (
        (apply(reader.parse(lines, number, where, bad)), tag)
        for lines, number, tag in line_chunks()
      )
    for part, (position, count) in parts:
      yield part
      progress.update(position, count)
  progress.close()
