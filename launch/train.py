"""Fine-tune with AdaMoLE / LoRA-MoE adapters under DeepSpeed.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json [options]
    torchrun --nproc_per_node 2 launch/train.py --ds_config ds_configs/zero3.json [options]
    mpirun -n 2 python launch/train.py [options]
    python launch/train.py [options]                      # one process

Options come from flags and/or a YAML recipe (--config); flags win. --help lists them all.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from adamole_dist.cli import parse_train_config  # noqa: E402
from adamole_dist.config import ConfigError  # noqa: E402
from adamole_dist.data import DataError  # noqa: E402


def main(argv=None) -> int:
    try:
        cfg = parse_train_config(argv)
        from adamole_dist.trainer import run_training

        run_training(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
