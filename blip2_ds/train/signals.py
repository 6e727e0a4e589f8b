"""SIGTERM / SIGUSR1, remembered from the moment the process starts until the loop can act on them.

``launch/train.py`` installs the handlers before it imports torch: a preemption notice that arrives
while the models are still being built must not kill the process (Python's default for SIGUSR1
is to terminate); the loop then finishes its first step, every rank saves, and it exits for a
requeue. Light on purpose: no torch import.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[str] = []


def _remember(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def install() -> None:
    """Remember STOP_SIGNALS instead of dying of them (idempotent; keeps what was already received)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)


def received() -> str | None:
    """The first stop signal this process got, or None."""
    return _received[0] if _received else None


def ignore_in_worker() -> None:
    """For data-loader workers (see data/stream.py)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
