"""Datasets: the registry of sources, the cache and the splits.

A dataset is a table of categorical fields encoded to dense ids
`0..field_dims[f]-1`, with a 0/1 label, split into train, validation and
test (one file at random: datasets/split.py). `config.dataset.name` picks a
source module of datasets/; its format keys sit in
`config.dataset.<format>`. Encoded splits are cached as `.npy` files
(memory-mapped when read), under a key of the source files' content and of
every option, so a second run skips the encoding and a changed input never
serves stale data. Every load checks the cache against its checksums and
the data's invariants (datasets/cache.py), and rebuilds a damaged one; a
build names the caches that its files' older contents left behind
(datasets/housekeeping.py).
batching.py cuts the splits into batches.
"""

from collections.abc import Callable, Iterator, Sequence
import contextlib
import importlib
import logging
import os

import ml_collections
import numpy as np

from datasets import cache
from datasets import core
from datasets import digests
from datasets import housekeeping
from datasets import remote
from datasets import split as split_lib
import utils

# Re-exported: the names that training, benchmarks and tests use.
DataError = core.DataError
DownloadError = core.DownloadError
Dataset = core.Dataset
Split = core.Split
cache_dir = core.cache_dir
split_sizes = split_lib.split_sizes
split_indices = split_lib.split_indices
DEFAULT_SPLIT = split_lib.DEFAULT
# configs/default.py's config.dataset.seed.
DEFAULT_SEED = 0

ROOT = os.path.dirname(os.path.abspath(__file__))

# The registry: format -> its source module, datasets/<format>.py, whose
# format keys are config.dataset.<format>. A new source is a new module and
# its name here.
FORMATS = ('movielens', 'criteo', 'avazu', 'libfm', 'csv')
SOURCES = {f: importlib.import_module(f'datasets.{f}') for f in FORMATS}

# Every config.dataset.name, and the format that serves it.
FORMAT_OF = {name: fmt for fmt, s in SOURCES.items() for name in s.NAMES}

# Keys of config.dataset that every format reads.
SHARED_KEYS = (
  *('name', 'path', 'valid_path', 'test_path', 'cache_dir', 'url', 'split'),
  *('seed', 'min_count', 'skip_bad_lines', 'chunk_rows', 'side_features'),
  'parse_workers',
)

SPLITS = cache.SPLITS


def format_defaults() -> dict[str, ml_collections.ConfigDict]:
  """`{format: its keys and defaults}`, the sections of `config.dataset`."""
  return {
    fmt: ml_collections.ConfigDict(source.DEFAULTS)
    for fmt, source in SOURCES.items()
    if source.DEFAULTS
  }


def resolve(config: ml_collections.ConfigDict):
  """Checks `config.dataset` and picks its source.

  Returns:
    (the source module, `config` with `min_count` resolved, its format
    keys as a ConfigDict with the defaults filled in).

  Raises:
    DataError: an unknown name or key, or a key of another format set.
  """
  if config.name not in FORMAT_OF:
    raise DataError(
      f'config.dataset.name: unknown dataset {config.name!r}; choose one of'
      f' {", ".join(FORMAT_OF)}.'
    )
  selected = FORMAT_OF[config.name]
  for key in sorted(set(config.keys()) - set(SHARED_KEYS) - set(SOURCES)):
    owner = next((f for f, s in SOURCES.items() if key in s.DEFAULTS), '')
    hint = f' (it is config.dataset.{owner}.{key} now)' if owner else ''
    raise DataError(f'config.dataset.{key}: unknown key{hint}.')
  for fmt, source in SOURCES.items():
    for key, value in (config.get(fmt) or {}).items():
      if key not in source.DEFAULTS:
        raise DataError(f'config.dataset.{fmt}.{key}: unknown key.')
      if fmt != selected and value != source.DEFAULTS[key]:
        raise DataError(
          f'config.dataset.{fmt}.{key} is set but config.dataset.name is'
          f' {config.name!r}: remove it, or set config.dataset.name to'
          f' {" or ".join(source.NAMES)}.'
        )
  if config.chunk_rows <= 0:
    raise DataError(
      f'config.dataset.chunk_rows must be positive, got {config.chunk_rows}'
    )
  source = SOURCES[selected]
  options = ml_collections.ConfigDict(source.DEFAULTS)
  options.update(dict(config.get(selected) or {}))
  for key in getattr(source, 'NAME_LISTS', ()):  # As names: the cache's key
    options[key] = core.name_list(options[key])  # and encoder.json's lists.
  features = core.name_list(config.get('side_features') or ())
  allowed = getattr(source, 'SIDE_FEATURES', {}).get(config.name, ())
  for feature in features:
    if feature not in allowed:
      choices = ', '.join(allowed) or 'none'
      raise DataError(
        f'config.dataset.side_features: {config.name} has no side feature'
        f' {feature!r} (side features of {config.name}: {choices}).'
      )
  config = ml_collections.ConfigDict(config.to_dict())
  if config.min_count < 0:
    config.min_count = source.MIN_COUNT
  # In the source's order, so that a reordered list shares the cache.
  config.side_features = tuple(f for f in allowed if f in features)
  return source, config, options


