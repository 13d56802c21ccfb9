"""Pieces shared by the three Python scripts' argument parsers."""

from __future__ import annotations

import argparse
import sys

from .layout import DEFAULT_OUTPUT_DIR


class SpanishHelpFormatter(argparse.RawDescriptionHelpFormatter):
    def add_usage(self, usage, actions, groups, prefix=None):
        # argparse's own "usage: " is not translated; every other heading of --help already is.
        return super().add_usage(usage, actions, groups, "uso: " if prefix is None else prefix)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=SpanishHelpFormatter, add_help=False)
    p._positionals.title = "argumentos"
    p._optionals.title = "opciones"
    p.add_argument("-h", "--help", action="help", help="muestra esta ayuda y termina")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help=f"directorio de salida compartido por las etapas (por defecto: {DEFAULT_OUTPUT_DIR}/)")
    return p


def argv_or_notebook(argv: list[str] | None) -> list[str] | None:
    """Inside a notebook cell sys.argv holds the kernel's own flags; a pasted script must ignore them."""
    if argv is not None:
        return argv
    if "ipykernel" in sys.modules and any(a.endswith(".json") for a in sys.argv[1:]):
        return []
    return None
