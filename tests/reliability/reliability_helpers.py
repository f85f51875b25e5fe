"""Helpers of the fault-injection suite: broken LLaVA-format data, and real `lvm.main` runs.

Everything here is real: files are written with real defects, runs are real
subprocesses of `python -m lvm.main`, and faults are real signals and real file damage.
"""

import dataclasses
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Reasons the fixture injects, with how many samples carry each; the pipeline must keep
# the others and count these (under its own reason names).
VICUNA_Q = 'What shape is in the picture and what colour is it?'


def make_tokenizer(path: str, vocab_size: int = 400) -> str:
  """A byte-level BPE `tokenizer.json` (+ tokenizer_config.json) that fits the tiny config.

  Byte-level so that every string encodes (no unknown characters in odd answers).
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=['<unk>', '<s>', '</s>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  corpus = [
      'A chat between a curious user and an artificial intelligence assistant. The assistant '
      "gives helpful, detailed, and polite answers to the user's questions.",
      'USER: ASSISTANT: ' + VICUNA_Q, 'The picture shows a red square on a white background.',
      'There is a blue circle. There is a green triangle. yes no one two three four',
  ] * 20
  tok.train_from_iterator(corpus, trainer)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tok.save(path)
  with open(os.path.join(os.path.dirname(path), 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': '<s>', 'eos_token': '</s>'}, f)
  return path


def _image(rng, size=(40, 30), mode='RGB'):
  colour = tuple(int(c) for c in rng.integers(0, 256, 3))
  img = Image.new('RGB', size, (255, 255, 255))
  w, h = size
  img.paste(colour, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
  if mode == 'CMYK':
    return img.convert('CMYK')
  if mode == 'P':
    return img.convert('P', palette=Image.Palette.ADAPTIVE, colors=8)
  return img.convert(mode)


def _bomb_png() -> bytes:
  """A PNG whose header claims 30000 x 30000 px (900 Mpx): a decompression bomb."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  ihdr = struct.pack('>IIBBBBB', 30000, 30000, 8, 0, 0, 0, 0)
  idat = zlib.compress(b'\x00' * 1000)
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', idat) + chunk(b'IEND', b'')


