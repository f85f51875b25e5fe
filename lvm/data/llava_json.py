"""`llava_json`: LLaVA-format data (LCS-558K, mix665k, ...) from local files, as TFDS.

The TFDS manual directory (`config.data.manual_dir`) holds one or more JSON files (a list of
`{id, image: path | [paths] (optional), conversations: [{from, value}]}`) and the images,
whose paths are relative to `config.data.llava_json.image_folder` (default: the manual dir
itself; an `images/` subfolder is tried too). Every problem of a sample is handled at prepare
time: fixable images are converted (grey, RGBA, CMYK, palette, 16 bit, wrong extension,
oversized), the rest of the samples are skipped with a count and a reason in the prepare log
(`prepare_report.json`), never a crash. An image path leading out of the image folder (`../`,
absolute) is refused (`image_outside_folder`) unless `allow_outside_images`.

Splits: a `validation_fraction` of the samples of `json_files` (by a hash of the id) forms
`validation` (it exists only when some sample hashes into it), the rest `train`; the samples
of `test_files` form `test` (it exists only when they are given).

A JSON file that does not parse is fatal (a `ValueError` naming file:line:col): dropping a
whole file silently would lose data. With `skip_broken_files` it is skipped instead and
listed under `broken_files` in the report.

The prepared dataset is keyed by the JSON files (size, mtime) and the settings. The image
files it read are recorded beside it (size, mtime_ns; `images.json`), and `prepare` rebuilds
the dataset when one of them changed, appeared or went away (a stat per image, no hashing).
"""

import collections
import glob
import hashlib
import json
import logging
import os
import shutil
import sys

from lvm import registry
from lvm.data import images as images_lib
from lvm.data import llava_samples
from lvm.data import records
from lvm.data import templates

SPLITS = ('train', 'validation', 'test')


def config_defaults() -> dict:
  """`config.data.llava_json`: which files, where the images are, how much is held out."""
  return dict(
      json_files='',  # comma-separated, relative to data.manual_dir ('' = all *.json there
                      # but the test files)
      test_files='',  # comma-separated, relative to data.manual_dir: the `test` split
      image_folder='',  # relative to data.manual_dir ('' = the manual dir, or its images/)
      validation_fraction=0.01,  # of samples (by a hash of the id) held out as validation
      allow_outside_images=False,  # image paths may leave image_folder (`../`, absolute)
      skip_broken_files=False,  # a JSON file that does not parse is skipped, not fatal
  )


def check_config(config, problems: registry.Problems):
  """Faults of the llava_json settings (runs when `config.data.dataset='llava_json'`)."""
  if not config.data.manual_dir:
    problems.add('data.manual_dir', "is empty but data.dataset is 'llava_json'",
                 'point it at the folder holding the LLaVA JSON file(s) and images')
  frac = config.data.llava_json.validation_fraction
  if not isinstance(frac, (int, float)) or not 0 <= frac < 1:
    problems.add('data.llava_json.validation_fraction', f'must be in [0, 1), got {frac!r}',
                 'hold out a small fraction such as 0.01, or 0 for none')
  c = config.data.llava_json
  both = {n for n in c.json_files.split(',') if n} & {n for n in c.test_files.split(',') if n}
  if both:
    problems.add('data.llava_json.test_files', f'{sorted(both)} are in json_files too',
                 'a test file must not be trained on: leave it out of data.llava_json.json_files')


def data_dir(config) -> str:
  return os.path.expanduser(config.data.data_dir or '~/tensorflow_datasets')


def _manual_dir(config) -> str:
  d = config.data.manual_dir
  if not d or not os.path.isdir(d):
    raise ValueError(f'config.data.manual_dir={d!r} is not a folder; point it at the folder '
                     'holding the LLaVA JSON file(s) and images.')
  return os.path.abspath(os.path.expanduser(d))


def _files(config, names: str, key: str) -> list[str]:
  d = _manual_dir(config)
  files = [os.path.join(d, n) for n in names.split(',') if n]
  for f in files:
    if not os.path.exists(f):
      raise FileNotFoundError(f'config.data.llava_json.{key}: {f} does not exist.')
  return files


def test_files(config) -> list[str]:
  """The JSON files of the `test` split (`llava_json.test_files`; maybe none)."""
  return _files(config, config.data.llava_json.test_files, 'test_files')


def json_files(config) -> list[str]:
  """The train/validation JSON files: `llava_json.json_files`, or all but the test files."""
  if config.data.llava_json.json_files:
    return _files(config, config.data.llava_json.json_files, 'json_files')
  held_out = set(test_files(config))
  d = _manual_dir(config)
  files = [f for f in sorted(glob.glob(os.path.join(d, '*.json'))) if f not in held_out]
  if not files:
    raise ValueError(f'No *.json file in config.data.manual_dir={d!r} (besides '
                     'config.data.llava_json.test_files).')
  return files


