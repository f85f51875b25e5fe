r"""Prints samples as the model sees them.

  python -m lvm.data.inspect --config=configs/tiny.py [--split=train] [--num=4] [--json]

Text shows supervised spans as [[...]] and collapses image-token runs to `<image xP>`; each
sample lists its lengths, and dropped samples their reason. With --json, one object per line:
`id`, `text` (the full decoded sequence), `supervised_text` (only the supervised tokens,
decoded), `supervised_spans`, `marked`, `num_image_tokens`, `length`, `num_supervised`,
`truncated`, `dropped`, `chat_template_checked` (the sample's ids were checked against the
tokenizer folder's chat template: chatml, mistral, gemma, llama3 with a model's tokenizer),
and for an anyres model (`model.anyres.pinpoints` set) `images`: per image its original
`size` [height, width], the `grid` [rows, cols] of tiles chosen for it, its `tiles` (grid
tiles + the base tile) and `num_image_tokens`. Any template shows with
`--config.data.template=NAME`. The dataset is prepared first if needed. With
`config.data.mixture`, the training split shows the mixture's stream (its first positions,
each source's records in order) and each sample names its `source`.
"""

import collections
import json
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np

from lvm import cli
from lvm.data import anyres
from lvm.data import images as images_lib
from lvm.data import templates

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_SPLIT = flags.DEFINE_string('split', None, 'Split (default: config.data.train_split).')
_NUM = flags.DEFINE_integer('num', 4, 'Samples to show (records read in order).')
_JSON = flags.DEFINE_bool('json', False, 'One JSON object per sample.')


def spans(tokenizer, ids, mask):
  """[(kind, text)] with kind in image|supervised|text; image runs collapsed.

  A span's text is decoded in the context of the preceding text, so leading spaces that a
  tokenizer folds into a token (SentencePiece's ▁) are kept.
  """
  out, context, k = [], [], 0
  ids, mask = list(map(int, ids)), list(map(bool, mask))
  while k < len(ids):
    j = k
    if ids[k] == tokenizer.image_token_id:
      while j < len(ids) and ids[j] == tokenizer.image_token_id:
        j += 1
      out.append(('image', f'<image x{j - k}>'))
      context = []
    else:
      while (j < len(ids) and ids[j] != tokenizer.image_token_id and mask[j] == mask[k]):
        j += 1
      before = tokenizer.decode(context)
      text = tokenizer.decode(context + ids[k:j])
      out.append(('supervised' if mask[k] else 'text',
                  text[len(before):] if text.startswith(before) else text))
      context = context + ids[k:j]
    k = j
  return out


def describe(tokenizer, ids, mask, untruncated_length=None):
  """The JSON-able description of one rendered sample."""
  parts = spans(tokenizer, ids, mask)
  ids, mask = np.asarray(ids), np.asarray(mask, bool)
  return {
      'text': ''.join(t for _, t in parts),
      'supervised_text': tokenizer.decode(ids[mask]),
      'supervised_spans': [t for k, t in parts if k == 'supervised'],
      'marked': ''.join(f'[[{t}]]' if k == 'supervised' else t for k, t in parts),
      'num_image_tokens': int((ids == tokenizer.image_token_id).sum()),
      'length': int(len(ids)),
      'num_supervised': int(mask.sum()),
      'truncated': bool(untruncated_length is not None and untruncated_length > len(ids)),
      'dropped': None,
  }


def anyres_image(size, lay) -> dict:
  """The tiling of one image of (height, width) `size` under an anyres layout."""
  rows, cols = anyres.grid_shape(size, lay.pinpoints, lay.tile_size)
  return {'size': [int(size[0]), int(size[1])], 'grid': [rows, cols], 'tiles': 1 + rows * cols,
          'num_image_tokens': lay.num_image_tokens(size)}


def inspect(config, split, num):
  """Yields one description per record (the first `num` of `split`, in order)."""
  from lvm import data  # pylint: disable=g-import-not-at-top
  from lvm.data import pipeline, tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  data.prepare(config)
  tok = tokenizer_lib.load(config)
  proc = pipeline.Processor(config, tok, train=split == config.data.train_split)
  from lvm.data import mixture  # pylint: disable=g-import-not-at-top
  mix = mixture.Mixture(config, shuffle=False) if mixture.applies(config, split) else None
  source = pipeline.data_source(config, split) if mix is None else None
  checked = (templates.get(config.data.template).messages is not None
             and tok.chat_template is not None)
  for i in range(min(num, len(source) if mix is None else mix.size)):
    if mix is None:
      record, name = source[i], None
    else:
      s, record = mix.record(i)
      name = mix.names[s]
    rid = pipeline._text(record.get('id', str(i)))  # pylint: disable=protected-access
    try:
      _, encoded = pipeline.record_turns(record, config.data.template, proc.caption_prompt)
      sizes = [images_lib.decode(b)[0].size[::-1] for b in encoded]
      ids, mask, _ = proc.text(record, sizes)
      turns, _ = pipeline.record_turns(record, config.data.template, proc.caption_prompt)
      full, _ = templates.render(config.data.template, turns, tok, proc.image_tokens(sizes),
                                 proc.system)
      d = describe(tok, ids, mask, len(full))
      if proc.layout is not None:
        d['images'] = [anyres_image(size, proc.layout) for size in sizes]
    except (templates.SampleError, images_lib.ImageError) as e:
      d = {'text': None, 'supervised_text': None, 'num_image_tokens': 0, 'length': 0,
           'dropped': e.reason, 'message': str(e)}
    d['id'] = rid
    d['chat_template_checked'] = checked
    if name is not None:
      d['source'] = name
    yield d


def main(argv):
  del argv
  config = _CONFIG.value
  split = _SPLIT.value or config.data.train_split
  drops = collections.Counter()
  for d in inspect(config, split, _NUM.value):
    drops[d['dropped']] += d['dropped'] is not None
    if _JSON.value:
      print(json.dumps(d))
      continue
    checked = ', checked against the chat template' if d['chat_template_checked'] else ''
    print(f'=== {d["id"]} ({d.get("source", config.data.dataset)}/{split}, template '
          f'{config.data.template}{checked})')
    if d['dropped']:
      print(f'DROPPED: {d["message"]}')
      continue
    print(d['marked'])
    for k, im in enumerate(d.get('images', [])):
      print(f'--- image {k}: {im["size"][0]}x{im["size"][1]} px (height x width) -> grid '
            f'{im["grid"][0]}x{im["grid"][1]} ({im["tiles"]} tiles with the base), '
            f'{im["num_image_tokens"]} image tokens')
    print(f'--- length {d["length"]}/{config.data.seq_len}, image tokens '
          f'{d["num_image_tokens"]}, supervised {d["num_supervised"]}'
          f'{", TRUNCATED" if d["truncated"] else ""}; supervised text: '
          f'{d["supervised_text"]!r}')
  if not _JSON.value:
    drops = {k: v for k, v in drops.items() if v}
    print(f'=== dropped: {drops or "none"}')
  sys.stdout.flush()


if __name__ == '__main__':
  cli.run(main)
