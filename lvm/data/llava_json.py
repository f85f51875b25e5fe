"""`llava_json`: LLaVA-format data (LCS-558K, mix665k, ...) from local files, as TFDS.

The TFDS manual directory (`config.data.manual_dir`) holds one or more JSON files (a list of
`{id, image: path | [paths] (optional), conversations: [{from, value}]}`) and the images,
whose paths are relative to `config.data.llava_json.image_folder` (default: the manual dir
itself; an `images/` subfolder is tried too). Every problem is handled at prepare time: fixable
images are converted (grey, RGBA, CMYK, palette, 16 bit, wrong extension, oversized), the rest
of the samples are skipped with a count and a reason in the prepare log
(`prepare_report.json`), never a crash. A `config.data.llava_json.validation_fraction` of
samples (by a hash of the id) forms the validation split.
"""

import collections
import glob
import hashlib
import io
import json
import logging
import os
import sys

from PIL import Image

from lvm import registry
from lvm.data import images as images_lib
from lvm.data import records
from lvm.data import templates

# Images with a longer side are downscaled at prepare time (storage and decode speed).
MAX_SIDE = 2048
_FORMATS = {'.jpg': 'JPEG', '.jpeg': 'JPEG', '.png': 'PNG', '.gif': 'GIF', '.bmp': 'BMP',
            '.webp': 'WEBP', '.tif': 'TIFF', '.tiff': 'TIFF'}
SPLITS = ('train', 'validation')


