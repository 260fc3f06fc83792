"""Evaluate a saved adapter, or a base model zero-shot: adamole_dist/cli/eval.py.

    python launch/eval.py --adapter runs/default/adapter [--dataset DIR] [--split test] [--json out.json]
    (or: adamole-eval ..., python -m adamole_dist.cli.eval ...)
"""

import sys

from adamole_dist.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
