"""Serve a base model and its adapters behind OpenAI's API: adamole_dist/cli/serve.py.

    python launch/serve.py --adapter adamole=runs/default/adapter --port 8000   # or: adamole-serve
"""

import sys

from adamole_dist.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
