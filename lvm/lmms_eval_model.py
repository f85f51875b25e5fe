"""lvm as an lmms-eval model: `python -m lmms_eval --model lvm --model_args workdir=RUN ...`.

lmms-eval (>= 0.7) finds external models through the `lmms_eval.models` entry-point group;
lvm's setup.cfg registers `manifest` there, so after `pip install -e '.[eval]'`

  python -m lmms_eval --model lvm --model_args workdir=RUN --tasks pope --batch_size 16
  python -m lmms_eval --model lvm --model_args hf=LLAVA_HF_DIR,template=vicuna_v1 --tasks mme

evaluates a run's newest checkpoint (`workdir=` takes anything `lvm.inference.from_run`
does: a workdir, its `checkpoints/` folder, a step folder or an `lvm.hf import` folder) or
a transformers LLaVA folder read through `lvm.hf.load`. `LvmModel` is a "simple" lmms-eval
model: tasks give it `doc_to_visual` images and `doc_to_text` prompts.

- `generate_until` renders each prompt as one human turn with the run's template (an
  `<image>` line per image before the text, unless the prompt places them itself), batches
  requests of equal generation settings through `lvm.inference.TextGenerator` (jitted,
  bucketed, sharded over every local device by the run's mesh), and cuts each answer at the
  template's stop strings and the task's `until` strings.
- `loglikelihood` renders (prompt, continuation) as a human turn and its answer, exactly as
  training does (`lvm.data.templates.render`: the scored tokens are the answer and its
  end-of-turn token), and scores batches teacher-forced with `Generator.score`. It returns,
  per request, `(mean negative log-likelihood per scored token, is_greedy)`: the value
  lmms-eval's own LLaVA adapters (`llava`, `llava_hf`) return as "loglikelihood" (their
  `outputs.loss`), and the one its `multiple_choice` scoring expects, since it takes the
  choice with the *smallest* value (`lmms_eval/api/task.py`, `np.argmin(lls)`).

One JAX process serves every request (lmms-eval's rank 0 of 1), its batches sharded over
the process's devices; multi-host evaluation goes through `python -m lvm.evaluate`.
"""

import collections
import json

import numpy as np
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

NAME = 'lvm'
IMAGE = '<image>'


def manifest() -> ModelManifest:
  """The `lmms_eval.models` entry point: `--model lvm` is `LvmModel`."""
  return ModelManifest(model_id=NAME, simple_class_path=f'{__name__}.LvmModel')


def _pass_through(result: tuple[float, bool]):
  """A loglikelihood result as lmms-eval's evaluator must receive it to keep it a pair.

  lmms-eval 0.7.3's evaluator passes every response through `unwrap_generation_output`,
  which turns anything but text into its `str()`: a (float, bool) pair would reach
  multiple_choice scoring as the string '(6.1, False)' and fail there ("too many values to
  unpack"). Wrapped in its `GenerationResult` the pair passes through unchanged; versions
  that keep pairs as they are get the plain pair.
  """
  try:
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output  # pylint: disable=g-import-not-at-top
  except ImportError:
    return result
  if unwrap_generation_output(result)[0] == result:
    return result
  return GenerationResult(text=result)


