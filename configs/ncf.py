"""Neural Collaborative Filtering, NeuMF (He et al., WWW 2017) on MovieLens.

python main.py --config=configs/ncf.py --workdir=/tmp/ncf
python main.py --config=configs/ncf.py:smoke --workdir=/tmp/ncf_smoke

On ml-latest-small (seeded 8:1:1 split, 2 CPU cores, shared): test AUC
0.7883, logloss 0.5379, best epoch 3 of 5 run, about 6 s wall. pytorch-fm
0.7.0 on the same split (benchmarks/quality.py): test AUC 0.7906 with dense
ids, 0.7912 with its raw ids.
Seeds 0, 1, 2 (`--config.seed`): 0.7883, 0.7887, 0.7901; with
`shared_embedding=True`: 0.7884, 0.7883, 0.7898.

NCF needs a user and an item field. On a dataset whose fields are not
(user, item) in that order, set them, e.g. `--config.model.user_field_idx=2
--config.model.item_field_idx=5`; indices that do not name two different
fields of the dataset stop the run with an error naming these keys.
pytorch-fm's single embedding table for both towers:
`--config.model.shared_embedding=True`.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'ncf'
  # Sizes as pytorch-fm's examples/main.py. The MovieLens fields are
  # (user, item): pytorch-fm's MovieLens datasets set the same indices.
  config.model = ml_collections.ConfigDict(
    dict(
      user_field_idx=0,
      item_field_idx=1,
      embed_dim=16,
      mlp_dims=(16, 16),
      dropout=0.2,
      shared_embedding=False,
    )
  )
  return config
