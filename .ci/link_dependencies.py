"""``python link_dependencies.py WHEEL SITE``: make a wheel's dependencies, as this interpreter has them installed,
visible in another environment's site-packages ``SITE``, without installing them again.

Run by ``.ci/wheel-check`` with the project's venv (which ``make test`` has just resolved from the index). The
dependencies are the wheel's own ``Requires-Dist`` (no extras), followed through each installed distribution's
requirements (with the extras asked for) to their closure: exactly the distributions ``pip install WHEEL`` would have
put there, at the versions the project venv resolved. Each one's top-level entries (packages, modules, ``.libs``
folders, its ``.dist-info``) are symlinked into ``SITE``, so that ``pip check`` and ``import`` see them as installed
there, and nothing else of the project venv is visible: not the test tools, not the editable ``vitpeer``. A
requirement that is not installed is left out; ``pip check`` in ``SITE`` then names it.
"""

from __future__ import annotations

import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode()
    found = []
    for line in text.splitlines():
        if not line.strip():  # the headers end at the first empty line; the description follows
            break
        if line.startswith("Requires-Dist:"):
            found.append(Requirement(line.split(":", 1)[1].strip()))
    return found


def wanted(requirement: Requirement, extras: set[str]) -> bool:
    """Whether ``requirement`` applies here, for a distribution installed with ``extras``."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras | {""})


def closure(requirements: list[Requirement]) -> dict[str, metadata.Distribution]:
    """The installed distributions these requirements reach, by canonical name."""
    installed = {}
    for dist in metadata.distributions():  # the first on sys.path wins, as for import
        installed.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    reached: dict[str, metadata.Distribution] = {}
    asked: dict[str, set[str]] = {}
    todo = [(requirement, set()) for requirement in requirements]
    while todo:
        requirement, extras = todo.pop()
        if not wanted(requirement, extras):
            continue
        name = canonicalize_name(requirement.name)
        dist = installed.get(name)
        if dist is None:
            continue  # pip check names it
        new_extras = set(requirement.extras) - asked.get(name, set())
        if name in reached and not new_extras:
            continue
        asked.setdefault(name, set()).update(requirement.extras)
        reached[name] = dist
        todo += [(Requirement(line), asked[name]) for line in dist.requires or []]
    return reached


def top_level(dist: metadata.Distribution) -> set[str]:
    """The entries a distribution put directly into its site-packages, its ``.dist-info`` among them (its RECORD
    lists its own files), not scripts or bytecode caches."""
    return {file.parts[0] for file in dist.files or []} - {"..", "__pycache__"}


def main(wheel: str, site: str) -> None:
    target = Path(site)
    linked, dists = 0, closure(wheel_requirements(Path(wheel)))
    for _, dist in sorted(dists.items()):
        for entry in sorted(top_level(dist)):
            source = Path(str(dist.locate_file(entry)))
            link = target / entry
            if source.exists() and not link.exists() and not link.is_symlink():  # the venv's own pip stays its own
                link.symlink_to(source)
                linked += 1
    print(f"{len(dists)} distributions, {linked} entries linked")


if __name__ == "__main__":
    main(*sys.argv[1:])
