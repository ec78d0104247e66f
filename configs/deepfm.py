"""DeepFM (Guo et al., IJCAI 2017) on the embedded MovieLens data.

python main.py --config=configs/deepfm.py --workdir=/tmp/deepfm
python main.py --config=configs/deepfm.py:smoke --workdir=/tmp/deepfm_smoke

On ml-latest-small (seeded 8:1:1 split, 2 CPU cores, shared): test AUC
0.7862, logloss 0.5539, best epoch 6 of 8 run, about 17 s wall. pytorch-fm
0.7.0 on the same split (benchmarks/quality.py): test AUC 0.7773 with dense
ids, 0.7730 with its raw ids.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'deepfm'
  # As pytorch-fm's examples/main.py (its model name there is 'dfm').
  config.model = ml_collections.ConfigDict(
    dict(embed_dim=16, mlp_dims=(16, 16), dropout=0.2)
  )
  return config
