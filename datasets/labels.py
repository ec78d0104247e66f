"""Label cells read as text: 0 or 1 (-1: 0), or True or False in any case.

pandas' `to_csv` writes a bool label column as True and False, which a
typed read of the column cannot parse: datasets/text.py reads such a column
as text, and `numbers` turns it into the labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  import pandas as pd

# Label cells, lowercased, read as 1 and 0: a bool column's `to_csv`.
TEXT_LABELS = {'true': '1', 'false': '0'}


def first_is_text(lines: list[bytes], sep: str, column: int) -> bool:
  """Whether the first line's label (cell `column`) is a word, e.g. True.

  A hint only, that spares a typed read bound to fail: a line whose quotes
  hide separators may be misread, which costs that read, nothing else.
  """
  cells = lines[0].split(sep.encode()) if lines else []
  return column < len(cells) and cells[column].strip(b' \t"')[:1].isalpha()


def text_labels(cells: pd.Series) -> pd.Series:
  """Label cells (strings; NaN: empty) with True and False as '1' and '0'."""
  lowered = cells.str.strip().str.lower()
  for text, number in TEXT_LABELS.items():
    cells = cells.mask(lowered == text, number)
  return cells


def numbers(cells: pd.Series) -> pd.Series:
  """The Int64 labels of label cells (strings; NaN: empty, read as NA).

  The cells that `to_csv` writes, True and False, are compared at once;
  only the others go through `text_labels`' string operations.

  Raises:
    ValueError: a cell that is no number, nor True or False.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top

  text = cells.to_numpy(object)
  ones = text == 'True'
  out = pd.Series(ones.astype(np.int64), cells.index, 'Int64', cells.name)
  other = ~(ones | (text == 'False'))
  if other.any():
    out[other] = pd.to_numeric(text_labels(cells[other])).astype('Int64')
  return out
