"""Bad data end to end through `lvm.main`: train on what is valid, count what is skipped.

`make_llava_folder` writes a LLaVA-format folder (JSON + images) where good samples
(RGB JPEGs; grey, RGBA, CMYK and palette images; a PNG named .jpg; a 3000x2000 photo;
a text-only sample) are mixed with broken ones: a missing image, random bytes named
.jpg, a JPEG cut to a third, a PNG header claiming 30000x30000 px (a decompression
bomb), two `<image>` markers for one image, a marker without an image, an image
without a marker, an empty answer, and a conversation whose image comes after more
text than the sequence holds. `lvm.main` prepares it, trains, and must report each
skip with its reason: at prepare time in `prepare_report.json`, at batching time in
the run's log and metrics.
"""

import json
import math
import os

import pytest

import reliability_helpers as h

pytestmark = pytest.mark.slow

# Our defect -> the reason the data module gives it, and where it is caught.
PREPARE_REASONS = {
    'missing_image': 'missing_image',
    'corrupt_image': 'corrupt_image',
    'truncated_image': 'corrupt_image',
    'oversized_image': 'image_too_large',
    'too_many_markers': 'too_many_image_markers',
    'marker_without_image': 'too_many_image_markers',
    'too_few_markers': 'too_few_image_markers',
    'empty_answer': 'empty_answer',
}
# The over-long conversation: its image comes after ~8000 text tokens. Either its image
# cannot fit, or the text is cut so that it does and the answer falls off the end.
TOO_LONG_REASONS = ('image_tokens_do_not_fit', 'no_supervised_tokens_after_truncation')


def test_llava_folder_with_broken_samples(shared, tmp_path):
  manual = str(tmp_path / 'llava')
  fixture = h.make_llava_folder(manual)
  tokenizer = h.make_tokenizer(str(tmp_path / 'tokenizer' / 'tokenizer.json'))
  data_dir = str(tmp_path / 'tfds')
  workdir = str(tmp_path / 'run')
  # 32 samples reach the dataset (31 good + the over-long one): 4 steps of 8 are one epoch,
  # so the over-long sample is drawn (and dropped) exactly once.
  # The default eval/test splits (neither exists here: no validation fraction, no test
  # files) are skipped with a line each, and the run exits 0 (issue 27).
  proc = h.run_main(
      shared, workdir, *h.SINGLE_MESH, '--config.data.dataset=llava_json',
      f'--config.data.manual_dir={manual}', f'--config.data.tokenizer={tokenizer}',
      f'--config.data.data_dir={data_dir}', '--config.data.llava_json.validation_fraction=0.0',
      '--config.train.num_steps=4', '--config.data.shuffle_seed=1', '--config.data.seq_len=128',
      base=h.TRAIN_OVERRIDES)
  out = proc.stdout + proc.stderr

  expected = {}
  for defect in fixture['bad'].values():
    if defect in PREPARE_REASONS:
      reason = PREPARE_REASONS[defect]
      expected[reason] = expected.get(reason, 0) + 1
  reports = [os.path.join(root, f) for root, _, files in os.walk(data_dir) for f in files
             if f == 'prepare_report.json']
  assert len(reports) == 1, reports
  with open(reports[0]) as f:
    report = json.load(f)
  assert report['skipped'] == expected, report
  assert report['kept'] == len(fixture['good']) + 1  # + the over-long one
  assert report['text_only'] == 1
  for note in ('wrong_extension', 'downscaled'):
    assert report['fixed'].get(note, 0) >= 1, report['fixed']
  for reason in expected:
    assert reason in out, f'prepare log does not name {reason}'
  for split, key in (('validation', 'eval_split'), ('test', 'test_split')):
    assert (f"data: dataset 'llava_json' has no '{split}' split (it has: train), so "
            f"config.data.{key}='{split}' (the default) is skipped") in out

  # It trained on the valid samples: finite losses at every step.
  metrics = h.read_metrics(workdir)
  assert sorted(metrics) == [1, 2, 3, 4]
  assert all(math.isfinite(m['loss']) and m['loss'] > 0 for m in metrics.values())
  # The over-long conversation is dropped at batching time (exactly once: it is drawn once
  # in these 4 steps), counted in the metrics and named in the log.
  skipped = {k[len('skipped_'):]: v for k, v in metrics[4].items() if k.startswith('skipped_')}
  assert len(skipped) == 1 and list(skipped.values()) == [1], metrics[4]
  reason = next(iter(skipped))
  assert reason in TOO_LONG_REASONS, skipped
  assert f"data: samples skipped so far, by reason: {{'{reason}': 1}}" in out
