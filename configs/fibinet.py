"""FiBiNET (Huang et al., RecSys 2019) on the embedded MovieLens data.

python main.py --config=configs/fibinet.py --workdir=/tmp/fibinet
python main.py --config=configs/fibinet.py:smoke --workdir=/tmp/fibinet_smoke

pytorch-fm has no FiBiNET. Model hyper-parameters of FuxiCTR
(model_zoo/FiBiNET): reduction ratio 3, bilinear type 'field_interaction'
and no dropout from its published template `FiBiNET_default`; no hidden
layers (the output layer alone reads the bilinear features), the default of
its `FiBiNET` class, and embedding 16, as pytorch-fm's models, chosen on the
validation AUC over the template's 500-500-500 layers and embedding 40,
which overfit this two-field data set within two epochs. A sigmoid SENET
excitation (the model's default) instead of FuxiCTR's ReLU, which on these
two fields zeroes SENET's output for good 3 times in 4 from the first step
(models/fibinet.py). Training as pytorch-fm (configs/default.py: Adam 1e-3,
weight decay 1e-6, batch 2048), not FuxiCTR's batch of 10000.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'fibinet'
  config.model = ml_collections.ConfigDict(
    dict(
      embed_dim=16,
      mlp_dims=(),
      dropout=0.0,
      reduction_ratio=3.0,
      excitation='sigmoid',
      bilinear_type='field_interaction',
    )
  )
  return config
