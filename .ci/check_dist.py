"""Check the sdist and the wheel that ``python -m build`` wrote: exactly one of
each, both carry the LICENSE, the wheel's metadata declares Apache-2.0 and
it holds the package files users need (the ``python -m rope_patch`` entry,
the ``rope-patch run`` bootstrap and the PEP 561 ``py.typed`` marker).
Standard library only.

    python .ci/check_dist.py DIST_DIR
"""

from __future__ import annotations

import email.parser
import glob
import os
import sys
import tarfile
import zipfile

WHEEL_FILES = (
    "rope_patch/__init__.py",
    "rope_patch/__main__.py",
    "rope_patch/auto.py",
    "rope_patch/cli/__init__.py",
    "rope_patch/_sitecustomize/sitecustomize.py",
    "rope_patch/py.typed",
)


def fail(message: str) -> None:
    raise SystemExit(f"check_dist: FAILED: {message}")


def one(pattern: str) -> str:
    found = glob.glob(pattern)
    if len(found) != 1:
        fail(f"expected one {os.path.basename(pattern)}, found {found}")
    return found[0]


def main(dist: str) -> None:
    sdist = one(os.path.join(dist, "rope_patch-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in ("LICENSE", "README.md", "pyproject.toml", "rope_patch/__init__.py"):
        if needed not in names:
            fail(f"{os.path.basename(sdist)} lacks {needed}")

    wheel = one(os.path.join(dist, "rope_patch-*-py3-none-any.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = {name.split("/", 1)[0] for name in names if ".dist-info/" in name}
        if len(dist_info) != 1:
            fail(f"{os.path.basename(wheel)} has dist-info folders {dist_info}")
        (dist_info,) = dist_info
        license_file = f"{dist_info}/licenses/LICENSE"
        if license_file not in names:
            fail(f"{os.path.basename(wheel)} lacks {license_file}")
        if "Apache License" not in archive.read(license_file).decode():
            fail(f"{license_file} is not the Apache license")
        metadata = email.parser.Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        stray = sorted(name for name in names if not name.startswith(("rope_patch/", dist_info + "/")))
    if metadata.get("License-Expression") != "Apache-2.0":
        fail(f"wheel METADATA License-Expression is {metadata.get('License-Expression')!r}")
    if "LICENSE" not in metadata.get_all("License-File", []):
        fail(f"wheel METADATA License-File is {metadata.get_all('License-File')!r}")
    missing = [name for name in WHEEL_FILES if name not in names]
    if missing:
        fail(f"{os.path.basename(wheel)} lacks {missing}")
    if stray:
        fail(f"{os.path.basename(wheel)} holds files outside rope_patch/: {stray}")
    print(f"check_dist: {os.path.basename(sdist)} and {os.path.basename(wheel)} ok (LICENSE in both, Apache-2.0)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