# --------------------------------------------------------------------------
# The cache (datasets/cache.py): one directory per key of the sources'
# content and of every option.


def cache_spec(
  config: ml_collections.ConfigDict,
  options: ml_collections.ConfigDict,
  paths: dict[str, str],
) -> dict:
  """Everything the encoded arrays depend on: the cache key's input."""
  out = {
    'version': cache.VERSION,
    'name': config.name,
    'sources': _fingerprints(config, paths),
    'min_count': config.min_count,
    'skip_bad_lines': config.skip_bad_lines,
    'options': options.to_dict(),
  }
  if config.get('side_features'):  # Absent otherwise: older keys stay valid.
    out['side_features'] = list(config.side_features)
  if 'all' in paths:
    out.update(split=list(config.split), seed=config.seed)
  return out


def _fingerprints(config: ml_collections.ConfigDict, paths: dict) -> dict:
  memo = os.path.join(cache_dir(config), 'digests')
  return {r: digests.fingerprint(p, memo) for r, p in paths.items()}


def _take(arrays: Sequence[np.ndarray | None], index) -> tuple:
  return tuple(None if a is None else a[index] for a in arrays)


def _routed(encoded: core.Encoded, config) -> Iterator[tuple]:
  """`(split index, ids, labels[, multi_ids, dense])` pieces (`core.Chunk`
  with the split for the role): by the file's role, or at random."""
  if 'all' not in encoded.rows:
    for role, *arrays in encoded.chunks():
      yield SPLITS.index(role), *arrays
    return
  parts = split_indices(encoded.rows['all'], config.split, config.seed)
  if encoded.in_memory:  # Each split in the order of the permutation.
    [(_, *arrays)] = encoded.chunks()
    for s, part in enumerate(parts):
      yield s, *_take(arrays, part)
    return
  # Streamed: one byte per row says its split; rows stay in file order.
  assignment = np.full(encoded.rows['all'], 2, np.int8)
  assignment[parts[0]], assignment[parts[1]] = 0, 1
  del parts
  row = 0
  for _, *arrays in encoded.chunks():
    count = len(arrays[0])
    where = assignment[row : row + count]
    if len(where) != count:
      raise DataError(f'{config.name}: more rows than in pass 1 (changed?)')
    for s in range(len(SPLITS)):
      yield s, *_take(arrays, where == s)
    row += count


def _build(
  directory, source, config, options, paths, spec, replace, stats
) -> None:
  """Encodes the sources and writes the cache; a source changed since its
  `stats`, taken before `spec` hashed it, is an error.

  A source changed mid-way also makes pass 2 read other lines than pass 1
  counted (a line cut short, a row too many): whatever fails then is
  reported as the change, not as its symptom.
  """
  try:
    with core.reading(*paths.values()):
      encoded = source.build(config, options, paths)
    if not encoded.field_dims:  # After pass 1, before pass 2 writes anything.
      raise DataError(
        f'config.dataset ({config.name}): at least one categorical (one-hot)'
        ' field is needed besides multi-hot and float ones; name one in'
        ' config.dataset.csv.categorical_columns or numeric_columns.'
      )
    if 'all' in encoded.rows:
      sizes = split_sizes(encoded.rows['all'], config.split)
    else:
      sizes = tuple(encoded.rows[split] for split in SPLITS)
    logging.info(
      '%s: %s examples, field_dims %s', config.name, sizes, encoded.field_dims
    )

    def parts():
      yield from _routed(encoded, config)
      _check_unchanged(stats)  # Before the cache is published.

    # Closed at once if the writer stops: a traceback kept (a notebook keeps
    # the last) would keep the pass and its parse workers alive.
    with contextlib.closing(parts()) as pieces:
      cache.write(directory, encoded, sizes, pieces, spec, replace, paths)
  except DataError as e:
    _check_unchanged(stats, e)
    raise
  core.release_memory()  # What the passes freed, before training takes over.


def _check_unchanged(stats: dict, error: Exception | None = None) -> None:
  """Raises a DataError, after `error` if given, if a source has changed
  (or gone) since its `stats` were taken."""
  for path, stat in stats.items():
    try:
      same = cache.source_stat(path) == stat
    except OSError:
      same = False
    if not same:
      message = f'{path} changed during preprocessing; run again.'
      raise DataError(message) from error