def image_folder(config) -> str:
  d = _manual_dir(config)
  sub = config.data.llava_json.image_folder
  return os.path.join(d, sub) if sub else d


def config_name(config) -> str:
  """The TFDS config name: the JSON files (size, mtime_ns) and the settings that shape it.

  Images are not in it (stat-ing 665K files at every lookup is too slow): `prepare` checks
  the ones the dataset read instead (`changed_images`).
  """
  c = config.data.llava_json
  files = json_files(config) + ['test:'] + test_files(config)
  stamp = json.dumps([[f, os.path.getsize(f), os.stat(f).st_mtime_ns] if f != 'test:' else f
                      for f in files] +
                     [image_folder(config), validation_fraction(config),
                      bool(c.allow_outside_images), bool(c.skip_broken_files)])
  base = os.path.basename(_manual_dir(config)).replace('-', '_')[:40] or 'data'
  return f'{base}_{hashlib.sha1(stamp.encode()).hexdigest()[:10]}'


def validation_fraction(config) -> float:
  return float(config.data.llava_json.validation_fraction)


def assets_dir(config) -> str:
  return os.path.join(data_dir(config), 'lvm_llava_json_assets', config_name(config))


def report_path(config) -> str:
  return os.path.join(assets_dir(config), 'prepare_report.json')


def images_path(config) -> str:
  """What the prepared dataset read: {image path: [size, mtime_ns], or None if absent}."""
  return os.path.join(assets_dir(config), 'images.json')


