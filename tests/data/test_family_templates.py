"""chatml / mistral / gemma / llama3: ids equal transformers' `apply_chat_template` on tokenizer
folders built here (a trained BPE tokenizer.json + tokenizer_config.json carrying each family's
real chat template, tests/data/chat_templates.json), masks are exactly the answers and their
end-of-turn token, mismatches are refused and counted, bad template/tokenizer pairs fail."""

import json
import os

import numpy as np
import pytest

from lvm import inference
from lvm import sharding
from lvm import validate
from lvm.data import chat_template
from lvm.data import inspect as inspect_lib
from lvm.data import pipeline
from lvm.data import templates
from lvm.data.tokenizer import Tokenizer
from tests.data.conftest import tiny_shapes_config

IMG, PAD = 510, 511
with open(os.path.join(os.path.dirname(__file__), 'chat_templates.json')) as _f:
  CHAT_TEMPLATES = json.load(_f)

# folder name -> (lvm template, special tokens, byte-level BPE?, Metaspace prepend scheme).
FAMILIES = {
    'qwen2': ('chatml', ['<|endoftext|>', '<|im_start|>', '<|im_end|>'], True, None),
    'qwen2_5': ('chatml', ['<|endoftext|>', '<|im_start|>', '<|im_end|>'], True, None),
    'llama3': ('llama3', ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
                          '<|end_header_id|>', '<|eot_id|>'], True, None),
    # Llama/Mistral SentencePiece: a ▁ before every text section (legacy).
    'mistral': ('mistral', ['<unk>', '<s>', '</s>'], False, 'always'),
    # Gemma: no dummy prefix.
    'gemma': ('gemma', ['<pad>', '<eos>', '<bos>', '<unk>', '<start_of_turn>', '<end_of_turn>'],
              False, 'never'),
}
END = {'chatml': '<|im_end|>', 'llama3': '<|eot_id|>', 'mistral': '</s>',
       'gemma': '<end_of_turn>'}

Q1, A1 = 'What color is the circle?', 'red'
Q2, A2 = 'How many shapes are there? ', ' two shapes'  # spaces: stripped where templates trim
CONVERSATIONS = {
    'one_turn': [{'from': 'human', 'value': Q1}, {'from': 'gpt', 'value': A1}],
    'two_turns': [{'from': 'human', 'value': Q1}, {'from': 'gpt', 'value': A1},
                  {'from': 'human', 'value': Q2}, {'from': 'gpt', 'value': A2}],
}
CORPUS = [f'{q} {a}' for q, a in ((Q1, A1), (Q2, A2))] * 3 + [
    'You are a helpful assistant. Describe the image. A blue square and a red circle.',
    'system user assistant model [INST] [/INST] You are Qwen, created by Alibaba Cloud.',
    'You are a helpful language and vision assistant. You are able to understand the visual '
    'content that the user provides, and assist the user with a variety of tasks using '
    'natural language. What shapes are there? Is there a triangle? yes no left right top',
]


def build_folder(root, family, chat=True, template_key=None):
  """A tokenizer folder: a BPE tokenizer.json trained on CORPUS + tokenizer_config.json."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top,line-too-long
  _, specials, byte_level, prepend = FAMILIES[family]
  tok = tokenizers.Tokenizer(models.BPE(unk_token=None if byte_level else '<unk>'))
  if byte_level:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement='▁', prepend_scheme=prepend),
        pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace(replacement='▁', prepend_scheme=prepend)
    alphabet = sorted(set(''.join(CORPUS).replace(' ', '▁')) | set('\n▁'))
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  folder = os.path.join(str(root), family + ('' if chat else '_nochat'))
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, 'tokenizer.json'))
  info = CHAT_TEMPLATES[template_key or family]
  cfg = {'bos_token': info['bos_token'], 'eos_token': info['eos_token'],
         'tokenizer_class': 'PreTrainedTokenizerFast', 'clean_up_tokenization_spaces': False}
  if chat:
    cfg['chat_template'] = info['chat_template']
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump(cfg, f)
  return folder


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('chat_tokenizers')
  return {family: build_folder(root, family) for family in FAMILIES}


def lvm_tok(folder):
  return Tokenizer(os.path.join(folder, 'tokenizer.json'), IMG, PAD)


def hf_ids(folder, turns, system=None, add_generation_prompt=False):
  """transformers' apply_chat_template ids of LLaVA `turns`."""
  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  messages = [{'role': 'system', 'content': system}] if system else []
  messages += [{'role': 'user' if t['from'] == 'human' else 'assistant', 'content': t['value']}
               for t in turns]
  out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                add_generation_prompt=add_generation_prompt)
  return list(out['input_ids'])


# The system prompt each family's conversation is rendered with: chatml writes Qwen2's default
# (None); llama3 its LLaVA-NeXT one; Mistral v0.1 and Gemma have no system turn.
SYSTEM = {'chatml': (None, 'You are a helpful assistant.'),
          'llama3': (None, templates.LLAMA3_SYSTEM), 'mistral': ('', None), 'gemma': ('', None)}


