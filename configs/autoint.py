"""AutoInt+ (Song et al., CIKM 2019) on the embedded MovieLens data.

python main.py --config=configs/autoint.py --workdir=/tmp/autoint
python main.py --config=configs/autoint.py:smoke --workdir=/tmp/autoint_smoke

Hyper-parameters of pytorch-fm's examples/main.py (its 'afi' entry:
embed_dim 16, atten_embed_dim 64, num_heads 2, num_layers 3, mlp_dims
(400, 400), dropouts 0; its third dropout rate is unused by the model), with
its training recipe (configs/default.py).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'autoint'
  config.model = ml_collections.ConfigDict(
    dict(
      embed_dim=16,
      atten_embed_dim=64,
      num_heads=2,
      num_layers=3,
      mlp_dims=(400, 400),
      dropouts=(0.0, 0.0),
      has_residual=True,
      linear_init='lecun',
    )
  )
  return default.with_model_arguments(config)
