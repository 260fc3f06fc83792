"""Fine-tune with AdaMoLE / LoRA-MoE adapters under DeepSpeed: the script the launchers run.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json [options]
    torchrun --nproc_per_node 2 launch/train.py --ds_config ds_configs/zero3.json [options]
    mpirun -n 2 python launch/train.py [options]
    python launch/train.py [options]                      # one process (or: adamole-train [options])

The command itself is adamole_dist/cli/train.py (--help, exit codes)."""

import sys

from adamole_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
