"""Synthetic Criteo-, Avazu- and MovieLens-20M-format files of N lines, seeded.

python -m benchmarks.synthetic --format=criteo --lines=1000000 \
  --out=/tmp/criteo_1m.txt

The layout is the raw format (Criteo DAC `train.txt`: label, 13 integer and
26 hexadecimal categorical columns, tab-separated, empty = missing; Avazu
`train`: a header, then id, click, hour and 21 categorical columns,
comma-separated; MovieLens-20M `ratings.csv`: a header, then userId, movieId,
rating, timestamp), so that data.py preprocesses it exactly as it would the
real files. Each categorical column draws from a vocabulary of the size the
full data set has (Criteo: the Kaggle train.txt counts quoted by DLRM;
Avazu: its train file; MovieLens: ML-20M's 138,493 users and 26,744 rated
movies, every one rated at least once when there are lines enough) with
Zipf skew (exponent 1.1), so the share of rare values and the vocabularies
that preprocessing must count are of the real order; missing rates follow
the real columns roughly. Labels depend on a few columns (CTR about 0.31 for
Criteo, 0.21 for Avazu, measured on 400K lines; for MovieLens, ratings from
user and movie biases and rank-8 factors, about half above 3), so a model
trained on the file does better than chance. The same seed gives the same
bytes. Unlike the real file, Criteo's integer columns hold -1 where a draw
is below 1 (real ones: 0 and up, but I2): one more class each, kept so that
the Criteo shape of benchmarks/README.md (`throughput.CRITEO_FIELD_DIMS`)
stays the one measured.

`--cardinality=kaggle` (Criteo only) gives each categorical column its own
Zipf exponent and vocabulary (`CRITEO_KAGGLE`), fitted so that 45,840,617
lines are expected to hold the Kaggle file's distinct values per column and,
at `min_count` 10, the values that pytorch-fm keeps (`CRITEO_KEPT`): 33.8M
distinct values in all, 1.09M kept, most values rare. The default's single
exponent on those vocabularies gives far fewer distinct values, as a Zipf
law of exponent 1.1 rarely draws past its first ranks. Fewer lines are a
sample of the same distribution, so they hold what a random sample of the
real file would under the fit (`expected_values`): 5.6M distinct at 5M
lines, 9.9M at 10M, 17.4M at 20M.
"""

from collections.abc import Sequence
import os
import sys
import time

import numpy as np

from benchmarks import common

# Distinct values of C1..C26 in Criteo's 45.8M-line Kaggle train.txt.
CRITEO_CARDINALITIES = (
  *(1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683),
  *(8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15),
  *(286181, 105, 142572),
)
CRITEO_CAT_MISSING = (
  *(0, 0, 0.03, 0.03, 0, 0.12, 0, 0, 0, 0, 0, 0.03, 0, 0, 0, 0.03, 0, 0),
  *(0.44, 0.44, 0.03, 0.76, 0, 0.03, 0.44, 0.44),
)
# Values of C1..C26 seen at least 10 times in the same file: pytorch-fm's
# field_dims (min_threshold 10) less the out-of-vocabulary id, as quoted.
CRITEO_KEPT = (
  *(1457, 554, 193948, 138800, 305, 18, 11969, 633, 3, 42645, 5177, 192772),
  *(3174, 26, 11421, 181074, 10, 4653, 2031, 4, 189656, 17, 15, 59696, 85),
  45570,
)
KAGGLE_LINES = 45_840_617
# --cardinality=kaggle: (Zipf exponent, vocabulary) of C1..C26, fitted with
# `expected_values` to CRITEO_CARDINALITIES and CRITEO_KEPT over
# KAGGLE_LINES lines (`fit`). C6, C14 and C22 keep exponent 1.1: no power
# law on 24, 27 or 18 values leaves the few rare ones the real file has.
CRITEO_KAGGLE = (
  *((1.1, 1460), (2.478, 583), (1.061, 3091364111), (1.149, 7387814)),
  *((1.1, 305), (1.1, 24), (1.557, 12517), (1.1, 633), (1.1, 3)),
  *((1.351, 93799), (1.758, 5683), (1.07, 761161827), (1.1, 3194)),
  *((1.1, 27), (1.592, 14995), (1.093, 96322386), (1.1, 10), (1.794, 5652)),
  *((1.919, 2173), (1.1, 4), (1.079, 298920022), (1.1, 18), (1.1, 15)),
  *((1.29, 325161), (3.536, 105), (1.265, 146755)),
)
CARDINALITIES = ('default', 'kaggle')
# Missing rate and log-normal location of I1..I13.
CRITEO_INT_MISSING = (
  *(0.45, 0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0005, 0.04, 0.45, 0.04, 0.77),
  0.22,
)
CRITEO_INT_MU = (
  0.5,
  1.5,
  2.5,
  1.8,
  7.5,
  3.5,
  1.5,
  2.5,
  3.5,
  0.3,
  1.0,
  0.3,
  1.8,
)

