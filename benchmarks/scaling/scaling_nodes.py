"""The scaling series by node count, on SLURM nodes emulated on this machine.

    python benchmarks/scaling/scaling_nodes.py --nodes 1,2,4 --json results/scaling_nodes.json \
        --plot results/scaling_nodes.png

Starts the test suite's SLURM cluster (tests/helpers/slurm_cluster.py: munged, slurmctld and one
``slurmd -N`` per emulated node, all on this host; needs root and Debian's slurm-wlm and munge),
submits ``launch/slurm/scaling.sbatch`` once per node count with one task per node (weak and
strong, replicated and expert parallel over every rank), waits for each, and prints
``scaling.py``'s table (efficiency against nodes), its cost-model check and plot.

What emulation measures: the nodes share this machine's cores and memory bus, so throughput
against nodes is not a cluster's. It does show, at every node count, that the script, the
rendezvous, process groups spanning nodes and the records work, and how each step splits into
compute, all-to-all and ZeRO communication.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common.records import write_records
from benchmarks.scaling.scaling import efficiency, plot, table, validation

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the test suite's cluster harness (tests.helpers), from a checkout


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="1,2,4", help="node counts, one job each")
    ap.add_argument("--batch", type=int, default=4, help="examples per rank (weak); strong uses 8x that in all")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each job")
    ap.add_argument("--json", type=Path, default=REPO / "runs" / "scaling_nodes.json")
    ap.add_argument("--plot", type=Path)
    return ap.parse_args(argv)


def run(args) -> list[dict]:
    """One sbatch job per node count on the emulated cluster, appending to --json; the records with
    their efficiency, written back."""
    from tests.helpers.slurm_cluster import SlurmCluster, missing_tools

    missing = missing_tools()
    if missing:
        sys.exit(f"error: {', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
    counts = [int(n) for n in args.nodes.split(",")]
    args.json = args.json.resolve()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.unlink(missing_ok=True)
    args.json.with_suffix(".csv").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="adamole-slurm-") as root:
        cluster = SlurmCluster(Path(root), nodes=max(counts)).start()
        try:
            env = (f"ALL,ADAMOLE_VENV={Path(sys.executable).parents[1]},SCALING_JSON={args.json},"
                   f"STEPS={args.steps},BATCH={args.batch},OMP_NUM_THREADS=1")
            for n in counts:
                proc = cluster.run("sbatch", "--parsable", f"--nodes={n}", "--ntasks-per-node=1", f"--chdir={REPO}",
                                   f"--output={root}/scaling-%j.out", f"--export={env}",
                                   str(REPO / "launch/slurm/scaling.sbatch"))
                if proc.returncode != 0:
                    sys.exit(f"sbatch failed: {proc.stderr}")
                job_id = proc.stdout.strip().split(";")[0]
                print(f"{n} node(s): job {job_id} ...", flush=True)
                job = cluster.wait_job(job_id, args.timeout)
                if job["JobState"] != "COMPLETED":
                    log = Path(root, f"scaling-{job_id}.out").read_text()
                    sys.exit(f"job {job_id} ({n} nodes) ended {job['JobState']}:\n{log[-3000:]}")
        finally:
            cluster.stop()
    records = efficiency(json.loads(args.json.read_text()))
    write_records(args.json, records)
    return records


def report(records: list[dict], args) -> None:
    print(table(records))
    print(validation(records))
    if args.plot:
        plot(records, args.plot)


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
