"""Notebook cell "auxiliares": run each stage as its own process, and the Hub upload of the push cell.

tools/make_colab.py pastes this file into the notebook; it is a file of its own so that the linter and the
tests read it like any other code. Only the standard library: it runs before the project is here.
"""

import codecs
import os
import shlex
import signal
import subprocess
import sys


class StageFailed(Exception):
    """A stage ended with an error; its own message is already printed above, so no traceback."""

    def _render_traceback_(self):  # IPython shows these lines instead of a traceback
        return [f"ERROR: {self}"]


def flags(*pairs):
    """Command-line flags from (flag, value) pairs: None and False are left out, True is a bare flag."""
    argv = []
    for flag, value in pairs:
        if value is None or value is False or value == "":
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def run_stage(script, *args, env=None):
    """Run one stage as its own process, showing its output (progress bars included) as it arrives."""
    program = ["bash"] if script.endswith(".sh") else [sys.executable, "-u"]
    print("$", "bash" if script.endswith(".sh") else "python", shlex.join([script, *args]), flush=True)
    # MPLBACKEND: the kernel's inline backend means nothing to a plain Python process.
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable, "MPLBACKEND": "Agg",
                 **(env or {})}
    process = subprocess.Popen([*program, script, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=child_env)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        # Raw chunks, not lines: progress bars redraw themselves with "\r" and never end a line.
        while chunk := process.stdout.read1(65536):
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        code = process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)  # the stage stops cleanly and keeps its last checkpoint
        process.wait()
        raise
    if code != 0:
        raise StageFailed(f"{script} terminó con el código {code}; el motivo está en los mensajes de arriba.")


def colab_secret(name):
    from google.colab import userdata

    try:
        return userdata.get(name)
    except Exception as err:  # no such secret, or the notebook was not given access to it
        raise StageFailed(f"No se pudo leer el secreto {name} de Colab ({type(err).__name__}): créalo en el "
                          f"panel 🔑 con ese nombre y activa «Acceso del cuaderno».") from None


def push_to_hub(push, push_flags):
    """Stage 04 with --push-only and `push_flags`, if `push` (the notebook's PUSH)."""
    if not push:
        print("PUSH = False: no se sube nada. Para publicar, sigue los pasos de arriba y pon PUSH = True.")
        return
    # The token goes only into the environment of this one child process: never printed, never a
    # notebook variable, never on a command line. Outside Colab, HF_TOKEN comes from the environment.
    env = {"HF_TOKEN": colab_secret("HF_TOKEN")} if "google.colab" in sys.modules else None
    run_stage("04_inference_and_export.py", "--push-only", *push_flags, env=env)
