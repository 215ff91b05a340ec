"""Stop signals: SIGTERM / SIGUSR1 (a scheduler's preemption notice; Slurm sends SIGUSR1 before the time
limit) become a flag that a run reads at its safe points, instead of killing the process.

The runner holds one ``StopRequest`` for the whole run; the training loop reads the same one between
optimizer steps, the runner between phases and between the layers of the conversion
(``StopRequest.check`` raises ``Stopped`` there, whose message says where it stopped and what a rerun
or resume=true does).
"""
import signal
import threading

from gblr.system import distributed


class Stopped(Exception):
    """A stop signal honoured at a safe point outside the training loop. ``str()`` is the one line to show;
    ``resumable``: whether resume=true continues from a checkpoint (else the command is run again)."""

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


class StopRequest:
    """Turns SIGTERM / SIGUSR1 into a flag (``signum``) for the ``with`` block; the previous handlers come
    back at its end. Outside the main thread (where Python cannot set handlers) it only holds the flag."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """Whether a stop signal arrived, in this process or (under torchrun) any rank's: one all-reduce,
        so every rank must call it at the same point and all take the same branch."""
        return distributed.all_sum(float(self.signum is not None))[0] > 0

    def check(self, where: str, then: str, resumable: bool = False) -> None:
        """At a safe point: raise ``halt(where, then, resumable)`` when a stop was requested (any rank)."""
        if self.requested():
            raise self.halt(where, then, resumable)

    def halt(self, where: str, then: str, resumable: bool = False) -> Stopped:
        """``Stopped`` with the line 'stopped by <signal> <where>: <then>'; where: the phase, e.g. 'in the
        layer conversion (3/60 layers converted)'; then: what resume=true or a rerun does."""
        return Stopped(f"stopped by {signal_name(self.signum)} {where}: {then}", resumable)


def signal_name(signum) -> str:
    return signal.Signals(signum).name if signum is not None else "a stop request (another rank)"
