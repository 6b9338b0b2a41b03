"""``ditaccel demo``: a Gradio page that runs dense and accelerated side by side (``pip install ditaccel[demo]``).

    from ditaccel.demo import launch
    launch()                          # http://127.0.0.1:7860, the embedded default pipeline

:func:`build_app` returns the ``gr.Blocks`` (``app.py``), :func:`launch` serves it, and
:func:`add_parser` / :func:`main` are the ``ditaccel demo`` subcommand (also ``python -m ditaccel.demo``).
The server binds to 127.0.0.1 unless a host is given, never opens a public share link, and loads
models through ``ditaccel.eval.runs.load_pipeline``. Gradio is imported only when a page is built, and
torch only when a server starts (``ditaccel --help`` must answer at once).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import threading


logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 7860


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


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same clean-up runs; a requested stop, so the exit status is 0."""


def _terminate(signum, frame):
    raise _Terminated


def main(args: argparse.Namespace) -> int:
    """Run the server from parsed arguments until interrupted; bad values raise ValueError."""
    check_address(args.host, args.port)
    if importlib.util.find_spec("gradio") is None:
        raise ValueError("the demo needs Gradio: pip install 'ditaccel[demo]'")
    if args.dense_cache < 1:
        raise ValueError(f"--dense-cache must be >= 1, got {args.dense_cache}")
    initial = {k: getattr(args, k) for k in ("prompt", "seed", "steps", "height", "width", "frames", "method")
               if getattr(args, k) is not None}
    if threading.current_thread() is threading.main_thread():
        # ``kill``/``docker stop`` send SIGTERM: stop like Ctrl-C, so Gradio closes the server and the
        # session removes its files.
        signal.signal(signal.SIGTERM, _terminate)
    from .session import DemoSession

    try:
        session = DemoSession(args.device, args.dtype, dense_cache_size=args.dense_cache)
        launch(args.host, args.port, session=session, model=args.model, initial=initial, block=True)
    except _Terminated:
        # Gradio swallows an interrupt that lands while it serves; one that lands while the server is
        # still starting up (after it answers, before Gradio waits) comes here, already cleaned up.
        pass
    return 0


def __getattr__(name):  # the page and the session import torch: load them on first use
    if name in ("INITIAL", "build_app"):
        from . import app

        return getattr(app, name)
    if name == "DemoSession":
        from .session import DemoSession

        return DemoSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["INITIAL", "DemoSession", "add_parser", "build_app", "build_parser", "launch", "main"]
