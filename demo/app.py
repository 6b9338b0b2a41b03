"""Launcher for the ditaccel Gradio demo from a checkout: ``python demo/app.py [--host H] [--port P] ...``.

The app itself ships in the package (``ditaccel/demo/``, ``pip install ditaccel[demo]``); this file
only runs it, the same as ``ditaccel demo`` and ``python -m ditaccel.demo``.
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's ditaccel, installed or not
    runpy.run_module("ditaccel.demo", run_name="__main__", alter_sys=True)
