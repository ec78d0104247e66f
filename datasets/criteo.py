"""Criteo Display Advertising Challenge files (Kaggle `train.txt`).

A line: the 0/1 label, 13 integer and 26 hexadecimal categorical columns,
tab-separated, empty when missing, no header. As pytorch-fm: integers
`v > 2` become `int(log(v) ** 2)`, and values seen fewer than 10 times in
the training rows share one out-of-vocabulary id per field.
"""

import ml_collections

from datasets import encode
from datasets import text

NAMES = ('criteo',)
MIN_COUNT = 10
DEFAULTS = {
  # Integers v > 2 become int(log(v)**2), as pytorch-fm; False: every
  # integer its own value.
  'log_bucket': True,
}

COLUMNS = (
  'label',
  *(f'I{i}' for i in range(1, 14)),
  *(f'C{i}' for i in range(1, 27)),
)


def reader(options: ml_collections.ConfigDict, path: str) -> text.Table:
  del path  # Every file has the same columns.
  return text.Table(
    columns=COLUMNS,
    label='label',
    fields=tuple(
      text.Field(c, c, 'int' if c.startswith('I') else 'cat')
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
