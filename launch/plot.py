"""Render a run's figures: adamole_dist/cli/plot.py.

    python launch/plot.py RUN_DIR [--out DIR]      # or: adamole-plot
"""

import sys

from adamole_dist.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
