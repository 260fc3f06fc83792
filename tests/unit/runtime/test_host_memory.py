"""runtime/host_memory.py: freed host memory stays with the process (so the next large tensor is not
page-faulted again), and only when asked."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import sys
    from adamole_dist.runtime.host_memory import keep_freed_host_memory
    took = keep_freed_host_memory() if sys.argv[1] == "keep" else None
    import torch

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    before = rss_mb()
    t = torch.ones(64 << 18)  # 64 MB, touched
    del t
    print(took, rss_mb() - before)
""")


def probe(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    took, grown = out.split()
    return took, float(grown)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_stay_in_the_process_only_when_kept():
    took, kept_mb = probe("keep")
    assert took == "True"
    assert kept_mb > 60  # the 64 MB block waits for the next tensor
    _, system_mb = probe("system")
    assert system_mb < 16  # glibc's default unmaps it at once


def test_overlap_is_on_for_cuda_tensors_only_under_auto():
    import torch

    from adamole_dist.parallel.ep_dispatcher import overlap_enabled

    assert overlap_enabled("auto", torch.device("cuda", 0)) and not overlap_enabled("auto", torch.device("cpu"))
    assert overlap_enabled("on", torch.device("cpu")) and not overlap_enabled("off", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="ep_overlap"):
        overlap_enabled("yes", torch.device("cpu"))
