"""Faults injected into a command run as a real subprocess, for the fault tests only: put this folder first
on the subprocess's PYTHONPATH (``tests.helpers.fault_hooks.env_with``) and set one of the variables below.
Python imports ``sitecustomize`` at start-up, before the command imports anything, so the patches below
are in place when the package binds the functions they replace. Without the variables it does nothing.

ADAMOLE_TEST_ENOSPC_AFTER=N    safetensors' ``save_file`` into a checkpoint's temporary folder
                               (``.tmp_step_*``) writes half a file and raises ENOSPC from its (N+1)-th
                               call on: a disk that fills up during a later checkpoint. A real full disk
                               needs a small filesystem (a tmpfs mount, root only), which CI does not have.
ADAMOLE_TEST_SLOW_FORWARD=S    every forward of a ``*ForCausalLM`` model sleeps S seconds first, so a
                               signal can be sent while a command is surely generating or scoring;
ADAMOLE_TEST_STARTED=FILE      with it: the first such forward creates FILE (the moment to send it).
"""

import os

if os.environ.get("ADAMOLE_TEST_ENOSPC_AFTER"):
    import errno

    import safetensors.torch

    _real_save_file = safetensors.torch.save_file
    _calls = {"checkpoint": 0}

    def _save_file_on_a_filling_disk(tensors, filename, metadata=None):
        if ".tmp_step_" in str(filename):
            _calls["checkpoint"] += 1
            if _calls["checkpoint"] > int(os.environ["ADAMOLE_TEST_ENOSPC_AFTER"]):
                with open(filename, "wb") as f:
                    f.write(b"\0" * 4096)  # what fitted before the disk filled up
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return _real_save_file(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = _save_file_on_a_filling_disk

if os.environ.get("ADAMOLE_TEST_SLOW_FORWARD"):
    import pathlib
    import time

    import torch

    def _slow_forward(module, args):
        if type(module).__name__.endswith("ForCausalLM"):
            started = os.environ.get("ADAMOLE_TEST_STARTED")
            if started:
                pathlib.Path(started).touch()
            time.sleep(float(os.environ["ADAMOLE_TEST_SLOW_FORWARD"]))

    torch.nn.modules.module.register_module_forward_pre_hook(_slow_forward)