def split_of(sample_id: str, fraction: float) -> str:
  h = int(hashlib.md5(sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
  return 'validation' if h < fraction else 'train'


def load_entries(file: str, skip_broken: bool = False):
  """The samples of one JSON file (a list), or None when it is broken and `skip_broken`.

  Raises:
    ValueError: the file is not a JSON list, naming `file:line:col` of a syntax error.
  """
  try:
    with open(file, encoding='utf-8') as f:
      entries = json.load(f)
  except json.JSONDecodeError as e:
    problem = f'{file}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})'
  except UnicodeDecodeError as e:
    problem = f'{file}: not UTF-8 text (byte {e.start}: {e.reason})'
  except OSError as e:
    problem = f'{file}: cannot be read ({e})'
  else:
    if isinstance(entries, list):
      return entries
    problem = f'{file}: expected a JSON list of samples, got {type(entries).__name__}'
  if skip_broken:
    logging.warning('llava_json: skipped %s (config.data.llava_json.skip_broken_files)', problem)
    return None
  raise ValueError(f'{problem}. Fix the file, leave it out of config.data.llava_json.json_files'
                   '/test_files, or set config.data.llava_json.skip_broken_files=True to skip '
                   'broken files (listed in prepare_report.json).')


def entries(config, split, broken=None):
  """(key, id, entry) of every sample of `split`; skipped broken files go to `broken`.

  The split of a sample depends only on its id and position (train/validation) or on its
  file (test).
  """
  frac = validation_fraction(config)
  for file in test_files(config) if split == 'test' else json_files(config):
    samples = load_entries(file, config.data.llava_json.skip_broken_files)
    if samples is None:
      if broken is not None and file not in broken:
        broken.append(file)
      continue
    for i, entry in enumerate(samples):
      key = f'{os.path.basename(file)}:{i}'
      sid = str(entry.get('id', '')) if isinstance(entry, dict) else ''
      if split == 'test' or split_of(sid + key, frac) == split:
        yield key, sid, entry


def has_validation(config) -> bool:
  return validation_fraction(config) > 0 and any(True for _ in entries(config, 'validation'))


def splits(config) -> list[str]:
  """The splits `prepare` builds (TFDS refuses empty ones): train, validation if some sample
  hashes into it, test if `test_files` are given."""
  return (['train'] + (['validation'] if has_validation(config) else [])
          + (['test'] if test_files(config) else []))


def new_report():
  return {'kept': 0, 'skipped': collections.Counter(), 'fixed': collections.Counter(),
          'text_only': 0, 'examples': collections.defaultdict(list),
          'splits': collections.defaultdict(collections.Counter), 'broken_files': [],
          'images': {}}


def _count(report, split, reason, example):
  report['skipped'][reason] += 1
  report['splits'][split][reason] += 1
  if len(report['examples'][reason]) < 5:
    report['examples'][reason].append(example)


def scan(config, split, report):
  """Yields (key, example) for every usable sample of `split`; counts the rest in `report`.

  Each split's scan reads (and checks the images of) only its own samples; the image files
  it stat-ed go to `report['images']`.
  """
  folder = image_folder(config)
  allow_outside = bool(config.data.llava_json.allow_outside_images)
  report['splits'][split]['kept'] += 0
  for key, sid, entry in entries(config, split, report['broken_files']):
    try:
      ex, notes = llava_samples.check_sample(entry, folder, allow_outside,
                                                 report['images'])
    except (templates.SampleError, images_lib.ImageError) as e:
      _count(report, split, e.reason, f'{sid or key}: {e}')
      continue
    for n in notes:
      report['fixed'][n] += 1
      if len(report['examples'][n]) < 5:
        report['examples'][n].append(sid or key)
    report['kept'] += 1
    report['splits'][split]['kept'] += 1
    report['text_only'] += not ex['images']
    ex['id'] = ex['id'] or key
    yield key, ex


def builder(config, report=None):
  """The TFDS builder of the `llava_json` dataset of `config` (not prepared).

  Args:
    config: the full config.
    report: a `new_report()` that building fills with counts by reason.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = config_name(config)
  report = new_report() if report is None else report

  cfg = tfds.core.BuilderConfig(name=name, description='LLaVA JSON from ' + _manual_dir(config))

  class LlavaJson(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """LLaVA JSON conversations with images, from config.data.manual_dir."""
    VERSION = tfds.core.Version('1.0.0')
    BUILDER_CONFIGS = [cfg]  # This run's settings: a known config, not a 'custom' one.
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'Set config.data.manual_dir to the LLaVA data folder.'

    def _info(self):
      return self.dataset_info_from_configs(features=records.features(), description=__doc__)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in splits(config)}

    def _generate_examples(self, split):
      yield from scan(config, split, report)

  return LlavaJson(config=cfg.name, data_dir=data_dir(config), file_format='array_record')


def _write_json(path, obj, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, **kw)
  os.replace(path + '.tmp', path)


def _write_report(report, config):
  out = {'kept': report['kept'], 'text_only': report['text_only'],
         'skipped': dict(sorted(report['skipped'].items())),
         'fixed': dict(sorted(report['fixed'].items())),
         'splits': {s: dict(sorted(c.items())) for s, c in sorted(report['splits'].items())},
         'broken_files': report['broken_files'],
         'examples': dict(report['examples'])}
  _write_json(report_path(config), out, indent=1)
  _write_json(images_path(config), report['images'])
  logging.info('llava_json: kept %d samples (%d text-only); skipped %s; fixed %s',
               out['kept'], out['text_only'], out['skipped'] or 'none', out['fixed'] or 'none')
  for file in out['broken_files']:
    logging.warning('llava_json: broken JSON file skipped: %s', file)
  for reason, ex in out['examples'].items():
    logging.info('llava_json:   %s e.g. %s', reason, '; '.join(ex[:2]))


def load_report(config) -> dict:
  with open(report_path(config)) as f:
    return json.load(f)


def changed_images(config) -> list[str] | None:
  """Image files that differ from what the prepared dataset read (None: not recorded)."""
  try:
    with open(images_path(config)) as f:
      recorded = json.load(f)
  except FileNotFoundError:
    return None
  changed = []
  for path, stamp in recorded.items():
    try:
      st = os.stat(path)
      now = [st.st_size, st.st_mtime_ns]
    except OSError:
      now = None
    if now != stamp:
      changed.append(path)
  return changed


def prepare(config):
  """Builds the dataset if needed (or rebuilds it if an image changed); returns the report."""
  b = builder(config)
  if b.is_prepared():
    changed = changed_images(config)
    if changed is None:
      logging.warning(
          'llava_json: reusing %s, prepared without a record of its images: changed images '
          'are not picked up. To rebuild, delete %s and %s.', b.data_dir, b.data_dir,
          assets_dir(config))
      return load_report(config)
    if not changed:
      return load_report(config)
    logging.warning('llava_json: %d image file(s) changed since %s was prepared (e.g. %s); '
                    'rebuilding it.', len(changed), b.data_dir, changed[0])
    shutil.rmtree(b.data_dir)
  report = new_report()
  builder(config, report).download_and_prepare()
  _write_report(report, config)
  return load_report(config)


def summary(config) -> list[str]:
  """Lines `python -m lvm.data` prints about a prepared dataset: the prepare report."""
  report = load_report(config)
  return [f'report: {report_path(config)}'] + json.dumps(
      {k: report[k] for k in ('kept', 'text_only', 'fixed', 'skipped', 'broken_files')
       if k in report}, indent=1).splitlines()


registry.DATASET.register('llava_json', sys.modules[__name__], defaults=config_defaults,
                          check=check_config)
