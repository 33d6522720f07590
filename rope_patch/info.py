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
        bytes: memory held, every form included; columns shared with
            other modules' tables (per-layer rotaries of equal frequency
            state, ``shared_by > 1``) count ``1/shared_by`` here, so that
            the sum over a model's modules is the memory held (rounded down).
        forms: the position_ids layouts it answers, each verified against the
            unpatched forward on its first real call: ``"2-D"`` (batch, seq),
            ``"3-D"`` (axes, batch, seq) with the axes kept apart, ``"M-RoPE"``
            (axes, batch, seq) recomposed or as the model's only form,
            ``"seq_len"`` (``forward(x, seq_len)``: the first rows),
            ``"rebuild"`` (the module's own cache rebuild,
            ``_set_cos_sin_cache``, replayed from the table).
        shared_by: how many modules' tables answer from these columns (1:
            its own).
    """

    device: object
    dtype: object
    layer_type: str | None
    positions: int
    bytes: int
    forms: tuple[str, ...]
    shared_by: int = 1

    @property
    def verified(self) -> bool:
        """Some call was answered from this table."""
        return bool(self.forms)


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """What rope_patch holds for one module.

    Attributes:
        tables: every table held: one per (device, dtype, layer_type), and
            for longrope a second one (the other frequency set).
        fallback: why the module is computed unpatched for good, or None.
        unpatched: why some calls are computed unpatched while others may be
            answered (a rope type computed per call for one layer type, say).
    """

    tables: tuple[TableInfo, ...]
    fallback: str | None
    unpatched: tuple[str, ...] = ()

    @property
    def answered(self) -> bool:
        """Calls of this module are answered from a (verified) table."""
        return self.fallback is None and any(table.verified for table in self.tables)

    @property
    def bytes(self) -> int:
        """Memory held by all tables."""
        return sum(table.bytes for table in self.tables)
