"""--help's text: every Config field with its type, its default (and each preset's where it differs) and its
reason, and each preset with the first sentence of its comment, both read from config.py's own source, so
help and code cannot drift apart.

Module order: above config; train and sweep import it.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import fields

from . import config
from .config import PRESETS, Config


def field_reasons() -> dict[str, str]:
    """Each Config field's reason, read from its own comment in this file (the one after its default and the
    comment lines under it), so that --help and the code cannot drift apart; a field with none is a bug a
    test catches."""
    lines = inspect.getsource(Config).splitlines()
    reasons: dict[str, list[str]] = {}
    current = None
    for line in lines:
        text = line.strip()
        if match := re.match(r"(\w+): [\w\[\], |]+ = .*?(?:  # ?(.*))?$", text):
            current = match[1]
            reasons[current] = [match[2]] if match[2] else []
        elif text.startswith("# ---") or not text.startswith("#"):
            current = None
        elif current:
            reasons[current].append(text[1:].strip())
    return {name: " ".join(words) for name, words in reasons.items()}


def field_help(width: int = 100) -> str:
    """Every Config field as --help lists it: its type, its default (and each preset's where it differs) and
    its reason, under the section comments of the dataclass; then the presets."""
    reasons, by_name = field_reasons(), {f.name: f for f in fields(Config)}
    out = ["fields (--name=value; a preset's value where it differs from the default):"]
    for line in inspect.getsource(Config).splitlines():
        text = line.strip()
        if text.startswith("# ---"):
            out += ["", f"  {text[5:].strip()}:"]
            continue
        if not (match := re.match(r"(\w+): ", text)) or match[1] not in by_name:
            continue
        field = by_name[match[1]]
        kind = field.type if isinstance(field.type, str) else field.type.__name__
        per_preset = [f"{preset}: {values[field.name]!r}" for preset, values in PRESETS.items()
                      if field.name in values and values[field.name] != field.default]
        head = f"--{field.name} ({kind}, default {field.default!r}" + \
            (f"; {'; '.join(per_preset)}" if per_preset else "") + ")"
        out.append(textwrap.fill(head, width, initial_indent="    ", subsequent_indent="        "))
        out.append(textwrap.fill(reasons[field.name], width, initial_indent="        ",
                                 subsequent_indent="        "))
    return "\n".join(out)


def preset_help(width: int = 100) -> str:
    """Each preset and the first sentence of the comment above it in PRESETS (read from this file, as the
    fields' reasons are)."""
    source = inspect.getsource(config)
    out, comment = ["presets (the first argument; each field below gives its value under a preset where it "
                    "differs):"], []
    for line in source[source.index("PRESETS: dict"):].splitlines()[1:]:
        text = line.strip()
        if text == "}":
            break
        if text.startswith("#"):
            comment.append(text[1:].strip())
        elif match := re.match(r'"(\w+)": ', text):
            first = " ".join(comment).split(". ")[0].rstrip(".")
            out.append(textwrap.fill(f"{match[1]}: {first}.", width, initial_indent="  ", subsequent_indent="    "))
            comment = []
    return "\n".join(out)
