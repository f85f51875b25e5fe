r"""Prepares the dataset of a config and prints where it is and what it holds.

  python -m lvm.data --config=configs/shapes.py
  python -m lvm.data --config=configs/llava15.py:stage=pretrain \
      --config.data.manual_dir=/data/LLaVA-Pretrain --config.data.tokenizer=/m/tokenizer.model

shapes: prints the split sizes and the image-blind majority baseline per question type.
llava_json: prints the kept / fixed / skipped counts by reason (also in prepare_report.json).
"""

import json

from ml_collections import config_flags

from lvm import cli
from lvm import data
from lvm.data import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)


def main(argv):
  del argv
  config = _CONFIG.value
  data.prepare(config)
  b = data.builder(config)
  print(f'{config.data.dataset}: {b.data_dir}')
  for split in b.info.splits:
    print(f'  {split}: {pipeline.num_examples(config, split)} records')
  if config.data.dataset == 'shapes':
    from lvm.data import shapes  # pylint: disable=g-import-not-at-top
    print(f'  tokenizer: {shapes.tokenizer_path(config)}')
    for split, res in shapes.load_baseline(config).items():
      print(f'  image-blind majority baseline ({split}): overall {res["overall"]:.3f}')
      for qtype, r in res['per_type'].items():
        print(f'    {qtype:9s} {r["accuracy"]:.3f}  (always {r["majority_answer"]!r})')
  else:
    from lvm.data import llava_json  # pylint: disable=g-import-not-at-top
    report = llava_json.load_report(config)
    print(f'  report: {llava_json.report_path(config)}')
    print(json.dumps({k: report[k] for k in ('kept', 'text_only', 'fixed', 'skipped')},
                     indent=1))


if __name__ == '__main__':
  cli.run(main)
