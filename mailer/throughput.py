"""``<Role> PID:<pid> Throughput: <n> ops / second`` lines, when ``measure_throughput`` is on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from typing import TextIO


class ThroughputMeter:
    """Counts operations and prints the rate every ``interval`` seconds from a background task."""

    def __init__(self, role: str, interval: float = 5.0, stream: TextIO | None = None) -> None:
        self.role = role
        self.interval = interval
        self.stream = stream
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    def add(self, n: int = 1) -> None:
        self.count += n

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def line(self, rate: float) -> str:
        return f"{self.role} PID:{os.getpid()} Throughput: {rate:.1f} ops / second"

    async def _run(self) -> None:
        last_count, last_t = self.count, time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            rate = (self.count - last_count) / max(now - last_t, 1e-9)
            last_count, last_t = self.count, now
            print(self.line(rate), file=self.stream or sys.stdout, flush=True)
