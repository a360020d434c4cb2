"""Write constraints.txt: the exact versions of this environment's packages that the project
needs (its dependencies and every extra, transitively), as tested. `make constraints`.

pyproject.toml states ranges (a user may bring their own torch); `make`, CI and the Docker
images install with `-c constraints.txt`, so they get exactly this set.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# The exact, tested set of the project's dependencies (all extras, transitively), from the
# environment the tests passed in. Regenerate: `make constraints`. Ranges: pyproject.toml.
"""


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _applies(requirement: str, extras: set[str]) -> bool:
    """Whether a Requires-Dist line applies here (environment markers, requested extras)."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in extras | {""})


def closure(roots: list[str]) -> dict[str, str]:
    """name -> installed version of `roots` and everything they require here."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = [(r, set()) for r in roots]
    while todo:
        requirement, _ = todo.pop()
        req = Requirement(requirement)
        name = _name(req.name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # not for this platform / Python (its marker said so)
        first = name not in seen
        seen[name] = dist.version
        if not first and not req.extras:
            continue
        for sub in dist.requires or []:
            if _applies(sub, set(req.extras)):
                todo.append((sub, set()))
    return seen


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = list(project["dependencies"])
    for reqs in project.get("optional-dependencies", {}).values():
        roots += [r for r in reqs if _name(r) != "wandb"]  # wandb[sweeps] pins numpy<2
    pins = closure([re.sub(r"[<>=!~].*", "", r).strip() or r for r in roots])
    pins.pop("ppc-sweeps", None)
    out = ROOT / "constraints.txt"
    out.write_text(HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    print(f"{out}: {len(pins)} packages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