# Avazu columns after id, click and hour: (cardinality, hexadecimal?).
AVAZU_CATEGORICAL = (
  ('C1', 7, False),
  ('banner_pos', 7, False),
  ('site_id', 4737, True),
  ('site_domain', 7745, True),
  ('site_category', 26, True),
  ('app_id', 8552, True),
  ('app_domain', 559, True),
  ('app_category', 36, True),
  ('device_id', 2686408, True),
  ('device_ip', 6729486, True),
  ('device_model', 8251, True),
  ('device_type', 5, False),
  ('device_conn_type', 4, False),
  ('C14', 2626, False),
  ('C15', 8, False),
  ('C16', 9, False),
  ('C17', 435, False),
  ('C18', 4, False),
  ('C19', 68, False),
  ('C20', 172, False),
  ('C21', 60, False),
)

# MovieLens-20M: 138,493 users and 26,744 rated movies.
ML20M_USERS, ML20M_MOVIES = 138_493, 26_744
ML_RANK = 8

ZIPF_EXPONENT = 1.1
CHUNK = 200_000
_HEX = np.frombuffer(b'0123456789abcdef', np.uint8)


def zipf_indices(
  rng: np.random.Generator, size: int, vocab: int, exponent: float
) -> np.ndarray:
  """Draws in `[0, vocab)` with P(k) ~ (k + 1)**-exponent (continuous approx).

  Inverse transform of the power law on `[1, vocab + 1)`: no table of
  `vocab` probabilities, so vocabularies of millions cost nothing.
  """
  u = rng.random(size)
  a = 1.0 - exponent
  x = ((float(vocab + 1) ** a - 1.0) * u + 1.0) ** (1.0 / a)
  return np.minimum(x.astype(np.int64) - 1, vocab - 1)


def expected_values(
  vocab: int, exponent: float, draws: float, min_count: int = 10
) -> tuple[float, float]:
  """Expected distinct values, and those drawn `min_count` times or more,
  in `draws` draws of `zipf_indices(..., vocab, exponent)`.

  Exact over the first 16,384 ranks; past them over 4,000 log-spaced runs
  of ranks, each at its mean probability (Poisson counts for the kept).
  """
  a = 1.0 - exponent
  top = float(vocab + 1) ** a - 1.0
  edges = np.arange(min(vocab, 1 << 14) + 1, dtype=np.int64)
  if vocab > edges[-1]:
    tail = np.geomspace(edges[-1], vocab, 4000).astype(np.int64)
    edges = np.unique(np.r_[edges, tail, vocab])
  width = np.diff(edges).astype(float)
  # P(rank in [e0, e1)) = P(e0 + 1 <= x < e1 + 1).
  p = np.diff(((edges + 1.0) ** a - 1.0) / top) / width
  mean = draws * p
  distinct = width @ -np.expm1(draws * np.log1p(-np.minimum(p, 1 - 1e-16)))
  term, below = np.exp(-mean), np.zeros_like(mean)
  for k in range(min_count):  # P(Poisson(mean) < min_count).
    below += term
    term = term * mean / (k + 1)
  return float(distinct), float(width @ np.maximum(1.0 - below, 0.0))


