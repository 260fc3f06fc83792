"""Export a trained adapter for use outside adamole_dist: adamole_dist/cli/export.py.

    python launch/export.py runs/x/adapter --out exported/ --format peft      # or: adamole-export
"""

import sys

from adamole_dist.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
