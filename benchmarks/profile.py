"""Where a training step's time goes, operation by operation (XLA:CPU).

  python -m benchmarks.profile --model=fnn --data=criteo
  python -m benchmarks.profile --model=deepfm --data=criteo --top=25
  python -m benchmarks.profile --model=fnn --data=criteo --program=eval
  python -m benchmarks.profile --tiny                   # seconds

Builds the throughput benchmark's runner (`throughput._JaxRunner`: the same
ids, config and pmapped train program), warms it up and traces `--dispatches`
dispatches with JAX's profiler. Each operation of the compiled train program
(a fusion, a dot, a scatter) is summed over the trace and divided by the
steps: milliseconds per step, its share of all the operations' time, runs
per step, and the JAX operation it came from (its HLO metadata: the model's
forward `jvp(...)`, backward `transpose(jvp(...))`, or the rest, the
optimizer's update; some operations XLA leaves unnamed). A loop (`while`)
is not an operation of its own: its body's operations are counted in their
rows. The operations' total exceeds the wall time of a step when XLA:CPU
runs two of them at once, on two threads. With several (emulated) devices
the times are summed over the devices and the runs counted per device.
`--program=eval` does the same for the evaluation program, per batch of
`--batch_size` rows (default 8192), whose operations are all forward.
`jax.profiler.ProfileData` reads the trace: nothing beyond jax is needed.

Results: benchmarks/results/profile.{json,csv,md} (with --tiny:
benchmarks/results/tmp/, not committed).
"""

import argparse
import collections
from collections.abc import Sequence
import glob
import os
import re
import tempfile
import time

from benchmarks import common
from benchmarks import throughput

# The opcodes of operations that stand for others: loops and branches run
# their bodies' operations, which the trace shows on their own.
CONTROL = ('while', 'conditional', 'call')
# Prefixes of a step's op_name that say nothing about where it came from.
_NOISE = re.compile(r'^jit\([^)]*\)/(shard_map/)?(while/body/)?(closed_call/)?')
_OP_NAME = re.compile(
  r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"', re.M
)
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = ', re.M)
_CONTROL = re.compile(
  rf'^\s*(?:ROOT )?%?([\w.\-]+) = .*? (?:{"|".join(CONTROL)})\(', re.M
)


def op_names(hlo_text: str) -> dict[str, str]:
  """Each instruction of a compiled program's text: its metadata op_name."""
  return {m[1]: m[2] for m in _OP_NAME.finditer(hlo_text)}


def operations(hlo_text: str) -> set[str]:
  """The instructions of a compiled program's text but its `CONTROL` ones."""
  control = {m[1] for m in _CONTROL.finditer(hlo_text)}
  return {m[1] for m in _INSTRUCTION.finditer(hlo_text)} - control


def part_of(op_name: str) -> str:
  """'forward', 'backward', 'update' (the rest) or 'unnamed' (no op_name)."""
  if not op_name:
    return 'unnamed'
  if 'transpose(jvp(' in op_name:
    return 'backward'
  if 'jvp(' in op_name:
    return 'forward'
  return 'update'