def load_hf(folder: str, template: str = 'vicuna_v1', system_prompt: str | None = None,
            image_aspect: str | None = None, **model_overrides):
  """(config, Generator, TextGenerator) for a transformers LLaVA folder.

  The tokenizer is the folder's `tokenizer.json` (or `tokenizer.model`); the image mean
  and std are its `preprocessor_config.json`'s when it has one. A folder carries no
  conversation template, so it is an argument (LLaVA-1.5: vicuna_v1).
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  from lvm import config as lvm_config  # pylint: disable=g-import-not-at-top
  from lvm import generate, hf, inference  # pylint: disable=g-import-not-at-top
  from lvm.data import tokenizer as data_tokenizer  # pylint: disable=g-import-not-at-top
  root = epath.Path(folder)
  tokenizer = next((root / n for n in ('tokenizer.json', 'tokenizer.model')
                    if (root / n).exists()), None)
  if tokenizer is None:
    raise FileNotFoundError(f'hf={folder!r} has no tokenizer.json or tokenizer.model')
  model_config, params = hf.load(folder, **model_overrides)
  config = lvm_config.get_config()
  config.model = model_config
  config.data.tokenizer = str(tokenizer)
  config.data.template = template
  config.data.system_prompt = system_prompt
  processor = root / 'preprocessor_config.json'
  if processor.exists():
    pre = json.loads(processor.read_text())
    config.data.image_mean = tuple(pre.get('image_mean', config.data.image_mean))
    config.data.image_std = tuple(pre.get('image_std', config.data.image_std))
  if image_aspect:
    config.data.image_aspect = image_aspect
  generator = generate.Generator(config, params)
  return config, generator, inference.TextGenerator(
      generator, data_tokenizer.load(config), template, system_prompt)


class LvmModel(lmms):
  """An lvm checkpoint (or transformers LLaVA folder) answering lmms-eval requests.

  Model args (`--model_args k=v,...`):
    workdir: a run's workdir or any path `lvm.inference.from_run` takes.
    hf: instead of workdir, a transformers LLaVA folder (`lvm.hf.load`).
    template, system_prompt: the conversation template and its system prompt; default the
      run's (for `hf`: vicuna_v1 and its own).
    image_aspect: pad | resize; default the run's `config.data.image_aspect`.
    max_new_tokens: the answer length when a task's generation_kwargs set none.
    seed: sampling seed for tasks that sample (temperature > 0).
    dtype: for `hf`, the compute dtype (e.g. bfloat16).
  `--batch_size N`: requests per generation / scoring batch (lmms-eval passes it).
  """

  is_simple = True

  def __init__(self, workdir: str | None = None, hf: str | None = None,
               template: str | None = None, system_prompt: str | None = None,
               image_aspect: str | None = None, max_new_tokens: int = 1024, seed: int = 0,
               dtype: str | None = None, batch_size: int | str = 1,
               max_batch_size: int | None = None, device: str | None = None, **unknown):
    super().__init__()
    del max_batch_size, device  # JAX places the model on the run's mesh of local devices
    if unknown:
      raise ValueError(f'Unknown lvm model_args {sorted(unknown)}; known: workdir, hf, '
                       'template, system_prompt, image_aspect, max_new_tokens, seed, dtype')
    if (workdir is None) == (hf is None):
      raise ValueError("Give exactly one of model_args workdir=RUN (an lvm run or "
                       "checkpoint) or hf=FOLDER (a transformers LLaVA folder)")
    if str(batch_size).startswith('auto'):
      raise ValueError("lvm needs a number for --batch_size ('auto' is not supported)")
    self.batch_size = int(batch_size)
    if self.batch_size < 1:
      raise ValueError(f'--batch_size must be >= 1, got {batch_size}')
    self.max_new_tokens = int(max_new_tokens)
    self.seed = int(seed)
    from lvm import inference  # pylint: disable=g-import-not-at-top
    from lvm.data import images as images_lib  # pylint: disable=g-import-not-at-top
    from lvm.data import templates  # pylint: disable=g-import-not-at-top
    if image_aspect and image_aspect not in images_lib.ASPECTS:
      raise ValueError(f'model_args image_aspect must be one of {images_lib.ASPECTS}, got '
                       f'{image_aspect!r}')
    if template is not None:  # a bad name fails before the model loads
      try:
        templates.get(template)
      except ValueError as e:
        raise ValueError(f'model_args template: {e}') from e
    if workdir is not None:
      if dtype is not None:
        raise ValueError('model_args dtype applies to hf= folders; a run keeps its own')
      self.config, self.generator, self.text_gen = inference.from_run(str(workdir))
      if template is not None:
        self.text_gen = inference.TextGenerator(self.generator, self.text_gen.tokenizer,
                                                template, self.text_gen.system_prompt)
      if system_prompt is not None:
        self.text_gen.system_prompt = system_prompt
      if image_aspect:
        self.config.data.image_aspect = image_aspect
    else:
      overrides = {'dtype': dtype} if dtype else {}
      self.config, self.generator, self.text_gen = load_hf(
          str(hf), template or 'vicuna_v1', system_prompt, image_aspect, **overrides)
    if list(self.config.model.anyres.pinpoints):
      raise ValueError('lvm.generate serves fixed-size towers; this model is anyres '
                       '(config.model.anyres.pinpoints is set)')

  # --------------------------------------------------------------------------------------
  # Requests -> turns and images.

  def _doc(self, task, split, doc_id):
    return self.task_dict[task][split][doc_id]

  def _images(self, visuals) -> np.ndarray | None:
    """A doc's visuals (PIL images or image files) -> float32[n, H, W, 3], or None."""
    from lvm.data import images as images_lib  # pylint: disable=g-import-not-at-top
    flat = []
    for v in visuals or []:
      flat.extend(v if isinstance(v, (list, tuple)) else [v])
    flat = [v for v in flat if v is not None]
    if not flat:
      return None
    for v in flat:
      if isinstance(v, dict):  # lmms-eval's audio ({'array', 'sampling_rate'})
        raise ValueError('lvm takes images; this task gives audio')
    return np.stack([images_lib.load_image(v, self.config) for v in flat])

  @staticmethod
  def _human_turn(context: str, num_images: int) -> dict:
    """One human turn: `<image>` lines first unless the prompt places its images itself."""
    placed = context.count(IMAGE)
    if placed and placed != num_images:
      raise ValueError(f'The prompt has {placed} {IMAGE} markers for {num_images} images: '
                       f'{context[:200]!r}')
    if not placed:
      context = f'{IMAGE}\n' * num_images + context
    return {'from': 'human', 'value': context}

  # --------------------------------------------------------------------------------------
  # lmms-eval's interface.

  def generate_until(self, requests) -> list[str]:
    """Greedy (or the task's sampling) answers, batched by equal generation settings."""
    from lvm import inference  # pylint: disable=g-import-not-at-top
    rows = []  # (context, settings, turns, images)
    for request in requests:
      context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
      images = self._images(doc_to_visual(self._doc(task, split, doc_id)))
      settings = self._settings(gen_kwargs)
      rows.append((context, settings,
                   [self._human_turn(context, 0 if images is None else len(images))], images))
    groups = collections.defaultdict(list)
    for i, row in enumerate(rows):
      groups[row[1]].append(i)
    answers = [None] * len(rows)
    for settings, members in groups.items():
      max_new_tokens, sampling, until = settings
      # Similar lengths share a batch, so fewer prompt buckets are compiled and padded.
      members.sort(key=lambda i: len(rows[i][0]))
      for lo in range(0, len(members), self.batch_size):
        batch = members[lo:lo + self.batch_size]
        outs = self.text_gen.answer([rows[i][2] for i in batch], [rows[i][3] for i in batch],
                                    max_new_tokens, sampling, min_batch=self.batch_size)
        for i, out in zip(batch, outs):
          answers[i] = inference.cut_at_stop_strings(out.text, until)[0]
          self.cache_hook.add_partial('generate_until', (rows[i][0], requests[i].args[1]),
                                      answers[i])
    return answers

  def _settings(self, gen_kwargs: dict | None) -> tuple:
    """(max_new_tokens, SamplingParams, until strings) of a task's generation_kwargs."""
    from lvm.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
    kw = dict(gen_kwargs or {})
    if int(kw.get('num_beams') or 1) != 1:
      raise ValueError(f"generation_kwargs num_beams={kw['num_beams']}: lvm decodes greedily "
                       'or by sampling, without beam search; set num_beams: 1')
    until = kw.get('until') or []
    until = tuple(s for s in ([until] if isinstance(until, str) else until) if s)
    temperature = float(kw.get('temperature') or 0.0)
    if not kw.get('do_sample', temperature > 0):
      temperature = 0.0
    sampling = SamplingParams(temperature=temperature, top_k=int(kw.get('top_k') or 0),
                              top_p=float(kw.get('top_p') or 1.0), seed=self.seed)
    return int(kw.get('max_new_tokens') or self.max_new_tokens), sampling, until

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    """(mean negative log-likelihood per scored token, is_greedy) per request.

    The continuation is rendered as the assistant's answer to the prompt, with the
    template's end-of-turn token, and those tokens are scored (as in training and as
    lmms-eval's LLaVA adapters do). Lower is likelier: lmms-eval's multiple_choice picks
    the argmin.
    """
    from lvm.data import templates  # pylint: disable=g-import-not-at-top
    text_gen = self.text_gen
    rows = []  # (ids, targets, images)
    for request in requests:
      if len(request.args) == 2:  # acc_mutual_info's unconditional (context, continuation)
        (context, continuation), images = request.args, None
      else:
        context, target, doc_to_visual, doc_id, task, split = request.args
        doc = self._doc(task, split, doc_id)
        continuation = target if isinstance(target, str) else target(doc)
        images = self._images(doc_to_visual(doc))
      turns = [self._human_turn(context, 0 if images is None else len(images)),
               {'from': 'gpt', 'value': str(continuation)}]
      ids, targets = templates.render(text_gen.template, turns, text_gen.tokenizer,
                                      self.generator.tokens_per_image, text_gen.system_prompt)
      rows.append((ids, targets, images))
    results = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for lo in range(0, len(order), self.batch_size):
      batch = order[lo:lo + self.batch_size]
      nll, count, greedy = self.generator.score(
          [rows[i][0] for i in batch], [rows[i][1] for i in batch],
          [rows[i][2] for i in batch], min_batch=self.batch_size)
      for k, i in enumerate(batch):
        results[i] = (float(nll[k] / count[k]), bool(greedy[k]))
        self.cache_hook.add_partial('loglikelihood', requests[i].args[:2], results[i])
    return [_pass_through(r) for r in results]

  def generate_until_multi_round(self, requests) -> list[str]:
    raise NotImplementedError('lvm answers single-round tasks (generate_until); multi-round '
                              'conversations go through `python -m lvm.generate --chat`')

