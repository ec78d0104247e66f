"""CTR models, one self-contained file each: `models/<name>.py`'s `Model`.

Every model file imports only its framework, so that it can be copied alone;
this file only lists them.
"""

import os


def names() -> list[str]:
  """The model names, sorted: the `models/<name>.py` files."""
  here = os.path.dirname(os.path.abspath(__file__))
  return sorted(
    f[:-3]
    for f in os.listdir(here)
    if f.endswith('.py') and not f.startswith('_')
  )
