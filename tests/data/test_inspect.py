"""python -m lvm.data.inspect: exactly the answers are shown as supervised, for every template."""

import json
import os
import subprocess
import sys

import pytest

from lvm.data import inspect as inspect_lib
from lvm.data import pipeline
from tests.data.conftest import tiny_shapes_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
END = {'plain': '\n', 'vicuna_v1': '</s>', 'llama3': '<|eot_id|>', 'chatml': '<|im_end|>',
       'mistral': '</s>', 'gemma': '<end_of_turn>'}


@pytest.mark.parametrize('template', sorted(END))
def test_supervised_text_is_the_answers(shapes_dir, template):
  # Mistral's and Gemma's formats have no system turn.
  system = '' if template in ('mistral', 'gemma') else None
  config = tiny_shapes_config(shapes_dir, seq_len=160, template=template, system_prompt=system)
  src = pipeline.data_source(config, 'train')
  for d, i in zip(inspect_lib.inspect(config, 'train', 3), range(3)):
    turns, _ = pipeline.record_turns(src[i], template)
    answers = [t['value'] for t in turns if t['from'] == 'gpt']
    assert d['dropped'] is None
    assert d['supervised_spans'] == [
        (' ' if template == 'vicuna_v1' else '') + a + END[template] for a in answers]
    assert d['supervised_text'].replace(' ', '') == ''.join(
        a + END[template] for a in answers).replace(' ', '')
    assert d['num_image_tokens'] == 16 and '<image x16>' in d['text']
    assert d['marked'].count('[[') == len(answers)


def test_cli_json(shapes_dir):
  out = subprocess.run(
      [sys.executable, '-m', 'lvm.data.inspect', '--config=configs/tiny.py',
       f'--config.data.data_dir={shapes_dir}', '--config.data.shapes.train=96',
       '--config.data.shapes.validation=24', '--config.data.shapes.test=24',
       '--config.data.seq_len=40', '--split=validation', '--num=2', '--json'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=300, check=True)
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  # seq_len 40 cannot hold the system prompt and the 16 image tokens: both are dropped.
  assert [r['dropped'] for r in rows] == ['image_tokens_do_not_fit'] * 2
  for r in rows:
    assert {'text', 'supervised_text', 'num_image_tokens', 'length'} <= set(r)
