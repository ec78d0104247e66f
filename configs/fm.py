"""Factorization Machine (Rendle, ICDM 2010) on the embedded MovieLens data.

python main.py --config=configs/fm.py --workdir=/tmp/fm
python main.py --config=configs/fm.py:smoke --workdir=/tmp/fm_smoke
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'fm'
  # As pytorch-fm's examples/main.py.
  config.model = ml_collections.ConfigDict(dict(embed_dim=16))
  return default.with_model_arguments(config)
