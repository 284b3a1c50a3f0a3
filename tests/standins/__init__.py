"""Local stand-ins for the platforms sprbot talks to, as real servers on localhost."""

from __future__ import annotations

import queue
import threading
from typing import Any


class AdapterThreads:
    """Runs adapters' ``serve(stop, host, port, on_ready)`` on threads, and stops them all."""

    def __init__(self) -> None:
        self.running: list[tuple[threading.Event, threading.Thread]] = []

    def start(self, adapter: Any, name: str) -> Any:
        """Serve ``adapter`` on a free local port; returns the port it listens on (None when
        it listens on none, as in Slack's Socket Mode)."""
        stop, ready = threading.Event(), queue.Queue()

        def serve() -> None:
            try:
                adapter.serve(stop, host="127.0.0.1", port=0, on_ready=lambda p: ready.put([p]))
            except BaseException as exc:
                ready.put(exc)
                raise

        thread = threading.Thread(target=serve, name=name)
        thread.start()
        self.running.append((stop, thread))
        started = ready.get(timeout=30)
        assert isinstance(started, list), f"the adapter did not start: {started!r}"
        return started[0]

    def stop_all(self) -> None:
        for stop, _ in self.running:
            stop.set()
        for _, thread in self.running:
            thread.join(timeout=30)
            assert not thread.is_alive(), "the adapter did not stop"