def fit(distinct: int, kept: int, draws: float) -> tuple[float, int]:
  """(exponent, vocab) expected to draw `distinct` values, `kept` of them
  10 times or more, in `draws` draws (bisections; about a second)."""

  def vocab_for(exponent):  # Smallest vocabulary that reaches `distinct`.
    lo, hi = distinct, (1 << 32) - 1
    if expected_values(hi, exponent, draws)[0] < distinct:
      return None
    if expected_values(lo, exponent, draws)[0] >= distinct - 0.5:
      return lo
    while hi - lo > 1:
      mid = (lo + hi) // 2
      if expected_values(mid, exponent, draws)[0] < distinct:
        lo = mid
      else:
        hi = mid
    return hi

  def kept_at(exponent):
    vocab = vocab_for(exponent)
    return vocab, vocab and expected_values(vocab, exponent, draws)[1]

  kept = min(kept, distinct)
  vocab, got = kept_at(ZIPF_EXPONENT)
  if vocab is not None and abs(got - kept) <= max(0.01 * kept, 0.5):
    return ZIPF_EXPONENT, vocab
  # Steeper laws keep fewer values (on the branch above exponent ~1), and
  # past some exponent no vocabulary under 2**32 gives `distinct` values.
  too_steep = vocab is None or got < kept
  lo, hi = (1.02, ZIPF_EXPONENT) if too_steep else (ZIPF_EXPONENT, 4.0)
  best = (ZIPF_EXPONENT, float('inf') if vocab is None else abs(got - kept))
  for _ in range(22):
    mid = (lo + hi) / 2
    vocab, got = kept_at(mid)
    if vocab is None or got < kept:
      hi = mid
    else:
      lo = mid
    if vocab is not None and abs(got - kept) < best[1]:
      best = (mid, abs(got - kept))
  exponent = round(best[0], 3)
  return exponent, vocab_for(exponent)


def scramble(indices: np.ndarray, salt: int) -> np.ndarray:
  """A per-column bijection of 32-bit values: popular values look random."""
  x = (indices.astype(np.uint64) + np.uint64(salt)) & np.uint64(0xFFFFFFFF)
  for _ in range(2):  # A 32-bit integer hash (invertible).
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x45D9F3B)) & np.uint64(0xFFFFFFFF)
  x ^= x >> np.uint64(16)
  return x.astype(np.uint32)


def hex8(values: np.ndarray) -> np.ndarray:
  """uint32 `[n]` -> bytes `[n]` of 8 lowercase hex digits (vectorised)."""
  octets = values.astype('>u4').view(np.uint8).reshape(-1, 4)
  out = np.empty((len(values), 8), np.uint8)
  out[:, 0::2] = _HEX[octets >> 4]
  out[:, 1::2] = _HEX[octets & 15]
  return out.view('S8').reshape(-1)


def join_lines(columns: Sequence[np.ndarray], sep: bytes) -> bytes:
  """Bytes columns `[n]` -> the `n` lines of text they make."""
  rows = zip(*(column.tolist() for column in columns), strict=True)
  return b'\n'.join(sep.join(row) for row in rows) + b'\n'


def _blank(column: np.ndarray, missing: np.ndarray) -> np.ndarray:
  column = column.astype(np.bytes_)
  column[missing] = b''
  return column


