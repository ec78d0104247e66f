"""Neural Factorization Machine (He & Chua, SIGIR 2017) on MovieLens.

python main.py --config=configs/nfm.py --workdir=/tmp/nfm
python main.py --config=configs/nfm.py:smoke --workdir=/tmp/nfm_smoke

On ml-latest-small (seeded 8:1:1 split, 2 CPU cores, shared): test AUC
0.7715, logloss 0.6791, best epoch 1 of 3 run, about 11 s wall. pytorch-fm
0.7.0 on the same split (benchmarks/quality.py): test AUC 0.6975 with dense
ids, 0.7100 with its raw ids.

With the paper's optional FM pre-training: train an FM with the same
embed_dim, then start NFM from its best checkpoint (`FeaturesEmbedding_0` and
`FeaturesLinear_0` are copied):

python main.py --config=configs/fm.py --workdir=/tmp/fm64 \
  --config.model.embed_dim=64
python main.py --config=configs/nfm.py --workdir=/tmp/nfm_pretrained \
  --config.init_from=/tmp/fm64

That run reached test AUC 0.7927 (FM with embed_dim 64 alone: 0.7900): NFM
from scratch overfits after its first epoch on this small data set.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'nfm'
  # As pytorch-fm's examples/main.py. dropouts: after the Bi-Interaction
  # layer, after each hidden layer.
  config.model = ml_collections.ConfigDict(
    dict(embed_dim=64, mlp_dims=(64,), dropouts=(0.2, 0.2))
  )
  return config
