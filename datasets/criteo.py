"""Criteo Display Advertising Challenge files (Kaggle `train.txt`).

A line: the 0/1 label, 13 integer and 26 hexadecimal categorical columns,
tab-separated, empty when missing, no header. As pytorch-fm: integers
`v > 2` become `int(log(v) ** 2)`, and values seen fewer than 10 times in
the training rows share one out-of-vocabulary id per field. With
`numeric='dense'` the 13 integer columns are numeric fields instead:
`log(1 + max(x, 0))`, standardised with the training split's statistics, a
missing value 0 (see datasets/side.py).
"""

import ml_collections
import numpy as np

from datasets import core
from datasets import encode
from datasets import text

NAMES = ('criteo',)
MIN_COUNT = 10
DEFAULTS = {
  # Integers v > 2 become int(log(v)**2), as pytorch-fm; False: every
  # integer its own value.
  'log_bucket': True,
  # 'buckets': the integer columns are one-hot fields (log_bucket applies);
  # 'dense': numeric fields, log(1 + max(x, 0)) standardised.
  'numeric': 'buckets',
}

NUMERIC = ('buckets', 'dense')

COLUMNS = (
  'label',
  *(f'I{i}' for i in range(1, 14)),
  *(f'C{i}' for i in range(1, 27)),
)


def log1p_positive(values: np.ndarray) -> np.ndarray:
  """`log(1 + max(x, 0))` of float values `[n]` (NaN stays NaN)."""
  return np.log1p(np.maximum(values, 0))


def reader(options: ml_collections.ConfigDict, path: str) -> text.Table:
  del path  # Every file has the same columns.
  numeric = options.get('numeric', 'buckets')
  if numeric not in NUMERIC:
    raise core.DataError(
      f'config.dataset.criteo.numeric={numeric!r} must be one of'
      f' {", ".join(NUMERIC)}.'
    )
  dense = dict(kind='float', transform=log1p_positive)
  return text.Table(
    columns=COLUMNS,
    label='label',
    fields=tuple(
      text.Field(c, c, **(dense if numeric == 'dense' else dict(kind='int')))
      if c.startswith('I')
      else text.Field(c, c, 'cat')
      for c in COLUMNS[1:]
    ),
    sep='\t',
    quoting=False,
    log_bucket=options.log_bucket,
    hint='label, 13 integer and 26 categorical, tab-separated',
    header=False,
  )


files = encode.source_files
build = encode.build_from(reader)
