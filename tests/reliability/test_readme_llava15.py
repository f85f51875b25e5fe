"""The README's LLaVA-1.5 commands, as written, on a small LLaVA-format folder (issue 27).

README "Train LLaVA-1.5 on your own data and hardware": `python -m lvm.data` and
`python -m lvm.data.inspect` on the stage-1 data, stage 1 from a CLIP folder and a LLaMA
folder (`init.kind=hf_parts`), then stage 2 from stage 1's run (`--config.init.path`). Only
the model size differs: `size=tiny` (configs/llava15.py) instead of `7b`, and the folders
are made here: tiny CLIP and LLaMA models saved by transformers (`from_config(...)
.save_pretrained`, safetensors), a SentencePiece `tokenizer.model` trained on the captions,
and a few images. Each stage is one epoch (2 steps of 8); the data has no validation sample
and no test file, so both evaluations are skipped with a line, and every command exits 0.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import reliability_helpers as h

pytestmark = pytest.mark.slow

COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220),
           'yellow': (235, 200, 40)}
SHAPES = ('square', 'bar')


def _folders(root):
  """Writes the stage-1 and stage-2 LLaVA folders; returns their paths and all text."""
  pretrain, instruct = os.path.join(root, 'LLaVA-Pretrain'), os.path.join(root, 'LLaVA-Instruct')
  captions, chats, text = [], [], []
  for i in range(16):
    colour, shape = list(COLOURS)[i % 4], SHAPES[i // 4 % 2]
    im = Image.new('RGB', (48, 40), (255, 255, 255))
    box = (8, 8, 40, 32) if shape == 'square' else (4, 16, 44, 24)
    im.paste(COLOURS[colour], box)
    name = f'{i:05d}.jpg'
    for folder, sub in ((pretrain, 'images'), (instruct, 'coco/train2017')):
      os.makedirs(os.path.join(folder, sub), exist_ok=True)
      im.save(os.path.join(folder, sub, name), format='JPEG')
    caption = f'a {colour} {shape} on white'
    captions.append({'id': f'p{i}', 'image': f'images/{name}', 'conversations': [
        {'from': 'human', 'value': '<image>\nRender a clear and concise summary of the photo.'},
        {'from': 'gpt', 'value': caption}]})
    chats.append({'id': f'c{i}', 'image': f'coco/train2017/{name}', 'conversations': [
        {'from': 'human', 'value': 'What color is the shape?\n<image>'},
        {'from': 'gpt', 'value': colour},
        {'from': 'human', 'value': 'What shape is it?'}, {'from': 'gpt', 'value': shape}]})
    text += [caption, colour, shape]
  chats.append({'id': 'text', 'conversations': [
      {'from': 'human', 'value': 'Say yes.'}, {'from': 'gpt', 'value': 'yes'}]})
  with open(os.path.join(pretrain, 'blip_laion_cc_sbu_558k.json'), 'w') as f:
    json.dump(captions, f)
  with open(os.path.join(instruct, 'llava_v1_5_mix665k.json'), 'w') as f:
    json.dump(chats, f)
  text += [t['value'] for c in captions + chats for t in c['conversations']]
  return pretrain, instruct, text


def _tokenizer(path, text):
  """A SentencePiece BPE `tokenizer.model` (unk 0, bos 1, eos 2) under the image id 256."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  corpus = text + ['A chat between a curious user and an artificial intelligence assistant. The '
             "assistant gives helpful, detailed, and polite answers to the user's questions. "
             'USER: ASSISTANT:'] * 4
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus * 4), model_prefix=path[:-len('.model')], vocab_size=200,
      model_type='bpe', character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      user_defined_symbols=['\n'], normalization_rule_name='identity',
      remove_extra_whitespaces=False, hard_vocab_limit=False, num_threads=1, minloglevel=2)
  return path


