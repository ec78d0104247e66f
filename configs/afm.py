"""Attentional FM (Xiao et al., IJCAI 2017) on the embedded MovieLens data.

python main.py --config=configs/afm.py --workdir=/tmp/afm
python main.py --config=configs/afm.py:smoke --workdir=/tmp/afm_smoke

The paper's L2 penalty on the attention network: `--config.model.attn_l2=...`.

On this data (two fields: user, movie) there is one pair, whose softmax weight
is always 1: the attention network (and its penalty) cannot change the output,
and AFM is FM with a learned weight per factor dimension (p) and dropout.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'afm'
  # As pytorch-fm's examples/main.py; attn_l2=0: no attention penalty, as
  # pytorch-fm (the paper tunes it per data set).
  config.model = ml_collections.ConfigDict(
    dict(embed_dim=16, attn_size=16, dropouts=(0.2, 0.2), attn_l2=0.0)
  )
  return default.with_model_arguments(config)
