"""Generate text with a trained adapter (or a base model alone): adamole_dist/cli/generate.py.

    python launch/generate.py --adapter runs/default/adapter --prompt "Name three colours."   # or: adamole-generate
"""

import sys

from adamole_dist.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
