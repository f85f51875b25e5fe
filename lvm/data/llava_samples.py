"""One LLaVA JSON sample -> a record: checks, image paths, image files (for `llava_json`).

`check_sample` raises `templates.SampleError` / `images.ImageError` with the reason a sample
is skipped under; `load_image` converts what can be fixed. Image paths are relative to the
image folder and may not leave it (`image_outside_folder`) unless allowed.
"""

import io
import json
import os

from PIL import Image

from lvm.data import images as images_lib
from lvm.data import templates

# Images with a longer side are downscaled at prepare time (storage and decode speed).
MAX_SIDE = 2048
_FORMATS = {'.jpg': 'JPEG', '.jpeg': 'JPEG', '.png': 'PNG', '.gif': 'GIF', '.bmp': 'BMP',
            '.webp': 'WEBP', '.tif': 'TIFF', '.tiff': 'TIFF'}


def _inside(folder: str, path: str) -> bool:
  """Whether `path` stays in `folder`, lexically (so a symlinked image folder works)."""
  folder, path = os.path.normpath(folder), os.path.normpath(path)
  return os.path.commonpath([folder, path]) == folder


def resolve(folder, rel, allow_outside=False, seen=None):
  """The file of JSON image path `rel`, or None; what it stat-ed goes to `seen`.

  Raises:
    images_lib.ImageError: image_outside_folder (`../`, absolute), unless `allow_outside`.
  """
  if not allow_outside and (os.path.isabs(rel) or not _inside(folder, os.path.join(folder, rel))):
    raise images_lib.ImageError('image_outside_folder', rel)
  for base in (folder, os.path.join(folder, 'images')):
    path = os.path.join(base, rel)
    try:
      st = os.stat(path)
    except OSError:
      if seen is not None:
        seen[path] = None  # absent now: adding it later must rebuild
      continue
    if seen is not None:
      seen[path] = [st.st_size, st.st_mtime_ns]
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


def check_sample(entry, folder, allow_outside=False, seen=None):
  """Validates one JSON entry and loads its images (what it stat-ed goes to `seen`).

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
  if not all(isinstance(p, str) and p for p in paths):
    raise templates.SampleError('bad_record', f'image is not a path or list of paths: {image!r}')
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
    path = resolve(folder, rel, allow_outside, seen)
    if path is None:
      raise images_lib.ImageError('missing_image', rel)
    d, n = load_image(path)
    data.append(d)
    notes += n
  sid = str(entry.get('id', ''))
  return {'id': sid, 'images': data, 'conversations': json.dumps(turns),
          'caption': '', 'question_types': '[]'}, notes
