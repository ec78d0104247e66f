"""Inner-product PNN (Qu et al., ICDM 2016) on the embedded MovieLens data.

python main.py --config=configs/ipnn.py --workdir=/tmp/ipnn
python main.py --config=configs/ipnn.py:smoke --workdir=/tmp/ipnn_smoke

Hyper-parameters of pytorch-fm's examples/main.py (its 'ipnn' entry:
embed_dim 16, mlp_dims (16,), dropout 0.2), with its training recipe
(configs/default.py).

On ml-latest-small (seeded 8:1:1 split, `--config.seed=0`, 1, 2): test AUC
0.7926, 0.7891, 0.7917 (mean 0.7912). torchfm 0.7.0 on the same split and
dense ids (benchmarks/quality.py, torch seeds 0, 1, 2): 0.7952, 0.7930, 0.7911
(mean 0.7931).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'pnn'
  config.model = ml_collections.ConfigDict(
    dict(embed_dim=16, mlp_dims=(16,), dropout=0.2, method='inner')
  )
  return config
