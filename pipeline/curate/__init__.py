"""Curating a collection from its embeddings: duplicates, label issues and outliers, a 2-D map.

Each job reads an extraction output (and optionally an index of it) and writes a folder of
results (`pipeline.curate.output`): `fc7 duplicates` (`duplicates.py`), `fc7 audit`
(`audit.py`), `fc7 map` (`projection.py`). `fc7 serve --map/--duplicates/--audit` shows them.
"""

from pipeline.curate.config import AuditConfig, DuplicatesConfig, MapConfig
from pipeline.curate.output import read_results

__all__ = ["AuditConfig", "DuplicatesConfig", "MapConfig", "read_results"]
