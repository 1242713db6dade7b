"""The README and docs/ name only things that exist: files, links and params."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
# Repository paths written in backticks or plain text: a top-level source folder, then a file name.
PATH = re.compile(r"(?<![\w./-])((?:maptr|pipeline|benchmarks|tests|docs)/[\w./-]*\w\.(?:py|md|png|json|yaml))")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PARAM = re.compile(
    r"`((?:synth|pack|model|float|sensitivity|calibrate|qat|export|compile|validate)\.[a-z_0-9.]+)(?![\w.])"
)
FILE_SUFFIXES = (".py", ".json", ".md", ".png", ".yaml", ".onnx", ".pt")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_named_repository_files_exist(doc: Path) -> None:
    text = doc.read_text()
    missing = sorted({p for p in PATH.findall(text) if not (REPO / p).exists() and not (doc.parent / p).exists()})
    assert not missing, f"{doc.relative_to(REPO)} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_relative_links_resolve(doc: Path) -> None:
    targets = [t for t in LINK.findall(doc.read_text()) if "://" not in t]
    missing = sorted({t for t in targets if not (doc.parent / t).exists()})
    assert not missing, f"{doc.relative_to(REPO)} links to missing files: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_named_params_exist(doc: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    missing = []
    for name in set(PARAM.findall(doc.read_text())) - {
        n for n in PARAM.findall(doc.read_text()) if n.endswith(FILE_SUFFIXES)
    }:
        node = params
        for part in name.rstrip(".").split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif node is params or isinstance(node, dict):
                missing.append(name)
                break
            else:
                break  # a value's attribute in prose (`model.preset=tiny`): the key itself exists
    assert not missing, f"{doc.relative_to(REPO)} names params that params.yaml lacks: {sorted(missing)}"
