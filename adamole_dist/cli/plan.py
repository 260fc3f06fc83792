"""Plan the memory of a training run per rank, from the model's config alone (no weights), and which cards fit.

    adamole-plan --model llama-3.1-8b --world_size 8 --micro_batch_size 4 --max_length 4096 --gradient_checkpointing
    python launch/plan.py --model path/to/config.json --quantize_base nf4 --json plan.json
    adamole-train ... --plan          # the same plan for a training command's options; exits 0, writes nothing

Exit codes: 0 done, 2 bad input (one line naming the option).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adamole_dist.atomic_files import write_text_atomically
from adamole_dist.config.cli import _add_fields
from adamole_dist.config.fields import ConfigError
from adamole_dist.planning.model_shape import load_model_shape
from adamole_dist.planning.plan_config import PlanConfig
from adamole_dist.planning.render import plan_record, plan_text
from adamole_dist.run_files.writable import check_output_file
from adamole_dist.runtime.stopping import EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_fields(parser, PlanConfig, skip=set())
    parser.add_argument("--json", type=Path, default=None, help="also write the plan as JSON to this file")
    return parser


def main(argv=None) -> int:
    ns = vars(build_parser().parse_args(argv))
    out = ns.pop("json")
    try:
        plan = PlanConfig(**ns)
        if out is not None:  # before any work: writable, not the model's config.json, not inside a training run
            check_output_file(out, "--json", [("--model", plan.model)])
        shape = load_model_shape(plan.model)
        text, record = plan_text(shape, plan), plan_record(shape, plan)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(text, flush=True)
    if out is not None:
        try:
            write_text_atomically(out, json.dumps(record, indent=1) + "\n")
        except OSError as e:
            print(f"error: json ({out}) cannot be written: {e.strerror or e}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
