"""Emulated nodes in their own network namespaces, joined by rate-limited links (tc tbf): the
network is built and removed without touching the host's interfaces, a gloo job runs across it,
and its traffic goes over the shaped links. (The bandwidth it recovers and the placement choice
on it are benchmarks: benchmarks/placement/shaped_links.py.)"""

import json
import subprocess

import pytest

from tests.helpers.shaped_network import ShapedNetwork, burst_bytes, missing_tools

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def needs_namespaces():
    missing = missing_tools()
    if missing:
        pytest.skip(f"SHAPED LINKS TEST SKIPPED: needs {', '.join(missing)}")


def host_links() -> list[tuple[str, list]]:
    out = json.loads(subprocess.run(["ip", "-j", "addr"], check=True, capture_output=True, text=True).stdout)
    return sorted((link["ifname"], sorted(a["local"] for a in link.get("addr_info", []))) for link in out)


def our_namespaces(net: ShapedNetwork) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return [ns for ns in net.namespaces() if ns in listed]


def test_a_job_runs_across_shaped_links_and_the_network_leaves_no_trace():
    from benchmarks.placement.shaped_links import probe

    before = host_links()
    net = ShapedNetwork(nodes=2, prefix="adt", subnet="10.232.0")
    with net:
        assert our_namespaces(net) == net.namespaces()
        assert host_links() == before  # every interface was born inside a namespace
        rate = 100e6 / 8
        net.shape(rate)
        for node in net.nodes:
            qdisc = subprocess.run(["tc", "-n", net.namespace(node), "-j", "qdisc", "show", "dev",
                                    net.interface(node)], check=True, capture_output=True, text=True).stdout
            tbf = json.loads(qdisc)[0]
            assert tbf["kind"] == "tbf" and tbf["options"]["rate"] == rate
            assert tbf["options"]["burst"] == pytest.approx(burst_bytes(rate), rel=0.01)  # kernel rounds to its ticks
        sent_before = net.tx_bytes(1)
        nbytes = 1 << 20
        link = probe(net, nbytes, port=29391, timeout=300)
        assert link["bytes"] == nbytes and link["beta_Bps"] > 0 and link["a2a_beta_Bps"] > 0
        # the probe's collectives (9+ all-reduces and all-to-alls of 1 MB each) crossed node 1's link
        assert net.tx_bytes(1) - sent_before > 9 * nbytes
        net.shape(None)
        assert "tbf" not in subprocess.run(["tc", "-n", net.namespace(1), "qdisc", "show", "dev", net.interface(1)],
                                           capture_output=True, text=True).stdout
    assert our_namespaces(net) == []
    assert host_links() == before


def test_namespaces_left_by_a_killed_run_are_replaced():
    net = ShapedNetwork(nodes=1, prefix="adt", subnet="10.232.0")
    net.start()  # never stopped, as if the process had been killed
    with ShapedNetwork(nodes=1, prefix="adt", subnet="10.232.0") as again:
        assert our_namespaces(again) == again.namespaces()
    assert our_namespaces(net) == []
