"""Wide & Deep (Cheng et al., DLRS 2016) on the embedded MovieLens data.

python main.py --config=configs/wd.py --workdir=/tmp/wd
python main.py --config=configs/wd.py:smoke --workdir=/tmp/wd_smoke

Cross-product features in the wide part (pairs of field indices), e.g.
`--config.model.cross_fields='((0, 1),)'`; off by default (see models/wd.py).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'wd'
  # Sizes as pytorch-fm's examples/main.py; no crosses, as pytorch-fm.
  config.model = ml_collections.ConfigDict(
    dict(
      embed_dim=16,
      mlp_dims=(16, 16),
      dropout=0.2,
      cross_fields=(),
      cross_buckets=2**17,
      linear_init='lecun',
    )
  )
  return default.with_model_arguments(config)