@utils.interrupts_heard()  # A Ctrl-C in a gc callback is not lost.
def load_dataset(
  config: ml_collections.ConfigDict,
  check_sources: Callable[[dict[str, dict]], None] | None = None,
) -> Dataset:
  """Loads (from the cache when possible) the dataset `config.dataset`.

  Args:
    config: the `dataset` part of the config.
    check_sources: called with the files' digests, `{role: {'size',
      'sha256'}}` (the `Dataset.sources` to come), before the cache is read
      or built; what it raises ends the load (a resume's files that hold
      other bytes than recorded: `sources.check`). The files are hashed
      once, for it and the cache's key.

  Returns:
    The encoded dataset, its splits memory-mapped from the cache, checked:
    ids inside `field_dims` and labels 0 or 1.

  Raises:
    DataError: unknown name or key, missing, unreadable or malformed file,
      or a cache that cannot be written.
  """
  source, config, options = resolve(config)
  if (
    config.name == 'criteo'
    and options.numeric == 'dense'
    and not options.log_bucket
  ):
    logging.warning(
      'config.dataset.criteo.log_bucket=False has no effect with'
      " numeric='dense', which feeds the integer columns as"
      ' log(1 + max(x, 0)), unbucketed.'
    )
  config = remote.localize(config)
  paths = source.files(config)
  if 'all' in paths:
    split_sizes(1, config.split)  # Validates the fractions before any work.
  else:
    _warn_unused_split(config, paths)
  with core.reading(*paths.values()):
    stats = {path: cache.source_stat(path) for path in paths.values()}
  spec = cache_spec(config, options, paths)
  if check_sources is not None:
    check_sources(spec['sources'])
  directory = os.path.join(
    cache_dir(config), 'encoded', f'{config.name}-{cache.key(spec)}'
  )
  dataset = _cached(directory, spec)
  if dataset is not None:
    return dataset
  _check_writable(directory)
  # One process builds; the others (a sweep started at once) wait for it.
  with core.building(directory, os.path.join(cache_dir(config), 'locks')):
    # Built by the process waited for? (Damage was reported above.)
    dataset = _cached(directory, spec, warn=False)
    if dataset is not None:
      return dataset
    replace = os.path.lexists(directory)
    _build(directory, source, config, options, paths, spec, replace, stats)
  housekeeping.report_superseded(directory, spec, paths)
  try:
    return cache.read(directory, spec)
  except cache.Damaged as e:
    # The rows passed the same checks on the way in: a bug or a bad disk.
    raise RuntimeError(f'{directory} fails its check once written: {e}') from e


def _check_writable(directory: str) -> None:
  """Fails now, not after pass 1 (minutes on a big file), where the cache
  `directory` cannot be written: as `cache.write` would then."""
  parent = existing = os.path.dirname(directory)
  # The probe goes where the first missing directory would be made, so that
  # a run that fails (a bad line) leaves cache_dir as it found it.
  while existing and not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing or '.'):
      os.makedirs(parent)  # Fails: a file on the path.
    os.rmdir(core.make_temp_dir(existing or '.', '.probe-'))
  except OSError as e:
    raise DataError(
      f'Could not write the dataset cache {directory}: {utils.os_problem(e)}.'
      ' Free some space or set config.dataset.cache_dir to a writable'
      ' directory.'
    ) from e


def _warn_unused_split(config: ml_collections.ConfigDict, paths: dict) -> None:
  """Warns that `config.split` and `seed`, set, are not used: predefined
  validation and test files (`paths`) give those splits, the training file
  trains, and nothing is drawn at random.

  Not an error: runs recorded with such a config still resume.
  """
  train = paths['train']
  if config.valid_path:
    given = 'config.dataset.valid_path and test_path'
    instead = f'leave valid_path and test_path empty to split {train}'
  else:
    given = f'found in the {config.name} directory config.dataset.path'
    instead = f'name {train} itself as config.dataset.path to split it'
  files = (
    f'validation and test are the predefined files {paths["valid"]} and'
    f' {paths["test"]} ({given}), and all of {train} trains'
  )
  split = tuple(config.split)
  if [float(f) for f in split] != list(DEFAULT_SPLIT):
    logging.warning(
      'config.dataset.split=%s is not used: %s. In a new run, leave split at'
      ' its default %s, or %s at random (a resumed run must keep its'
      ' recorded split).',
      split,
      files,
      DEFAULT_SPLIT,
      instead,
    )
  if config.seed != DEFAULT_SEED:
    logging.warning(
      'config.dataset.seed=%s is not used: it seeds the random split, and %s:'
      ' the seed draws nothing (config.seed seeds the parameters, the shuffle'
      ' and dropout). In a new run, leave dataset.seed at its default'
      ' %s, or %s at random (a resumed run must keep its recorded seed).',
      config.seed,
      files,
      DEFAULT_SEED,
      instead,
    )


def _cached(directory: str, spec: dict, warn: bool = True) -> Dataset | None:
  """The dataset cached in `directory`; None if there is none, or damaged."""
  if not os.path.lexists(directory):
    return None
  try:
    return cache.read(directory, spec)
  except cache.Damaged as e:
    if warn:
      logging.warning('Rebuilding the damaged cache %s: %s', directory, e)
    return None


def describe(dataset: Dataset) -> str:
  """What `dataset` holds, in one line for the run's log."""
  parts = [f'fields {dataset.field_names}', f'field_dims {dataset.field_dims}']
  if dataset.multi_field_names:
    parts.append(f'multi-hot fields {dataset.multi_field_names}')
  if dataset.dense_names:
    parts.append(f'numeric fields {dataset.dense_names}')
  sizes = [len(s) for s in (dataset.train, dataset.valid, dataset.test)]
  parts.append(f'train/valid/test examples {sizes}')
  return f'Dataset {dataset.name}: ' + ', '.join(parts)
