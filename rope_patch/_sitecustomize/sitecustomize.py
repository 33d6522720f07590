"""Imported by Python at start-up in programs run by ``rope-patch run``
(site.py imports the first ``sitecustomize`` module on sys.path, and this
folder is first on PYTHONPATH).

It activates rope_patch, then runs the sitecustomize the program would have
had without us, found further along sys.path. Errors activating rope_patch
are reported and the program runs unpatched; errors in the program's own
sitecustomize behave as they would without us.
"""

import os
import sys


def _activate():
    try:
        import rope_patch.auto  # noqa: F401
    except Exception as error:  # noqa: BLE001 - e.g. another interpreter without rope_patch
        sys.stderr.write(f"rope-patch run: rope_patch is not active in {sys.executable}: {error!r}\n")


def _chain():
    """Import the next ``sitecustomize`` on sys.path, as ddtrace's bootstrap
    does: hide our folder (every occurrence) and our module, import, restore.

    Hiding rather than skipping by name is what prevents recursion, also when
    another rope_patch copy's folder is further on the path: each copy hides
    itself before importing the next.
    """
    here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    hidden = [(i, entry) for i, entry in enumerate(sys.path) if os.path.realpath(entry or os.curdir) == here]
    for i, _ in reversed(hidden):
        del sys.path[i]
    ours = sys.modules.pop("sitecustomize", None)
    try:
        import sitecustomize  # noqa: F401
    except ImportError as error:
        if error.name != "sitecustomize":  # the user's sitecustomize failed inside: let site report it
            raise
        if ours is not None:
            sys.modules["sitecustomize"] = ours
    finally:
        # Put our folder back where it was (keeping whatever the user's
        # sitecustomize changed), so sys.path shows what was configured.
        for i, entry in hidden:
            sys.path.insert(i, entry)


_activate()
_chain()
