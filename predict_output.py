"""The output file of predict.py: a CSV of the probabilities of raw rows.

`write_predictions` scores an input file chunk by chunk into
`probability[,label]` lines (gzipped for a name ending in `.gz`), written
beside the output and renamed over it at the end (`-`, standard output,
and an existing output that is no regular file, such as a FIFO or
/dev/null, are written in place), and logs what the rows
tell about the model: values that training did not keep, rows scored NaN,
and the AUC and logloss of labelled rows. `check_output` refuses, before
any row is scored, an output that would replace what is read or that is
named for another format (`x.parquet`).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import stat
import sys
import threading
from typing import TYPE_CHECKING

from absl import logging
import numpy as np

import bad_rows as bad_rows_lib
from datasets import core
import metrics
import utils

if TYPE_CHECKING:
  import predict

# Suffixes of formats the output is not written in (it is CSV, gzipped for
# `.gz`): a name ending in one, before a `.gz` or not, is refused rather
# than given CSV. `.tsv` too: the columns are separated by commas.
OTHER_FORMATS = frozenset(
  (
    '.arrow .avro .bz2 .feather .h5 .hdf5 .ipc .json .jsonl .ndjson .npy'
    ' .npz .orc .parquet .pickle .pkl .pq .tsv .xls .xlsx .xz .zip .zst'
  ).split()
)


def csv_lines(probabilities: np.ndarray, labels: np.ndarray | None) -> str:
  """Output lines `probability[,label]`, each float32 written exactly.

  numpy's shortest repr of a float32 reads back as the same float32, and is
  many times faster than formatting each value in Python.
  """
  text = np.asarray(probabilities, np.float32).astype(str).tolist()
  if labels is not None:  # NaN: a row that could not be encoded, blank.
    flags_ = {0.0: '0', 1.0: '1'}
    labels = np.asarray(labels, np.float32).tolist()
    text = [
      f'{p},{flags_.get(y, "")}' for p, y in zip(text, labels, strict=True)
    ]
  return ''.join(line + '\n' for line in text)


@utils.interrupts_heard()  # A Ctrl-C in a gc callback is not lost.
def write_predictions(
  predictor: predict.Predictor,
  path: str,
  output: str,
  chunk_rows: int = 100_000,
  parse_workers: int = -1,
  bad_rows: str = 'error',
) -> int:
  """Writes the probabilities (and labels) of file `path` to CSV `output`
  (gzipped if its name ends in `.gz`, as an input may be).

  The output appears complete or not at all (written beside, then renamed;
  a link's file is, the link kept; calls on other threads to the same
  `output` each write their own copy, and the copies of killed processes
  are removed first), except where it is streamed (`streamed`): `-` is
  standard output.
  Logs how many rows had a value that training did not keep, per field: a
  model scoring many of them is out of date. `parse_workers` as
  `config.dataset.parse_workers`. `bad_rows` 'nan' scores a row that
  cannot be encoded nan, with a blank label, and logs how many there were
  (bad_rows.py); 'error' stops at it.

  Returns:
    The number of rows written.
  """
  in_place = streamed(output)
  target = tmp = output
  if not in_place:
    target = os.path.realpath(output)  # A link stays, its file is replaced.
    tmp = f'{target}.tmp-{core.owner_tag()}.{threading.get_ident()}'
    # The copies of writes that were killed (SIGKILL, out of memory).
    directory, name = os.path.split(target)
    core.remove_orphans(directory, f'{name}.tmp-')
  rows, header = 0, None
  enc = predictor.encoder
  names = enc.field_names
  # Lists read from the rows; MovieLens's come from the movie, by its id.
  lists = enc.format != 'movielens' and bool(enc.side.multi_field_names)
  if lists:
    names += enc.side.multi_field_names
  unseen = np.zeros(len(names), np.int64)  # Per field.
  unseen_rows = nans = 0
  scored = []  # (logits, labels) of the chunks, when labelled.
  if output == '-':
    opened = contextlib.nullcontext(sys.stdout)
  else:
    opened = (gzip.open if output.lower().endswith('.gz') else open)(tmp, 'wt')
  bad = bad_rows_lib.count(bad_rows)
  more = {} if bad is None else {'bad': bad}
  try:
    with opened as f:
      chunks = predictor.score_chunks(path, chunk_rows, parse_workers, **more)
      for encoded, probs, logits in chunks:
        labels = encoded.labels
        if header is None:
          header = 'probability' + (',label' if labels is not None else '')
          f.write(header + '\n')
        places = getattr(encoded, 'bad', ())  # Rows not encoded: nan.
        f.write(csv_lines(*bad_rows_lib.placed(probs, labels, places)))
        rows += len(probs) + len(places)
        nans += int(np.isnan(probs).sum())
        if labels is not None:
          scored.append((logits, np.asarray(labels, np.uint8)))
        mask = predictor.unseen(encoded.ids)
        if lists:
          mask = np.hstack([mask, predictor.unseen_lists(encoded.multi_ids)])
        unseen += mask.sum(0)
        unseen_rows += int(mask.any(1).sum())
      f.flush()  # Standard output stays open.
    if not in_place:
      os.replace(tmp, target)
  finally:
    if not in_place and os.path.exists(tmp):
      os.remove(tmp)
  if unseen_rows:
    logging.info(
      '%d of %d rows have values that training did not keep, scored with'
      " the field's out-of-vocabulary id: %s",
      unseen_rows,
      rows,
      ', '.join(
        f'{name} {n}' for name, n in zip(names, unseen, strict=True) if n
      ),
    )
  if bad is not None:
    bad.log(rows)
  if nans:  # Numbers far outside training's range overflow the model.
    logging.warning('%d of %d rows scored NaN (nan in the output).', nans, rows)
  labelled = sum(len(y) for _, y in scored)  # Not the rows scored nan.
  if labelled:  # An empty file has no AUC to log.
    # From the logits, as training's evaluation: probabilities saturate.
    logits, labels = (np.concatenate(a) for a in zip(*scored, strict=True))
    scored.clear()
    auc, one = metrics.roc_auc(labels, logits), np.unique(labels)
    logging.info(
      'The %d labelled rows: AUC %s, logloss %.6f',
      labelled,
      f'{auc:.6f}' if len(one) > 1 else f'undefined (all labels {one[0]:g})',
      metrics.logit_log_loss(labels, logits),
    )
  return rows


# Paths of a process's open files and of devices: written where they lead.
SPECIAL_DIRS = ('/dev/', '/proc/')


def streamed(output: str) -> bool:
  """Whether `output` is written in place rather than beside and renamed.

  `-` (standard output); a path in /dev or /proc (/dev/stdout, /dev/null,
  /proc/self/fd/1), or a link to one; an existing path that is no regular
  file or directory (a FIFO). A rename would replace the link or device
  with a regular file: as root, /dev/stdout itself, also when the shell
  sends standard output to a file (`> out.csv`).
  """
  if output == '-':
    return True
  targets = [os.path.abspath(output)]
  with contextlib.suppress(OSError):  # Not a link: no target.
    targets.append(os.path.join(targets[0], '..', os.readlink(output)))
  if any(os.path.normpath(t).startswith(SPECIAL_DIRS) for t in targets):
    return True
  try:
    mode = os.stat(output).st_mode
  except OSError:  # None yet (or unreadable: the write will say).
    return False
  return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_output(output: str, source: str, workdir: str) -> None:
  """Raises a UserError if writing `output` would replace what we read,
  or its name asks for a format other than CSV (`OTHER_FORMATS`).

  The output is written beside and renamed over its path at the end: over
  the input, the rows would be lost; inside the run's directory, one of
  its files (metrics.jsonl, a checkpoint) could be. A `streamed` output
  is not renamed.
  """
  if streamed(output):
    return
  if os.path.isdir(output):  # Found before the rows are scored.
    raise utils.UserError(f'--output: {output} is a directory, not a file.')
  if os.path.exists(output) and os.path.samefile(output, source):
    raise utils.UserError(
      f'--output: {output} is the --input file; write the probabilities to'
      ' another file.'
    )
  run = os.path.realpath(workdir)
  if os.path.realpath(output).startswith(run + os.sep):
    raise utils.UserError(
      f"--output: {output} is inside the run's directory {workdir}; write"
      ' the probabilities outside it.'
    )
  gzipped = output.lower().endswith('.gz')  # As write_predictions reads it.
  stem, suffix = os.path.splitext(output[:-3] if gzipped else output)
  if suffix.lower() in OTHER_FORMATS:
    stem = stem[:-4] if stem.lower().endswith('.csv') else stem  # x.csv.xz
    raise utils.UserError(
      f'--output: {output} names a {suffix} file, but the output is CSV'
      f' (probability[,label]): name it {stem}.csv, or {stem}.csv.gz to'
      ' gzip it.'
    )
