"""Conversation templates: one function renders the ids *and* the label mask.

A template turns LLaVA turns (`[{'from': 'human'|'gpt', 'value': str}]`, `<image>` marks an
image) into a list of chunks: text, single special ids, and image slots, each flagged as
supervised or not. Consecutive text chunks form a *run* that is tokenized as one string (so the
ids are those of the rendered text), and each chunk's ids are the tokens added by extending the
run's prefix to the chunk's end. If the tokens of a prefix change when the text grows (a merge
across a chunk boundary), the chunk boundaries are not token boundaries, the mask would be
shifted, and the sample is rejected as `tokenization_mismatch` instead of trained on.

Supervised tokens are exactly each assistant answer plus its end-of-turn token; BOS is added
once, by the template, never by the tokenizer.

A template is a `Template` registered with `lvm.registry.TEMPLATE` under its config name
(`config.data.template`); `plain`, `vicuna_v1` and `llama3` are registered below, the other
decoder families' (`chatml`, `mistral`, `gemma`) in `lvm.data.family_templates`.

A template that renders a decoder family's own chat format (`Template.messages` set) is checked
against the tokenizer folder's jinja chat template on every sample (`lvm.data.chat_template`):
ids that differ from that rendering are refused as `chat_template_mismatch`, a conversation the
chat template itself refuses (its `raise_exception`) as `chat_template_refuses`. Which
templates fit a tokenizer at all is `check_tokenizer`, run by `lvm.validate` and at load.
"""

import dataclasses
import itertools
import os
from typing import Callable

import numpy as np

from lvm import registry
from lvm.data import chat_template as chat_template_lib
from lvm.data.tokenizer import IMAGE_MARKER

VICUNA_SYSTEM = ('A chat between a curious user and an artificial intelligence assistant. '
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 'questions.')
# LLaVA-NeXT's conv_llava_llama_3 system prompt.
LLAMA3_SYSTEM = ('You are a helpful language and vision assistant. You are able to understand '
                 'the visual content that the user provides, and assist the user with a variety '
                 'of tasks using natural language.')
LLAMA3_SPECIALS = ('<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>')


