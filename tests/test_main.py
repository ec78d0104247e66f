"""End to end through `python main.py` in a subprocess, as a user runs it."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import script_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *flags, config='configs/fm.py:smoke', devices=None):
  """`main.py` on conftest's 2 emulated devices, or on `devices`."""
  cache = os.path.join(os.path.dirname(workdir), 'cache')
  env = dict(os.environ)
  if devices is not None:
    env['XLA_FLAGS'] = re.sub(
      r'device_count=\d+', f'device_count={devices}', env['XLA_FLAGS']
    )
  return subprocess.run(
    [
      sys.executable,
      'main.py',
      f'--config={config}',
      f'--workdir={workdir}',
      f'--config.dataset.cache_dir={cache}',
      *flags,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _refused(workdir, *flags, config='configs/fm.py:smoke'):
  """`_run` of a main.py that stops before training (script_runs.run)."""
  cache = os.path.join(os.path.dirname(workdir), 'cache')
  return script_runs.run(
    [
      'main.py',
      f'--config={config}',
      f'--workdir={workdir}',
      f'--config.dataset.cache_dir={cache}',
      *flags,
    ]
  )


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


class MainTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()

  def test_smoke_run_writes_metrics_and_resumes_without_retraining(self):
    workdir = os.path.join(self.tmp, 'fm')
    result = _run(workdir, '--config.num_epochs=1')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    lines = _metrics(workdir)
    self.assertEqual([r['split'] for r in lines], ['train', 'valid', 'test'])
    for record in lines:
      self.assertIn('epoch', record)
      self.assertIn('step', record)
    self.assertGreater(lines[0]['examples_per_sec'], 0)
    for record in lines[1:]:
      self.assertEqual(
        set(record) - {'split', 'epoch', 'step', 'wall_time', 'time'},
        {'auc', 'logloss', 'num_examples'},
      )
      self.assertGreater(record['auc'], 0.7)
    with open(os.path.join(workdir, 'config.json')) as f:
      self.assertEqual(json.load(f)['model_name'], 'fm')

    # Same workdir, one more epoch: epoch 1 is restored, not retrained.
    result = _run(workdir, '--config.num_epochs=2')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('Resumed from epoch 1', result.stderr)
    self.assertNotIn('Resuming on', result.stderr)  # The same devices.
    resumed = _metrics(workdir)
    self.assertEqual(resumed[:2], lines[:2])
    self.assertEqual(
      [(r['split'], r['epoch']) for r in resumed],
      [('train', 1), ('valid', 1), ('train', 2), ('valid', 2), ('test', 2)],
    )

    # The two-step run equals an uninterrupted two-epoch run.
    straight = os.path.join(self.tmp, 'straight')
    result = _run(straight, '--config.num_epochs=2')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    expected = _metrics(straight)
    for a, b in zip(resumed, expected, strict=True):
      for key in ('loss', 'auc', 'logloss'):
        if key in a:
          self.assertAlmostEqual(a[key], b[key], places=5)

  def test_a_resume_on_another_device_count_warns_in_one_line(self):
    # Dropout masks are drawn per device: such a resume differs from the
    # run uninterrupted, and said nothing.
    workdir = os.path.join(self.tmp, 'devices')
    result = _run(workdir, '--config.num_epochs=1')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    result = _run(workdir, '--config.num_epochs=2', devices=1)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    warned = [x for x in result.stderr.splitlines() if 'Resuming on' in x]
    self.assertLen(warned, 1, result.stderr[-3000:])
    self.assertRegex(
      warned[0],
      r'^W.*\] Resuming on 1 device a run saved on 2 devices: dropout masks'
      r' are drawn per device, so the epochs from here differ from those of'
      r' a run on 2 devices\.$',
    )
    self.assertEqual(_metrics(workdir)[-1]['split'], 'test')

  def test_sigterm_stops_a_run_that_resumes_from_its_last_epoch(self):
    # A scheduler's, `docker stop`'s or `timeout`'s SIGTERM ended the process
    # at once: the saves still queued were lost, and nothing was said. Now
    # it unwinds as a Ctrl-C: the queued saves finish, one line, 143.
    workdir = os.path.join(self.tmp, 'term')
    cache = os.path.join(self.tmp, 'cache')
    log = os.path.join(self.tmp, 'term.log')

    def said():
      with open(log) as f:
        return f.read()

    flags = [f'--workdir={workdir}', f'--config.dataset.cache_dir={cache}']
    with open(log, 'w') as out:
      run = subprocess.Popen(
        [sys.executable, 'main.py', '--config=configs/fm.py:smoke', *flags]
        + ['--config.num_epochs=100', '--config.patience=100'],
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
      )
    try:
      deadline = time.monotonic() + 240
      while 'Saved the checkpoint of epoch 2' not in said():
        self.assertIsNone(run.poll(), said()[-3000:])
        self.assertLess(time.monotonic(), deadline, 'no second checkpoint')
        time.sleep(0.05)
      run.send_signal(signal.SIGTERM)
      self.assertEqual(run.wait(60), 143, said()[-3000:])
    finally:
      run.kill()
    self.assertEqual(
      said().strip().splitlines()[-1], 'main.py: error: terminated (SIGTERM).'
    )
    validated = max(
      r['epoch'] for r in _metrics(workdir) if r['split'] == 'valid'
    )
    result = _run(workdir, f'--config.num_epochs={validated + 1}')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    # Every save queued finished: at most the epoch the signal cut short
    # between its validation and its save is trained again.
    resumed = int(re.search(r'Resumed from epoch (\d+)', result.stderr)[1])
    self.assertIn(resumed, (validated - 1, validated))
    self.assertEqual(_metrics(workdir)[-1]['split'], 'test')

  def _assert_one_line(self, result, message):
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    self.assertNotIn('Traceback', result.stderr)
    self.assertEqual(
      result.stderr.strip().splitlines()[-1], f'main.py: error: {message}'
    )

  def test_start_up_imports_no_pandas(self):
    # pandas takes a third of a second to import: only the parsers of raw
    # text and frames import it, not a run whose data is encoded already.
    out = subprocess.run(
      [
        sys.executable,
        '-c',
        'import json, sys, main; print(json.dumps([*sys.modules]))',
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
      check=True,
    )
    modules = json.loads(out.stdout)
    self.assertIn('jax', modules)
    self.assertNotIn('pandas', modules)

  def test_config_typo_names_the_key(self):
    result = _refused(os.path.join(self.tmp, 'typo'), '--config.batch_sise=64')
    self._assert_one_line(
      result,
      "--config.batch_sise: config has no key 'batch_sise'. Did you mean"
      ' "batch_size" instead of "batch_sise"? Its keys are in the config file'
      ' and configs/default.py.',
    )
    result = _refused(os.path.join(self.tmp, 'typo'), '--config.model.dim=8')
    self._assert_one_line(
      result,
      "--config.model.dim: config.model has no key 'dim'. Its keys are in"
      ' the config file and configs/default.py.',
    )
    # A typo before the last part of the key, and a key under a value.
    result = _refused(os.path.join(self.tmp, 'typo'), '--config.datset.name=x')
    self._assert_one_line(
      result,
      "--config.datset.name: config has no key 'datset'. Did you mean"
      ' "dataset" instead of "datset"? Its keys are in the config file and'
      ' configs/default.py.',
    )
    result = _refused(
      os.path.join(self.tmp, 'typo'), '--config.model.embed_dim.x=1'
    )
    self._assert_one_line(
      result,
      '--config.model.embed_dim.x: config.model.embed_dim is a value, not a'
      ' group of keys.',
    )
    self.assertFalse(os.path.exists(os.path.join(self.tmp, 'typo')))

  def test_a_key_given_at_another_level_names_where_it_is(self):
    # `--config.embed_dim=32` for `--config.model.embed_dim=32` said only
    # that config has no key 'embed_dim'.
    workdir = os.path.join(self.tmp, 'w')
    for flag, meant in (
      ('embed_dim=32', 'model.embed_dim'),
      ('csv.label_column=y', 'dataset.csv.label_column'),
      ('model.seed=1', 'dataset.seed or --config.seed'),
    ):
      name, _, _ = flag.partition('=')
      key = name.split('.')[-2 if name.startswith('csv') else -1]
      where = 'config.model' if name.startswith('model.') else 'config'
      self._assert_one_line(
        _refused(workdir, f'--config.{flag}'),
        f"--config.{name}: {where} has no key '{key}'. Did you mean"
        f' --config.{meant}? Its keys are in the config file and'
        ' configs/default.py.',
      )
    self.assertFalse(os.path.exists(workdir))

  def test_a_config_file_that_fails_is_named_with_its_line(self):
    missing = os.path.join(self.tmp, 'missing.py')
    self._assert_one_line(
      _refused(os.path.join(self.tmp, 'w'), config=missing),
      f'--config: {missing} does not exist. Give a config file, e.g.'
      ' --config=configs/fm.py (relative to the current directory).',
    )
    # A directory: ml_collections' own error named an `_ErrorConfig`.
    self._assert_one_line(
      _refused(os.path.join(self.tmp, 'w'), config=self.tmp),
      f'--config: {self.tmp} is not a file. Give a config file, e.g.'
      ' --config=configs/fm.py (relative to the current directory).',
    )
    broken = os.path.join(self.tmp, 'broken.py')
    with open(broken, 'w') as f:
      f.write('def get_config(arg=None):\n  return undefined_name\n')
    self._assert_one_line(
      _refused(os.path.join(self.tmp, 'w'), config=broken),
      f'{broken}:2: error in the config file: NameError: name'
      " 'undefined_name' is not defined",
    )
    with open(broken, 'w') as f:
      f.write('def get_config(arg=None)\n  return None\n')
    self._assert_one_line(
      _refused(os.path.join(self.tmp, 'w'), config=broken),
      f"{broken}:1: expected ':'",
    )
    # A ValueError of the config file reaches absl as a flag error.
    result = _refused(os.path.join(self.tmp, 'w'), config='configs/fm.py:Smoke')
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    self.assertRegex(  # All of stderr: one line.
      result.stderr.strip(),
      r'^main.py: error: configs/fm.py:\d+: error in the config file:'
      r' ValueError: Unknown config argument \'Smoke\'; use "smoke".$',
    )
    self.assertFalse(os.path.exists(os.path.join(self.tmp, 'w')))

  def test_a_config_file_without_a_config_says_what_it_needs(self):
    needs = (
      '; a config file defines get_config(arg=None) returning an'
      ' ml_collections.ConfigDict, e.g. configs/fm.py.'
    )
    w = os.path.join(self.tmp, 'w')
    for text, what in (
      ('x = 1\n', 'has no get_config()'),
      ('def get_config():\n  return 1\n', 'gave 1 from get_config()'),
    ):
      path = os.path.join(self.tmp, 'not_a_config.py')
      with open(path, 'w') as f:
        f.write(text)
      # No override: it would fail first.
      result = script_runs.run(
        ['main.py', f'--config={path}', f'--workdir={w}']
      )
      self._assert_one_line(result, f'--config: {path} {what}{needs}')
    self.assertFalse(os.path.exists(w))
    # `:arg` for a get_config() that takes none: ml_collections' traceback,
    # flattened into the line.
    with open(path, 'w') as f:
      f.write(
        'from configs import fm\ndef get_config():\n  return fm.get_config()\n'
      )
    self._assert_one_line(
      _refused(w, config=f'{path}:smoke'),
      f"--config: get_config() in {path} takes no argument, so 'smoke'"
      ' (after the colon) cannot be passed to it. Drop ":smoke", or define'
      ' get_config(arg=None) as configs/fm.py does.',
    )

  def test_a_value_of_the_wrong_type_names_what_the_key_takes(self):
    workdir = os.path.join(self.tmp, 'w')
    self._assert_one_line(  # Given twice: the value refused is named.
      _refused(workdir, '--config.batch_size=1.5', '--config.batch_size=64'),
      '--config.batch_size=1.5: config.batch_size takes an integer, e.g. 512;'
      " '1.5' is not one.",
    )
    self._assert_one_line(
      _refused(workdir, '--config.dataset.split=(0.8,0.2'),
      '--config.dataset.split=(0.8,0.2: config.dataset.split takes a tuple,'
      " quoted for the shell, e.g. '(0.8, 0.1, 0.1)'; '(0.8,0.2' is not"
      ' one.',
    )
    self._assert_one_line(  # Names with a space: the example is theirs.
      _refused(
        workdir,
        '--config.dataset.name=csv',
        '--config.dataset.csv.categorical_columns=user id,city',
      ),
      '--config.dataset.csv.categorical_columns=user id,city:'
      ' config.dataset.csv.categorical_columns takes a tuple, quoted for the'
      " shell, e.g. \"('user id', 'city')\"; 'user id,city' is not one.",
    )
    self._assert_one_line(  # As predict.py and export.py say it.
      _refused(workdir, 'fm'), 'Unexpected arguments: fm'
    )
    self._assert_one_line(  # absl's words: a Python tuple.
      _refused(workdir, '--distributed=true', '--distributed=maybe'),
      '--distributed=maybe: --distributed takes true or false (or'
      " --distributed, --nodistributed); 'maybe' is not one.",
    )
    self._assert_one_line(
      _refused(workdir, '--workdirr=/tmp'),
      "Unknown command line flag 'workdirr'. Did you mean: workdir? Pass"
      ' --helpshort to see the flags.',
    )
    self.assertFalse(os.path.exists(workdir))

  def test_a_model_name_flag_for_another_models_config_is_refused(self):
    workdir = os.path.join(self.tmp, 'w')
    self._assert_one_line(
      _refused(workdir, '--config.model_name=hofm'),
      '--config.model_name=hofm: config.model holds the arguments of the'
      " config file's model; it lacks order, which no flag could then set."
      ' Pick the model by its config file instead: --config=configs/hofm.py.',
    )
    self.assertFalse(os.path.exists(workdir))
    # A run recorded with such an override (before it was refused) resumes.
    result = _run(
      workdir, '--config.num_epochs=1', config='configs/hofm.py:smoke'
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(os.path.join(workdir, 'config.json')) as f:
      recorded = json.load(f)
    del recorded['model']['order']  # What configs/fm.py's config holds.
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(recorded, f)
    result = _run(workdir, '--config.model_name=hofm', '--config.num_epochs=2')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertEqual(_metrics(workdir)[-1]['epoch'], 2)

  def test_a_bad_value_of_a_key_that_is_none_names_its_type(self):
    # absl's words were "could not convert string to float: 'abc'. Pass
    # --helpshort to see the flags." (and the help lists no config key).
    workdir = os.path.join(self.tmp, 'w')
    for flag, value, takes, config in (
      ('table_weight_decay', 'abc', 'a number', 'configs/fm.py:smoke'),
      ('table_weight_decay', 'None', 'a number', 'configs/fm.py:smoke'),
      ('model.low_rank', '1.5', 'an integer', 'configs/dcnv2.py:smoke'),
    ):
      self._assert_one_line(
        _refused(workdir, f'--config.{flag}={value}', config=config),
        f'--config.{flag}={value}: config.{flag} takes {takes} (leave the'
        f" flag out for None, as now); '{value}' is not one.",
      )
    self.assertFalse(os.path.exists(workdir))

  def test_multi_pooling_without_multi_hot_fields_is_refused(self):
    result = _refused(
      os.path.join(self.tmp, 'w'), '--config.model.multi_pooling=sum'
    )
    self._assert_one_line(
      result,
      "config.model.multi_pooling='sum' pools the lists of multi-hot fields,"
      " and ml-latest-small has none here: leave it at its default, 'mean',"
      ' or add one (config.dataset.side_features=genres on MovieLens,'
      ' config.dataset.csv.multi_hot_columns on a CSV).',
    )

  def test_bad_batch_size_names_the_key(self):
    result = _run(os.path.join(self.tmp, 'odd'), '--config.batch_size=511')
    self.assertNotEqual(result.returncode, 0)
    self.assertIn('config.batch_size=511', result.stderr)


if __name__ == '__main__':
  absltest.main()