def _conv(question, answer, image=True):
  q = f'<image>\n{question}' if image else question
  return [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': answer}]


def make_llava_folder(root: str, num_good: int = 24, seed: int = 0) -> dict:
  """Writes a LLaVA-format folder with broken samples mixed into good ones.

  Layout: `root/llava.json` (list of {id, image, conversations}) and `root/images/`.

  Args:
    root: the folder to create (the TFDS manual dir).
    num_good: valid samples with one RGB image each (plus a few valid text-only and
      convertible ones listed in the returned dict).
    seed: makes the folder deterministic.

  Returns:
    {'good': ids that must be kept, 'bad': {id: defect}} where defect is one of
    missing_image, corrupt_image, truncated_image, oversized_image, too_many_markers,
    too_few_markers, marker_without_image, empty_answer, too_long.
  """
  rng = np.random.default_rng(seed)
  pyrng = random.Random(seed)
  img_dir = os.path.join(root, 'images')
  os.makedirs(img_dir, exist_ok=True)
  samples, good, bad = [], [], {}

  def save(name, img, fmt):
    path = os.path.join(img_dir, name)
    img.save(path, format=fmt)
    return f'images/{name}'

  answers = ['A red square.', 'A blue circle.', 'A green triangle.', 'Two shapes.']
  for i in range(num_good):
    sid = f'good_{i}'
    image = save(f'{sid}.jpg', _image(rng), 'JPEG')
    samples.append({'id': sid, 'image': image,
                    'conversations': _conv(VICUNA_Q, pyrng.choice(answers))})
    good.append(sid)
  # Valid after conversion: grey, RGBA, CMYK, palette, a PNG named .jpg, a large photo,
  # and a text-only sample (no image at all, as in mix665k).
  for mode, fmt, ext in (('L', 'PNG', 'png'), ('RGBA', 'PNG', 'png'), ('CMYK', 'JPEG', 'jpg'),
                         ('P', 'PNG', 'png'), ('RGB', 'PNG', 'jpg')):
    sid = f'convert_{mode}_{fmt}_{ext}'.lower()
    image = save(f'{sid}.{ext}', _image(rng, mode=mode), fmt)
    samples.append({'id': sid, 'image': image, 'conversations': _conv(VICUNA_Q, 'A shape.')})
    good.append(sid)
  sid = 'large_photo'
  image = save(f'{sid}.jpg', _image(rng, size=(3000, 2000)), 'JPEG')
  samples.append({'id': sid, 'image': image, 'conversations': _conv(VICUNA_Q, 'A big one.')})
  good.append(sid)
  samples.append({'id': 'text_only', 'conversations': _conv('Say yes.', 'yes', image=False)})
  good.append('text_only')

  def add_bad(sid, defect, image, conversations):
    sample = {'id': sid, 'conversations': conversations}
    if image is not None:
      sample['image'] = image
    samples.append(sample)
    bad[sid] = defect

  add_bad('missing', 'missing_image', 'images/does_not_exist.jpg', _conv(VICUNA_Q, 'Red.'))
  with open(os.path.join(img_dir, 'corrupt.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0' + bytes(rng.integers(0, 256, 2000, dtype=np.uint8)))
  add_bad('corrupt', 'corrupt_image', 'images/corrupt.jpg', _conv(VICUNA_Q, 'Red.'))
  buf = io.BytesIO()
  _image(rng, size=(64, 64)).save(buf, format='JPEG')
  with open(os.path.join(img_dir, 'truncated.jpg'), 'wb') as f:
    f.write(buf.getvalue()[:len(buf.getvalue()) // 3])
  add_bad('truncated', 'truncated_image', 'images/truncated.jpg', _conv(VICUNA_Q, 'Red.'))
  with open(os.path.join(img_dir, 'bomb.png'), 'wb') as f:
    f.write(_bomb_png())
  add_bad('bomb', 'oversized_image', 'images/bomb.png', _conv(VICUNA_Q, 'Red.'))
  two = save('two_markers.jpg', _image(rng), 'JPEG')
  add_bad('two_markers', 'too_many_markers', two,
          _conv(f'{VICUNA_Q}\n<image>', 'Red.'))
  none = save('no_marker.jpg', _image(rng), 'JPEG')
  add_bad('no_marker', 'too_few_markers', none,
          [{'from': 'human', 'value': VICUNA_Q}, {'from': 'gpt', 'value': 'Red.'}])
  add_bad('marker_no_image', 'marker_without_image', None, _conv(VICUNA_Q, 'Red.'))
  empty = save('empty_answer.jpg', _image(rng), 'JPEG')
  add_bad('empty_answer', 'empty_answer', empty, _conv(VICUNA_Q, ''))
  # The image comes after a question far longer than any sequence length the tests use,
  # so its tokens cannot fit: dropped, never cut.
  long_img = save('too_long.jpg', _image(rng), 'JPEG')
  long_q = ' '.join(['Describe every detail of the picture.'] * 400)
  add_bad('too_long', 'too_long', long_img,
          [{'from': 'human', 'value': f'{long_q}\n<image>'}, {'from': 'gpt', 'value': 'Red.'}])

  pyrng.shuffle(samples)
  with open(os.path.join(root, 'llava.json'), 'w') as f:
    json.dump(samples, f)
  return {'good': good, 'bad': bad}


NUM_STEPS = 8
# Every fault run: the tiny model on a small `shapes` set, a checkpoint every 2 steps
# (all kept), asynchronous saves, no evaluation (the faults concern training).
TRAIN_OVERRIDES = (
    f'--config.train.num_steps={NUM_STEPS}', '--config.train.log_every=1',
    '--config.checkpoint.interval=2', '--config.checkpoint.keep=4',
    '--config.checkpoint.async_save=True',
)
BASE_OVERRIDES = (
    '--config.data.shapes.train=256', '--config.data.shapes.validation=32',
    '--config.data.shapes.test=32', *TRAIN_OVERRIDES, '--config.data.eval_split=',
    '--config.data.test_split=',
)
SINGLE_MESH = ('--config.mesh.data=-1', '--config.mesh.fsdp=1', '--config.mesh.tensor=1')
CUBE_MESH = ('--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2')


@dataclasses.dataclass
class Shared:
  """Per-session folders shared by all runs: the prepared dataset and the XLA cache."""
  tfds_dir: str
  cache_dir: str
  root: str


@dataclasses.dataclass
class Reference:
  """The uninterrupted run: its workdir and its per-step train losses."""
  workdir: str
  losses: dict


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def env(shared: Shared | None = None, num_devices: int = 8) -> dict:
  """Subprocess environment: the repo importable, `num_devices` CPU devices, and the
  session's persistent compilation cache (restarts then skip compiling)."""
  e = dict(os.environ)
  e['PYTHONPATH'] = REPO + os.pathsep + e.get('PYTHONPATH', '')
  e['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  e['JAX_PLATFORMS'] = 'cpu'
  e.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if shared is not None:
    e['JAX_COMPILATION_CACHE_DIR'] = shared.cache_dir
    e['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  return e


DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'driver.py')


def main_cmd(shared: Shared, workdir: str, *overrides: str, entry=('-m', 'lvm.main'),
             config='configs/tiny.py', base=BASE_OVERRIDES) -> list[str]:
  """`python -m lvm.main` (or `entry=(DRIVER,)`) with the suite's `base` overrides."""
  return [sys.executable, *entry, f'--config={config}', f'--workdir={workdir}',
          f'--config.data.data_dir={shared.tfds_dir}', *base, *overrides]


def run_main(shared, workdir, *overrides, num_devices=8, timeout=600, check=True, **kw):
  """Runs `python -m lvm.main` to completion; returns the CompletedProcess."""
  proc = subprocess.run(main_cmd(shared, workdir, *overrides, **kw), cwd=REPO,
                        env=env(shared, num_devices), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'lvm.main failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n'
                         f'{proc.stderr[-6000:]}')
  return proc


def start_main(shared, workdir, log_path, *overrides, num_devices=8, extra_flags=(), **kw):
  """Starts `python -m lvm.main` in its own process group; output goes to `log_path`."""
  log = open(log_path, 'w')
  cmd = main_cmd(shared, workdir, *overrides, **kw) + list(extra_flags)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env(shared, num_devices), stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
  proc.log_file = log
  return proc


def train_losses(workdir: str) -> dict[int, float]:
  return {step: r['loss'] for step, r in read_metrics(workdir).items()}


def load_state(step_dir: str) -> dict:
  """The whole train state of a checkpoint step as numpy arrays (no shardings needed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(step_dir, 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def assert_states_equal(a: dict, b: dict, what: str):
  """Bit-for-bit equality of two state trees (same paths, dtypes, shapes, bytes)."""
  import jax  # pylint: disable=g-import-not-at-top
  fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert fa.keys() == fb.keys(), f'{what}: different state trees'
  diff = [jax.tree_util.keystr(k) for k in fa
          if np.asarray(fa[k]).tobytes() != np.asarray(fb[k]).tobytes()
          or np.asarray(fa[k]).dtype != np.asarray(fb[k]).dtype]
  assert not diff, f'{what}: {len(diff)} of {len(fa)} leaves differ, e.g. {diff[:5]}'


def checkpoint_steps(workdir: str) -> list[int]:
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def kill_group(proc, sig=signal.SIGKILL):
  """Sends `sig` to the run's process group (the run and any worker it started)."""
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:
    pass


def read_metrics(workdir: str, split: str = 'train') -> dict[int, dict]:
  """step -> the last metrics line of that step and split (a resumed run may repeat steps)."""
  out = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut by a kill -9; the step is logged again after the restart.
      if record.get('split') == split:
        out[int(record['step'])] = record
  return out


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if predicate():
      return True
    time.sleep(interval)
  return False
