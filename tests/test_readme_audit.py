"""What a new user meets, following README.md: each case a promise it makes.

A new model is `models/<name>.py` and `configs/<name>.py`, and a run that
refuses a file says so in one line: `config_check` imports the file first,
so a draft that does not import, or lacks `Model`, must be told there, not
end in a traceback. Your own data is `config.dataset.name=csv`: a CSV given
as `path` without it is read as MovieLens ratings, and the error says so.
An export's directory is no workdir: a run refuses it, writing nothing.
"""

import os
import sys
import tempfile
import textwrap
from unittest import mock

from absl.testing import absltest
import ml_collections

import config_check
from configs import fm as fm_config
from configs import nfm as nfm_config
from datasets import core
from datasets import csv
from datasets import movielens
import models
import train
import utils


class NewModelFileTest(absltest.TestCase):
  def draft(self, source: str, name: str = 'readme_draft') -> str:
    """Writes `models/<name>.py` in a directory that `models` also reads."""
    temporary = tempfile.TemporaryDirectory()
    self.addCleanup(temporary.cleanup)
    directory = temporary.name
    with open(os.path.join(directory, f'{name}.py'), 'w') as f:
      f.write(textwrap.dedent(source))
    names = sorted(models.names() + [name])
    for patch in (
      mock.patch.object(models, '__path__', [*models.__path__, directory]),
      mock.patch.object(models, 'names', lambda: names),
    ):
      patch.start()
      self.addCleanup(patch.stop)
    self.addCleanup(sys.modules.pop, f'models.{name}', None)  # If imported.
    self.addCleanup(vars(models).pop, name, None)
    return name

  def config(self, name: str, model_name_only: bool = False):
    config = fm_config.get_config('smoke')
    config.model_name = name
    if not model_name_only:
      config.model = {}
    return config

  def test_a_file_without_model_is_one_line_naming_it(self):
    # Before: AttributeError: module 'models.readme_draft' has no
    # attribute 'Model', a traceback from config_check.
    name = self.draft(
      'import flax.linen as nn\n\n\nclass Mine(nn.Module):\n  pass\n'
    )
    told = r'models/readme_draft\.py must end with `Model = <ClassName>`'
    with self.assertRaisesRegex(config_check.ConfigError, told):
      config_check.validate_config(self.config(name))
    # --config.model_name=<draft> on another model's config file.
    with self.assertRaisesRegex(config_check.ConfigError, told):
      config_check.check_model_name_override(self.config(name, True))

  def test_a_file_that_does_not_import_names_its_line(self):
    name = self.draft(
      """\
      import jax

      def broken(:
        pass
      """
    )
    told = (
      r'^models/readme_draft\.py:3: SyntaxError: invalid syntax\. Fix'
      r' models/readme_draft\.py, the file of config\.model_name='
      r"'readme_draft'\.$"
    )
    with self.assertRaisesRegex(config_check.ConfigError, told):
      config_check.validate_config(self.config(name))

  def test_an_error_at_import_names_the_files_line(self):
    name = self.draft('import jax\n\nSCALE = 1 / 0\n')
    told = r'^models/readme_draft\.py:3: ZeroDivisionError: division by zero'
    with self.assertRaisesRegex(config_check.ConfigError, told):
      config_check.validate_config(self.config(name))

  def test_an_argument_without_default_left_out_of_the_config_is_named(self):
    # Before: TypeError: Draft.__init__() missing 1 required positional
    # argument: 'embed_dim', a traceback when the run built the model.
    name = self.draft(
      """\
      from collections.abc import Sequence

      import flax.linen as nn


      class Draft(nn.Module):
        field_dims: Sequence[int]
        embed_dim: int
        scale: float = 1.0
        axis_name: str | None = None


      Model = Draft
      """
    )
    told = (
      r'^1 bad config value: config\.model\.embed_dim is not set, and'
      r' models/readme_draft\.py has no default for it: add it to'
      r' config\.model in the config file\.'
    )
    with self.assertRaisesRegex(config_check.ConfigError, told):
      config_check.validate_config(self.config(name))
    config = self.config(name)
    config.model = {'embed_dim': 4}  # Given: nothing to say.
    config_check.validate_config(config)


