"""A config check's error reworded to name what the user typed (moved here from ``common_args``, which imports
them): ``flag_text`` (a flag with its value as typed), ``naming_flags`` (``eta=-1.0`` becomes ``--eta -1``) and
``naming_section`` (a YAML file's key named with its section, ``search.max_steps_per_epoch``).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from gmpq_core.errors import GMPQError

def flag_text(flag: str, value: Any) -> str:
    """``flag`` with ``value`` as typed on the command line (``--eta -1``, ``--include-stem``)."""
    if value is True:
        return flag
    return f"{flag} {value:.15g}" if isinstance(value, float) else f"{flag} {value}"   # 1.9999999 stays so


def naming_flags(err: GMPQError, given: Mapping[str, tuple[str, Any]]) -> GMPQError:
    """``err``, raised by a config check that names keys and values (``but got eta=-1.0``), reworded to name the
    flags the user typed instead: ``given`` maps a config key to the (flag, value) that set it (``"eta": ("--eta",
    -1.0)``). A key is reworded only where the message echoes the flag's own value (a key set in a --config file
    keeps its name); ``eta must ... but got eta=-1.0. Use e.g. eta=40`` becomes ``--eta must ... but got --eta -1.
    Use e.g. --eta 40``. Returns an error of the same type (``err`` itself when no flag is named)."""
    text = str(err)
    for key, (flag, value) in given.items():
        echo = re.compile(rf"(?<![\w.-]){re.escape(key)}={re.escape(repr(value))}(?!\w|\.\d)")
        if value is None or not echo.search(text):
            continue
        text = echo.sub(lambda _: flag_text(flag, value), text)
        text = re.sub(rf"(?<=e\.g\. ){re.escape(key)}=", f"{flag} ", text)    # a suggestion: "Use e.g. eta=40" (not an
        #                                                                    example's code: "Budget(avg_bits=3)")
        text = re.sub(rf"^{re.escape(key)} (?=must )", f"{flag} ", text)            # the rule's subject
    return err if text == str(err) else type(err)(text)


def naming_section(err: GMPQError, section: str, keys: Sequence[str]) -> GMPQError:
    """``err``, raised by a config check that names a key of a YAML file's ``section`` (``but got
    max_steps_per_epoch=-4``), reworded to name it as written there (``search.max_steps_per_epoch``), and Python's
    None as YAML's ``null``. Returns an error of the same type (``err`` itself when nothing changed)."""
    text = str(err)
    for key in keys:
        text = re.sub(rf"(?<![\w.-]){re.escape(key)}(?==|\s+must\b)", f"{section}.{key}", text)
    if text != str(err):
        text = re.sub(r"\bUse None\b", "Use null", text)
    return err if text == str(err) else type(err)(text)
