"""Neural Factorization Machine (He & Chua, SIGIR 2017) on MovieLens.

python main.py --config=configs/nfm.py --workdir=/tmp/nfm
python main.py --config=configs/nfm.py:smoke --workdir=/tmp/nfm_smoke

With the paper's optional FM pre-training: train an FM with the same
embed_dim, then start NFM from its best checkpoint (`FeaturesEmbedding_0` and
`FeaturesLinear_0` are copied):

python main.py --config=configs/fm.py --workdir=/tmp/fm64 \
  --config.model.embed_dim=64
python main.py --config=configs/nfm.py --workdir=/tmp/nfm_pretrained \
  --config.init_from=/tmp/fm64

NFM from scratch overfits after its first epoch on this small data set;
started from the FM, its first epoch begins at the FM's fit.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'nfm'
  # As pytorch-fm's examples/main.py. dropouts: after the Bi-Interaction
  # layer, after each hidden layer. torch.nn.Linear's initialisers, as
  # pytorch-fm: the best epoch is the first, and over ten seeds they raise
  # its validation AUC in nine (mean +0.0057; benchmarks/README.md, Quality
  # across seeds).
  config.model = ml_collections.ConfigDict(
    dict(embed_dim=64, mlp_dims=(64,), dropouts=(0.2, 0.2), linear_init='torch')
  )
  return default.with_model_arguments(config)
