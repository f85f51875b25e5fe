"""CPU cost of checking each sample against the tokenizer's chat template.

Renders one 4-round text conversation with `chatml` (byte-level BPE, the Qwen2 chat template)
and `llama3` (the Llama-3 template) on the tokenizer folders the tests build
(tests/data/test_family_templates.py), with and without the per-sample jinja check, and prints
the process CPU time per sample of each.

  python benchmarks/chat_template_check.py [--samples=2000]
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--samples', type=int, default=2000)
  args = parser.parse_args()
  from lvm.data import templates  # pylint: disable=g-import-not-at-top
  from tests.data import test_family_templates as fixtures  # pylint: disable=g-import-not-at-top
  turns = fixtures.CONVERSATIONS['two_turns'] * 2
  with tempfile.TemporaryDirectory() as root:
    for family in ('qwen2', 'llama3'):
      tok = fixtures.lvm_tok(fixtures.build_folder(root, family))
      template = fixtures.FAMILIES[family][0]

      def per_sample():
        start = time.process_time()
        for _ in range(args.samples):
          templates.render(template, turns, tok, 16, None)
        return (time.process_time() - start) / args.samples * 1e3

      per_sample()  # warm-up (jinja compile, caches)
      checked = per_sample()
      tok.chat_template = None  # as a tokenizer without one: rendered unchecked
      unchecked = per_sample()
      print(f'{template:7s} ({family}): {checked:.2f} ms/sample checked, {unchecked:.2f} ms '
            f'unchecked: the check costs {checked - unchecked:.2f} ms')


if __name__ == '__main__':
  main()
