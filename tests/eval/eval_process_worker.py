"""One process of the 2-process evaluation test: answers a POPE folder, prints JSON.

usage: eval_process_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID TOKENIZER_DIR DATA_DIR OUT_DIR
"""

import json
import sys

from lvm import distributed


def main():
  address, num, pid, tok_dir, data_dir, out_dir = sys.argv[1:7]
  distributed.initialize(address, int(num), int(pid))
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import eval_memory  # pylint: disable=import-outside-toplevel
  from lvm import evaluate  # pylint: disable=import-outside-toplevel
  config, text_gen = eval_memory.tiny_text_generator(tok_dir)  # every device, both processes
  result = evaluate.run(text_gen, config, 'pope', data_dir, out_dir, batch_size=8,
                        max_new_tokens=4)
  local = text_gen.generator.local_rows(8, 8)
  print(json.dumps({'devices': jax.device_count(), 'processes': jax.process_count(),
                    'mesh': dict(text_gen.generator.mesh.shape),
                    'local_rows': [local.start, local.stop], 'skipped': result['skipped'],
                    'num_scored': result['num_scored']}))
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
