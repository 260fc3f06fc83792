"""Peer liveness: when one rank dies, the others exit within a bounded time, naming it.

A collective with a dead peer can block for the whole process-group timeout (gloo) or forever
(some NCCL setups), and a blocked collective cannot be interrupted from Python. So every rank
runs a daemon thread that, through its own client of the rendezvous TCPStore, bumps a
heartbeat counter and watches the others'. A rank whose counter stops moving for
``timeout_s``, or that published a failure, ends the run: the watchdog prints which rank and
why, then ``os._exit`` s the process even if the main thread is stuck in a collective.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

from adamole_dist.runtime.process_group import release_shm_buffer

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 76
PREFIX = "adamole_watchdog"


class PeerWatchdog:
    def __init__(self, rank: int, world_size: int, *, timeout_s: float = 60.0, interval_s: float = 1.0) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None

    def _connect(self):
        import torch.distributed as dist

        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=max(5.0, self.interval_s * 5)))

    def start(self) -> "PeerWatchdog":
        if self.world_size <= 1:
            return self
        self._store = self._connect()
        self._thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and join the thread: one still inside a store call at interpreter exit can make the
        C++ runtime abort the process ("terminate called without an active exception")."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.interval_s + max(5.0, self.interval_s * 5))
        self._thread, self._store = None, None

    def publish_failure(self, message: str) -> None:
        """Tell the other ranks why this one is about to exit (best effort)."""
        if self._store is None:
            return
        try:
            self._store.set(f"{PREFIX}/failed/{self.rank}", message[:500])
        except Exception:  # the store may already be gone
            pass

    def _run(self) -> None:
        peers = [r for r in range(self.world_size) if r != self.rank]
        self._last_value = {r: -1 for r in peers}
        self._last_change = {r: time.monotonic() for r in peers}
        self._store_failures = 0
        while not self._stop.wait(self.interval_s):
            reason = self._check_once()
            if reason:
                self._abort(reason)

    def _check_once(self) -> str | None:
        """One heartbeat and one look at the peers; the reason to stop, if any."""
        store = self._store
        try:
            store.add(f"{PREFIX}/hb/{self.rank}", 1)
            for r in self._last_value:
                failed_key = f"{PREFIX}/failed/{r}"
                if store.check([failed_key]):
                    return f"rank {r} failed: {store.get(failed_key).decode(errors='replace')}"
                value = store.add(f"{PREFIX}/hb/{r}", 0)
                if value != self._last_value[r]:
                    self._last_value[r], self._last_change[r] = value, time.monotonic()
                elif time.monotonic() - self._last_change[r] > self.timeout_s:
                    return f"rank {r} stopped responding (no heartbeat for {self.timeout_s:.0f} s)"
            self._store_failures = 0
        except Exception as e:  # the store lives in rank 0 (or the launcher's agent)
            self._store_failures += 1
            if self._store_failures * self.interval_s > min(self.timeout_s, 10.0):
                return f"rank 0 (host of the rendezvous store) is unreachable: {type(e).__name__}: {e}"
        return None

    def wait_for_verdict(self) -> None:
        """After a communication error in the main thread: give the watchdog thread time to see
        which peer is gone (it then ends the process, naming it). Returns if every peer lives."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._thread.join(self.timeout_s + 3 * self.interval_s)

    def _abort(self, reason: str) -> None:
        if self._stop.is_set():
            return
        log.error(f"[rank {self.rank}] {reason}; exiting (exit code {EXIT_PEER_LOST})")
        release_shm_buffer()  # os._exit skips atexit
        os._exit(EXIT_PEER_LOST)
