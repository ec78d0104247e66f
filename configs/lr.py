"""Logistic regression on the embedded MovieLens data.

python main.py --config=configs/lr.py --workdir=/tmp/lr
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'lr'
  config.model = ml_collections.ConfigDict()
  return config
