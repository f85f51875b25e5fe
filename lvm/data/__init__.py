"""Data: TFDS datasets (`shapes`, `llava_json`), templates, tokenizer, images, input pipeline.

A dataset registers itself with `lvm.registry.DATASET` under its config name
(`config.data.dataset`), with its own config group's defaults (`config.data.<name>`) and
check. The registered object (the dataset's module for the built-in ones) has:
  builder(config): its TFDS builder (prepared or not);
  prepare(config): builds it into `config.data.data_dir` unless already built (idempotent);
  own_tokenizer(config) -> path (optional): the tokenizer used when `config.data.tokenizer=''`;
  summary(config) -> [str] (optional): what `python -m lvm.data` prints about it.

`prepare(config)` builds the dataset of `config.data.dataset`; call it at every start.
"""

import logging

from lvm import registry
# The modules that register datasets and templates (registry.DATASET / TEMPLATE import this
# package before any lookup). None imports tensorflow at module level: `lvm.config` reads the
# dataset defaults through them.
from lvm.data import family_templates  # pylint: disable=unused-import
from lvm.data import llava_json  # pylint: disable=unused-import
from lvm.data import mixture
from lvm.data import shapes  # pylint: disable=unused-import
from lvm.data import templates  # pylint: disable=unused-import


def dataset(config):
  """The registered object of `config.data.dataset` (see the module docstring)."""
  return registry.DATASET.get(config.data.dataset).obj


def builder(config):
  """The TFDS builder of `config.data.dataset` (prepared or not)."""
  return dataset(config).builder(config)


def prepare(config) -> None:
  """Builds `config.data.dataset` into `config.data.data_dir` unless already built.

  shapes: also trains its SentencePiece tokenizer and writes the image-blind baseline.
  llava_json: writes `prepare_report.json` with the skipped/fixed counts by reason.
  With `config.data.mixture`, every source's dataset is built too.
  """
  dataset(config).prepare(config)
  mixture.prepare(config)
  logging.info('data: %s ready in %s', config.data.dataset,
               config.data.data_dir or '~/tensorflow_datasets')


__all__ = ['builder', 'dataset', 'prepare']
