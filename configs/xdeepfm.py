"""xDeepFM (Lian et al., KDD 2018) on the embedded MovieLens data.

python main.py --config=configs/xdeepfm.py --workdir=/tmp/xdeepfm
python main.py --config=configs/xdeepfm.py:smoke --workdir=/tmp/xdeepfm_smoke

Hyper-parameters of pytorch-fm's examples/main.py (its 'xdfm' entry:
embed_dim 16, cross_layer_sizes (16, 16), split_half False, mlp_dims
(16, 16), dropout 0.2), with its training recipe (configs/default.py).

On ml-latest-small (seeded 8:1:1 split, 2 shared CPU cores), seeds 0, 1, 2
(`--config.seed=<seed>`): test AUC 0.7862, 0.7921, 0.7913 (mean 0.7899),
best epoch 4-6 of 6-8 run, about 55 s wall each. pytorch-fm 0.7.0 on the
same split with dense ids (benchmarks/quality.py, seed 0): test AUC 0.7767.
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
    )
  )
  return config
