"""Print the prompts and output lengths `kvfleet bench engine` uses (Workload.make, its defaults) as JSON:
`python -m cluster.bench.workload_json NUM_REQUESTS [VOCAB]`."""

import json
import sys

from cluster.bench.engine import Workload

n = int(sys.argv[1])
vocab = int(sys.argv[2]) if len(sys.argv) > 2 else 49152
w = Workload.make(n, (32, 128), (64, 64), vocab, 0)
print(json.dumps({"prompts": w.prompts, "output_lens": w.output_lens}))
