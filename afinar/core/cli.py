"""Pieces shared by the three Python scripts' argument parsers."""

from __future__ import annotations

import argparse
import re
import shlex
import sys

from afinar.core import validation
from afinar.core.errors import EXIT_USER_ERROR
from afinar.core.layout import DEFAULT_OUTPUT_DIR


class SpanishHelpFormatter(argparse.RawDescriptionHelpFormatter):
    def add_usage(self, usage, actions, groups, prefix=None):
        # argparse's own "usage: " is not translated; every other heading of --help already is.
        return super().add_usage(usage, actions, groups, "uso: " if prefix is None else prefix)


# argparse's English messages (Python 3.11 wording), and their Spanish form.
_TRANSLATIONS = [
    (re.compile(r"^unrecognized arguments: (?P<rest>.*)$", re.S), "opciones no reconocidas: {rest}"),
    (re.compile(r"^the following arguments are required: (?P<rest>.*)$", re.S), "faltan las opciones obligatorias: {rest}"),
    (re.compile(r"^ambiguous option: (?P<opt>\S+) could match (?P<rest>.*)$", re.S),
     "opción ambigua: {opt} puede ser {rest}"),
    (re.compile(r"^argument (?P<opt>\S+): invalid choice: (?P<value>.*) \(choose from (?P<rest>.*)\)$", re.S),
     "opción {opt}: {value} no es un valor válido; elige entre {rest}"),
    (re.compile(r"^argument (?P<opt>\S+): expected one argument$"), "opción {opt}: falta su valor"),
    (re.compile(r"^argument (?P<opt>\S+): expected at least one argument$"), "opción {opt}: falta al menos un valor"),
    (re.compile(r"^argument (?P<opt>\S+): invalid int value: (?P<value>.*)$", re.S),
     "opción {opt}: {value} no es un número entero"),
    (re.compile(r"^argument (?P<opt>\S+): invalid float value: (?P<value>.*)$", re.S),
     "opción {opt}: {value} no es un número"),
    (re.compile(r"^argument (?P<opt>\S+): ignored explicit argument (?P<value>.*)$", re.S),
     "opción {opt}: no admite valor (se le dio {value})"),
    (re.compile(r"^argument (?P<opt>\S+): not allowed with argument (?P<rest>.*)$", re.S),
     "opción {opt}: no se puede usar junto con {rest}"),
    (re.compile(r"^argument (?P<opt>\S+): (?P<rest>.*)$", re.S), "opción {opt}: {rest}"),
]


def translate(message: str) -> str:
    for pattern, spanish in _TRANSLATIONS:
        found = pattern.match(message)
        if found:
            return spanish.format(**found.groupdict())
    return message


class SpanishArgumentParser(argparse.ArgumentParser):
    """argparse with Spanish errors (exit 2, like every bad input), and range checks after parsing.

    Every option whose destination has a rule in afinar.core.validation is checked here, before the script does
    anything: a bad value must never reach the stage after it has deleted or written something. The checks
    run after parsing rather than as `type=` callables, so the options keep their plain int/float types
    (tools/make_colab.py reads them to build the notebook's form).
    """

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"ERROR: {translate(message)}. Usa --help para ver las opciones.", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        for action in self._actions:
            name = action.dest
            if name not in validation.RULES or not action.option_strings or action.choices:
                continue  # argparse checks `choices` itself (and the CLI's may add "auto")
            value = getattr(parsed, name, None)
            if value is None:
                continue  # absent: the value inherited from run.json, checked with the manifest, applies
            why = validation.problem(name, value)
            if why:
                self.error(f"argument {action.option_strings[-1]}: {why}")
        return parsed, extra


def parser(description: str) -> argparse.ArgumentParser:
    p = SpanishArgumentParser(description=description, formatter_class=SpanishHelpFormatter, add_help=False)
    p._positionals.title = "argumentos"
    p._optionals.title = "opciones"
    p.add_argument("-h", "--help", action="help", help="muestra esta ayuda y termina")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help=f"directorio de salida compartido por las etapas (por defecto: {DEFAULT_OUTPUT_DIR}/)")
    return p


def quoted(path) -> str:
    """A path as it must be typed in the next suggested command (spaces, quotes, accents)."""
    return shlex.quote(str(path))


def argv_or_notebook(argv: list[str] | None) -> list[str] | None:
    """Inside a notebook cell sys.argv holds the kernel's own flags; a pasted script must ignore them."""
    if argv is not None:
        return argv
    if "ipykernel" in sys.modules and any(a.endswith(".json") for a in sys.argv[1:]):
        return []
    return None
