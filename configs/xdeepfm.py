"""xDeepFM (Lian et al., KDD 2018) on the embedded MovieLens data.

python main.py --config=configs/xdeepfm.py --workdir=/tmp/xdeepfm
python main.py --config=configs/xdeepfm.py:smoke --workdir=/tmp/xdeepfm_smoke

Hyper-parameters of pytorch-fm's examples/main.py (its 'xdfm' entry:
embed_dim 16, cross_layer_sizes (16, 16), split_half False, mlp_dims
(16, 16), dropout 0.2), with its training recipe (configs/default.py).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'xdeepfm'
  config.model = ml_collections.ConfigDict(
    dict(
      embed_dim=16,
      cross_layer_sizes=(16, 16),
      split_half=False,
      mlp_dims=(16, 16),
      dropout=0.2,
      linear_init='lecun',
    )
  )
  return default.with_model_arguments(config)
