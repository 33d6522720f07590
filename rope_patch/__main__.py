"""``python -m rope_patch``: the ``rope-patch`` command without the console
script (same as ``python -m rope_patch.cli``)."""

from rope_patch.cli import main

if __name__ == "__main__":
    main(prog_name="rope-patch")