def op_times(xspace_path: str, program_ops: set[str]) -> dict[str, list]:
  """`{hlo_op: [total ns, runs]}` of `program_ops` in a trace."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top

  totals = collections.defaultdict(lambda: [0.0, 0])
  plane = ProfileData.from_file(xspace_path).find_plane_with_name('/host:CPU')
  for line in plane.lines:
    for event in line.events:
      op = dict(event.stats).get('hlo_op')
      if op not in program_ops:
        continue
      totals[op][0] += event.duration_ns
      totals[op][1] += 1
  return dict(totals)


def _compiled_text(program, *args) -> str:
  """The compiled text of a pmapped `program` for `args`."""
  if hasattr(program, 'compile'):  # programs.OptionedProgram
    return program.compile(*args).as_text()
  return program.lower(*args).compile().as_text()


def profile(spec: dict, dispatches: int, program: str = 'train') -> dict:
  """Traces `dispatches` dispatches of `spec`'s runner's `program`.

  Args:
    spec: the throughput benchmark's runner spec.
    dispatches: training dispatches, or passes over the evaluation batches.
    program: 'train' or 'eval'.

  Returns:
    `{'steps', 'wall_ms_per_step', 'ops': [{op, ms, runs, part, op_name}]}`,
    the ops sorted by time, per step (per batch for 'eval').
  """
  import jax  # pylint: disable=g-import-not-at-top

  runner = throughput._JaxRunner(spec)  # pylint: disable=protected-access
  if program == 'train':
    steps = dispatches * runner.per_dispatch
    run = lambda: runner.train(steps)[1]  # noqa: E731
    args = (runner.state, runner.train_batches[0], runner.hyper)
    text = _compiled_text(runner.p_train, *args)
  else:

    def run():
      for _ in range(dispatches):
        runner.evaluate()
      return dispatches * len(runner.eval_batches)

    text = _compiled_text(runner.p_eval, runner.state, runner.eval_batches[0])
  run()  # Compiles and warms up.
  run()
  names = op_names(text)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    try:
      start = time.perf_counter()
      ran = run()
      wall = time.perf_counter() - start
    finally:
      jax.profiler.stop_trace()
    (path,) = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)
    totals = op_times(path, operations(text))
  ops = [
    {
      'op': op,
      'ms': 1e-6 * ns / ran,
      'runs': runs / ran / runner.num_devices,
      'part': part_of(names.get(op, '')) if program == 'train' else 'forward',
      'op_name': _NOISE.sub('', names.get(op, '')),
    }
    for op, (ns, runs) in totals.items()
  ]
  ops.sort(key=lambda r: -r['ms'])
  return {'steps': ran, 'wall_ms_per_step': 1e3 * wall / ran, 'ops': ops}


def markdown(records: list[dict], info: dict, command: str) -> str:
  """The parts' totals, then the top operations (one record per operation)."""
  run = records[0]
  total = sum(r['ms'] for r in records)
  parts = collections.Counter()
  for r in records:
    parts[r['part']] += r['ms']
  shown = [r for r in records if r['rank'] < run['top']]
  unit = 'step' if run['program'] == 'train' else 'batch'
  if run['program'] == 'train':
    what = f'a step (batch {run["batch_size"]})'
    split = (
      f' (forward {parts["forward"]:.2f}, backward {parts["backward"]:.2f},'
      f' update and the rest {parts["update"]:.2f}, without a name'
      f' {parts["unnamed"]:.2f})'
    )
  else:
    what, split = f'an evaluation batch ({run["batch_size"]} rows)', ''
  return '\n'.join(
    [
      f'`{command}`',
      '',
      f'**{run["model"]}, {run["data"]}, `{run["optimizer"]}`**: {what}'
      f' takes {run["wall_ms_per_step"]:.2f} ms of wall time; its'
      f' {len(records)} operations {total:.2f} ms{split}, over'
      f' {run["steps"]} {unit}{"es" if unit == "batch" else "s"}. The'
      f' {len(shown)} longest:',
      '',
      common.markdown_table(
        [
          'operation',
          f'ms / {unit}',
          'share',
          f'runs / {unit}',
          'part',
          'from',
        ],
        [
          [
            f'`{r["op"]}`',
            f'{r["ms"]:.3f}',
            f'{r["ms"] / total:.1%}',
            f'{r["runs"]:g}',
            r['part'],
            f'`{r["op_name"][:90]}`' if r['op_name'] else '',
          ]
          for r in shown
        ],
      ),
      '',
      common.machine_line(info),
      '',
    ]
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = common.ArgumentParser(
    prog='python -m benchmarks.profile', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--model', default='fnn')
  parser.add_argument('--data', default='criteo', choices=throughput.DATA)
  parser.add_argument(
    '--optimizer', default='rowwise_adagrad', choices=throughput.OPTIMIZERS
  )
  parser.add_argument('--program', default='train', choices=('train', 'eval'))
  parser.add_argument(
    '--batch_size',
    type=int,
    default=None,
    help='default: 2048; eval 8192; --tiny 256',
  )
  parser.add_argument('--dispatches', type=int, default=4)
  parser.add_argument('--top', type=int, default=20, help='operations shown')
  parser.add_argument(
    '--tiny',
    action='store_true',
    help='seconds, tiny data (flags given explicitly win)',
  )
  parser.add_argument('--out_dir', default=None)
  parser.add_argument('--out_name', default='profile')
  args = common.parse_tiny(
    parser, argv, dict(data='synthetic', batch_size=256, dispatches=2)
  )
  if args.model not in common.model_names():  # One model: not all, a,b.
    parser.error(
      f'--model: unknown {args.model!r}; one of'
      f' {", ".join(common.model_names())}.'
    )
  field_dims = throughput.FIELD_DIMS.get(
    args.data,
    throughput.TINY_FIELD_DIMS if args.tiny else throughput.ML20M_FIELD_DIMS,
  )
  if args.batch_size is None:
    args.batch_size = 2048 if args.program == 'train' else 8192
  for key in ('batch_size', 'dispatches', 'top'):
    if getattr(args, key) <= 0:
      parser.error(f'--{key} must be positive')
  args.spec = {
    'model': args.model,
    'data': args.data,
    'field_dims': field_dims,
    'batch_size': args.batch_size,
    'eval_batch_size': args.batch_size,
    'eval_batches': 1 if args.tiny else 4,
    'pool_batches': 4 if args.tiny else 32,
    'seed': 0,
    'cache_dir': '',
    'steps_per_dispatch': None,
    'optimizer': args.optimizer,
  }
  if args.out_dir is None:
    args.out_dir = os.path.join(common.RESULTS, 'tmp' if args.tiny else '')
  common.check_dir(args.out_dir, '--out_dir')
  return args


@common.user_errors()
def main(argv: Sequence[str] | None = None) -> list[dict]:
  """Profiles; returns one record per operation, the longest first."""
  args = parse_args(argv)
  info = common.machine_info()
  result = profile(args.spec, args.dispatches, args.program)
  run = {
    'model': args.model,
    'data': args.data,
    'optimizer': args.optimizer,
    'program': args.program,
    'batch_size': args.batch_size,
    'steps': result['steps'],
    'wall_ms_per_step': result['wall_ms_per_step'],
    'top': args.top,
  }
  records = [{**run, 'rank': i, **op} for i, op in enumerate(result['ops'])]
  command = common.command_line('profile', argv)
  common.write_results(
    args.out_dir, args.out_name, records, info, markdown, command
  )
  print(markdown(records, info, command))
  return records


if __name__ == '__main__':
  common.run(main)
