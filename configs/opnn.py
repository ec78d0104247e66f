"""Outer-product PNN (Qu et al., ICDM 2016) on the embedded MovieLens data.

python main.py --config=configs/opnn.py --workdir=/tmp/opnn
python main.py --config=configs/opnn.py:smoke --workdir=/tmp/opnn_smoke

Hyper-parameters of pytorch-fm's examples/main.py (its 'opnn' entry:
embed_dim 16, mlp_dims (16,), dropout 0.2), with its training recipe
(configs/default.py), torch.nn.Linear's initialisers in the MLP and lazy
Adam (as configs/ipnn.py). Its outer product is the kernel product of the
journal version (models/pnn.py).
"""

import ml_collections

from configs import ipnn


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ipnn.get_config(arg)
  config.model.method = 'outer'
  return config
