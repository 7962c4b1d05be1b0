"""Stopping a training run without losing it: Ctrl-C (SIGINT) or a scheduler's SIGTERM asks the loop to
stop after the step it is in; the loop saves its state and raises TrainingInterrupted, which says how to
continue. A Ctrl-C after that stops at once, as Python would.

The signal only sets a flag: a step cut in the middle (half the parameters updated) must not be saved.
Only in one process: under torchrun the ranks would see the signal at different steps, and a save is a
collective that all of them must enter, so there the signals keep their usual meaning (torchrun stops
every rank).
"""

from __future__ import annotations

import signal
import threading


class TrainingInterrupted(RuntimeError):
    """The run stopped on a signal after saving its state; str() says where and how to continue."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process that a signal ended."""
        return 128 + int(getattr(signal, self.signal_name))


class StopOnSignal:
    """`with StopOnSignal(enabled) as stop:` ... `if stop.requested:` save, then stop. Outside the block
    (or when not enabled, or off the main thread, where Python allows no handlers) nothing changes."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: str | None = None  # the name of the first signal received
        self._previous: dict[str, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and name == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C after a stop was asked: at once
        self.requested = self.requested or name
        print(f"\n{name}: stopping after this step, to save the run (Ctrl-C again to stop at once)", flush=True)

    def __enter__(self) -> "StopOnSignal":
        if self.enabled:
            for name in self.SIGNALS:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous.clear()
