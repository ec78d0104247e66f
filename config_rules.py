"""The rules that config_check.py checks config values by.

A rule takes a value and returns None when it is fine, else what the value
must be ('an integer >= 1'), for a message that names the key and its
value. The makers (`integer`, `number`, `optional`, `one_of`, ...) build
rules from bounds and choices.
"""

from collections.abc import Callable, Sequence
import math
import numbers
from typing import Any

# A rule returns None when the value is fine, else what it must be.
Rule = Callable[[Any], str | None]

# Model attributes that the trainer sets from the data (or flax itself).
# Here, not in config_check.py: configs/default.py reads them too, and
# config_check.py imports config_unused.py, which imports configs/default.py.
TRAINER_SET = (
  'field_dims',
  'multi_field_dims',
  'num_dense',
  'axis_name',
  'dtype',
  'parent',
  'name',
)


def is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  return (
    isinstance(value, numbers.Real)
    and not isinstance(value, bool)
    and math.isfinite(value)
  )


def is_sequence(value: Any) -> bool:
  return isinstance(value, (list, tuple))


def integer(low: int, below: int | None = None) -> Rule:
  """An integer >= `low` (and < `below`)."""

  def rule(value: Any) -> str | None:
    ok = is_int(value) and value >= low and (below is None or value < below)
    less = '' if below is None else f' and < {below}'
    return None if ok else f'an integer >= {low}{less}'

  return rule


def number(low: float, *, strict: bool = False) -> Rule:
  """A finite number >= `low` (> if `strict`)."""

  def rule(value: Any) -> str | None:
    ok = is_number(value) and (value > low if strict else value >= low)
    return None if ok else f'a number {">" if strict else ">="} {low}'

  return rule


def optional(rule: Rule) -> Rule:
  """`rule`, or None."""
  return lambda v: (
    None if v is None or rule(v) is None else f'{rule(v)} or None'
  )


def rate(value: Any) -> str | None:
  ok = is_number(value) and 0 <= value < 1
  return None if ok else 'a dropout rate in [0, 1)'


def factor(value: Any) -> str | None:
  ok = is_number(value) and 0 < value <= 1
  return None if ok else 'a factor in (0, 1] (1: off)'


def boolean(value: Any) -> str | None:
  return None if isinstance(value, bool) else 'True or False'


def string(value: Any) -> str | None:
  return None if isinstance(value, str) else 'a string'


def separator(value: Any) -> str | None:
  """A CSV column separator; `\\t` typed on a shell is a tab (csv.py)."""
  ok = isinstance(value, str) and (len(value) <= 1 or value == '\\t')
  if ok and value not in ('"', '\r', '\n'):
    return None
  return (
    'a string of one character other than a quote or a newline, e.g. "," or'
    ' ";" or a tab (also written \\t)'
  )


def one_of(names: Sequence[str]) -> Rule:
  return lambda v: None if v in names else f'one of {", ".join(names)}'


def integers(low: int) -> Rule:
  def rule(value: Any) -> str | None:
    ok = is_sequence(value) and all(is_int(v) and v >= low for v in value)
    return None if ok else f'a sequence of integers >= {low}'

  return rule


def columns(value: Any) -> str | None:
  # A flag's `a,1` arrives as ('a', 1): a column may be named by a number.
  ok = isinstance(value, str) or (
    is_sequence(value) and all(isinstance(v, str) or is_int(v) for v in value)
  )
  return None if ok else 'column names: a sequence of strings, or "a,b,c"'


def rates(length: int | None) -> Rule:
  def rule(value: Any) -> str | None:
    ok = is_sequence(value) and all(is_number(v) and 0 <= v < 1 for v in value)
    ok = ok and (length is None or len(value) == length)
    n = f'{length} ' if length is not None else ''
    return None if ok else f'a sequence of {n}dropout rates in [0, 1)'

  return rule


def optional_index(value: Any) -> str | None:
  ok = value is None or (is_int(value) and value >= 0)
  return None if ok else 'a field index >= 0 (or None)'


def field_pairs(value: Any) -> str | None:
  """Pairs of two different field indices, each pair once in either order
  (W&D's crosses: `(0, 1)` twice, or with `(1, 0)`, would train two weights
  for one cross)."""
  what = 'a sequence of pairs of two different field indices'
  ok = is_sequence(value) and all(
    is_sequence(p)
    and len(p) == 2
    and all(is_int(i) and i >= 0 for i in p)
    and p[0] != p[1]
    for p in value
  )
  if not ok:
    return what
  for k, pair in enumerate(value):
    earlier = [tuple(p) for p in value[:k] if set(p) == set(pair)]
    if earlier:
      same = (
        'is given twice'
        if earlier[0] == tuple(pair)
        else f'crosses the same fields as {earlier[0]}'
      )
      return (
        f'{what}, each pair once: {tuple(pair)} {same} (one cross would'
        ' train two weights)'
      )
  return None
