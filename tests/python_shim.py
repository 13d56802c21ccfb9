"""`python3` for code that starts the interpreter itself: a script run goes to a zygote (tests/zygote.py).

tests/conftest.py writes, per zygote, an executable `python3` that runs `main(REAL, SOCKET)` below with only the
standard library (`-I -S`: a few milliseconds). `python3 [-u] script.py args` and `python3 [-u] -m module args` are
sent to the zygote with this process's stdin, stdout and stderr; this process then forwards the signals it gets
to the child and exits as the child did. Anything else, an import-time environment the zygote does not have, or
no zygote to answer, becomes the real interpreter with the same arguments (exec: same pid, same stdio).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

from zygote import runs_code  # the same rule as the zygote's; stdlib-only at import, so still a few milliseconds

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _request(args: list[str]) -> dict | None:
    unbuffered = args[:1] == ["-u"]
    rest = args[1:] if unbuffered else args
    if runs_code(rest):
        return {"argv": rest, "env": dict(os.environ), "cwd": os.getcwd(), "unbuffered": unbuffered}
    return None


def main(real: str, path: str) -> None:
    args = sys.argv[1:]
    request = _request(args)
    answer = None
    if request is not None:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            conn.connect(path)
            socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
            answer = json.loads(conn.recv(1 << 16) or b"{}")
        except (OSError, ValueError):
            answer = None
    if not answer or "pid" not in answer:
        os.execv(real, [real, *args])
    pid = answer["pid"]

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    data = conn.recv(1 << 16)
    code = json.loads(data)["returncode"] if data else 1
    if code < 0:  # killed by a signal: so is this process, as its caller expects
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)
