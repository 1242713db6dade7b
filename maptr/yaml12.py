"""YAML 1.2 as DVC reads and writes params files.

DVC reads and writes params with ruamel.yaml (YAML 1.2): ``dvc exp run -S qat.lr=1e-6`` writes ``lr: 1e-06``,
which PyYAML's YAML 1.1 rules take for a string. :func:`parse_yaml` is PyYAML's safe loader with the YAML 1.2
core schema's scalar rules instead (no ruamel at run time: the GPU check's machines lack it).
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the scalars of the YAML 1.2 core schema: ``1e-06``, ``1e-3`` and ``.5``
    are floats, ``010`` is ten, ``yes`` / ``on`` / ``no`` stay strings."""


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = {"0x": 16, "0o": 8}.get(digits[:2], 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


_Yaml12Loader.yaml_implicit_resolvers = {}  # YAML 1.1's rules (PyYAML's defaults) dropped, the 1.2 core set added
for _tag, _pattern, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
):  # fmt: skip
    _Yaml12Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first))
_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


def parse_yaml(text: str) -> Any:
    """YAML 1.2 (core schema) as DVC reads it: ``1e-06``, ``1e-3`` and ``.5`` are floats; ``yes`` / ``on`` are
    strings, not booleans."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
