"""`pip check` for the images, allowing only the lock's deliberate overrides.

requirements/overrides.txt pins a few packages against a dependent's stated range on purpose
(each with the reason beside it); `pip check` reports exactly those conflicts. This runs `pip
check` and fails on any conflict that does not name an overridden package, so a broken install
still fails the image build while the documented overrides do not.

    python docker/pip_check.py requirements/overrides.txt
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
# "tfx 1.16.0 has requirement tensorflow-hub<0.16,>=0.15.0, but you have tensorflow-hub 0.16.1."
_CONFLICT = re.compile(r"has requirement ([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 name normalisation, so `tensorflow_hub` and `TensorFlow-Hub` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def overridden_packages(overrides: Path) -> set[str]:
    """The package names pinned in an overrides file (comments and blank lines skipped)."""
    names = set()
    for line in overrides.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0]
        match = _REQUIREMENT.match(line)
        if match:
            names.add(canonical(match.group(1)))
    return names


def unexpected_conflicts(pip_check_output: str, allowed: set[str]) -> list[str]:
    """The lines of `pip check` output that are not a conflict on an overridden package."""
    problems = []
    for line in pip_check_output.splitlines():
        line = line.strip()
        if not line or line.startswith("No broken requirements"):
            continue
        match = _CONFLICT.search(line)
        if match and canonical(match.group(1)) in allowed:
            continue
        problems.append(line)
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python docker/pip_check.py requirements/overrides.txt", file=sys.stderr)
        return 2
    allowed = overridden_packages(Path(argv[0]))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
    )
    problems = unexpected_conflicts(result.stdout + result.stderr, allowed)
    for line in problems:
        print(f"pip check: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"pip check: consistent (allowed overrides: {', '.join(sorted(allowed)) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
