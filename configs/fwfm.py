"""Field-weighted FM (Pan et al., WWW 2018) on the embedded MovieLens data.

python main.py --config=configs/fwfm.py --workdir=/tmp/fwfm
python main.py --config=configs/fwfm.py:smoke --workdir=/tmp/fwfm_smoke

pytorch-fm has no FwFM. Model hyper-parameters of FuxiCTR's FwFM (its
defaults: linear_type FiLV, embedding_dim 10), with this library's training
recipe (configs/default.py: Adam 1e-3, weight decay 1e-6, batch 2048).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'fwfm'
  config.model = ml_collections.ConfigDict(
    dict(embed_dim=10, linear_type='filv')
  )
  # Lazy Adam (optim.lazy_adam: Adam on the table rows a batch reads, as
  # torch's SparseAdam; dense Adam on the rest): a higher validation and
  # test AUC than dense Adam on three splits, at more epochs
  # (benchmarks/README.md, "Lazy Adam for the models nearest their bar").
  config.optimizer = 'lazy_adam'
  return default.with_model_arguments(config)