@pytest.mark.parametrize('conversation', sorted(CONVERSATIONS))
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_ids_equal_transformers_and_mask_is_answers_plus_end_of_turn(folders, family,
                                                                     conversation):
  template = FAMILIES[family][0]
  tok = lvm_tok(folders[family])
  turns = CONVERSATIONS[conversation]
  lvm_system, hf_system = SYSTEM[template]
  ids, mask = templates.render(template, turns, tok, 3, lvm_system)
  assert ids.tolist() == hf_ids(folders[family], turns, hf_system)
  # Supervised: exactly each answer (stripped) and its end-of-turn token.
  spans = [t for k, t in inspect_lib.spans(tok, ids, mask) if k == 'supervised']
  answers = [t['value'].strip() for t in turns if t['from'] == 'gpt']
  assert [s.lstrip('▁ ') for s in spans] == [a + END[template] for a in answers]
  end_id = tok.token_to_id(END[template])
  assert end_id is not None
  supervised_ends = ids[mask] == end_id
  assert supervised_ends.sum() == len(answers) and supervised_ends[-1]


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_prompt_equals_transformers_generation_prompt(folders, family):
  template = FAMILIES[family][0]
  turns = CONVERSATIONS['two_turns'][:3]
  lvm_system, hf_system = SYSTEM[template]
  prompt = templates.render_prompt(template, turns, lvm_tok(folders[family]), 3, lvm_system)
  assert prompt.tolist() == hf_ids(folders[family], turns, hf_system, add_generation_prompt=True)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_images_are_checked_as_one_slot_each(folders, family):
  template = FAMILIES[family][0]
  tok = lvm_tok(folders[family])
  turns = [{'from': 'human', 'value': Q1 + '\n<image>'}, {'from': 'gpt', 'value': A1}]
  ids, mask = templates.render(template, turns, tok, 4, SYSTEM[template][0])
  assert (ids == IMG).sum() == 4 and not mask[ids == IMG].any()
  text = tok.decode(ids)
  assert '<image><image><image><image>\n' + Q1 in text  # moved to the front, as LLaVA does


def test_tokenizer_without_bos(folders):
  tok = lvm_tok(folders['qwen2'])
  assert tok.bos_id is None and tok.bos_token is None
  assert tok.eos_token == '<|im_end|>' and '<|im_start|>' in tok.chat_template
  ids, mask = templates.render('plain', [{'from': 'human', 'value': '<image>'},
                                         {'from': 'gpt', 'value': 'A blue square.'}], tok, 2)
  assert ids[:2].tolist() == [IMG, IMG] and mask[2:].all()  # no BOS in front
  with pytest.raises(ValueError, match='no BOS'):
    tok.encode('red', add_bos=True)


def test_chat_template_read_order(tmp_path):
  with open(tmp_path / 'tokenizer_config.json', 'w') as f:
    json.dump({'chat_template': [{'name': 'tool_use', 'template': 'T'},
                                 {'name': 'default', 'template': 'D'}]}, f)
  assert chat_template.read(str(tmp_path)) == 'D'
  (tmp_path / 'chat_template.jinja').write_text('J')
  assert chat_template.read(str(tmp_path)) == 'J'
  assert chat_template.read(str(tmp_path / 'none')) is None
  with pytest.raises(chat_template.ChatTemplateError, match='System role not supported'):
    chat_template.render(CHAT_TEMPLATES['gemma']['chat_template'],
                         [{'role': 'system', 'content': 'x'}], bos_token='<bos>')


def test_mismatches_are_refused_with_their_reason(folders, tmp_path):
  turns = CONVERSATIONS['one_turn']
  # Qwen2's chat template writes its default system turn when none is given: without one,
  # lvm's ids would differ from what the model was tuned on.
  with pytest.raises(templates.SampleError, match='chat_template_mismatch') as e:
    templates.render('chatml', turns, lvm_tok(folders['qwen2']), 3, '')
  assert e.value.reason == 'chat_template_mismatch'
  # Qwen2.5's template has another default, so lvm's (always written) renders the same there.
  templates.render('chatml', turns, lvm_tok(folders['qwen2_5']), 3, None)
  # A chat template that differs (here: a made-up space after each answer's </s>).
  variant = build_folder(tmp_path, 'mistral')
  with open(os.path.join(variant, 'tokenizer_config.json')) as f:
    cfg = json.load(f)
  cfg['chat_template'] = cfg['chat_template'].replace("eos_token}}", "eos_token + ' '}}")
  assert "eos_token + ' '" in cfg['chat_template']
  with open(os.path.join(variant, 'tokenizer_config.json'), 'w') as f:
    json.dump(cfg, f)
  with pytest.raises(templates.SampleError) as e:
    templates.render('mistral', turns, lvm_tok(variant), 3)
  assert e.value.reason == 'chat_template_mismatch'
  # A conversation the chat template itself refuses (its raise_exception).
  (tmp_path / 'mistral' / 'chat_template.jinja').write_text(
      "{% if messages|length > 1 %}{{ raise_exception('Only one message!') }}{% endif %}"
      '[INST][/INST]')
  with pytest.raises(templates.SampleError, match='Only one message') as e:
    templates.render('mistral', turns, lvm_tok(variant), 3)
  assert e.value.reason == 'chat_template_refuses'


