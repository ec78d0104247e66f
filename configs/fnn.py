"""FNN (Zhang et al., ECIR 2016) on the embedded MovieLens data.

Without FM pre-training (embeddings from scratch, as pytorch-fm):

python main.py --config=configs/fnn.py --workdir=/tmp/fnn

With the paper's FM pre-training: train the FM first, then start FNN from its
best checkpoint (the FM's `FeaturesEmbedding_0` and `FeaturesLinear_0` are
copied; `embed_dim` must match the FM's, 16 in both configs):

python main.py --config=configs/fm.py --workdir=/tmp/fm
python main.py --config=configs/fnn.py --workdir=/tmp/fnn_pretrained \
  --config.init_from=/tmp/fm

python main.py --config=configs/fnn.py:smoke --workdir=/tmp/fnn_smoke
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'fnn'
  # Sizes as pytorch-fm's examples/main.py. fm_linear_inputs=True feeds each
  # field's FM linear weight to the MLP too (the paper); False as pytorch-fm.
  # torch.nn.Linear's initialisers, as pytorch-fm: the same validation AUC
  # here over ten seeds, +0.0015 on MovieLens-20M-shaped ids over three
  # (benchmarks/README.md, Time from launch).
  config.model = ml_collections.ConfigDict(
    dict(
      embed_dim=16,
      mlp_dims=(16, 16),
      dropout=0.2,
      fm_linear_inputs=True,
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