class SampleError(ValueError):
  """A sample that cannot be trained on; `reason` is the short key it is counted under."""

  def __init__(self, reason: str, message: str = ''):
    super().__init__(f'{reason}: {message}' if message else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A piece of a rendered conversation: text, one special id, or an image's slot."""
  kind: str  # text | id | image
  value: object = None
  supervised: bool = False


@dataclasses.dataclass(frozen=True)
class Template:
  """A conversation format.

  Attributes:
    chunks: `(pairs, tokenizer, system) -> [Chunk]`: pairs are (question, answer) texts, the
      last answer None when rendering a prompt; `system` is the system prompt (None: the
      template's own; '': none). The chunks start with BOS (if the format has one);
      answers are supervised together with their end-of-turn token, stripped unless the
      family's chat template keeps them as they are (chatml, mistral).
    stop_strings: strings that end an assistant answer in generation (besides EOS).
    messages: None, or `(pairs, system) -> [{'role', 'content'}]`: the conversation as the
      tokenizer's chat template takes it; set, every sample is checked against that rendering.
    special_tokens: texts the tokenizer must hold as single tokens (`<|im_end|>`).
    chat_markers: texts the tokenizer's chat template must contain to be this format's.
    needs_bos: the format starts with the tokenizer's BOS.
    conversational: a chat format (not `plain` captioning): refused with a tokenizer whose
      chat template is another registered format's.
    system_turn: the format has a system turn (the `mistral` and `gemma` ones have none).
  """
  chunks: Callable[..., list[Chunk]]
  stop_strings: tuple[str, ...]
  messages: Callable[..., list[dict]] | None = None
  special_tokens: tuple[str, ...] = ()
  chat_markers: tuple[str, ...] = ()
  needs_bos: bool = False
  conversational: bool = True
  system_turn: bool = True


def get(template: str) -> Template:
  """The registered template named `template`; a ValueError naming the known ones if none."""
  return registry.TEMPLATE.get(template).obj


def stop_strings(template: str) -> tuple[str, ...]:
  """Strings that end an assistant answer in generation (besides the EOS id)."""
  return get(template).stop_strings


def count_images(turns) -> int:
  return sum(t['value'].count(IMAGE_MARKER) for t in turns)


def normalize_turns(turns) -> list[dict]:
  """Validates roles and moves a lone `<image>` to the front of its turn (as LLaVA does)."""
  turns = [{'from': str(t['from']), 'value': str(t['value'])} for t in turns]
  if turns and turns[0]['from'] != 'human':  # LLaVA drops a leading non-human turn.
    turns = turns[1:]
  for i, t in enumerate(turns):
    want = 'human' if i % 2 == 0 else 'gpt'
    if t['from'] != want:
      raise SampleError('bad_roles', f'turn {i} is from {t["from"]!r}, expected {want!r}')
    if want == 'gpt' and IMAGE_MARKER in t['value']:
      raise SampleError('image_marker_in_answer', f'turn {i}')
  if count_images(turns) == 1:
    for t in turns:
      if IMAGE_MARKER in t['value']:
        rest = t['value'].replace(IMAGE_MARKER, '').strip()
        t['value'] = IMAGE_MARKER + ('\n' + rest if rest else '')
  return turns


def _split_images(text: str, supervised=False) -> list[Chunk]:
  chunks = []
  for k, part in enumerate(text.split(IMAGE_MARKER)):
    if k:
      chunks.append(Chunk('image'))
    if part:
      chunks.append(Chunk('text', part, supervised))
  return chunks


def _special(tokenizer, name):
  i = tokenizer.token_to_id(name)
  if i is None:
    raise ValueError(f'The llama3 template needs the token {name!r}, which {tokenizer} lacks; '
                     'use a Llama-3 tokenizer (or the shapes tokenizer).')
  return i


def _plain(pairs, tokenizer, system):
  """Stage 1: the image(s), then the caption and a newline; the question text is dropped."""
  del system  # plain has none
  c = [] if tokenizer.bos_id is None else [Chunk('id', tokenizer.bos_id)]  # Qwen: no BOS
  for q, a in pairs:
    c += [Chunk('image')] * q.count(IMAGE_MARKER)
    if a is not None:
      c.append(Chunk('text', a.strip() + '\n', True))
  return c


def _vicuna_v1(pairs, tokenizer, system):
  """SYS USER: Q ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>"""
  system = VICUNA_SYSTEM if system is None else system
  prefix = system + ' ' if system else ''
  c = [Chunk('id', tokenizer.bos_id)]
  for q, a in pairs:
    c += _split_images(prefix + 'USER: ' + q + ' ASSISTANT:')
    if a is not None:
      c += [Chunk('text', ' ' + a.strip(), True), Chunk('id', tokenizer.eos_id, True)]
    prefix = ''
  return c


def chat_messages(pairs, system, default_system='', strip=True) -> list[dict]:
  """The conversation of `pairs` as chat-template messages (system first if any).

  `system` None gives `default_system`; '' none. `strip`: every message stripped, as the
  chat templates that `| trim` each (Llama-3, Gemma) write it; else as it is (ChatML, Mistral).
  """
  fix = str.strip if strip else (lambda x: x)
  system = default_system if system is None else system
  out = [{'role': 'system', 'content': fix(system)}] if system else []
  for q, a in pairs:
    out.append({'role': 'user', 'content': fix(q)})
    if a is not None:
      out.append({'role': 'assistant', 'content': fix(a)})
  return out


def _llama3(pairs, tokenizer, system):
  """Llama-3's chat format (its tokenizer's chat template; LLaVA-NeXT's conv_llava_llama_3
  system prompt by default): header-delimited turns, each trimmed and ending with <|eot_id|>."""
  bos, sh, eh, eot = (_special(tokenizer, n) for n in LLAMA3_SPECIALS)
  system = LLAMA3_SYSTEM if system is None else system
  c = [Chunk('id', bos)]
  if system:
    c += [Chunk('id', sh), Chunk('text', 'system'), Chunk('id', eh),
          Chunk('text', '\n\n' + system.strip()), Chunk('id', eot)]
  for q, a in pairs:
    c += [Chunk('id', sh), Chunk('text', 'user'), Chunk('id', eh)]
    c += _split_images('\n\n' + q.strip())
    c += [Chunk('id', eot), Chunk('id', sh), Chunk('text', 'assistant'), Chunk('id', eh),
          Chunk('text', '\n\n')]
    if a is not None:
      c += [Chunk('text', a.strip(), True), Chunk('id', eot, True)]
  return c


def _llama3_messages(pairs, system):
  return chat_messages(pairs, system, LLAMA3_SYSTEM)


def check_config(config, problems: registry.Problems):
  """`check_tokenizer` of `config.data.template` with `config.data.tokenizer` (if it exists).

  A dataset's own tokenizer (`data.tokenizer=''`) is made at prepare time: checked at load.
  """
  t = get(config.data.template)
  if not t.system_turn and config.data.system_prompt:
    problems.add('data.system_prompt', f'{config.data.template!r} has no system turn (its chat '
                 'template refuses one)', "set it to None or ''")
  path = config.data.tokenizer
  if not path or not os.path.exists(path):
    return  # Reported by the tokenizer's own load.
  from lvm.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  try:
    tok = tokenizer_lib.Tokenizer(path, config.model.image_token_id, config.model.pad_token_id)
  except ValueError:
    return  # Its own error (e.g. an image id in the text vocabulary) comes at load.
  for line in tokenizer_problems(config.data.template, tok, require_chat_template=True):
    problems.add('data.template', line, _fix(tok, True))


registry.TEMPLATE.register('plain', Template(_plain, ('\n',), conversational=False),
                           check=check_config)
registry.TEMPLATE.register('vicuna_v1', Template(_vicuna_v1, ('</s>',), needs_bos=True),
                           check=check_config)
registry.TEMPLATE.register(
    'llama3', Template(_llama3, ('<|eot_id|>',), messages=_llama3_messages,
                       special_tokens=LLAMA3_SPECIALS, chat_markers=LLAMA3_SPECIALS[1:]),
    check=check_config)


def tokenizer_problems(template: str, tokenizer, require_chat_template: bool) -> list[str]:
  """Why `template` cannot render for `tokenizer` (empty if it can).

  Args:
    template: a registered template name.
    tokenizer: a `lvm.data.tokenizer.Tokenizer`.
    require_chat_template: a template checked against the chat template needs one (a model's
      tokenizer folder); False for a dataset's own tokenizer (shapes), which has none.
  """
  t = get(template)
  out = []
  if t.needs_bos and tokenizer.bos_id is None:
    out.append(f'{template!r} starts with a BOS token, which tokenizer {tokenizer.path} has none '
               'of (bos_token is null)')
  missing = [s for s in t.special_tokens if tokenizer.token_to_id(s) is None]
  if missing:
    out.append(f'{template!r} needs the special tokens {missing}, which tokenizer '
               f'{tokenizer.path} lacks')
  chat = tokenizer.chat_template
  if t.messages is not None:
    if chat is None and require_chat_template:
      out.append(f'{template!r} is checked against the chat template of the tokenizer folder, '
                 f'and {os.path.dirname(tokenizer.path)} has none ({chat_template_lib.CONFIG_FILE}'
                 f' "chat_template" or {chat_template_lib.JINJA_FILE})')
    elif chat is not None and not all(m in chat for m in t.chat_markers):
      out.append(f'the chat template of tokenizer {tokenizer.path} is not the {template!r} '
                 f'format (it lacks {[m for m in t.chat_markers if m not in chat]})')
  elif t.conversational and chat is not None:
    others = [k.name for k in registry.TEMPLATE.kinds()
              if k.obj.chat_markers and all(m in chat for m in k.obj.chat_markers)]
    if others:
      out.append(f'tokenizer {tokenizer.path} was trained for the {others[0]!r} chat format '
                 f"(its chat template), not {template!r}'s")
  return out


def supported(tokenizer, require_chat_template: bool) -> list[str]:
  """The registered templates that `tokenizer` can render."""
  return [name for name in registry.TEMPLATE.names()
          if not tokenizer_problems(name, tokenizer, require_chat_template)]


def _fix(tokenizer, require_chat_template):
  ok = supported(tokenizer, require_chat_template)
  return (f'set config.data.template to one this config.data.tokenizer supports: {ok}' if ok
          else 'set config.data.tokenizer to the decoder\'s own tokenizer folder (tokenizer.json '
               'with tokenizer_config.json carrying its chat template)')


def check_tokenizer(template: str, tokenizer, require_chat_template: bool = True):
  """Raises a ValueError naming `data.template` / `data.tokenizer` if they do not fit.

  `vicuna_v1` with a Qwen tokenizer (no BOS; its chat template is ChatML), `chatml` with a
  folder that has no chat template, `llama3` with a tokenizer lacking `<|eot_id|>`...
  """
  problems = tokenizer_problems(template, tokenizer, require_chat_template)
  if problems:
    raise ValueError(
        f'config.data.template={template!r} does not fit config.data.tokenizer '
        f'({tokenizer.path}): ' + '; '.join(problems) + '. Fix: '
        + _fix(tokenizer, require_chat_template) + '.')


def _collapse_images(ids, image_id):
  """`ids` with each run of image ids as one (image counts are checked elsewhere)."""
  out = []
  for i in ids:
    if not (i == image_id and out and out[-1] == image_id):
      out.append(int(i))
  return out


def check_against_chat_template(template: str, pairs, system, tokenizer, ids,
                                add_generation_prompt: bool):
  """Raises SampleError unless `ids` equal the tokenizer's chat template rendering.

  The rendering is tokenized as transformers' `apply_chat_template(tokenize=True)` does (the
  whole text, specials as their ids); each `<image>` and each run of image ids count as one.
  """
  t = get(template)
  if t.messages is None or tokenizer.chat_template is None:
    return
  specials = {'bos_token': tokenizer.bos_token, 'eos_token': tokenizer.eos_token}
  try:
    text = chat_template_lib.render(tokenizer.chat_template, t.messages(pairs, system),
                                    add_generation_prompt, **specials)
  except chat_template_lib.ChatTemplateError as e:
    raise SampleError('chat_template_refuses', str(e)) from e
  want = []
  for k, part in enumerate(text.split(IMAGE_MARKER)):
    if k:
      want.append(tokenizer.image_token_id)
    want.extend(tokenizer.encode_with_specials(part))
  got = _collapse_images(ids, tokenizer.image_token_id)
  want = _collapse_images(want, tokenizer.image_token_id)
  if got != want:
    k = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    raise SampleError(
        'chat_template_mismatch',
        f'{template!r} renders {tokenizer.decode(got[k:k + 8])!r} at token {k} where the '
        f'tokenizer\'s chat template renders {tokenizer.decode(want[k:k + 8])!r}')


def _chunks(template, turns, tokenizer, prompt_only, system=None):
  """Chunks of `turns`; with prompt_only, stops where the last (unanswered) answer starts.

  `system`: the system prompt (None: the template's own; '': none). `plain` has none.
  """
  pairs = [(turns[i]['value'], turns[i + 1]['value'] if i + 1 < len(turns) else None)
           for i in range(0, len(turns), 2)]
  if prompt_only:
    if not pairs or pairs[-1][1] is not None:
      raise ValueError('render_prompt needs turns that end with a human turn.')
  else:
    if pairs and pairs[-1][1] is None:
      pairs = pairs[:-1]  # A trailing question has nothing to supervise.
    if not pairs:
      raise SampleError('no_answer', 'no assistant turn')
  for _, a in pairs:
    if a is not None and not a.strip():
      raise SampleError('empty_answer')
  return get(template).chunks(pairs, tokenizer, system), pairs


def _image_counts(num_image_tokens):
  """An iterator of each image's token count: an int (every image alike) or one per image."""
  if isinstance(num_image_tokens, (int, np.integer)):
    return itertools.repeat(int(num_image_tokens))
  return iter([int(k) for k in num_image_tokens])


def _tokenize(chunks, tokenizer, num_image_tokens):
  ids, mask = [], []
  run: list[Chunk] = []
  counts = _image_counts(num_image_tokens)

  def flush():
    text, prev = '', []
    for ch in run:
      text += ch.value
      cur = tokenizer.encode(text)
      if cur[:len(prev)] != prev:
        raise SampleError('tokenization_mismatch',
                          f'tokens of {text[:-len(ch.value)][-40:]!r} change when '
                          f'{ch.value[:40]!r} follows')
      new = cur[len(prev):]
      ids.extend(new)
      mask.extend([ch.supervised] * len(new))
      prev = cur
    run.clear()

  for ch in chunks:
    if ch.kind == 'text':
      run.append(ch)
      continue
    flush()
    if ch.kind == 'id':
      ids.append(int(ch.value))
      mask.append(ch.supervised)
    else:
      k = next(counts, None)
      if k is None:
        raise SampleError('image_count_mismatch', 'more <image> markers than images')
      ids.extend([tokenizer.image_token_id] * k)
      mask.extend([False] * k)
  flush()
  return ids, mask


def render(template: str, turns, tokenizer, num_image_tokens: int, system: str | None = None):
  """Ids and label mask of a conversation for training.

  Args:
    template: a registered template name (`lvm.registry.TEMPLATE`).
    turns: LLaVA turns, human first, alternating; `<image>` marks images.
    tokenizer: a `lvm.data.tokenizer.Tokenizer`.
    num_image_tokens: image-token ids each `<image>` expands to: one int for all, or one
      count per image in order (anyres: `lvm.models.num_image_tokens(config, image_size=...)`).
    system: system prompt; None = the template's own, '' = none (`plain` has none).

  Returns:
    (ids int32[T], loss_mask bool[T]); loss_mask[t] is True where ids[t] is a target.

  Raises:
    SampleError: with `.reason` (bad_roles, empty_answer, no_answer, tokenization_mismatch,
      chat_template_mismatch, chat_template_refuses, no_supervised_tokens, ...).
  """
  get(template)  # An unknown name fails before any sample is judged.
  turns = normalize_turns(turns)
  chunks, pairs = _chunks(template, turns, tokenizer, False, system)
  ids, mask = _tokenize(chunks, tokenizer, num_image_tokens)
  check_against_chat_template(template, pairs, system, tokenizer, ids, False)
  if len(ids) != len(mask):  # Defensive: the two must be built together.
    raise SampleError('tokenization_mismatch', f'{len(ids)} ids vs {len(mask)} mask entries')
  if not any(mask):
    raise SampleError('no_supervised_tokens')
  return np.asarray(ids, np.int32), np.asarray(mask, bool)


def render_prompt(template: str, turns, tokenizer, num_image_tokens: int,
                  system: str | None = None) -> np.ndarray:
  """Ids of `turns` (ending with a human turn) up to where the assistant answer starts.

  Checked against the tokenizer's chat template with `add_generation_prompt` (SampleError).
  """
  get(template)  # An unknown name fails before any sample is judged.
  turns = normalize_turns(turns)
  chunks, pairs = _chunks(template, turns, tokenizer, True, system)
  ids, _ = _tokenize(chunks, tokenizer, num_image_tokens)
  check_against_chat_template(template, pairs, system, tokenizer, ids, True)
  return np.asarray(ids, np.int32)


def encode_example(template: str, turns, tokenizer, num_image_tokens, seq_len: int,
                   num_images: int | None = None, system: str | None = None):
  """Renders, checks the image count, and fits to `seq_len` (text truncated, images never).

  `num_image_tokens`: an int for every image, or one count per image (anyres).

  Returns:
    (ids int32[T], loss_mask bool[T]) with T <= seq_len (not padded).

  Raises:
    SampleError: image_count_mismatch, image_token_count_mismatch (the text itself holds
      image-token ids), image_tokens_do_not_fit, no_supervised_tokens_after_truncation, or
      any reason of `render`.
  """
  markers = count_images(turns)
  if num_images is not None and markers != num_images:
    raise SampleError('image_count_mismatch', f'{markers} <image> markers for {num_images} images')
  ids, mask = render(template, turns, tokenizer, num_image_tokens, system)
  want = sum(itertools.islice(_image_counts(num_image_tokens), markers))
  got = int(np.sum(ids == tokenizer.image_token_id))
  if got != want:
    raise SampleError('image_token_count_mismatch',
                      f'{got} image-token ids for {markers} image(s) that need {want}')
  if len(ids) > seq_len:
    image_pos = np.flatnonzero(ids == tokenizer.image_token_id)
    if image_pos.size and image_pos[-1] >= seq_len:
      raise SampleError('image_tokens_do_not_fit',
                        f'last image token at {image_pos[-1]} >= seq_len {seq_len}')
    ids, mask = ids[:seq_len], mask[:seq_len]
    if not mask.any():
      raise SampleError('no_supervised_tokens_after_truncation')
  return ids, mask
