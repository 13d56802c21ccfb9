"""User-facing errors: a Spanish message, exit code 2, never a traceback."""

from __future__ import annotations

import errno
import functools
import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix (bad input, missing stage, missing file).

    The message is in Spanish and names the file, the entry and the field where it can.
    """


_OS_REASONS = {
    errno.EACCES: "no hay permiso para escribir o leer aquí",
    errno.EPERM: "la operación no está permitida",
    errno.EROFS: "el sistema de archivos es de solo lectura",
    errno.ENOSPC: "no queda espacio en el disco",
    errno.EDQUOT: "se ha superado la cuota de disco",
}


def main_guard(func: Callable[..., object]) -> Callable[..., object]:
    """Wrap a script's main(): UserError becomes a Spanish message and exit 2.

    Anything else is a bug in our code and keeps its traceback, so it can be reported.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            print(f"ERROR: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except OSError as err:
            # The environment, not our code: no permission, a read-only or full disk. Anything else stays a bug.
            reason = _OS_REASONS.get(err.errno)
            if reason is None:
                raise
            where = f" ({err.filename})" if err.filename else ""
            print(f"ERROR: {reason}{where}. Elige otro --output-dir o corrige los permisos y vuelve a "
                  f"intentarlo.", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            print("Interrumpido por el usuario.", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
