"""Fine-tune with AdaMoLE / LoRA-MoE adapters under DeepSpeed: the script the launchers run.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json [options]
    torchrun --nproc_per_node 2 launch/train.py --ds_config ds_configs/zero3.json [options]
    mpirun -n 2 python launch/train.py [options]
    python launch/train.py [options]                      # one process (or: adamole-train [options])

Exit codes: 0 done, 2 bad input, 3 non-finite loss, 74 a checkpoint could not be written (disk full;
the previous one intact), 75 stopped by a signal (after a checkpoint; or before the first step, at
once, nothing written), 76 another rank died. The command itself is adamole_dist/cli/train.py (--help;
its docstring details each code; docs/training-at-scale.md, "Stopping and exit codes", what each launcher returns)."""

import sys

from adamole_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
