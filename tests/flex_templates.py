"""How the Flex Template launcher starts a pipeline, for tests that start it the same way.

The launcher runs ``python <FLEX_TEMPLATE_PYTHON_PY_FILE>`` with one ``--name=value`` flag per
template parameter, after checking the parameters against ``templates/<name>/metadata.json``.
cloudbuild.yaml sets the file for each template; docker/Dockerfile installs the package in the
image, so the entry file is ``__main__`` and everything else is imported from the package.

    argv = [sys.executable, str(entry_file("monitor")), *flags(parameters)]
    check_parameters("monitor", parameters)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TEMPLATE_ROOT = "/template/"  # the image's WORKDIR, where docker/Dockerfile copies the package


def entry_file(template: str) -> Path:
    """The template's FLEX_TEMPLATE_PYTHON_PY_FILE as cloudbuild.yaml builds it, in this checkout."""
    steps = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())["steps"]
    args = next(s["args"] for s in steps if s.get("id") == f"template-{template}")
    assert args[args.index("--metadata-file") + 1] == f"templates/{template}/metadata.json"
    env = dict(a.split("=", 1) for a in args[args.index("--env") + 1 :: 2])
    path = env["FLEX_TEMPLATE_PYTHON_PY_FILE"]
    assert path.startswith(TEMPLATE_ROOT), path
    return REPO / path.removeprefix(TEMPLATE_ROOT)


def check_parameters(template: str, parameters: dict[str, str]) -> None:
    """What the launcher checks before it runs anything: known names, the required ones given,
    each value matching its parameter's regexes (a local path is checked as gs://local<path>,
    the URL it stands in for)."""
    declared = json.loads((REPO / "templates" / template / "metadata.json").read_text())
    by_name = {p["name"]: p for p in declared["parameters"]}
    unknown = set(parameters) - set(by_name)
    assert not unknown, f"{template} launched with parameters its template lacks: {unknown}"
    required = {name for name, p in by_name.items() if not p.get("isOptional", False)}
    assert required <= set(parameters), f"{template} needs {required - set(parameters)}"
    for name, value in parameters.items():
        as_given = f"gs://local{value}" if value.startswith("/") else value
        for regex in by_name[name].get("regexes", []):
            assert re.fullmatch(regex, as_given), f"--{name}={value} does not match {regex}"


def flags(parameters: dict[str, str]) -> list[str]:
    """One ``--name=value`` flag per parameter, as the launcher passes them."""
    return [f"--{name}={value}" for name, value in parameters.items()]


def package_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this checkout on PYTHONPATH: the package as the image installs it."""
    pythonpath = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO)]))
    return {**env, "PYTHONPATH": pythonpath}
