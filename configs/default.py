"""Fields shared by every model's config.

A model config imports this file, sets `model_name` (the file in models/) and
`model` (that file's constructor arguments), and overrides what differs.
`get_config('smoke')` shrinks any config to two epochs of batch 512, a run
of seconds (configs/afn.py and finalmlp.py also narrow their layers);
`with_model_arguments` adds the model's other arguments at their defaults.
"""

import dataclasses

import ml_collections

import config_rules
import data
import model_contract


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config; `arg='smoke'` makes a two-epoch run."""
  config = ml_collections.ConfigDict()

  # File in models/ and its constructor arguments (besides field_dims).
  config.model_name = 'fm'
  config.model = ml_collections.ConfigDict()

  config.dataset = ml_collections.ConfigDict()
  # ml-latest-small (embedded), ml-100k, ml-1m, ml-20m, ml-25m, criteo,
  # avazu, libfm or csv (see README, Datasets).
  config.dataset.name = 'ml-latest-small'
  # Local file or directory of the raw data, or an http(s) URL downloaded
  # once into `cache_dir` (archives unpacked; a `#sha256=<hex>` fragment is
  # checked; datasets/remote.py); empty: the embedded copy (ml-latest-small)
  # or a verified download into `cache_dir` (GroupLens).
  config.dataset.path = ''
  # Predefined validation and test files (both or neither; neither: `split`
  # of `path` at random). A libfm `path` directory finds them by name.
  config.dataset.valid_path = ''
  config.dataset.test_path = ''
  # Where downloads and encoded arrays are kept; empty: $XDG_CACHE_HOME/flax_fm
  # (default ~/.cache/flax_fm).
  config.dataset.cache_dir = ''
  # Base URL of the GroupLens archives; a mirror must serve the same files
  # (their MD5s are checked). Tests point it at a local server.
  config.dataset.url = 'https://files.grouplens.org/datasets/movielens'
  # Fractions of train / validation / test, split at random with `seed`;
  # unused (a warning says so) with predefined validation and test files.
  # Its default is data.DEFAULT_SPLIT.
  config.dataset.split = (0.8, 0.1, 0.1)
  config.dataset.seed = data.DEFAULT_SEED
  # Values seen fewer times share one out-of-vocabulary id per field, counted
  # in the training file (`path`, the whole of it when `split` divides it,
  # as pytorch-fm counts); -1: the format's default (criteo 10, avazu 4,
  # others 1).
  # MovieLens keeps every user and movie, as pytorch-fm: there it applies to
  # the side features only.
  config.dataset.min_count = -1
  # Skip and count malformed lines instead of stopping at the first one.
  config.dataset.skip_bad_lines = False
  # Lines per chunk when preprocessing: memory grows with it (and with the
  # distinct values that pass 1 counts), not with the file's lines.
  config.dataset.chunk_rows = 100_000
  # Processes that parse the chunks beside this one (each holds one chunk):
  # -1, one per core (at most 4) for files of 128 MiB or more; 0, none; n, n.
  config.dataset.parse_workers = -1
  # MovieLens movie and user features besides the ids, e.g. 'genres,year':
  # genres, year, tags (ml-latest-small, ml-20m, ml-25m); genres, year, age,
  # gender, occupation, zip (ml-100k, ml-1m). See datasets/movielens_side.py.
  config.dataset.side_features = ()
  # The keys of one format each, read only when `name` is that format (any
  # other format's key set is an error); defaults and meaning in
  # datasets/<format>.py: csv (label_column, numeric_columns,
  # categorical_columns, sep, log_bucket, float_columns, multi_hot_columns,
  # multi_hot_sep, multi_hot_max_len), criteo (log_bucket, numeric), avazu
  # (hour_features, drop_id), libfm (field_dims). E.g.
  # --config.dataset.csv.label_column=clicked.
  config.dataset.update(data.format_defaults())

  config.batch_size = 2048
  # Evaluation batches are padded to this size, rounded up to a multiple of
  # the devices (a mask drops the padding), or to fewer than twice a smaller
  # split's rows (programs.eval_batch_size). Metrics may move in the last
  # digits with it: XLA compiles each batch shape apart, and may round some
  # logits otherwise (AUC within 1e-5 on the embedded data).
  config.eval_batch_size = 8192
  # 'adam': Adam with L2 weight decay added to the gradient, as torch's
  # Adam(weight_decay=...) in pytorch-fm. 'lazy_adam': the same, but on the
  # embedding tables only the rows that the batch reads are decayed and
  # updated, moments included (TensorFlow's LazyAdam, torch's SparseAdam).
  # 'rowwise_adagrad': Adagrad with one accumulator per table row on the
  # tables (TorchRec's default), Adam on the rest. The row-wise two never
  # form a table-sized gradient: much faster steps on large tables.
  # 'auto': 'adam' below 100,000 one-hot and multi-hot ids (ml-latest-small:
  # pytorch-fm's update), 'lazy_adam' from there (Criteo, MovieLens-20M: the
  # same test AUC sooner). Training logs which one it took. A model's config
  # may name one: 'lazy_adam' in FNN's, the PNNs', DCN's, NCF's, FFM's,
  # FwFM's, DCN-V2's and FinalMLP's, 'adam' in LR's and FiBiNET's.
  config.optimizer = 'auto'
  config.learning_rate = 1e-3
  # 'rowwise_adagrad's step size on the tables (`learning_rate` is Adam's).
  config.table_learning_rate = 0.05
  config.weight_decay = 1e-6
  # The tables' own L2 coefficient (the rows of one-hot and multi-hot ids:
  # embeddings and per-id linear weights; the rest, numeric fields' vectors
  # included, keeps `weight_decay`), as FuxiCTR's embedding and network
  # regularizers. None: `weight_decay` on every parameter, as torch's Adam.
  config.table_weight_decay = ml_collections.config_dict.placeholder(float)
  config.num_epochs = 100
  # Stop after this many epochs without a better validation AUC.
  config.patience = 2
  # After each epoch without a better validation AUC the learning rates are
  # multiplied by this, down to 1e-6 (FuxiCTR's reduce_lr_on_plateau: 0.1);
  # 1: kept, as pytorch-fm.
  config.lr_plateau_factor = 1.0
  # Seeds parameter initialisation, the shuffle of every epoch and dropout.
  config.seed = 0
  # Reshuffle the training rows every epoch. False: every epoch reads them
  # in the split's stored order, as pytorch-fm's DataLoader, which never
  # shuffles (MovieLens: the seeded split's random order; the file formats
  # keep file order, so sorted or time-ordered files train in that order).
  config.shuffle = True
  # Workdir of an earlier run whose best parameters initialise every
  # parameter of the same path and shape (e.g. FNN from a trained FM).
  config.init_from = ''
  config.log_every_steps = 50
  # Training steps per dispatch to the devices (one compiled loop over a
  # stack of batches): fewer round trips on small steps, the same updates.
  config.steps_per_dispatch = 16
  # Keep the training split on every device when its arrays take at most
  # this many MiB (MovieLens: 1 MiB): the host sends only row indices.
  # 0: never.
  config.device_split_mb = 1024
  # Show progress (process 0 only): a bar on a terminal, else a log line a
  # minute.
  config.progress_bar = True

  if arg == 'smoke':
    config.num_epochs = 2
    config.batch_size = 512
    config.log_every_steps = 10
  elif arg:
    raise ValueError(f'Unknown config argument {arg!r}; use "smoke".')
  return config


def with_model_arguments(
  config: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """`config` with every other argument of its model at the model's default
  (None-valued ones aside), so that a flag can set any of them, e.g.
  `--config.model.multi_pooling=sum`."""
  model = model_contract.model_class(config.model_name)
  for field in dataclasses.fields(model):
    default = field.default
    if not (
      field.name in config_rules.TRAINER_SET
      or field.name in config.model
      or default is None
      or default is dataclasses.MISSING
    ):
      config.model[field.name] = default
  return config
