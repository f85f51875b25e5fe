r"""Prepares the dataset of a config and prints where it is and what it holds.

  python -m lvm.data --config=configs/shapes.py
  python -m lvm.data --config=configs/llava15.py:stage=pretrain \
      --config.data.manual_dir=/data/LLaVA-Pretrain --config.data.tokenizer=/m/tokenizer.model

shapes: prints the split sizes and the image-blind majority baseline per question type.
llava_json: prints the kept / fixed / skipped counts by reason (also in prepare_report.json).
With `config.data.mixture`: each source's records, and its share of the training stream
(target and realised over its first 100000 samples).
"""

from ml_collections import config_flags

from lvm import cli
from lvm import data
from lvm.data import mixture
from lvm.data import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)


def main(argv):
  del argv
  config = _CONFIG.value
  data.prepare(config)
  b = data.builder(config)
  print(f'{config.data.dataset}: {b.data_dir}')
  for split in b.info.splits:
    print(f'  {split}: {len(pipeline.data_source(config, split))} records')
  for line in getattr(data.dataset(config), 'summary', lambda _: [])(config):
    print(f'  {line}')
  if config.data.mixture:
    print(f'training split {config.data.train_split!r} from data.mixture:')
    for line in mixture.summary(config):
      print(f'  {line}')
    for source in mixture.sources(config):
      kind = data.dataset(source.config)
      print(f'  source {source.name}: {kind.builder(source.config).data_dir}')
      for line in getattr(kind, 'summary', lambda _: [])(source.config):
        print(f'    {line}')


if __name__ == '__main__':
  cli.run(main)
