"""AFN (Cheng et al., AAAI 2020) on the embedded MovieLens data.

python main.py --config=configs/afn.py --workdir=/tmp/afn
python main.py --config=configs/afn.py:smoke --workdir=/tmp/afn_smoke

Hyper-parameters of pytorch-fm's examples/main.py (GitHub master; its 'afn'
entry: embed_dim 16, LNN_dim 1500, mlp_dims (400, 400, 400), dropouts 0),
with its training recipe (configs/default.py).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'afn'
  config.model = ml_collections.ConfigDict(
    dict(
      embed_dim=16,
      lnn_dim=1500,
      mlp_dims=(400, 400, 400),
      dropout=0.0,
      linear_init='lecun',
    )
  )
  if arg == 'smoke':
    # Narrower, so that the smoke run takes seconds, not minutes, on a CPU.
    config.model.update(lnn_dim=64, mlp_dims=(64, 64, 64))
  return default.with_model_arguments(config)
