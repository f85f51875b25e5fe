"""One tokenizer interface over SentencePiece models and transformers' `tokenizer.json`.

The image token and the pad token are not part of the text vocabulary: their ids come from
the model config (`config.model.image_token_id`, `config.model.pad_token_id`), usually just
above the text vocabulary (llava-hf: 32000 and 32001 over LLaMA's 32000 pieces).
"""

import json
import os
import re
from typing import Sequence

from lvm.data import chat_template as chat_template_lib

IMAGE_MARKER = '<image>'


class Tokenizer:
  """Text <-> ids with the image and pad ids of the model config.

  Attributes:
    bos_id, eos_id: begin/end of sequence ids of the text vocabulary; `bos_id` is None for
      tokenizers without one (Qwen: its `tokenizer_config.json` says `"bos_token": null`).
    bos_token, eos_token: their texts (None without a BOS), as chat templates use them.
    chat_template: the jinja chat template of the tokenizer's folder, or None
      (`lvm.data.chat_template.read`).
    pad_id, image_token_id: from the model config.
    vocab_size: size of the text vocabulary (ids 0..vocab_size-1), specials excluded.
  """

  def __init__(self, path: str, image_token_id: int, pad_id: int):
    self.path = path
    self.image_token_id = int(image_token_id)
    self.pad_id = int(pad_id)
    if path.endswith('.json'):
      import tokenizers  # pylint: disable=g-import-not-at-top
      self._hf = tokenizers.Tokenizer.from_file(path)
      self._sp = None
      self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
      bos, eos = _hf_bos_eos(path, self._hf)
    else:
      import sentencepiece as spm  # pylint: disable=g-import-not-at-top
      self._sp = spm.SentencePieceProcessor(model_file=path)
      self._hf = None
      self.vocab_size = self._sp.get_piece_size()
      bos, eos = self._sp.bos_id(), self._sp.eos_id()
    if eos is None or eos < 0:
      raise ValueError(f'Tokenizer {path} has no EOS token (eos={eos}).')
    self.bos_id = None if bos is None or bos < 0 else int(bos)
    self.eos_id = int(eos)
    self.bos_token = None if self.bos_id is None else self.id_to_token(self.bos_id)
    self.eos_token = self.id_to_token(self.eos_id)
    self.chat_template = chat_template_lib.read(os.path.dirname(os.path.abspath(path)))
    for name, i in (('image_token_id', self.image_token_id), ('pad_token_id', self.pad_id)):
      if i < self.vocab_size:
        raise ValueError(
            f'config.model.{name}={i} collides with the text vocabulary of {path} '
            f'({self.vocab_size} ids); set it to {self.vocab_size} or above.')

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Ids of `text`; never adds EOS, adds BOS only when asked (templates add it once)."""
    if self._sp is not None:
      ids = list(self._sp.encode(text, out_type=int))
    else:
      ids = list(self._hf.encode(text, add_special_tokens=False).ids)
    if add_bos and self.bos_id is None:
      raise ValueError(f'{self} has no BOS token to add.')
    return [self.bos_id] + ids if add_bos else ids

  def encode_with_specials(self, text: str) -> list[int]:
    """Ids of rendered template text: BOS/EOS texts in it become their ids, never pieces.

    (tokenizer.json splits its added tokens itself; SentencePiece would spell `<s>` out.)
    """
    specials = {t: i for t, i in ((self.bos_token, self.bos_id), (self.eos_token, self.eos_id))
                if t}
    ids = []
    for part in re.split('(' + '|'.join(map(re.escape, specials)) + ')', text):
      if part in specials:
        ids.append(specials[part])
      elif part:
        ids.extend(self.encode(part))
    return ids

  def id_to_token(self, i: int) -> str:
    """The text of token `i` as a chat template writes it (`<s>`, `<|im_end|>`)."""
    return self._sp.id_to_piece(int(i)) if self._sp is not None else self._hf.id_to_token(int(i))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; image ids become `<image>`, BOS/EOS show as text, pad ids are dropped."""
    out, run = [], []
    def flush():
      if run:
        out.append(self._sp.decode(run) if self._sp is not None
                   else self._hf.decode(run, skip_special_tokens=False))
        run.clear()
    for i in ids:
      i = int(i)
      if i == self.image_token_id:
        flush()
        out.append(IMAGE_MARKER)
      elif self._sp is not None and i in (self.bos_id, self.eos_id):
        flush()  # SentencePiece drops control pieces; show them like tokenizer.json does.
        out.append(self._sp.id_to_piece(i))
      elif i == self.pad_id or not 0 <= i < self.vocab_size:
        flush()
      else:
        run.append(i)
    flush()
    return ''.join(out)

  def token_to_id(self, token: str) -> int | None:
    """Id of a single special/added token such as `<|eot_id|>`, or None if absent."""
    if self._sp is not None:
      i = self._sp.piece_to_id(token)
      return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else int(i)
    i = self._hf.token_to_id(token)
    return None if i is None else int(i)

  def __repr__(self):
    return (f'Tokenizer({self.path!r}, vocab={self.vocab_size}, bos={self.bos_id}, '
            f'eos={self.eos_id}, image={self.image_token_id}, pad={self.pad_id})')


