"""Two variants of one model's train program, timed in one process.

Between processes minutes apart, a small shared machine's speed drifts (on
the 2-core test machine by up to a quarter), more than most changes to a
step. Within one process, with the two compiled programs alternated, the
drift falls on both. So a change to a step is measured here: each variant is
the model's config with `--set` and then its own `--a` or `--b` overrides
(`key=value`, nested keys dotted: `model.dropout=0.2`), trained on its
dataset's training split (the embedded data unless `--set` names another)
as `train.train_and_evaluate` trains it: the same pmapped program, stacks
of `steps_per_dispatch` batches, the split on the devices when it fits.
After one warm-up dispatch each, `--rounds` rounds of `--dispatches`
dispatches are timed in the order AB, BA, AB, ...; each round gives training
examples/s. Give the same overrides twice for an A/A run: its ratio is the
noise. `--a_xla` / `--b_xla` (`option=value`) compile a variant's train
program with XLA options (`DebugOptions` fields, as `XLA_FLAGS` names
them), which `XLA_FLAGS` could only set for both.

  python -m benchmarks.ab --model=deepfm --a=optimizer=adam \\
    --b=optimizer=rowwise_adagrad
  python -m benchmarks.ab --model=deepfm \\
    --b_xla=xla_cpu_experimental_ynn_fusion_type=

Results: benchmarks/results/<out_name>.{json,csv,md} (default ab).
"""

from collections.abc import Sequence
import itertools
import os
import statistics
import time

from benchmarks import common

VARIANTS = ('a', 'b')
# Distinct stacks of batches each variant cycles through: the epoch's first
# ones, not the whole epoch held in memory.
POOL = 8


