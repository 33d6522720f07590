"""Output forms: how a table answers one layout of position input.

Every form has the same small interface:

- ``build_positions(size, device[, axes])`` (static): the input a table of
  ``size`` positions is built from, when the table is built for this form;
- ``columns_of(outputs, size, device)`` (static): the table's columns in the
  forward's outputs for that input (raises NotCacheable when they do not fit);
- ``lookup(module, x, index)``: the forward's output for one call (index:
  position_ids, or seq_len), from the table (raises IndexError/RuntimeError
  for positions outside it on CPU);
- ``nbytes()``: memory held beyond the table's columns;
- ``verified``: its first real call was compared with the unpatched forward;
- ``dims`` / ``axes``: the position_ids layout it answers (its key in
  ``Table.forms``: 2, 3, or 0 for seq_len).

Forms: :class:`PlanarForm` (2-D ``(batch, seq)``), :class:`AxesForm`
(3-D ``(axes, batch, seq)``, M-RoPE), :class:`PrefixForm` (``seq_len``:
the first rows).
"""

from rope_patch.cache.forms.axes import AxesForm
from rope_patch.cache.forms.planar import PlanarForm
from rope_patch.cache.forms.prefix import PrefixForm

__all__ = ["AxesForm", "PlanarForm", "PrefixForm"]
