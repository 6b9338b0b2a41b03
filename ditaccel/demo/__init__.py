"""``ditaccel demo``: a Gradio page that runs dense and accelerated side by side (``pip install ditaccel[demo]``).

    from ditaccel.demo import launch
    launch()                          # http://127.0.0.1:7860, the embedded default pipeline

:func:`build_app` returns the ``gr.Blocks`` (``app.py``), :func:`launch` serves it, and
:func:`add_parser` / :func:`main` are the ``ditaccel demo`` subcommand (also ``python -m ditaccel.demo``).
The server binds to 127.0.0.1 unless a host is given, never opens a public share link, and loads
models through ``ditaccel.eval.runs.load_pipeline``. Gradio is imported only when a page is built, and
torch only when a server starts (``ditaccel --help`` must answer at once).
Every request is sized before any work and refused when it exceeds the limits (``admission.py``,
flags ``--max-token-steps``, ``--max-memory-gb``, ``--max-prompt-chars``). SIGTERM and SIGINT stop
the server within seconds: the running generation is cancelled (``cancel.py``), queued ones are
refused, the work directory is removed, and the exit status is 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import shutil
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import DemoSession

if TYPE_CHECKING:
    from .session import DemoSession

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_PROMPT_CHARS = 2000  # admission.DEFAULT_MAX_PROMPT_CHARS (not imported: it would import torch)
STOP_DEADLINE_S = 10.0  # after a stop signal, the process exits by then even if clean-up hangs


def check_address(host, port) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an int in [1, 65535], got {port!r}")
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be an address such as {LOOPBACK!r}, got {host!r}")


def launch(host: str = LOOPBACK, port: int = DEFAULT_PORT, *, session: DemoSession | None = None, model=None,
           device=None, dtype=None, initial: dict | None = None, block: bool = True, quiet: bool = False):
    """Build the page and serve it on ``host:port``; returns the ``gr.Blocks`` (running, if ``block=False``).

    ``block=True`` serves until interrupted, then frees the session. With ``block=False`` the caller
    stops it with ``app.close()`` (and ``session.close()``).
    """
    from .app import build_app
    from .session import DemoSession

    check_address(host, port)
    if host not in (LOOPBACK, "localhost", "::1"):
        logger.warning("ditaccel demo: serving on %s — anyone who can reach it can run generations here", host)
    session = session or DemoSession(device, dtype)
    start = dict(initial or {})
    if model is not None:
        start["model"] = model
    app = build_app(session, initial=start)
    try:
        app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=quiet,
                   ssr_mode=False, allowed_paths=[str(session.work_dir)], inbrowser=False)
    except BaseException:
        app.close()
        session.close()
        raise
    if block:
        session.close()
    return app


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=LOOPBACK, help=f"address to bind (default: {LOOPBACK}, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--model", help="local pipeline directory or hub id to start with (default: the embedded "
                                   "pipeline); safetensors weights only")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default: bfloat16 on cuda, float32 elsewhere)")
    p.add_argument("--dense-cache", type=int, default=4, metavar="N",
                   help="dense results kept for reuse while only the method changes (default: 4)")
    limits = p.add_argument_group("limits of one request (checked before any work)")
    limits.add_argument("--max-token-steps", type=int, metavar="N",
                        help="latent tokens (frames x height x width of the latent grid) x steps "
                             "(default: 2,000,000 on cpu, 200,000,000 on cuda)")
    limits.add_argument("--max-memory-gb", type=float, metavar="GB",
                        help="estimated peak memory of one generation (default: 80%% of the memory free on "
                             "the device when the request comes)")
    limits.add_argument("--max-prompt-chars", type=int, default=DEFAULT_MAX_PROMPT_CHARS, metavar="N",
                        help=f"prompt length in characters (default: {DEFAULT_MAX_PROMPT_CHARS})")
    group = p.add_argument_group("initial values of the page's inputs")
    group.add_argument("--prompt")
    group.add_argument("--seed", type=int)
    group.add_argument("--steps", type=int)
    group.add_argument("--height", type=int)
    group.add_argument("--width", type=int)
    group.add_argument("--frames", type=int, help="0: the pipeline's default (image pipelines)")
    group.add_argument("--method", help="method name or 'preset' (default)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``demo`` to an argparse ``subparsers`` (``ditaccel``'s); the parsed args go to :func:`main`."""
    p = subparsers.add_parser("demo", help="Gradio page: dense vs accelerated side by side",
                              description="Serve a Gradio page that generates dense and accelerated outputs "
                                          "side by side with timings, density, PSNR/SSIM and plan pictures.")
    _add_arguments(p)
    p.set_defaults(func=main)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of ``python -m ditaccel.demo``."""
    p = argparse.ArgumentParser(prog="ditaccel demo", description="Serve the ditaccel Gradio demo.")
    _add_arguments(p)
    return p


def limits_from_args(args: argparse.Namespace):
    """The request limits of ``--max-token-steps``, ``--max-memory-gb`` and ``--max-prompt-chars``."""
    from .admission import Limits

    gb = getattr(args, "max_memory_gb", None)
    if gb is not None and not (math.isfinite(gb) and gb > 0):
        raise ValueError(f"--max-memory-gb must be a positive number of GB, got {gb}")
    for flag in ("max_token_steps", "max_prompt_chars"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    return Limits(max_prompt_chars=getattr(args, "max_prompt_chars", None) or DEFAULT_MAX_PROMPT_CHARS,
                  max_token_steps=getattr(args, "max_token_steps", None),
                  max_memory_bytes=None if gb is None else int(gb * 2**30))


class _Terminated(KeyboardInterrupt):
    """A stop signal while the server starts, raised like Ctrl-C; a requested stop: exit status 0."""


class _Stopper:
    """SIGTERM/SIGINT: while starting, interrupt the start-up; once serving, cancel the running
    generation at once (from the handler, so it unwinds while the server closes) and wake ``main``.
    A watchdog ends the process ``STOP_DEADLINE_S`` after the signal whatever still hangs (a thread
    stuck in one huge operation), after removing the work directory."""

    def __init__(self) -> None:
        self.session: DemoSession | None = None
        self.serving = False
        self.stop = threading.Event()

    def __call__(self, signum, frame) -> None:
        first = not self.stop.is_set()
        self.stop.set()
        if first:
            threading.Thread(target=self._watchdog, name="ditaccel-demo-stop", daemon=True).start()
        if self.session is not None:
            self.session.cancellation.cancel(running=True)
        if not self.serving:
            raise _Terminated

    def _watchdog(self) -> None:
        if not _exited.wait(STOP_DEADLINE_S):
            if self.session is not None:
                shutil.rmtree(self.session.work_dir, ignore_errors=True)
            logger.warning("ditaccel demo: clean-up took over %.0f s; exiting now", STOP_DEADLINE_S)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


_exited = threading.Event()  # set when main has cleaned up: the watchdog stands down


def main(args: argparse.Namespace) -> int:
    """Run the server from parsed arguments until SIGTERM/SIGINT; bad values raise ValueError.

    A stop signal while serving ends the process (status 0) once the server is closed and the work
    directory removed; one while starting up makes ``main`` return 0.
    """
    check_address(args.host, args.port)
    if importlib.util.find_spec("gradio") is None:
        raise ValueError("the demo needs Gradio: pip install 'ditaccel[demo]'")
    if args.dense_cache < 1:
        raise ValueError(f"--dense-cache must be >= 1, got {args.dense_cache}")
    limits = limits_from_args(args)
    initial = {k: getattr(args, k) for k in ("prompt", "seed", "steps", "height", "width", "frames", "method")
               if getattr(args, k) is not None}
    stopper = _Stopper()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # ``kill``/``docker stop`` send SIGTERM, Ctrl-C SIGINT: both are a requested stop.
        previous = {sig: signal.signal(sig, stopper) for sig in (signal.SIGTERM, signal.SIGINT)}
    _exited.clear()
    session = app = None
    from .session import DemoSession

    try:
        session = stopper.session = DemoSession(args.device, args.dtype, dense_cache_size=args.dense_cache,
                                                limits=limits)
        app = launch(args.host, args.port, session=session, model=args.model, initial=initial, block=False)
        stopper.serving = True
        while not stopper.stop.wait(0.1):
            pass
    except _Terminated:
        pass  # stopped while starting up: launch() has closed what it had opened
    finally:
        if session is not None:
            session.cancellation.cancel(running=True)
        if app is not None:
            _close_now(app)
        if session is not None:
            session.close()  # waits for the cancelled generation to unwind, removes the work directory
        _exited.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopper.serving and stopper.stop.is_set() and threading.current_thread() is threading.main_thread():
        # Everything is saved and removed; the interpreter's own teardown of torch and Gradio would
        # take seconds more on a busy machine (measured 6-7 s under load) and has nothing left to do.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _close_now(app) -> None:
    """``app.close()`` without waiting for the clients: uvicorn would otherwise wait (Gradio: up to
    5 s) for the open event streams of the requests still queued, which end with the server anyway."""
    server = getattr(app, "server", None)
    if server is not None and hasattr(server, "force_exit"):
        server.force_exit = True
        # A forced exit cancels those streams; uvicorn would log each as an ASGI exception.
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    app.close(verbose=False)


def __getattr__(name):  # the page and the session import torch: load them on first use
    if name in ("INITIAL", "build_app"):
        from . import app

        return getattr(app, name)
    if name == "DemoSession":
        from .session import DemoSession

        return DemoSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["INITIAL", "DemoSession", "add_parser", "build_app", "build_parser", "launch", "main"]
