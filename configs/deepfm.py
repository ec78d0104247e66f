"""DeepFM (Guo et al., IJCAI 2017) on the embedded MovieLens data.

python main.py --config=configs/deepfm.py --workdir=/tmp/deepfm
python main.py --config=configs/deepfm.py:smoke --workdir=/tmp/deepfm_smoke
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'deepfm'
  # As pytorch-fm's examples/main.py (its model name there is 'dfm').
  config.model = ml_collections.ConfigDict(
    dict(embed_dim=16, mlp_dims=(16, 16), dropout=0.2, linear_init='lecun')
  )
  return default.with_model_arguments(config)
