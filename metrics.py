"""The metrics of a run: exact ROC AUC and logloss; its `metrics.jsonl`.

Without JAX (numpy, absl and utils), so that a process without it (a
benchmark's torch worker) scores and records its runs the same way.
"""

from collections.abc import Callable
import contextlib
import json
import math
import os
import time

from absl import logging
import numpy as np

import event_files
import utils

# Rows at a time of the metrics' float64 temporaries: their memory stays a
# few MB beyond the inputs, whatever the rows (predict.py: a whole file's).
BLOCK_ROWS = 1 << 20


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Exact ROC AUC: P(score of a positive > score of a negative), ties half.

  `labels` are 0/1 `[n]`; `scores` `[n]` any monotone score (logits keep more
  resolution than probabilities, which saturate to 1.0 in float32). NaN when
  one class is absent, or when a score is NaN (a diverged model): NaNs have
  no order, and sorting them would rank them by their position. Beyond the
  inputs it holds the negatives' scores sorted, the positives' and a
  flag per row (float32 scores: 5 bytes a row, where ranks took 80).
  """
  positive = np.asarray(labels).reshape(-1) == 1
  scores = np.asarray(scores).reshape(-1)
  if scores.dtype.kind != 'f' or scores.dtype.itemsize < 4:
    scores = scores.astype(np.float64)
  n_pos = int(np.count_nonzero(positive))
  n_neg = len(positive) - n_pos
  if n_pos == 0 or n_neg == 0 or np.isnan(scores).any():
    return float('nan')
  negatives = scores[~positive]
  negatives.sort()
  positives = scores[positive]
  del positive
  # Per positive: the negatives below it, plus those below or tied: twice
  # its wins, a tie counted half.
  twice_wins = 0
  for start in range(0, n_pos, BLOCK_ROWS):
    block = positives[start : start + BLOCK_ROWS]
    for side in ('left', 'right'):
      twice_wins += int(np.searchsorted(negatives, block, side).sum())
  return twice_wins / (2 * n_pos * n_neg)


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
  """Mean binary cross-entropy of float32 `probabilities` `[n]`.

  A probability of exactly 0 or 1 (float32 saturates) is moved in by the
  float32 spacing there, as if its logit were finite.
  """
  p = np.asarray(probabilities, np.float64)
  p = np.clip(p, 2.0**-149, 1 - 2.0**-24)
  y = np.asarray(labels, np.float64)
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def logit_log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
  """Mean binary cross-entropy of `logits` `[n]`, in float64: training's
  `optax.sigmoid_binary_cross_entropy`, which no probability cuts."""
  logits = np.asarray(logits).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  total = 0.0
  for start in range(0, len(logits), BLOCK_ROWS):
    x = logits[start : start + BLOCK_ROWS].astype(np.float64)
    y = labels[start : start + BLOCK_ROWS].astype(np.float64)
    total += float(
      np.sum(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
    )
  return total / len(logits) if len(logits) else float('nan')


def json_line(record: dict) -> str:
  """`record` as one line of strict JSON, a non-finite number as `null`.

  JSON has no NaN or infinity (Python would write `NaN`, which other readers
  refuse): the loss and logloss of a diverged epoch are written as `null`.
  """

  def finite(value):
    if isinstance(value, float) and not math.isfinite(value):
      return None
    if isinstance(value, dict):
      return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [finite(v) for v in value]
    return value

  return json.dumps(finite(record), allow_nan=False) + '\n'


class MetricsWriter:
  """Appends JSON lines to `workdir/metrics.jsonl` (process 0 only).

  Every line gets `wall_time`: seconds since training started, carried over
  a resume by `wall_time_offset` (the value saved with the checkpoint), so
  runs can be compared against wall-clock time (benchmarks/plot.py); and
  `time`, the Unix time of the line, so that a run can be timed from its
  process's launch (benchmarks/time_to_auc.py). The lines are strict JSON
  (`json_line`): a metric that is NaN or infinite is `null`. TensorBoard
  event files beside it hold the same numbers (`event_files`).

  Every process of a run calls `truncate` and `write` in `shared()`
  (`multihost.errors_shared`): where process 0 cannot write, all raise.
  """

  def __init__(
    self,
    workdir: str,
    enabled: bool,
    wall_time_offset: float = 0.0,
    shared: Callable[[], contextlib.AbstractContextManager] = (
      contextlib.nullcontext
    ),
  ):
    self.shared = shared
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled
    self.start = time.perf_counter() - wall_time_offset
    self.events = event_files.EventWriter(workdir)
    self.kept_test = False  # A finished run's test line, kept (`truncate`).

  def wall_time(self) -> float:
    return time.perf_counter() - self.start

  def truncate(self, epoch: int, keep_test: bool = False) -> None:
    """Keeps only train/valid lines of epochs <= `epoch` (and, with
    `keep_test`, the test line).

    A resumed run redoes the epochs after its checkpoint; their old lines,
    and any old test line, would otherwise appear twice. A run that has
    finished training (`keep_test`) only scores its best state again: its
    test line stays, and `write` does not repeat it, so that a rerun stopped
    before it scores loses nothing. The lines dropped end the file
    (with a line cut short by a kill): it is cut there, in place, so that
    a reader following it (`tail -f`) goes on. Lines to drop elsewhere
    (an edited file) make an atomic rewrite. The event files are replaced
    by one that holds the lines kept (`event_files.EventWriter.rewrite`).

    Raises:
      UserError: the file cannot be rewritten (full disk, permissions); it
        is left as it was.
    """
    with self.shared():
      if self.enabled and os.path.exists(self.path):
        self._truncate(epoch, keep_test)

  def _truncate(self, epoch: int, keep_test: bool) -> None:
    try:
      with open(self.path, 'rb') as f:
        lines = f.readlines()
    except OSError as e:
      raise utils.UserError(
        f'Cannot read {self.path}: {utils.os_problem(e)}. Make it a readable'
        ' file again (or move it away), then start the run again.'
      ) from e
    kept, cut, offset = [], None, 0  # The lines kept, as records.
    for line in lines:
      try:
        record = json.loads(line)
      except ValueError:
        record = None  # A line cut short by a kill.
      test = isinstance(record, dict) and record.get('split') == 'test'
      if isinstance(record, dict) and (
        keep_test if test else record.get('epoch', 0) <= epoch
      ):
        kept.append(record)
        self.kept_test |= test
        if cut is not None or json_line(record).encode() != line:
          cut = -1  # A kept line after a dropped one, or not strict JSON.
      elif cut is None:
        cut = offset
      offset += len(line)
    if cut is not None:
      with self._writing():
        if cut >= 0:
          os.truncate(self.path, cut)
        else:
          with open(self.path + '.tmp', 'w') as f:
            f.writelines(json_line(record) for record in kept)
          os.replace(self.path + '.tmp', self.path)
    self.events.rewrite([r for r in kept if isinstance(r.get('step'), int)])

  def _writing(self):
    """`utils.writing` for this file and its temporary copy."""
    name = os.path.basename(self.path)
    return utils.writing(name, os.path.dirname(self.path), f'{name}.tmp')

  def write(self, **record) -> None:
    """Logs `record` and appends it as a line, whole or not at all.

    Raises:
      UserError: the line cannot be written (full disk, permissions); the
        file is left as it was.
    """
    record['wall_time'] = round(self.wall_time(), 3)
    record['time'] = round(time.time(), 3)
    logging.info('%s', ' '.join(f'{k}={v}' for k, v in record.items()))
    kept = record.get('split') == 'test' and self.kept_test
    with self.shared():
      if self.enabled and not kept:  # Else the same scores, kept.
        self._append(record)

  def _append(self, record: dict) -> None:
    with self._writing():
      line = memoryview(json_line(record).encode())
      fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
      try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
          while line:  # A full disk may take part of it first.
            line = line[os.write(fd, line) :]
        except OSError:
          os.ftruncate(fd, end)
          raise
      finally:
        os.close(fd)
    self.events.write(record)
