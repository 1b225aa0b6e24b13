"""Reading an offline W&B run back from its files, without an account or network.

wandb stores an offline run as a binary transaction log (``run-<id>.wandb``); its own command
``wandb leet inspect --json`` decodes it into one JSON record per line. This wraps that command, so tests and
scripts can check what a run logged before (or instead of) ``wandb sync``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustattr.errors import RobustAttrError


@dataclass
class OfflineRun:
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # staged for `wandb sync` (tables with media)

    def artifact_files(self, path: str) -> list[dict[str, Any]]:
        """The manifest entries (``path``, ``local_path``, ...) of the staged artifact holding the file ``path``
        (a table's ``<key>.table.json``, with the images of its cells), or [] if none does."""
        for artifact in self.artifacts:
            contents = artifact.get("manifest", {}).get("contents", [])
            if any(entry.get("path") == path for entry in contents):
                return contents
        return []

    def values(self, key: str) -> list[Any]:
        """Every logged value of ``key``, in step order."""
        return [row[key] for row in self.history if key in row]

    def media(self, key: str) -> list[dict[str, Any]]:
        """Every logged media entry of ``key`` (images, tables), as dicts with ``_type``, ``filenames`` or
        ``path``, ...; the files lie under the run's ``files/`` folder."""
        prefix = f"{key}."
        entries = []
        for row in self.history:
            fields = {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}
            if fields:
                entries.append(fields)
        return entries

    @property
    def files(self) -> Path:
        return self.path.parent / "files"


def find_offline_runs(save_dir: str | Path) -> list[Path]:
    """The ``run-*.wandb`` files under ``save_dir`` (the WandbLogger ``save_dir``), oldest first."""
    return sorted(Path(save_dir).glob("**/offline-run-*/run-*.wandb"))


def read_offline_run(path: str | Path, timeout: float = 120.0) -> OfflineRun:
    """Decode an offline run (its ``.wandb`` file or run folder) into config, history rows and summary."""
    path = Path(path)
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RobustAttrError(f"{path}: cannot read the W&B run: {proc.stderr.strip()[:500]}")
    run = OfflineRun(path)
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        kind = record.get("type")
        if kind == "config":
            run.config.update(record["config"]["update"])
        elif kind == "history":
            run.history.append(record["history"]["item"])
        elif kind == "artifact":
            run.artifacts.append(record["artifact"])
        elif kind == "summary":
            run.summary.update(record["summary"].get("update", {}))
    return run
