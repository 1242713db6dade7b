"""Deterministic nuScenes-style tokens: 32 hex characters derived from a namespace and a path of names."""

from __future__ import annotations

import hashlib


def make_token(namespace: str, *parts: object) -> str:
    """md5 of ``namespace/part1/part2/...``: the same inputs always give the same token, different inputs
    (another seed in the namespace, another table or index in the parts) give unrelated tokens."""
    key = "/".join([namespace, *map(str, parts)])
    return hashlib.md5(key.encode("utf-8")).hexdigest()
