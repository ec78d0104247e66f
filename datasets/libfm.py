"""libFM / libSVM text: `label idx:value ...`, one one-hot feature per field.

Without `field_dims`, the k-th feature of a line belongs to field k (as in
the Frappe and MovieLens-tag files of the NFM and AFM papers) and every line
must have the same number of features; each field's indices are then
encoded like any categorical value. With `field_dims`, the indices are
global over fields laid end to end: index `i` of field `f` is
`offset[f] <= i < offset[f] + field_dims[f]` and becomes id
`i - offset[f]`, and each line has exactly one feature of every field.
Labels are -1/0/1 (> 0 is a positive). A `path` directory finds its train,
validation ('valid' or 'dev') and test files by name.
"""

import codecs

import ml_collections
import numpy as np

from datasets import core
from datasets import encode
from datasets import keying
from datasets import streaming

NAMES = ('libfm',)
MIN_COUNT = 1
DEFAULTS = {
  # Field sizes, feature indices global over the fields end to end; empty:
  # the k-th feature of a line is field k, encoded from the data.
  'field_dims': (),
}


class Reader:
  """Parses libFM lines (see the module docstring) to keys and labels.

  With `labeled=False` lines have no label (rows to predict): they start
  with the features, and their labels are NaN.
  """

  def __init__(
    self, num_fields: int, field_dims: tuple[int, ...], labeled: bool = True
  ):
    self.num_fields = num_fields
    self.field_dims = field_dims
    self.labeled = labeled
    self.offsets = np.concatenate([[0], np.cumsum(field_dims)]).astype(np.int64)
    self.field_names = tuple(f'field{f}' for f in range(num_fields))

  def for_rows(self, first_line: bytes) -> 'Reader':
    """The reader of lines like `first_line`: with a label, or without.

    A line of one token per field is unlabelled, unless its first token
    alone is no `idx:value` (a label, before too few features: named so).
    """
    tokens = first_line.split()
    labeled = len(tokens) != self.num_fields or (
      len(tokens) > 1
      and b':' not in tokens[0]
      and all(b':' in t for t in tokens[1:])
    )
    return Reader(self.num_fields, self.field_dims, labeled)

  @staticmethod
  def has_header(first_line: bytes, path: str) -> bool:
    del first_line, path
    return False

  def parse(self, lines, first, where, bad):
    """See `core.Reader.parse`."""
    keys = np.empty((len(lines), self.num_fields), np.int64)
    labels = np.empty(len(lines), np.float32)
    n = 0
    if first == 1 and lines and lines[0].startswith(codecs.BOM_UTF8):
      lines = [lines[0][len(codecs.BOM_UTF8) :], *lines[1:]]
    for number, line in enumerate(lines, start=first):
      tokens = line.split()
      if not tokens:
        continue
      row = self._parse_line(tokens)
      if isinstance(row, str):
        bad(where(number), row)
        continue
      labels[n], keys[n] = row
      n += 1
    return keys[:n], labels[:n]

  def _parse_line(self, tokens):
    """(label, keys) of one line, or the reason it is malformed."""
    if not self.labeled:
      tokens = [b'nan', *tokens]
    try:
      label = float(tokens[0])
    except ValueError:
      return f'label {core.shown(tokens[0])} is not a number'
    if label not in (-1.0, 0.0, 1.0) and self.labeled:
      return f'label {label:g} is not -1, 0 or 1'
    features = tokens[1:]
    if len(features) != self.num_fields:
      return (
        f'expected {self.num_fields} features idx:value (one per field),'
        f' found {len(features)}'
      )
    indices = []
    for token in features:
      index, colon, value = token.partition(b':')
      try:
        index, value = int(index), float(value) if colon else 1.0
      except ValueError:
        return f'feature {core.shown(token)} is not idx:value'
      if index < 0 or index >= keying.INT_LIMIT:
        return f'feature index {index} is out of range'
      if value != 1.0:
        return (
          f'feature {token.decode(errors="replace")}: only one-hot'
          ' features (value 1) are supported'
        )
      indices.append(index)
    label = float(label > 0) if self.labeled else label
    if not self.field_dims:
      return label, indices
    indices = np.array(indices, np.int64)
    fields = np.searchsorted(self.offsets, indices, side='right') - 1
    if indices.max() >= self.offsets[-1]:
      return (
        f'feature index {indices.max()} is beyond'
        f' config.dataset.libfm.field_dims (sum {self.offsets[-1]})'
      )
    if len(set(fields.tolist())) != self.num_fields:
      return (
        'expected one feature of each field of config.dataset.libfm.field_dims'
      )
    keys = np.empty(self.num_fields, np.int64)
    keys[fields] = indices - self.offsets[fields]
    return label, keys


def reader(options: ml_collections.ConfigDict, path: str) -> Reader:
  """The reader of libFM files like `path` (its first line gives fields)."""
  field_dims = tuple(int(d) for d in options.field_dims)
  if any(d <= 0 for d in field_dims):
    raise core.DataError(
      f'config.dataset.libfm.field_dims must be positive, got {field_dims}'
    )
  num_fields = len(field_dims)
  if not num_fields:
    for line in streaming.text_lines(path):
      if line.strip():
        num_fields = len(line.split()) - 1
        break
    if num_fields <= 0:
      raise core.DataError(f'{path}: no libFM line with features found.')
  return Reader(num_fields, field_dims)


def files(config: ml_collections.ConfigDict) -> dict[str, str]:
  return encode.source_files(config, find_splits=True)


def build(
  config: ml_collections.ConfigDict,
  options: ml_collections.ConfigDict,
  paths: dict[str, str],
) -> core.Encoded:
  # Every file is read with the training file's number of fields.
  parser = reader(options, paths.get('all') or paths['train'])
  field_dims = parser.field_dims
  return encode.encode(config, paths, lambda path: parser, field_dims)