class OwnDataTest(absltest.TestCase):
  def ratings_file(self, header: str) -> str:
    temporary = tempfile.TemporaryDirectory()
    self.addCleanup(temporary.cleanup)
    path = os.path.join(temporary.name, 'clicks.csv')
    with open(path, 'w') as f:
      f.write(f'{header}\n1,2,0,0\n')
    return path

  def test_a_csv_of_your_own_without_name_csv_is_told_to_set_it(self):
    # README's "Your own data" without --config.dataset.name=csv: the path
    # is read as ml-latest-small's ratings, whose header check said only
    # "Reorder or rename them".
    path = self.ratings_file('user,city,device,clicked')
    told = (
      r"clicks\.csv:1: header 'user,city,device,clicked' is not userId,.*"
      r' Reorder or rename them\. Or, for a file of your own, set'
      r" config\.dataset\.name=csv \(it is 'ml-latest-small', a MovieLens"
      r' ratings file\)\.$'
    )
    with self.assertRaisesRegex(core.DataError, told):
      movielens.read_movielens(path, 'ml-latest-small')

  def test_movielens_columns_in_another_order_are_told_only_that(self):
    path = self.ratings_file('movieId,userId,rating,timestamp')
    with self.assertRaisesRegex(core.DataError, r'Reorder or rename them\.$'):
      movielens.read_movielens(path, 'ml-latest-small')

  def csv_options(self, **options):
    config = ml_collections.ConfigDict(csv.DEFAULTS)
    config.update(label_column='clicked', **options)
    return config

  def test_a_csv_without_header_is_told_to_add_one(self):
    # The first row of values is read as the header: the label column and
    # the model's columns are "not in the header", which did not say why.
    row = ['170', 'rome', 'android', '1']
    told = (
      r"^config\.dataset\.csv\.label_column: column 'clicked' is not in the"
      r" header of f\.csv: 170, rome, android, 1\. '170' in the header is a"
      r' number: is the first line a row of values\? Put a line naming the'
      r' columns first\.$'
    )
    with self.assertRaisesRegex(core.DataError, told):
      csv.table(self.csv_options(), row, 'f.csv')
    options = self.csv_options(categorical_columns=('user', 'city'))
    told = r"^new\.csv: no column 'user', .* '170' in the header is a number"
    with self.assertRaisesRegex(core.DataError, told):  # Rows to predict.
      csv.table(options, row[:3], 'new.csv', require_label=False)

  def test_a_header_of_names_is_not_told_it_is_values(self):
    options = self.csv_options(categorical_columns=('device',))
    for header in (['user', 'city', 'clicked'], ['nan', 'inf', 'clicked']):
      with self.assertRaisesRegex(core.DataError, r"'device' is not") as e:
        csv.table(options, header, 'f')
      self.assertNotIn('is a number', str(e.exception))


class ExportAsWorkdirTest(absltest.TestCase):
  def test_a_run_in_an_export_refuses_it_and_writes_nothing(self):
    # Before: the run trained there and replaced the export's
    # encoder/encoder.json with its own (another model's), beside the
    # export's model.jax.
    temporary = tempfile.TemporaryDirectory()
    self.addCleanup(temporary.cleanup)
    export = temporary.name
    os.makedirs(os.path.join(export, 'encoder'))
    files = {'signature.json': '{"version": 2}\n', 'model.jax': 'x'}
    files['encoder/encoder.json'] = '{"model_name": "fm"}\n'
    for name, text in files.items():
      with open(os.path.join(export, name), 'w') as f:
        f.write(text)
    told = (
      rf'^workdir {export} is an export \(export\.py: signature\.json\), not'
      r' a run: training in it would overwrite its encoder/\. Use another'
      r' workdir\.$'
    )
    config = nfm_config.get_config('smoke')
    with self.assertRaisesRegex(utils.UserError, told):
      train.train_and_evaluate(config, export)
    written = {
      os.path.relpath(os.path.join(root, name), export)
      for root, _, names in os.walk(export)
      for name in names
    }
    self.assertEqual(written, set(files))
    for name, text in files.items():
      with open(os.path.join(export, name)) as f:
        self.assertEqual(f.read(), text)


if __name__ == '__main__':
  absltest.main()