def _hf_bos_eos(path, tok):
  """BOS/EOS of a tokenizer.json: from tokenizer_config.json beside it, else common names."""
  bos = eos = None
  no_bos = False
  cfg_path = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      cfg = json.load(f)
    def tok_id(entry):
      if isinstance(entry, dict):
        entry = entry.get('content')
      return tok.token_to_id(entry) if entry else None
    bos, eos = tok_id(cfg.get('bos_token')), tok_id(cfg.get('eos_token'))
    # `"bos_token": null` (Qwen) means none: no guessing from common names.
    no_bos = 'bos_token' in cfg and cfg['bos_token'] is None
  for name in ('<s>', '<|begin_of_text|>', '<bos>'):
    if bos is None and not no_bos:
      bos = tok.token_to_id(name)
  for name in ('</s>', '<|end_of_text|>', '<eos>'):
    if eos is None:
      eos = tok.token_to_id(name)
  return bos, eos


def load(config) -> Tokenizer:
  """The tokenizer of `config.data.tokenizer`, or the dataset's own ('' -> e.g. shapes' model).

  A dataset has a tokenizer of its own when its registered object has `own_tokenizer(config)`
  (the path `lvm.data.prepare` writes it to).
  """
  from lvm import registry  # pylint: disable=g-import-not-at-top
  path = config.data.tokenizer
  if not path:
    dataset = registry.DATASET.get(config.data.dataset).obj
    if not hasattr(dataset, 'own_tokenizer'):
      raise ValueError(
          f'config.data.tokenizer is empty but dataset {config.data.dataset!r} has no '
          'tokenizer of its own; set it to a tokenizer.model or tokenizer.json path.')
    path = dataset.own_tokenizer(config)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'{path} does not exist: the {config.data.dataset} tokenizer is trained by '
          'lvm.data.prepare(config).')
  if not os.path.exists(path):
    raise FileNotFoundError(f'config.data.tokenizer={path!r} does not exist.')
  tok = Tokenizer(path, config.model.image_token_id, config.model.pad_token_id)
  vocab = config.model.decoder.vocab_size
  for name, i in (('image_token_id', tok.image_token_id), ('pad_token_id', tok.pad_id)):
    if i >= vocab:
      raise ValueError(f'config.model.{name}={i} does not fit config.model.decoder.vocab_size='
                       f'{vocab}; raise the vocab size or lower the id.')
  if tok.vocab_size > vocab:
    raise ValueError(f'Tokenizer {path} has {tok.vocab_size} ids but '
                     f'config.model.decoder.vocab_size={vocab}.')
  from lvm.data import templates  # pylint: disable=g-import-not-at-top
  # A dataset's own tokenizer (shapes) has no chat template to check against.
  templates.check_tokenizer(config.data.template, tok,
                            require_chat_template=bool(config.data.tokenizer))
  return tok
