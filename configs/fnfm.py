"""Field-aware Neural FM (Zhang et al., 2019) on the embedded MovieLens data.

python main.py --config=configs/fnfm.py --workdir=/tmp/fnfm
python main.py --config=configs/fnfm.py:smoke --workdir=/tmp/fnfm_smoke

Warm start from a trained FFM (same embed_dim, 4 in both configs): its
`FieldAwareEmbedding_0` and `FeaturesLinear_0` are copied.

python main.py --config=configs/ffm.py --workdir=/tmp/ffm
python main.py --config=configs/fnfm.py --workdir=/tmp/fnfm_from_ffm \
  --config.init_from=/tmp/ffm
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'fnfm'
  # As pytorch-fm's examples/main.py. dropouts: after the interaction layer,
  # after each hidden layer.
  config.model = ml_collections.ConfigDict(
    dict(embed_dim=4, mlp_dims=(64,), dropouts=(0.2, 0.2), linear_init='lecun')
  )
  return default.with_model_arguments(config)
