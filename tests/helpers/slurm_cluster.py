"""A real SLURM cluster for tests on this one machine: munged, slurmctld, and one slurmd per
emulated node.

Each emulated node (``adamole-n1`` ... ``adamole-nK``) is its own ``slurmd -N <name>`` with its own
port, pid file, spool directory and log; all of them live on this host (``NodeHostname`` and
``NodeAddr`` are this host, so slurmctld and srun reach them; the node NAMES do not resolve, as on
clusters whose node names are not in DNS, which is why the sbatch scripts rendezvous at the first
node's NodeAddr). Emulation means the nodes share this machine's cores and memory bus: jobs
across them exercise the scripts, the rendezvous, groups spanning nodes, checkpoints and requeue,
not a network. Everything lives in a temporary directory (config, state, logs, the munge socket);
the daemons are stopped by the pids they wrote. Needs Debian's slurm-wlm and munge (installed by
.ci/run) and root, as the daemons run as root here (no systemd, no cgroups).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from adamole_dist.runtime.stopping import parent_pid, process_cmdline
from tests.helpers.launch_utils import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo")


def missing_tools() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


NODE_PREFIX = "adamole-n"


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 1, cpus_per_node: int | None = None) -> None:
        self.root = root
        self.host = socket.gethostname()
        self.nodes = [f"{NODE_PREFIX}{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node or os.cpu_count() or 2
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.pid_files = {"munged": root / "munge" / "munged.pid", "slurmctld": root / "slurmctld.pid",
                          **{node: root / f"slurmd-{node}.pid" for node in self.nodes}}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def write_config(self) -> None:
        for d in ("state", "log", "munge", *(f"spool/{node}" for node in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self.conf.write_text(f"""ClusterName=adamole-test
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
SlurmctldPort={free_port()}
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
""" + "".join(f"NodeName={node} NodeHostname={self.host} NodeAddr={self.host} Port={free_port()} "
              f"CPUs={self.cpus_per_node} State=UNKNOWN\n" for node in self.nodes)
            + "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n")

    def start(self) -> "SlurmCluster":
        self.write_config()
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        subprocess.run([_bin("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                        f"--pid-file={self.pid_files['munged']}", f"--log-file={self.root}/log/munged.log",
                        f"--seed-file={self.root}/munge/seed"], check=True, env=self.env)
        subprocess.run([_bin("slurmctld"), "-f", str(self.conf)], check=True, env=self.env)
        for node in self.nodes:
            self.start_node(node)
        self.wait_until(lambda: self.idle_nodes() == len(self.nodes), 60, f"{len(self.nodes)} idle node(s)")
        return self

    def start_node(self, node: str) -> None:
        subprocess.run([_bin("slurmd"), "-f", str(self.conf), "-N", node], check=True, env=self.env)

    def kill_node(self, node: str, job_id: str) -> list[int]:
        """``node`` goes away mid-job, as a machine that loses power: its slurmd, and the job's
        tasks it runs with the step daemons above them, are SIGKILLed at once. Returns the task pids."""
        envs = {pid: _environ(pid) for pid in _pids()}
        tasks = [pid for pid, env in envs.items() if env.get("SLURMD_NODENAME") == node
                 and env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID")]
        steps = {ppid for ppid in map(parent_pid, tasks) if ppid and process_cmdline(ppid).startswith("slurmstepd")}
        self._signal(node, signal.SIGKILL)
        for pid in [*tasks, *steps]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return tasks

    def idle_nodes(self) -> int:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split("\n")
        return sum(1 for line in out if line.split() and line.split()[1] == "idle")

    def _signal(self, name: str, sig) -> None:
        pid_file = self.pid_files[name]
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), sig)
            except (ProcessLookupError, ValueError):
                pass

    def stop(self) -> None:
        for name in (*self.nodes, "slurmctld", "munged"):
            self._signal(name, signal.SIGTERM)
        time.sleep(1)

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([_bin(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True, check=check)

    def wait_until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(1)
        logs = "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}\n{logs}")

    def controller_log(self) -> str:
        return (self.root / "log" / "slurmctld.log").read_text()

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: str, timeout: float) -> dict:
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        self.wait_until(lambda: self.job(job_id).get("JobState") in final, timeout, f"job {job_id} to finish")
        return self.job(job_id)