def test_pipeline_counts_mismatches_as_drops(folders, shapes_dir):
  path = os.path.join(folders['qwen2'], 'tokenizer.json')
  config = tiny_shapes_config(shapes_dir, template='chatml', tokenizer=path, seq_len=96)
  config.model.decoder.vocab_size = 512
  mesh = sharding.make_mesh(config.mesh)
  it = pipeline.make_iterator(config, 'train', mesh)
  batch = next(it)
  assert it.stats == {} and int(np.asarray(batch['loss_mask']).sum()) > 0
  d = next(inspect_lib.inspect(config, 'train', 1))
  assert d['chat_template_checked'] and d['dropped'] is None
  assert all(span.endswith('<|im_end|>') for span in d['supervised_spans'])
  config = tiny_shapes_config(shapes_dir, template='chatml', tokenizer=path, seq_len=96,
                              system_prompt='')
  with pytest.raises(ValueError, match="chat_template_mismatch"):
    next(pipeline.make_iterator(config, 'train', mesh))


def test_template_and_tokenizer_must_fit(folders, tmp_path):
  qwen = lvm_tok(folders['qwen2'])
  with pytest.raises(ValueError) as e:
    templates.check_tokenizer('vicuna_v1', qwen)
  msg = str(e.value)
  assert "config.data.template='vicuna_v1'" in msg and 'config.data.tokenizer' in msg
  assert 'BOS' in msg and "'chatml' chat format" in msg and "['chatml', 'plain']" in msg
  with pytest.raises(ValueError, match=r"'gemma' needs the special tokens \['<start_of_turn>'"):
    templates.check_tokenizer('gemma', qwen)
  with pytest.raises(ValueError, match="is not the 'llama3' format"):
    templates.check_tokenizer('llama3', lvm_tok(build_folder(tmp_path, 'llama3',
                                                             template_key='qwen2')))
  no_chat = lvm_tok(build_folder(tmp_path, 'qwen2', chat=False))
  with pytest.raises(ValueError, match=r"'chatml' is checked against the chat template .* has "
                                       r'none'):
    templates.check_tokenizer('chatml', no_chat)
  templates.check_tokenizer('chatml', no_chat, require_chat_template=False)  # lvm's own
  for family, (template, *_) in FAMILIES.items():
    templates.check_tokenizer(template, lvm_tok(folders[family]))


def test_validate_names_the_key_before_compiling(folders):
  config = tiny_shapes_config('/tmp/unused', template='vicuna_v1',
                              tokenizer=os.path.join(folders['qwen2'], 'tokenizer.json'))
  with pytest.raises(ValueError, match=r"config.data.template: 'vicuna_v1' starts with a BOS"):
    validate.validate_config(config, num_devices=1)
  config = tiny_shapes_config('/tmp/unused', template='gemma', system_prompt='Be brief.')
  with pytest.raises(ValueError, match=r"config.data.system_prompt: 'gemma' has no system turn"):
    validate.validate_config(config, num_devices=1)


class _FakeGenerator:
  """Stands in for `lvm.generate.Generator`: 'generates' `tokens`, stopping at a stop id."""
  tokens_per_image = 3
  anyres = None

  def __init__(self, tokens):
    self.tokens, self.stop_ids = tokens, None

  def generate(self, prompts, images, max_new_tokens, sampling, stop_ids, min_batch):
    del prompts, images, max_new_tokens, sampling, min_batch
    from lvm import generate  # pylint: disable=g-import-not-at-top
    self.stop_ids = tuple(stop_ids)
    stop = next(i for i, t in enumerate(self.tokens) if t in stop_ids)
    return [generate.Output(list(self.tokens[:stop]), 'stop')]


@pytest.mark.parametrize('family', ['qwen2', 'gemma', 'llama3'])
def test_generation_stops_at_the_templates_end_of_turn(folders, family):
  template = FAMILIES[family][0]
  tok = lvm_tok(folders[family])
  end = tok.token_to_id(END[template])
  answer = tok.encode('red')
  gen = _FakeGenerator(answer + [end] + tok.encode(' and more'))
  text_gen = inference.TextGenerator(gen, tok, template, SYSTEM[template][0])
  assert end in text_gen.stop_ids and tok.eos_id in text_gen.stop_ids
  out = text_gen.answer([CONVERSATIONS['one_turn'][:1]])[0]
  assert gen.stop_ids == text_gen.stop_ids
  assert out.tokens == answer and out.text == 'red' and out.finish == 'stop'
