"""What a loaded dataset must hold before a run trains on it.

`check_model_inputs` refuses data whose every field holds one id (no value
kept under `config.dataset.min_count`) and model options for inputs the data
lacks. `check_splits` refuses splits that cannot train or be scored (a batch
larger than the training split, a validation or test split of one class)
and warns of what would train poorly: fields left empty, few steps an
epoch, a large part of the split left out of each epoch. Both run after
`data.load_dataset` and before the model is built (train.py).
"""

import logging

import ml_collections
import numpy as np

import batching
import data
from datasets.core import DataError
from datasets.core import Dataset

# The part of the training split that an epoch may leave out (its last,
# partial batch) without a warning.
DROPPED_WARNING = 0.1
# Training steps an epoch below which a run is warned: early stopping reads
# the validation AUC after each epoch, which so few steps barely move.
FEW_STEPS = 10


def check(
  dataset: Dataset, config: ml_collections.ConfigDict, resuming: bool = False
) -> None:
  """`check_model_inputs` (not on a resume), then `check_splits`.

  Raises:
    DataError: naming what to change.
  """
  check_model_inputs(dataset, config, resuming)
  check_splits(dataset, config)  # Warns of fields left empty, on a resume too.


def _warn_empty_fields(dataset: Dataset, config: ml_collections.ConfigDict):
  """Warns of fields that kept no value: all their rows share one id.

  Every value of such a field was seen fewer than `min_count` times in
  training (a small file, or a large min_count): the field tells the model
  nothing, and with every field so the run learns a constant.
  """
  fields = []  # (name, kept keys) where the keys are known.
  if dataset.vocabulary is not None:
    fields += zip(dataset.field_names, dataset.vocabulary, strict=True)
  if dataset.multi_vocabulary:
    multi = dataset.multi_field_names, dataset.multi_vocabulary
    fields += zip(*multi, strict=True)
  empty = [name for name, keys in fields if not len(keys)]
  if not empty:
    return
  min_count = config.min_count
  if min_count < 0 and config.name in data.FORMAT_OF:
    min_count = data.SOURCES[data.FORMAT_OF[config.name]].MIN_COUNT
  total = len(dataset.field_names) + len(dataset.multi_field_names)
  logging.warning(
    '%d of the %d categorical fields of %s kept no value, each seen fewer'
    ' than config.dataset.min_count=%d times in training: their rows all'
    ' share the out-of-vocabulary id, which tells the model nothing (%s).'
    ' Lower config.dataset.min_count to keep more values.',
    len(empty),
    total,
    dataset.name,
    min_count,
    ', '.join(empty),
  )


def check_model_inputs(
  dataset: Dataset, config: ml_collections.ConfigDict, resuming: bool = False
):
  """Refuses inputs that cannot inform the model, or options they lack.

  A field whose every value is rarer than `config.dataset.min_count` holds
  one id, the out-of-vocabulary one, in every row: with every field so
  (and no numeric one) the model can learn only the share of positives.
  `config.model.multi_pooling` pools the lists of multi-hot fields: set to
  other than every model's default ('mean') on data without one, it would
  change nothing, silently, as a key of another format would (`resolve`).

  Not on a resume (`resuming`): runs recorded with such a config, which a
  resume may not change, still resume.

  Raises:
    DataError: naming the key and what to change.
  """
  if resuming:
    return
  dims = (*dataset.field_dims, *dataset.multi_field_dims)
  if not dataset.dense_names and all(d <= 1 for d in dims):
    min_count = config.dataset.get('min_count', -1)
    given = f'={min_count}' + " (the format's default)" * (min_count < 0)
    raise DataError(
      f'Every field of {dataset.name} holds one id, the out-of-vocabulary'
      ' one, in every row: no value is seen config.dataset.min_count'
      f'{given} times in the training file, so the model could learn only'
      ' the share of positives. Lower config.dataset.min_count.'
    )
  pooling = (config.get('model') or {}).get('multi_pooling', 'mean')
  if pooling == 'mean' or dataset.multi_field_dims:
    return
  raise DataError(
    f'config.model.multi_pooling={pooling!r} pools the lists of multi-hot'
    f' fields, and {dataset.name} has none here: leave it at its default,'
    " 'mean', or add one (config.dataset.side_features=genres on"
    ' MovieLens, config.dataset.csv.multi_hot_columns on a CSV).'
  )


