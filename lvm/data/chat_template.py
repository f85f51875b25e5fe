"""A tokenizer folder's own chat template, rendered as transformers renders it.

Decoder families ship their conversation format as a jinja template in the tokenizer folder
(`tokenizer_config.json` `chat_template`, or `chat_template.jinja`). lvm renders its training
samples with its own templates (`lvm.data.templates`), which also know the label mask, and
checks each sample's ids against this rendering: a sample on which the two differ is refused
(`chat_template_mismatch`), so a template can never drift from the tokenizer silently.

The environment is transformers' (`apply_chat_template`): a sandboxed jinja2 environment with
`trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`, a `tojson` that does not
escape HTML, `strftime_now`, the `{% generation %}` tag (rendered as its body), and the
tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables. transformers itself
is not imported: this runs on every training sample.
"""

import datetime
import functools
import json
import os

import jinja2
import jinja2.ext
from jinja2 import sandbox

CONFIG_FILE = 'tokenizer_config.json'
JINJA_FILE = 'chat_template.jinja'


class ChatTemplateError(ValueError):
  """The chat template refused a conversation (its `raise_exception`) or failed to render."""


def read(folder: str) -> str | None:
  """The chat template of a tokenizer folder, or None if it has none.

  `chat_template.jinja` wins over `tokenizer_config.json` (as in transformers); a config that
  lists named templates gives its `default` one.
  """
  path = os.path.join(folder, JINJA_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return f.read()
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    template = json.load(f).get('chat_template')
  if isinstance(template, list):  # [{'name': 'default', 'template': ...}, {'name': 'tool_use'...}]
    named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
    template = named.get('default')
  return template or None


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): the body."""
  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


def render(source: str, messages: list[dict], add_generation_prompt: bool = False,
           **special_tokens) -> str:
  """The text `source` renders for `messages` ([{'role', 'content'}]).

  Args:
    source: the jinja chat template.
    messages: the conversation, roles `system` / `user` / `assistant`.
    add_generation_prompt: append the opening of an assistant turn (prompts for generation).
    **special_tokens: template variables such as `bos_token='<s>'`, `eos_token='</s>'`.

  Raises:
    ChatTemplateError: the template refused the conversation (e.g. Gemma's 'System role not
      supported') or could not be compiled.
  """
  try:
    return _compile(source).render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt,
                                   **special_tokens)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(str(e)) from e
