"""Plan a training run's memory per rank and the cards it fits: adamole_dist/cli/plan.py.

    python launch/plan.py --model llama-3.1-8b --world_size 8 --micro_batch_size 4 --max_length 4096 [--json plan.json]
    (or: adamole-plan ..., python -m adamole_dist.cli.plan ...)
"""

import sys

from adamole_dist.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