class Variant:
  """One config's compiled train program, its state and its stacks."""

  def __init__(self, config, xla_options: dict[str, str] | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    import batching  # pylint: disable=g-import-not-at-top
    import data  # pylint: disable=g-import-not-at-top
    import data_checks  # pylint: disable=g-import-not-at-top
    import programs  # pylint: disable=g-import-not-at-top
    import train  # pylint: disable=g-import-not-at-top

    self.jax = jax
    dataset = data.load_dataset(config.dataset)
    data_checks.check_splits(dataset, config)  # A batch larger than the split.
    model = train.create_model(
      config, dataset.field_dims, train.AXIS, **batching.model_fields(dataset)
    )
    self.p_train, _ = train.pmapped_steps(model, config)
    init = train.state_initializer(config, model)
    self.state = programs.replicate(init(jax.random.key(config.seed)))
    self.hyper = programs.replicate(train.hyperparameters(config))
    self.resident = programs.replicate(
      batching.resident_split(dataset.train, config)
    )
    sizes, stacks = programs.epoch_stacks(
      dataset.train, config, 0, self.resident
    )
    # Up to `POOL` full stacks of the first epoch, cycled (a shorter
    # remainder runs the same program, padded, but trains fewer examples).
    self.steps = max(sizes)
    full = (s for s, n in zip(stacks, sizes, strict=True) if n == self.steps)
    self.stacks = list(itertools.islice(full, POOL))
    self.count = programs.replicate(np.int32(self.steps))
    self.examples = self.steps * config.batch_size
    self.dispatches = 0
    if xla_options:  # Over the run's own (`programs.with_options`).
      args = (self.state, self.stacks[0], self.hyper, self.resident)
      lowered = self.p_train.lower(*args, self.count)
      options = {**getattr(self.p_train, 'options', {}), **xla_options}
      self.p_train = lowered.compile(compiler_options=options)
    self.dispatch(1)  # Compiles, and warms up.

  def dispatch(self, n: int) -> None:
    """Runs `n` dispatches and waits for the last."""
    for _ in range(n):
      stack = self.stacks[self.dispatches % len(self.stacks)]
      self.state, loss = self.p_train(
        self.state, stack, self.hyper, self.resident, self.count
      )
      self.dispatches += 1
    self.jax.block_until_ready((self.state, loss))

  def trained_steps(self) -> int:
    return int(self.jax.device_get(self.state.step)[0])


# XLA takes its boolean options as Python booleans.
_BOOLEANS = {'true': True, 'false': False}


def _xla_options(items: list[str], variant: str) -> dict[str, str | bool]:
  """`['option=value', ...]` -> `{option: value}`, values as XLA reads them:
  XLA takes its boolean options as Python booleans, not strings."""
  options = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key.startswith('xla_'):
      raise SystemExit(
        f'--{variant}_xla: {item!r} is not xla_<option>=value (e.g.'
        ' xla_cpu_experimental_ynn_fusion_type=).'
      )
    options[key] = _BOOLEANS.get(value.lower(), value)
  return options


def measure(variants: dict, rounds: int, dispatches: int) -> dict:
  """Examples/s of each variant per round, rounds in the order AB, BA, ..."""
  rates = {name: [] for name in variants}
  names = list(variants)
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      variant = variants[name]
      start = time.perf_counter()
      variant.dispatch(dispatches)
      elapsed = time.perf_counter() - start
      rates[name].append(variant.examples * dispatches / elapsed)
  return rates


def markdown(records: list[dict], info: dict, command: str) -> str:
  rows = []
  for r in records:
    for v in VARIANTS:
      rounds = r[f'{v}_rounds']
      changes = [f'{k}={x!r}' for k, x in r[f'{v}_overrides'].items()]
      changes += [f'XLA {k}={x!r}' for k, x in r.get(f'{v}_xla', {}).items()]
      rows.append(
        [
          r['model'],
          v,
          ', '.join(changes) or '(config)',
          common.fmt(r[f'{v}_ex_per_s']),
          f'{common.fmt(min(rounds))} - {common.fmt(max(rounds))}',
        ]
      )
  header = ['model', 'variant', 'overrides', 'train ex/s (median)', 'rounds']
  ratios = ', '.join(f'{r["model"]} b/a {r["b_over_a"]:.3f}' for r in records)
  return '\n\n'.join(
    [
      f'`{command}`',
      common.markdown_table(header, rows),
      f'Ratio of the medians: {ratios}. Common overrides:'
      f' {records[0]["set"] or "none"}; {records[0]["rounds"]} rounds of'
      f' {records[0]["dispatches"]} dispatches each, alternated.',
      common.machine_line(info),
    ]
  )


@common.user_errors('--set')
def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = common.ArgumentParser(
    prog='python -m benchmarks.ab', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--model', required=True, help='a config in configs/')
  for flag, what in (
    ('--set', 'both variants'),
    ('--a', 'variant a'),
    ('--b', 'variant b'),
  ):
    parser.add_argument(
      flag, action='append', default=[], help=f'key=value for {what}'
    )
  for v in VARIANTS:
    parser.add_argument(
      f'--{v}_xla',
      action='append',
      default=[],
      help=f"option=value: an XLA option of variant {v}'s train program",
    )
  parser.add_argument('--rounds', type=int, default=12)
  parser.add_argument('--dispatches', type=int, default=4, help='per round')
  parser.add_argument('--out_dir', default=None, help='default: results/')
  parser.add_argument('--out_name', default='ab')
  parser.add_argument(
    '--tiny',
    action='store_true',
    help='a seconds-long run: 2 rounds of 1, batch_size=256 (flags given'
    ' explicitly win)',
  )
  args = common.parse_tiny(parser, argv, dict(rounds=2, dispatches=1))
  if args.tiny:  # A --set=batch_size=..., later, wins.
    args.set = ['batch_size=256', *args.set]
  if args.out_dir is None:
    args.out_dir = common.RESULTS
    if args.tiny:
      args.out_dir = os.path.join(common.RESULTS, 'tmp')
  common.check_dir(args.out_dir, '--out_dir')
  if args.model not in common.model_names():
    raise SystemExit(
      f'--model: unknown {args.model!r}; one of'
      f' {", ".join(common.model_names())}.'
    )
  common.check_least(args, {'rounds': 1, 'dispatches': 1})
  common_overrides = common.parse_overrides(args.set, '--set')
  overrides = {
    v: common.parse_overrides(getattr(args, v), f'--{v}') for v in VARIANTS
  }
  configs = {
    v: common.get_config(
      args.model,
      None,
      common_overrides,
      overrides[v],
      flags=('--set', f'--{v}'),
    )
    for v in VARIANTS
  }
  xla = {v: _xla_options(getattr(args, f'{v}_xla'), v) for v in VARIANTS}
  info = common.machine_info()
  variants = {}
  for v in VARIANTS:
    try:
      variants[v] = Variant(configs[v], xla[v])
    except Exception as e:  # pylint: disable=broad-except
      known = ('While setting option', 'No such compile option')
      if not xla[v] or not any(k in str(e) for k in known):
        raise
      raise SystemExit(f'--{v}_xla: {str(e).splitlines()[0]}') from e
  rates = measure(variants, args.rounds, args.dispatches)
  record = {
    'model': args.model,
    'set': common_overrides,
    'rounds': args.rounds,
    'dispatches': args.dispatches,
  }
  for v in VARIANTS:
    record.update(
      {
        f'{v}_overrides': overrides[v],
        f'{v}_xla': xla[v],
        f'{v}_ex_per_s': statistics.median(rates[v]),
        f'{v}_rounds': rates[v],
        f'{v}_steps_per_dispatch': variants[v].steps,
        f'{v}_trained_steps': variants[v].trained_steps(),
      }
    )
  record['b_over_a'] = record['b_ex_per_s'] / record['a_ex_per_s']
  print(
    f'{args.model}: a {record["a_ex_per_s"]:,.0f} ex/s, b'
    f' {record["b_ex_per_s"]:,.0f} ex/s, b/a {record["b_over_a"]:.3f}'
  )
  common.write_results(
    args.out_dir,
    args.out_name,
    [record],
    info,
    markdown,
    common.command_line('ab', argv),
  )
  return [record]


if __name__ == '__main__':
  common.run(main)
