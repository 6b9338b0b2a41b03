"""Stopping a generation that is already running, for a server that has been asked to stop.

A pipeline call cannot be killed from another thread, and ``callback_on_step_end`` belongs to the
timing code (``compare.timed_run``) and only runs between steps: a step, or the VAE decode after
the last one, can take minutes. :class:`Cancellation` instead installs, only once a stop is asked
for, a process-wide module forward pre-hook (``torch.nn.modules.module.register_module_forward_pre_hook``)
that raises :class:`GenerationCancelled`: the running call unwinds at its next module call —
within one transformer block or VAE layer — through its own ``finally`` clauses (``accelerate`` is
removed, the pipeline's progress bar and clock are put back). Nothing is hooked while serving, so
timings are untouched.
"""

from __future__ import annotations

import threading

import torch


class GenerationCancelled(RuntimeError):
    """A generation stopped because the server is shutting down."""


class Cancellation:
    """A stop flag for new requests, and the hook that stops a running one."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._hook = None
        self._guard = threading.Lock()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise GenerationCancelled("the server is shutting down; no new generation starts")

    def cancel(self, running: bool = True) -> None:
        """Refuse new requests; with ``running``, also stop the call in progress at its next module call."""
        self._event.set()
        if not running:
            return
        with self._guard:
            if self._hook is None:
                self._hook = torch.nn.modules.module.register_module_forward_pre_hook(_stop)

    def release(self) -> None:
        """Take the hook out again (once nothing runs); new requests stay refused."""
        with self._guard:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None


def _stop(module, args):
    raise GenerationCancelled("the server is shutting down; the generation was stopped")


__all__ = ["Cancellation", "GenerationCancelled"]
