"""DCN (Wang et al., ADKDD 2017) on the embedded MovieLens data.

python main.py --config=configs/dcn.py --workdir=/tmp/dcn
python main.py --config=configs/dcn.py:smoke --workdir=/tmp/dcn_smoke

Hyper-parameters of pytorch-fm's examples/main.py (its 'dcn' entry:
embed_dim 16, num_layers 3, mlp_dims (16, 16), dropout 0.2), with its
training recipe (configs/default.py).

On ml-latest-small (seeded 8:1:1 split, 2 shared CPU cores), seeds 0, 1, 2
(`--config.seed=<seed>`): test AUC 0.7908, 0.7894, 0.7893 (mean 0.7898),
best epoch 3-4 of 5-6 run, about 30 s wall each. pytorch-fm 0.7.0 on the
same split with dense ids (benchmarks/quality.py, torch seeds 0, 1, 2): test
AUC 0.7906, 0.7881, 0.7898 (mean 0.7895).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'dcn'
  config.model = ml_collections.ConfigDict(
    dict(embed_dim=16, num_layers=3, mlp_dims=(16, 16), dropout=0.2)
  )
  return config
