"""Rotaries that rebuild their own cache: the Llama-2-era convention of
remote code (InternLM2, DeepSeek-V2/V3, MiniCPM, ...), answered from tables.
The convention is stated here and nowhere else::

    def _set_cos_sin_cache(self, seq_len, device, dtype):   # the rebuild
        self.max_seq_len_cached = seq_len
        ...  # cos/sin for positions 0 .. seq_len-1 from the frequency state
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        if self.max_seq_len_cached is None or seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)

A forward that slices a cache built once (InternLM2: in ``__init__``, for
``max_position_embeddings``) already answers from it; one whose
``__init__`` leaves ``max_seq_len_cached = None`` (DeepSeek-V3) rebuilds it
for the whole sequence at every new length, i.e. at every decode step.

So the rebuild is what rope_patch answers, not the forward: the class's
``_set_cos_sin_cache`` is replaced (per class, as forwards are; the
original on ``__wrapped__``, removed by ``unpatch()``, nothing stored on the
module), and the forward is left as it is: its own code, condition and
slicing, at its own cost on calls within its cache. A rebuild called from
the forward (its caller's frame says so) is treated as a pure function of
``(seq_len, device, dtype)`` and the frequency state it reads (recorded by
rope_patch.cache.watch) to a *state delta*: the entries it writes. The
delta is learnt from the rebuild itself, run at the table's size ``S`` and
at ``S // 2`` (state put back after, as for table builds); each entry is

- ``= seq_len`` (an int: ``max_seq_len_cached``);
- the first ``seq_len`` rows of a table column (a tensor, rows along one
  dimension, canonical contiguous layout: ``cos_cached``, ``sin_cached``);
- a value that does not depend on ``seq_len`` (YaRN re-registers the same
  ``inv_freq``; tensors are copied per replay, as the rebuild makes new ones).

It is then proven on other lengths (1, 2, 3, ``S - 1``: same entries, bit
for bit), and the first real rebuild of each table is compared with the
unpatched one: every attribute, buffer and parameter of the module, bit for
bit. A replay writes what the rebuild would have written: fresh copies of
the rows, so the module's own state is exactly what unpatched leaves, and
the table never aliases it.

The package, by concern:

- :mod:`~rope_patch.cache.rebuild.convention` -- the method, how a class is
  recognised as following it, and how answered rebuilds are reported;
- :mod:`~rope_patch.cache.rebuild.delta` -- the entries a rebuild writes and
  their replay (Program, RebuildForm);
- :mod:`~rope_patch.cache.rebuild.learn` -- learning and proving a delta;
- :mod:`~rope_patch.cache.rebuild.slow` -- the slow path of one rebuild.

The replacement method itself, and the caller-frame test that decides which
rebuilds it answers, sit above the table engine with the replacement
forward (rope_patch.rebuild_method): the engine never installs or
recognises a function on a class, it only reads the mark
(rope_patch.marks).
"""

from rope_patch.cache.rebuild.convention import (
    METHOD,
    MIN_LEARN,
    OWN_CACHE,
    PARAMETERS,
    REBUILD,
    answers_rebuilds,
    rebuild_method,
)
from rope_patch.cache.rebuild.delta import Entry, NotElementwise, Program, RebuildForm
from rope_patch.cache.rebuild.learn import build
from rope_patch.cache.rebuild.slow import answer

__all__ = [
    "METHOD",
    "MIN_LEARN",
    "OWN_CACHE",
    "PARAMETERS",
    "REBUILD",
    "Entry",
    "NotElementwise",
    "Program",
    "RebuildForm",
    "answer",
    "answers_rebuilds",
    "build",
    "rebuild_method",
]
