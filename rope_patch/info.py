"""What rope_patch holds for one module: the answer of :func:`rope_patch.cache_info`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TableInfo:
    """One cos/sin table of a module.

    Attributes:
        device: where the table lives (the device of the calls it answers).
        dtype: the dtype of the calls it answers.
        layer_type: the ``layer_type`` argument it answers (None for forwards without one).
        positions: positions covered, ``0 .. positions - 1``.
        bytes: memory held, every form included.
        verified: its first real call was compared with the unpatched forward
            and matched; only verified tables answer calls.
        forms: the position_ids layouts it answers (``"2-D"``, ``"3-axis"``).
    """

    device: object
    dtype: object
    layer_type: str | None
    positions: int
    bytes: int
    verified: bool
    forms: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """What rope_patch holds for one module.

    Attributes:
        tables: every table held, one per (device, dtype, layer_type).
        fallback: why the module is computed unpatched for good, or None.
    """

    tables: tuple[TableInfo, ...]
    fallback: str | None

    @property
    def answered(self) -> bool:
        """Calls of this module are answered from a (verified) table."""
        return self.fallback is None and any(table.verified for table in self.tables)

    @property
    def bytes(self) -> int:
        """Memory held by all tables."""
        return sum(table.bytes for table in self.tables)
