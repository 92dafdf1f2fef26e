"""Export stage: dooly's latency predictions written in other simulators' profile formats."""

from dooly.export.vidur import VidurExport, export_vidur

__all__ = ["VidurExport", "export_vidur"]
