"""The packed dataset as an MLflow dataset (imported only where MLflow is in use)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from mlflow.data.meta_dataset import MetaDataset


class PackedDataset(MetaDataset):
    """``data/packed`` as an MLflow dataset: DVC's hash as digest, the sample counts as profile."""

    def __init__(self, folder: str | Path, digest: str):
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        folder = Path(folder).resolve()
        info_path = folder / "metas" / "info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        counts = info.get("num_samples", {})
        files = [p for p in folder.rglob("*") if p.is_file()]
        self._profile = {**{f"{split}_samples": int(n) for split, n in counts.items()},
                         "files": len(files), "bytes": sum(p.stat().st_size for p in files)}  # fmt: skip
        name = f"{Path(str(info.get('dataroot', folder.name))).name}/{info.get('version', 'packed')}"
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(folder))
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, int]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}