def criteo_chunk(
  rng: np.random.Generator,
  n: int,
  effects: dict,
  laws: Sequence[tuple[float, int]] = (),
) -> bytes:
  """`n` lines of Criteo DAC format; `laws`: (exponent, vocab) of C1..C26."""
  laws = laws or [(ZIPF_EXPONENT, v) for v in CRITEO_CARDINALITIES]
  logit = np.full(n, -1.25)
  columns = []
  for i, mu in enumerate(CRITEO_INT_MU):
    values = np.floor(rng.lognormal(mu, 1.3, n)).astype(np.int64) - 1
    if i == 1:  # I2 has a few negative values (-1, -2, -3).
      negative = rng.random(n) < 0.05
      values[negative] = -rng.integers(1, 4, int(negative.sum()))
    if i in (5, 10):
      logit += 0.25 * (np.log1p(np.maximum(values, 0)) - mu)
    columns.append(_blank(values, rng.random(n) < CRITEO_INT_MISSING[i]))
  for c, (exponent, vocab) in enumerate(laws):
    index = zipf_indices(rng, n, vocab, exponent)
    if c in effects:
      logit += effects[c][index]
    missing = rng.random(n) < CRITEO_CAT_MISSING[c]
    columns.append(_blank(hex8(scramble(index, 7919 * (c + 1))), missing))
  label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
  return join_lines([label.astype(np.bytes_), *columns], b'\t')