def check_splits(dataset: Dataset, config: ml_collections.ConfigDict):
  """Refuses, before any training, splits that cannot train or be scored;
  warns of fields that kept no value (`_warn_empty_fields`).

  Early stopping maximises the validation AUC and the run reports the test
  AUC: both are undefined without examples of both classes.

  Raises:
    DataError: naming the split, its counts and what to change.
  """
  _warn_empty_fields(dataset, config.dataset)
  steps = batching.num_train_steps(dataset.train, config.batch_size)
  if steps == 0:
    # With valid_path and test_path the split is not drawn: path is training.
    more = (
      ' or give training more rows in config.dataset.path'
      if config.dataset.get('valid_path')
      else ' or give training a larger part with config.dataset.split'
    )
    raise DataError(
      f'config.batch_size={config.batch_size} exceeds the'
      f' {len(dataset.train)} training examples of {dataset.name}: lower it,'
      f'{more}.'
    )
  if steps < FEW_STEPS:
    # The largest power of two that makes 3 * FEW_STEPS steps or more.
    smaller = 2 ** max(int(np.log2(len(dataset.train) / (3 * FEW_STEPS))), 0)
    logging.warning(
      'config.batch_size=%d makes %d training step%s an epoch of the %d'
      ' examples: early stopping (config.patience=%d epochs) may end the run'
      ' before training has moved the validation AUC. config.batch_size=%d'
      ' makes %d.',
      config.batch_size,
      steps,
      's' * (steps != 1),
      len(dataset.train),
      config.patience,
      smaller,
      batching.num_train_steps(dataset.train, smaller),
    )
  left = len(dataset.train) % config.batch_size
  if left > DROPPED_WARNING * len(dataset.train):
    # Unshuffled, every epoch drops the same last rows (batching.train_rows).
    which = (
      'drawn anew each epoch'
      if config.get('shuffle', True)
      else 'the same last rows every epoch, config.shuffle=False: never'
      ' trained on'
    )
    logging.warning(
      'config.batch_size=%d leaves %d of the %d training examples out of each'
      ' epoch (%.0f%%; %s): a batch size that divides the split more evenly'
      ' trains on more of it.',
      config.batch_size,
      left,
      len(dataset.train),
      100 * left / len(dataset.train),
      which,
    )
  for name, split in (('validation', dataset.valid), ('test', dataset.test)):
    positives = int(np.count_nonzero(np.asarray(split.labels) > 0.5))
    negatives = len(split) - positives
    if positives and negatives:
      continue
    what = (
      'no examples'
      if not len(split)
      else f'{positives} positive and {negatives} negative examples'
    )
    use = 'early stopping' if name == 'validation' else 'the final score'
    key = 'valid_path' if name == 'validation' else 'test_path'
    if config.dataset.get(key):
      # A predefined file: the split and its seed draw nothing.
      change = (
        f' Give config.dataset.{key} (now {config.dataset[key]}) a file'
        ' that holds both labels.'
      )
    elif 'all' in dataset.sources or not dataset.sources:
      change = (
        f' Change config.dataset.split (now {tuple(config.dataset.split)})'
        ' or config.dataset.seed, or pass config.dataset.valid_path and'
        ' config.dataset.test_path files that hold both labels.'
      )
    else:  # Found in the config.dataset.path directory.
      change = (
        f' Give the {name} file in config.dataset.path (now'
        f' {config.dataset.path}) both labels.'
      )
    raise DataError(
      f'The {name} split of {dataset.name} has {what}: its AUC, which'
      f' {use} needs, is undefined without both classes.{change}'
    )
