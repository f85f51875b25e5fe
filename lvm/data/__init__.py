"""Data: TFDS datasets (`shapes`, `llava_json`), templates, tokenizer, images, input pipeline.

`prepare(config)` builds the dataset of `config.data.dataset` into `config.data.data_dir` if it
is not there yet (idempotent; call it at every start).
"""

import logging


def builder(config):
  """The TFDS builder of `config.data.dataset` (prepared or not)."""
  name = config.data.dataset
  if name == 'shapes':
    from lvm.data import shapes  # pylint: disable=g-import-not-at-top
    return shapes.builder(config)
  if name == 'llava_json':
    from lvm.data import llava_json  # pylint: disable=g-import-not-at-top
    return llava_json.builder(config)
  raise ValueError(f"config.data.dataset must be 'shapes' or 'llava_json', got {name!r}")


def prepare(config) -> None:
  """Builds `config.data.dataset` into `config.data.data_dir` unless already built.

  shapes: also trains its SentencePiece tokenizer and writes the image-blind baseline.
  llava_json: writes `prepare_report.json` with the skipped/fixed counts by reason.
  """
  name = config.data.dataset
  if name == 'shapes':
    from lvm.data import shapes  # pylint: disable=g-import-not-at-top
    shapes.prepare(config)
  elif name == 'llava_json':
    from lvm.data import llava_json  # pylint: disable=g-import-not-at-top
    llava_json.prepare(config)
  else:
    raise ValueError(f"config.data.dataset must be 'shapes' or 'llava_json', got {name!r}")
  logging.info('data: %s ready in %s', name, config.data.data_dir or '~/tensorflow_datasets')


__all__ = ['prepare', 'builder']
