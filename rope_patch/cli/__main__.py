"""``python -m rope_patch.cli``: the ``rope-patch`` command without the
console script (e.g. from a source checkout)."""

from rope_patch.cli import main

main(prog_name="rope-patch")
