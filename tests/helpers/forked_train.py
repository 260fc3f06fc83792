"""launch/train.py's ``main`` in a process of its own, forked from a parent that imported torch, DeepSpeed,
transformers and the trainer once: the refusal tests' rows cost the refusal, not ~6 s of imports each.

Each row still gets a fresh process (its own exit code, stdout and stderr, environment and working directory,
nothing left behind by the row before), as launch/train.py would run: the script is ``sys.exit(main())``.
The parent imports without running a tensor op, so no OpenMP pool exists when it forks. Tests whose point
is the script itself (--help, --debug's traceback, a signal, a launcher) keep launching the real script."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from tests.helpers.launch_utils import REPO, launch_env

MARK = "forked-train-exit:"

# What runs in the parent process: read a request per line, fork, run main in the child, report its exit.
PARENT = f"""
import json, os, sys, traceback
import deepspeed, transformers, datasets  # the imports every row would pay
import adamole_dist.train.loop, adamole_dist.train.assembly
from adamole_dist.cli.train import main

for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.chdir(request["cwd"])
        os.environ.clear(); os.environ.update(request["env"])
        sys.argv = ["launch/train.py", *request["argv"]]
        try:
            code = main(request["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    print("{MARK}" + str(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])), flush=True)
"""


class ForkedTrain:
    """One parent process; ``run(argv)`` is ``python launch/train.py *argv`` as a CompletedProcess."""

    def __init__(self, scratch: Path):
        self.scratch = Path(scratch)
        self.count = 0
        self.parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True, env=launch_env(), cwd=REPO)

    def run(self, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = self.scratch / f"{self.count}.stdout", self.scratch / f"{self.count}.stderr"
        request = {"argv": [str(a) for a in argv], "env": launch_env(), "cwd": str(REPO),
                   "stdout": str(out), "stderr": str(err)}
        assert self.parent.stdin is not None and self.parent.stdout is not None
        self.parent.stdin.write(json.dumps(request) + "\n")
        self.parent.stdin.flush()
        watchdog = threading.Timer(timeout, self.parent.kill)  # a hung row fails instead of hanging the suite
        watchdog.start()
        try:
            line = next((ln for ln in self.parent.stdout if ln.startswith(MARK)), None)
        finally:
            watchdog.cancel()
        assert line is not None, f"the forking parent died (after {timeout} s?) running {argv}"
        return subprocess.CompletedProcess(["launch/train.py", *argv], int(line[len(MARK):]),
                                           out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        if self.parent.stdin is not None:
            self.parent.stdin.close()
        try:
            self.parent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.parent.kill()
