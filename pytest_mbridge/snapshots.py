"""Syrupy extension: mbridge snapshots live in one configurable directory, a file per model,
so a run limited to some models never sees the other models' snapshots as unused."""
from __future__ import annotations

import re
from pathlib import Path

from syrupy.extensions.amber import AmberSnapshotExtension


class MbridgeSnapshot(AmberSnapshotExtension):
    directory: str = "__snapshots__"  # set by the plugin at configure time

    @classmethod
    def dirname(cls, *, test_location) -> str:
        return cls.directory

    @classmethod
    def get_file_basename(cls, *, test_location, index) -> str:
        model = test_location.nodename.split("[", 1)[-1].rstrip("]")  # snapshot tests: [model]
        return "mbridge-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", model)

    @classmethod
    def exists(cls, snapshot) -> bool:
        """Whether a snapshot for this assertion is already recorded."""
        loc = Path(cls.get_location(test_location=snapshot.test_location, index=snapshot.index))
        name = cls.get_snapshot_name(test_location=snapshot.test_location, index=snapshot.index)
        return loc.exists() and f"# name: {name}\n" in loc.read_text()