def config_defaults() -> dict:
  """`config.data.llava_json`: which files, where the images are, how much is held out."""
  return dict(
      json_files='',  # comma-separated, relative to data.manual_dir ('' = all *.json there)
      image_folder='',  # relative to data.manual_dir ('' = the manual dir, or its images/)
      validation_fraction=0.01,  # of samples (by a hash of the id) held out as validation
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


def data_dir(config) -> str:
  return os.path.expanduser(config.data.data_dir or '~/tensorflow_datasets')


def _manual_dir(config) -> str:
  d = config.data.manual_dir
  if not d or not os.path.isdir(d):
    raise ValueError(f'config.data.manual_dir={d!r} is not a folder; point it at the folder '
                     'holding the LLaVA JSON file(s) and images.')
  return os.path.abspath(os.path.expanduser(d))


def json_files(config) -> list[str]:
  """The JSON files: `config.data.llava_json.json_files` (relative to manual_dir) or all."""
  d = _manual_dir(config)
  names = config.data.llava_json.json_files
  files = ([os.path.join(d, n) for n in names.split(',') if n] if names
           else sorted(glob.glob(os.path.join(d, '*.json'))))
  if not files:
    raise ValueError(f'No *.json file in config.data.manual_dir={d!r}.')
  for f in files:
    if not os.path.exists(f):
      raise FileNotFoundError(f'config.data.llava_json.json_files: {f} does not exist.')
  return files


def image_folder(config) -> str:
  d = _manual_dir(config)
  sub = config.data.llava_json.image_folder
  return os.path.join(d, sub) if sub else d


def config_name(config) -> str:
  files = json_files(config)
  stamp = json.dumps([[f, os.path.getsize(f), int(os.path.getmtime(f))] for f in files] +
                     [image_folder(config), validation_fraction(config)])
  base = os.path.basename(_manual_dir(config)).replace('-', '_')[:40] or 'data'
  return f'{base}_{hashlib.sha1(stamp.encode()).hexdigest()[:10]}'


def validation_fraction(config) -> float:
  return float(config.data.llava_json.validation_fraction)


def report_path(config) -> str:
  return os.path.join(data_dir(config), 'lvm_llava_json_assets', config_name(config),
                      'prepare_report.json')


def split_of(sample_id: str, fraction: float) -> str:
  h = int(hashlib.md5(sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
  return 'validation' if h < fraction else 'train'


def _entry_ids(config):
  for file in json_files(config):
    with open(file) as f:
      entries = json.load(f)
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
      sid = str(entry.get('id', '')) if isinstance(entry, dict) else ''
      yield sid + f'{os.path.basename(file)}:{i}'


def has_validation(config) -> bool:
  frac = validation_fraction(config)
  return frac > 0 and any(split_of(k, frac) == 'validation' for k in _entry_ids(config))


def _resolve(folder, rel):
  for base in (folder, os.path.join(folder, 'images')):
    path = os.path.join(base, rel)
    if os.path.exists(path):
      return path
  return None


def load_image(path: str) -> tuple[bytes, list[str]]:
  """Bytes to store for one image file, and notes on what was fixed.

  Raises:
    images_lib.ImageError: missing_image and every reason of `images.decode`.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise images_lib.ImageError('missing_image', str(e)) from e
  fmt = None
  try:
    fmt = Image.open(io.BytesIO(data)).format
  except Exception:  # pylint: disable=broad-except
    pass  # decode() below names the problem.
  im, notes = images_lib.decode(data)
  expected = _FORMATS.get(os.path.splitext(path)[1].lower())
  if fmt and expected != fmt:
    notes.append('wrong_extension')
  if max(im.size) > MAX_SIDE:
    scale = MAX_SIDE / max(im.size)
    im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))),
                   Image.Resampling.BICUBIC)
    notes.append('downscaled')
  if notes or fmt not in ('JPEG', 'PNG'):
    # Store what the pipeline can decode directly: RGB, lossless.
    buf = io.BytesIO()
    im.save(buf, format='PNG', compress_level=1)
    data = buf.getvalue()
  return data, notes


def check_sample(entry, folder):
  """Validates one JSON entry and loads its images.

  Returns:
    (example dict, notes list).

  Raises:
    templates.SampleError or images_lib.ImageError with a `.reason`.
  """
  if not isinstance(entry, dict) or not isinstance(entry.get('conversations'), list):
    raise templates.SampleError('bad_record', 'no conversations list')
  turns = entry['conversations']
  if not all(isinstance(t, dict) and 'from' in t and isinstance(t.get('value'), str)
             for t in turns):
    raise templates.SampleError('bad_record', 'a turn lacks from/value')
  image = entry.get('image')
  paths = [] if image in (None, '') else [image] if isinstance(image, str) else list(image)
  markers = templates.count_images(turns)
  if markers != len(paths):
    reason = 'too_many_image_markers' if markers > len(paths) else 'too_few_image_markers'
    raise templates.SampleError(reason, f'{markers} <image> for {len(paths)} images')
  normalized = templates.normalize_turns(turns)  # bad_roles, image_marker_in_answer
  answers = [t for t in normalized if t['from'] == 'gpt']
  if not answers:
    raise templates.SampleError('no_answer')
  if any(not t['value'].strip() for t in answers):
    raise templates.SampleError('empty_answer')
  data, notes = [], []
  for rel in paths:
    path = _resolve(folder, rel)
    if path is None:
      raise images_lib.ImageError('missing_image', rel)
    d, n = load_image(path)
    data.append(d)
    notes += n
  sid = str(entry.get('id', ''))
  return {'id': sid, 'images': data, 'conversations': json.dumps(turns),
          'caption': '', 'question_types': '[]'}, notes


def new_report():
  return {'kept': 0, 'skipped': collections.Counter(), 'fixed': collections.Counter(),
          'text_only': 0, 'examples': collections.defaultdict(list)}


def scan(config, split, report):
  """Yields (key, example) for every usable sample of `split`; counts the rest in `report`.

  The split of a sample depends only on its id and position, so each split's scan reads
  (and checks the images of) only its own samples.
  """
  folder = image_folder(config)
  frac = validation_fraction(config)
  for file in json_files(config):
    try:
      with open(file) as f:
        entries = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f'{file} is not a JSON list of LLaVA samples: {e}') from e
    if not isinstance(entries, list):
      raise ValueError(f'{file}: expected a JSON list of samples, got {type(entries).__name__}')
    for i, entry in enumerate(entries):
      key = f'{os.path.basename(file)}:{i}'
      sid = str(entry.get('id', '')) if isinstance(entry, dict) else ''
      if split_of(sid + key, frac) != split:
        continue
      try:
        ex, notes = check_sample(entry, folder)
      except (templates.SampleError, images_lib.ImageError) as e:
        report['skipped'][e.reason] += 1
        if len(report['examples'][e.reason]) < 5:
          report['examples'][e.reason].append(f'{sid or key}: {e}')
        continue
      for n in notes:
        report['fixed'][n] += 1
        if len(report['examples'][n]) < 5:
          report['examples'][n].append(sid or key)
      report['kept'] += 1
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
      # TFDS refuses empty splits: validation exists only if some sample hashes into it.
      splits = ['train'] + (['validation'] if has_validation(config) else [])
      return {s: self._generate_examples(s) for s in splits}

    def _generate_examples(self, split):
      yield from scan(config, split, report)

  return LlavaJson(config=cfg.name, data_dir=data_dir(config), file_format='array_record')


def _write_report(report, path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  out = {'kept': report['kept'], 'text_only': report['text_only'],
         'skipped': dict(sorted(report['skipped'].items())),
         'fixed': dict(sorted(report['fixed'].items())),
         'examples': dict(report['examples'])}
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)
  logging.info('llava_json: kept %d samples (%d text-only); skipped %s; fixed %s',
               out['kept'], out['text_only'], out['skipped'] or 'none', out['fixed'] or 'none')
  for reason, ex in out['examples'].items():
    logging.info('llava_json:   %s e.g. %s', reason, '; '.join(ex[:2]))


def load_report(config) -> dict:
  with open(report_path(config)) as f:
    return json.load(f)


def prepare(config):
  """Builds the dataset if needed; returns the prepare report (counts by reason)."""
  report = new_report()
  b = builder(config, report)
  if not b.is_prepared():
    b.download_and_prepare()
    _write_report(report, report_path(config))
  return load_report(config)


def summary(config) -> list[str]:
  """Lines `python -m lvm.data` prints about a prepared dataset: the prepare report."""
  report = load_report(config)
  return [f'report: {report_path(config)}'] + json.dumps(
      {k: report[k] for k in ('kept', 'text_only', 'fixed', 'skipped')}, indent=1).splitlines()


registry.DATASET.register('llava_json', sys.modules[__name__], defaults=config_defaults,
                          check=check_config)
