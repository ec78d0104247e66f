"""Higher-Order FM (Blondel et al., NeurIPS 2016) on the embedded MovieLens.

python main.py --config=configs/hofm.py --workdir=/tmp/hofm
python main.py --config=configs/hofm.py:smoke --workdir=/tmp/hofm_smoke

Hyper-parameters of pytorch-fm's examples/main.py (GitHub master; its 'hofm'
entry: order 3, embed_dim 16), with its training recipe (configs/default.py).

The embedded data's two fields (user, movie) have no triple, so the order-3
term is zero there and HOFM is an FM with other random draws; the higher
orders matter on three fields or more (side inputs count).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'hofm'
  config.model = ml_collections.ConfigDict(dict(order=3, embed_dim=16))
  return default.with_model_arguments(config)
