"""Render a run's figures (loss curves, layer x expert load heatmap, active experts per layer).

    python launch/plot.py RUN_DIR [--out DIR]      # default DIR: RUN_DIR/plots
"""

import argparse
import sys
from pathlib import Path

from adamole_dist.cli.console import configure_logging
from adamole_dist.run_files.plots import plot_run


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="an output_dir of launch/train.py (holds metrics.jsonl)")
    ap.add_argument("--out", type=Path, help="where the PNGs go (default: RUN_DIR/plots)")
    return ap


def main(argv=None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir / 'metrics.jsonl'} not found", file=sys.stderr)
        return 2
    try:
        for path in plot_run(args.run_dir, args.out):
            print(f"wrote {path}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
