"""Avazu CTR prediction files (Kaggle `train`).

A line: id, click (the label), hour as YYMMDDHH and 21 categorical columns,
comma-separated, with a header (optional here). As pytorch-fm, values seen
fewer than 4 times in the training rows share one out-of-vocabulary id per
field; by default the hour becomes hour of day and weekday, and the `id`
column (unique per row) is dropped.
"""

import datetime
import functools

import ml_collections
import numpy as np

from datasets import encode
from datasets import text

NAMES = ('avazu',)
MIN_COUNT = 4
DEFAULTS = {
  # hour (YYMMDDHH) -> hour_of_day and weekday; False: the raw hour field.
  'hour_features': True,
  # Drop the `id` column (unique per row); False keeps it as a field.
  'drop_id': True,
}

COLUMNS = (
  *('id', 'click', 'hour', 'C1', 'banner_pos', 'site_id', 'site_domain'),
  *('site_category', 'app_id', 'app_domain', 'app_category', 'device_id'),
  *('device_ip', 'device_model', 'device_type', 'device_conn_type', 'C14'),
  *('C15', 'C16', 'C17', 'C18', 'C19', 'C20', 'C21'),
)


def hour_keys(values: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """Hour of day (0-23) or weekday (0 = Monday) of YYMMDDHH ints, and validity.

  Computed once per distinct value (an Avazu chunk holds a few hours).
  """
  unique, inverse = np.unique(values, return_inverse=True)
  out = np.zeros(len(unique), np.int64)
  valid = np.zeros(len(unique), bool)
  for i, v in enumerate(unique.tolist()):
    day, hour = divmod(v, 100)
    try:
      date = datetime.date(2000 + day // 10000, day // 100 % 100, day % 100)
    except ValueError:
      continue
    if 0 <= v < 10**8 and hour < 24:
      valid[i] = True
      out[i] = hour if kind == 'hour_of_day' else date.weekday()
  return out[inverse.reshape(-1)], valid[inverse.reshape(-1)]


def reader(options: ml_collections.ConfigDict, path: str) -> text.Table:
  del path  # Every file has the same columns.
  fields = [] if options.drop_id else [text.Field('id', 'id')]
  if options.hour_features:
    fields += [
      text.Field(
        kind,
        'hour',
        'derived',
        functools.partial(hour_keys, kind=kind),
        'YYMMDDHH',
      )
      for kind in ('hour_of_day', 'weekday')
    ]
  else:
    fields.append(text.Field('hour', 'hour'))
  fields += [text.Field(c, c) for c in COLUMNS[3:]]
  return text.Table(
    columns=COLUMNS,
    label='click',
    fields=tuple(fields),
    sep=',',
    quoting=False,
    log_bucket=False,
    hint='id, click, hour and 21 categorical, comma-separated; the Kaggle'
    ' test file has no click column',
    header=None,
  )


files = encode.source_files
build = encode.build_from(reader)
