"""DCN-V2 (Wang et al., WWW 2021) on the embedded MovieLens data.

python main.py --config=configs/dcnv2.py --workdir=/tmp/dcnv2
python main.py --config=configs/dcnv2.py:smoke --workdir=/tmp/dcnv2_smoke

pytorch-fm has no DCN-V2. Model hyper-parameters of FuxiCTR's published
template (model_zoo/DCNv2/config/model_config.yaml, `DCNv2_default`):
parallel structure, 3 full-rank cross layers (low rank 32 and 4 experts when
the mixture is switched on with `--config.model.low_rank=32`), no BatchNorm
in the deep part. But the deep part, embedding and dropout of pytorch-fm's
DCN (examples/main.py: hidden layers 16-16, embedding 16, dropout 0.2)
instead of the template's 500-500-500, 40 and 0, chosen on the validation
AUC (against 500-500-500 with dropout 0 or 0.5, 64-64, the stacked
structure and the low-rank mixture): the template overfits this two-field
data set within two epochs. With BatchNorm in the deep part (this library's
MLP, after pytorch-fm) the validation AUC is lower (benchmarks/README.md,
"BatchNorm off in FinalMLP and DCN-V2"). Training as pytorch-fm
(configs/default.py: Adam 1e-3, weight decay 1e-6, batch 2048), not
FuxiCTR's batch of 10000 (worse here on the validation AUC).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'dcnv2'
  config.model = ml_collections.ConfigDict(
    dict(
      embed_dim=16,
      num_cross_layers=3,
      mlp_dims=(16, 16),
      dropout=0.2,
      structure='parallel',
      # None (full rank) or an int: a placeholder, so a flag can set it.
      low_rank=ml_collections.config_dict.placeholder(int),
      num_experts=4,
      linear_init='lecun',
      batch_norm=False,
    )
  )
  # Lazy Adam (optim.lazy_adam: Adam on the table rows a batch reads, as
  # torch's SparseAdam; dense Adam on the rest): a higher validation and
  # test AUC than dense Adam on three splits, at more epochs
  # (benchmarks/README.md, "Lazy Adam for the models nearest their bar").
  config.optimizer = 'lazy_adam'
  return default.with_model_arguments(config)
