"""The chat formats of the decoder families lvm trains: `chatml`, `mistral`, `gemma`.

Each renders its family's chat template (the jinja string in the model's tokenizer folder)
as `lvm.data.templates` chunks, so the label mask comes with the ids by construction: the
supervised tokens are each assistant answer and its end-of-turn token; the newline a format
writes after that token is not supervised (generation stops at the token). Messages are
written as the family's chat template writes them: Gemma's (and Llama-3's) trims each, ChatML
and Mistral keep them as they are. Every
sample is then checked against the tokenizer's own chat template
(`templates.check_against_chat_template`). `llama3` lives beside `vicuna_v1` in `templates`.

  chatml   Qwen2 / Qwen2.5 / Qwen3 (no BOS):
           <|im_start|>system\\nS<|im_end|>\\n<|im_start|>user\\nQ<|im_end|>\\n
           <|im_start|>assistant\\n[[A<|im_end|>]]\\n
           The system prompt defaults to Qwen2-Instruct's ('You are a helpful assistant.');
           it is always written, so Qwen2.5's template (whose own default differs) renders
           the same text.
  mistral  Mistral Instruct's first format, as the chat template of Mixtral-8x7B-Instruct-v0.1
           (tests/data/chat_templates.json); LLaVA-NeXT-Mistral's decoder is
           Mistral-7B-Instruct-v0.2:
           <s>[INST] Q [/INST][[A</s>]][INST] Q2 [/INST][[A2</s>]]  (no system role)
           Later Mistral templates (system and tool turns, v0.3's control tokens) and one
           Mistral-7B-Instruct-v0.1 revision (a space after each </s>) render otherwise: with
           those folders the per-sample check drops the samples instead of training on them.
  gemma    Gemma / Gemma 2 instruction-tuned (no system role; every message trimmed):
           <bos><start_of_turn>user\\nQ<end_of_turn>\\n<start_of_turn>model\\n
           [[A<end_of_turn>]]\\n
"""

import functools

from lvm import registry
from lvm.data import templates
from lvm.data.templates import Chunk, Template

# Qwen2-Instruct's chat template writes this system turn when none is given.
QWEN2_SYSTEM = 'You are a helpful assistant.'
CHATML_SPECIALS = ('<|im_start|>', '<|im_end|>')
GEMMA_SPECIALS = ('<start_of_turn>', '<end_of_turn>')
MISTRAL_MARKERS = ('[INST]', '[/INST]')
# Single tokens of the shapes tokenizer, so that the demo trains with every format.
SPECIALS = CHATML_SPECIALS + GEMMA_SPECIALS + MISTRAL_MARKERS


def _answer(a, end_of_turn, after=''):
  """An answer and its end-of-turn text (its tokens, one or several), both supervised."""
  c = [Chunk('text', a, True), Chunk('text', end_of_turn, True)]
  return c + [Chunk('text', after)] if after else c


def _chatml(pairs, tokenizer, system):
  del tokenizer  # ChatML has no BOS; its markers are text the tokenizer holds as tokens.
  system = QWEN2_SYSTEM if system is None else system
  c = [Chunk('text', f'<|im_start|>system\n{system}<|im_end|>\n')] if system else []
  for q, a in pairs:
    c += templates._split_images(  # pylint: disable=protected-access
        f'<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n')
    if a is not None:
      c += _answer(a, '<|im_end|>', '\n')  # Qwen's template keeps the answer as it is
  return c


def _mistral(pairs, tokenizer, system):
  if system:
    raise templates.SampleError('system_prompt_unsupported',
                                'the mistral format has no system turn (data.system_prompt)')
  c = [Chunk('id', tokenizer.bos_id)]
  for q, a in pairs:
    c += templates._split_images(f'[INST] {q} [/INST]')  # pylint: disable=protected-access
    if a is not None:
      c += [Chunk('text', a, True), Chunk('id', tokenizer.eos_id, True)]
  return c


def _gemma(pairs, tokenizer, system):
  if system:
    raise templates.SampleError('system_prompt_unsupported',
                                'the gemma format has no system turn (data.system_prompt)')
  c = [Chunk('id', tokenizer.bos_id)]
  for q, a in pairs:
    c += templates._split_images(  # pylint: disable=protected-access
        f'<start_of_turn>user\n{q.strip()}<end_of_turn>\n<start_of_turn>model\n')
    if a is not None:
      c += _answer(a.strip(), '<end_of_turn>', '\n')
  return c


registry.TEMPLATE.register(
    'chatml', Template(
        _chatml, ('<|im_end|>',),
        messages=functools.partial(templates.chat_messages, default_system=QWEN2_SYSTEM,
                                   strip=False),
        special_tokens=CHATML_SPECIALS, chat_markers=CHATML_SPECIALS),
    check=templates.check_config)
registry.TEMPLATE.register(
    'mistral', Template(
        _mistral, ('</s>',), messages=functools.partial(templates.chat_messages, strip=False),
        chat_markers=MISTRAL_MARKERS, needs_bos=True, system_turn=False),
    check=templates.check_config)
registry.TEMPLATE.register(
    'gemma', Template(
        _gemma, ('<end_of_turn>',),
        messages=functools.partial(templates.chat_messages, strip=True),
        special_tokens=GEMMA_SPECIALS, chat_markers=GEMMA_SPECIALS, needs_bos=True,
        system_turn=False),
    check=templates.check_config)