def avazu_chunk(
  rng: np.random.Generator, n: int, start: int, total: int, effects: dict
) -> bytes:
  """`n` lines of Avazu format, rows `start..start + n` of `total`."""
  ids = rng.integers(0, np.iinfo(np.int64).max, n, dtype=np.int64)
  # Chronological over 10 days, as the real file: 14102100 .. 14103023.
  hours = (np.arange(start, start + n) * 240 // max(total, 1)).astype(np.int64)
  hour = (14102100 + (hours // 24) * 100 + hours % 24).astype(np.bytes_)
  logit = np.full(n, -1.7) + 0.2 * np.sin(hours % 24 / 24 * 2 * np.pi)
  columns = []
  for c, (_, vocab, is_hex) in enumerate(AVAZU_CATEGORICAL):
    index = zipf_indices(rng, n, vocab, ZIPF_EXPONENT)
    if c in effects:
      logit += effects[c][index]
    if is_hex:
      columns.append(hex8(scramble(index, 104729 * (c + 1))))
    else:
      columns.append((index + 1000 * (c == 0)).astype(np.bytes_))
  click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
  return join_lines(
    [ids.astype(np.bytes_), click.astype(np.bytes_), hour, *columns], b','
  )


def movielens_effects(rng: np.random.Generator) -> dict:
  """Rating effects of ML-20M's users and movies, and the orders that put
  each of them once in the first lines."""
  effects = {}
  for name, vocab in (('user', ML20M_USERS), ('movie', ML20M_MOVIES)):
    effects[name] = (
      rng.normal(0, 0.4, vocab),  # Bias.
      rng.normal(0, 0.35, (vocab, ML_RANK)),  # Factors.
      rng.permutation(vocab),  # Who comes first.
    )
  return effects


def movielens_chunk(
  rng: np.random.Generator, n: int, start: int, effects: dict
) -> bytes:
  """`n` lines of ML-20M's ratings.csv, rows `start..start + n`."""
  index, score = {}, np.full(n, 3.3)
  for name, (bias, _, first) in effects.items():
    index[name] = zipf_indices(rng, n, len(bias), ZIPF_EXPONENT)
    row = np.arange(start, start + n)
    covered = row < len(first)
    index[name][covered] = first[row[covered]]
    score += bias[index[name]]
  user, movie = effects['user'][1], effects['movie'][1]
  score += np.einsum('nk,nk->n', user[index['user']], movie[index['movie']])
  score += rng.normal(0, 0.8, n)
  rating = np.clip(np.round(score * 2) / 2, 0.5, 5.0)
  seconds = 789_652_009 + rng.integers(0, 638_000_000, n)
  return join_lines(
    [
      (index['user'] + 1).astype(np.bytes_),
      (index['movie'] + 1).astype(np.bytes_),
      np.char.mod(b'%.1f', rating).astype(np.bytes_),
      seconds.astype(np.bytes_),
    ],
    b',',
  )


def write(
  fmt: str, lines: int, out: str, seed: int = 0, cardinality: str = 'default'
) -> str:
  """Writes `lines` synthetic lines of `fmt` to `out` (atomically).

  Args:
    fmt: 'criteo', 'avazu' or 'movielens'.
    lines: lines of data (without the header).
    out: the file to write.
    seed: seeds the lines and the effects behind the labels.
    cardinality: 'kaggle' (Criteo only): the distinct values of the real
      file (`CRITEO_KAGGLE`); 'default': one Zipf exponent.

  Returns:
    `out`.
  """
  if cardinality not in CARDINALITIES:
    raise ValueError(f'cardinality={cardinality!r}: one of {CARDINALITIES}')
  if cardinality != 'default' and fmt != 'criteo':
    raise ValueError(f'cardinality={cardinality!r} is for Criteo only.')
  rng = np.random.default_rng(seed)
  if fmt == 'movielens':
    return _write_movielens(rng, lines, out)
  laws = CRITEO_KAGGLE if cardinality == 'kaggle' else ()
  small = (
    [v for _, v in laws] or CRITEO_CARDINALITIES
    if fmt == 'criteo'
    else [v for _, v, _ in AVAZU_CATEGORICAL]
  )
  # Per-value effects on the click logit for the small vocabularies.
  effects = {
    c: rng.normal(0, 0.6, vocab)
    for c, vocab in enumerate(small)
    if vocab <= 10_000
  }
  tmp = f'{out}.partial'
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(tmp, 'wb') as f:
    if fmt == 'avazu':
      header = ['id', 'click', 'hour'] + [c for c, _, _ in AVAZU_CATEGORICAL]
      f.write(','.join(header).encode() + b'\n')
    for start in range(0, lines, CHUNK):
      n = min(CHUNK, lines - start)
      if fmt == 'criteo':
        f.write(criteo_chunk(rng, n, effects, laws))
      else:
        f.write(avazu_chunk(rng, n, start, lines, effects))
  os.replace(tmp, out)
  return out


def _write_movielens(rng: np.random.Generator, lines: int, out: str) -> str:
  effects = movielens_effects(rng)
  tmp = f'{out}.partial'
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(tmp, 'wb') as f:
    f.write(b'userId,movieId,rating,timestamp\n')
    for start in range(0, lines, CHUNK):
      f.write(movielens_chunk(rng, min(CHUNK, lines - start), start, effects))
  os.replace(tmp, out)
  return out


def main(argv: Sequence[str] | None = None) -> str:
  parser = common.ArgumentParser(
    prog='python -m benchmarks.synthetic', description=__doc__.split('\n')[0]
  )
  parser.add_argument(
    '--format', choices=('criteo', 'avazu', 'movielens'), required=True
  )
  parser.add_argument('--lines', type=int, required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument(
    '--cardinality',
    choices=CARDINALITIES,
    default='default',
    help='kaggle (Criteo): the distinct values per column of the Kaggle'
    ' train.txt over its 45.8M lines, most of them rare.',
  )
  parser.add_argument(
    '--seed',
    type=int,
    default=0,
    help='Seeds the lines and the effects behind the labels: a file of'
    ' another seed is another task, not held-out lines of the same one;'
    ' split one file for those.',
  )
  args = parser.parse_args(argv)
  if args.cardinality != 'default' and args.format != 'criteo':
    parser.error(f'--cardinality={args.cardinality} is for --format=criteo')
  if args.lines < 1:
    parser.error('--lines: at least 1')
  if os.path.isdir(args.out):  # Else written, then not renamed to it.
    parser.error(f'--out={args.out} is a directory; give a file name')
  start = time.perf_counter()
  write(args.format, args.lines, args.out, args.seed, args.cardinality)
  print(
    f'{args.out}: {args.lines:,} {args.format} lines,'
    f' {os.path.getsize(args.out) / 2**20:,.0f} MiB,'
    f' {time.perf_counter() - start:.1f} s',
    file=sys.stderr,
  )
  return args.out


if __name__ == '__main__':
  common.run(main)
