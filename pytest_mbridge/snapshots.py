"""Syrupy extension: mbridge snapshots live in one configurable directory, a file per model,
so a run limited to some models never sees the other models' snapshots as unused."""
from __future__ import annotations

import re
from pathlib import Path

from syrupy.data import SnapshotCollections
from syrupy.extensions.amber import AmberSnapshotExtension
from syrupy.extensions.amber.serializer import AmberDataSerializer

from conformance.models import FIXTURES


class _AtomicAmber(AmberDataSerializer):
    """Snapshot files are written to a temporary file and renamed into place, under syrupy's
    file lock, even without xdist: an interrupted --snapshot-update never leaves half a file."""

    @classmethod
    def write_file(cls, snapshot_collection, merge: bool = False, name_order=None, *, file_lock=None,
                   _already_locked: bool = False) -> None:
        super().write_file(snapshot_collection, merge, name_order, file_lock=True,
                           _already_locked=_already_locked)


class MbridgeSnapshot(AmberSnapshotExtension):
    directory: str = "__snapshots__"  # set by the plugin at configure time
    serializer_class = _AtomicAmber

    @classmethod
    def dirname(cls, *, test_location) -> str:
        return cls.directory

    @classmethod
    def get_file_basename(cls, *, test_location, index) -> str:
        model = test_location.nodename.split("[", 1)[-1].rstrip("]")  # snapshot tests: [model]
        return "mbridge-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", model)

    def discover_snapshots(self, *, test_location, ignore_extensions=None) -> SnapshotCollections:
        """Only this model's file: the other models' files in the shared directory belong to
        runs of those models, never 'unused' here."""
        mine = Path(self.get_location(test_location=test_location, index=0))
        found = super().discover_snapshots(test_location=test_location, ignore_extensions=ignore_extensions)
        out = SnapshotCollections()
        for collection in found:
            if Path(collection.location) == mine:
                out.add(collection)
        return out

    @classmethod
    def exists(cls, snapshot) -> bool:
        """Whether a snapshot for this assertion is already recorded."""
        loc = Path(cls.get_location(test_location=snapshot.test_location, index=snapshot.index))
        name = cls.get_snapshot_name(test_location=snapshot.test_location, index=snapshot.index)
        return loc.exists() and f"# name: {name}\n" in loc.read_text()


class ShippedSnapshot(MbridgeSnapshot):
    """The snapshots recorded in this repository and shipped with the package (read only): the
    reference for a shipped model whose snapshot the run's own directory has not recorded."""
    directory = str(FIXTURES.parent / "snapshots")
