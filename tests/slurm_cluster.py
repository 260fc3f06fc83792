"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd on this machine.

Everything lives in a temporary directory (config, state, logs, the munge socket); the
daemons are stopped by the pids they wrote. Needs Debian's slurm-wlm and munge (installed by
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

from launch_utils import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo")


def missing_tools() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.pid_files = {"munged": root / "munge" / "munged.pid", "slurmctld": root / "slurmctld.pid",
                          "slurmd": root / "slurmd.pid"}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def write_config(self) -> None:
        for d in ("state", "spool", "log", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        cpus = os.cpu_count() or 2
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
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmdPidFile={self.pid_files['slurmd']}
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
NodeName={self.host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def start(self) -> "SlurmCluster":
        self.write_config()
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        subprocess.run([_bin("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                        f"--pid-file={self.pid_files['munged']}", f"--log-file={self.root}/log/munged.log",
                        f"--seed-file={self.root}/munge/seed"], check=True, env=self.env)
        subprocess.run([_bin("slurmctld"), "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run([_bin("slurmd"), "-f", str(self.conf)], check=True, env=self.env)
        self.wait_until(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, 60, "the node to be idle")
        return self

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.pid_files[name]
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
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

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: str, timeout: float) -> dict:
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        self.wait_until(lambda: self.job(job_id).get("JobState") in final, timeout, f"job {job_id} to finish")
        return self.job(job_id)
