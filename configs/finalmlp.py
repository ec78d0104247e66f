"""FinalMLP (Mao et al., AAAI 2023) on the embedded MovieLens data.

python main.py --config=configs/finalmlp.py --workdir=/tmp/finalmlp
python main.py --config=configs/finalmlp.py:smoke --workdir=/tmp/finalmlp_smoke

pytorch-fm has no FinalMLP. Model hyper-parameters of FuxiCTR's published
template (model_zoo/FinalMLP/config/model_config.yaml, `FinalMLP_default`):
embedding 16, streams 1024-512 and 1024-512-256 without BatchNorm, gates of
1024-512, 2 fusion heads; but dropout 0.5 in both streams instead of 0, and
the user field as gate 1's context and the movie field as gate 2's (the
paper's user- and item-specific feature gating) instead of none, chosen on
the validation AUC: the template overfits this two-field data set within
three epochs. Training as pytorch-fm (configs/default.py: Adam 1e-3, batch
2048), not FuxiCTR's batch of 10000, but with weight decay 1e-4 instead of
1e-6, also chosen on the validation AUC (1e-6 to 3e-4 tried). With this
library's BatchNorm in the streams (after pytorch-fm) the fused logit
starts far from zero in training mode and the validation AUC is lower
(benchmarks/README.md, "BatchNorm off in FinalMLP and DCN-V2").
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.model_name = 'finalmlp'
  config.weight_decay = 1e-4
  config.model = ml_collections.ConfigDict(
    dict(
      embed_dim=16,
      mlp1_dims=(1024, 512),
      mlp2_dims=(1024, 512, 256),
      dropouts=(0.5, 0.5),
      use_fs=True,
      fs_dims=(1024, 512),
      # MovieLens fields: 0 user, 1 movie.
      fs1_context=(0,),
      fs2_context=(1,),
      num_heads=2,
      linear_init='lecun',
      batch_norm=False,
    )
  )
  # Lazy Adam (optim.lazy_adam: Adam on the table rows a batch reads, as
  # torch's SparseAdam; dense Adam on the rest): a higher validation and
  # test AUC than dense Adam on three splits (benchmarks/README.md, "Lazy
  # Adam for the models nearest their bar").
  config.optimizer = 'lazy_adam'
  if arg == 'smoke':
    # Narrower, so that the smoke run takes seconds, not minutes, on a CPU.
    config.model.update(
      mlp1_dims=(64, 32), mlp2_dims=(64, 32, 16), fs_dims=(64, 32)
    )
  return default.with_model_arguments(config)