def _hf_models(root):
  """Tiny CLIP and LLaMA folders, shaped as configs/llava15.py:size=tiny."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from configs import llava15  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  v, d = llava15.TINY_VISION, llava15.SIZES['tiny']
  clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=v['width'], intermediate_size=v['mlp_dim'], num_hidden_layers=v['depth'],
      num_attention_heads=v['heads'], image_size=v['image_size'], patch_size=v['patch_size'],
      hidden_act='quick_gelu'))
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=llava15.TINY_RUN['image_token_id'], hidden_size=d['width'],
      intermediate_size=d['mlp_dim'], num_hidden_layers=d['depth'],
      num_attention_heads=d['heads'], num_key_value_heads=d['kv_heads'],
      max_position_embeddings=256, tie_word_embeddings=False))
  paths = os.path.join(root, 'clip-vit-tiny'), os.path.join(root, 'vicuna-tiny')
  clip.save_pretrained(paths[0], safe_serialization=True)
  llama.save_pretrained(paths[1], safe_serialization=True)
  return paths


def _run(cwd, env, *args):
  proc = subprocess.run([sys.executable, '-m', *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, f'{args[:2]} exited {proc.returncode}:\n{out[-5000:]}'
  return out


def _leaves(params, prefix):
  import jax  # pylint: disable=g-import-not-at-top
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat
          if jax.tree_util.keystr(k).startswith(prefix)}


def test_readme_llava15_stage1_then_stage2(tmp_path):
  pretrain, instruct, text = _folders(str(tmp_path / 'data'))
  tokenizer = _tokenizer(str(tmp_path / 'models' / 'vicuna-tiny' / 'tokenizer.model'), text)
  clip_dir, vicuna_dir = _hf_models(str(tmp_path / 'models'))
  env = h.env(num_devices=1)
  # The README's commands name no data_dir: the datasets go to ~/tensorflow_datasets.
  env['HOME'] = str(tmp_path / 'home')
  # Run where `configs/llava15.py` and `runs/stage1` mean what they do in the README.
  cwd = str(tmp_path)
  os.symlink(os.path.join(h.REPO, 'configs'), tmp_path / 'configs')

  # 1. Prepare and inspect the stage-1 data.
  stage1_data = (f'--config.data.manual_dir={pretrain}', f'--config.data.tokenizer={tokenizer}')
  out = _run(cwd, env, 'lvm.data', '--config=configs/llava15.py:size=tiny,stage=pretrain',
             *stage1_data)
  assert 'train: 16 records' in out, out[-2000:]
  out = _run(cwd, env, 'lvm.data.inspect', '--config=configs/llava15.py:size=tiny,stage=pretrain',
             *stage1_data, '--num=3')
  assert 'on white' in out, out[-2000:]

  # 2. Stage 1 from the CLIP and LLaMA folders, then stage 2 from stage 1's run.
  out1 = _run(cwd, env, 'lvm.main', '--config=configs/llava15.py:size=tiny,stage=pretrain',
              '--workdir=runs/stage1', *stage1_data, f'--config.init.vision_path={clip_dir}',
              f'--config.init.decoder_path={vicuna_dir}')
  out2 = _run(cwd, env, 'lvm.main', '--config=configs/llava15.py:size=tiny,stage=finetune',
              '--workdir=runs/stage2', f'--config.data.manual_dir={instruct}',
              f'--config.data.tokenizer={tokenizer}', '--config.init.path=runs/stage1')
  assert 'from hf_parts' in out1 and 'from checkpoint (0 left at random init)' in out2, out2
  for out in (out1, out2):
    assert "has no 'test' split" in out and 'Traceback' not in out

  # Stage 2 started from stage 1's parameters: the vision tower, frozen in both stages,
  # is stage 1's (= the CLIP folder's) bit for bit; stage 1's trained projector moved on.
  from lvm import checkpoint  # pylint: disable=g-import-not-at-top
  runs = tmp_path / 'runs'
  # One epoch each: 16 captions, 17 conversations, batch 8.
  assert h.checkpoint_steps(str(runs / 'stage1')) == [2]
  assert h.checkpoint_steps(str(runs / 'stage2')) == [3]
  _, p1 = checkpoint.load_params(str(runs / 'stage1'))
  _, p2 = checkpoint.load_params(str(runs / 'stage2'))
  v1, v2 = _leaves(p1, "['vision"), _leaves(p2, "['vision")
  assert v1 and v1.keys() == v2.keys()
  assert all(np.array_equal(v1[k], v2[k]) for k in v1)
  j1, j2 = _leaves(p1, "['projector"), _leaves(p2, "['projector")
  assert j1 and j1.keys() == j2.keys()
  assert not all(np.array_equal(j1[k], j2[k]) for k in j1)
