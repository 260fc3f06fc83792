"""Fine-tune with AdaMoLE / LoRA-MoE adapters under DeepSpeed.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json [options]
    torchrun --nproc_per_node 2 launch/train.py --ds_config ds_configs/zero3.json [options]
    mpirun -n 2 python launch/train.py [options]
    python launch/train.py [options]                      # one process

Options come from flags and/or a YAML recipe (--config); flags win. --help lists them all.
Exit codes of each rank: 0 done, 2 bad input (one line naming the option or file; nothing
written; --debug adds the traceback), 3 non-finite loss or gradient, 74 a checkpoint could not be
written (disk full, quota: one line; its partial folder removed, the previous checkpoint and
'latest' intact), 75 stopped by SIGTERM, SIGINT or SIGUSR1 (or the launcher going away) after
writing a checkpoint (requeue and --resume latest) -- or, during set-up (reading and tokenizing the
data, converting and loading the model), at once, before anything was written (run it again) --,
76 another rank died. docs/training-at-scale.md ("Stopping and exit codes") says what each launcher returns.
"""

import sys
import traceback
import warnings

# DeepSpeed calls torch.distributed functions that torch 2.13 deprecates, once per step.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+.* is deprecated", category=FutureWarning)

from adamole_dist.cli.console import configure_logging
from adamole_dist.config.cli import parse_train_config
from adamole_dist.config.fields import ConfigError
from adamole_dist.data import DataError
from adamole_dist.planning.model_shape import load_model_shape
from adamole_dist.planning.plan_config import plan_config_from_train
from adamole_dist.planning.render import plan_text
from adamole_dist.runtime.stopping import (
    EXIT_BAD_INPUT,
    EXIT_NON_FINITE,
    EXIT_PREEMPTED,
    EXIT_WRITE_FAILED,
    CheckpointWriteError,
    NonFiniteLoss,
    Preempted,
    StoppedBeforeTraining,
)


def planned_text(cfg) -> str:
    """--plan: the memory plan of this command's options on this launch's world size and device."""
    import os

    import torch

    plan = plan_config_from_train(cfg, int(os.environ.get("WORLD_SIZE", "1")),
                                  "cuda" if torch.cuda.is_available() else "cpu")
    try:
        return plan_text(load_model_shape(plan.model), plan)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def main(argv=None) -> int:
    configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # known before the options parse, so a parse error can show its traceback too
    try:
        cfg = parse_train_config(argv)
        if cfg.plan:
            print(planned_text(cfg), flush=True)
            return 0
        from adamole_dist.train.loop import run_training

        run_training(cfg)
    except (ConfigError, DataError) as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_NON_FINITE
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_WRITE_FAILED
    except (Preempted, StoppedBeforeTraining) as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
