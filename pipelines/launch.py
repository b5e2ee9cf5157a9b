"""The one launch path of every Loopline pipeline: flags in, one line out on any usage error.

Each entry point (``python -m pipelines.<name>``, also a Flex Template's main file) has the
shape Options → ``resolve(options) -> Config`` (every check of arguments, files and secrets) →
``build(pipeline, config)``. This module owns what they share:

- ``parse_options`` refuses unknown or misspelt flags (Beam itself only logs and drops them, so
  ``--alowed_lateness 1h`` would run with the default) and answers ``--help`` with the
  pipeline's own options;
- ``UsageError`` is the one error type for bad arguments and inputs; ``main`` prints it as
  ``prog: error: <one line>`` and exits with status 2, as argparse does;
- ``counter_summary`` spells every ``loopline.*`` counter one way, ``<step>.<name>``
  (``join.decisions_in``, ``score.decisions``), in printed summaries and manifests alike.

    def run(argv=None):
        options, monitor_options = parse_options(argv, MonitorOptions, "monitor")
        config = resolve(monitor_options)
        ...

    if __name__ == "__main__":
        sys.exit(main(run, "monitor"))
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from loopline.errors import UsageError

__all__ = [
    "FailedRun",
    "UsageError",
    "boolean_flag",
    "counter_summary",
    "help_text",
    "main",
    "parse_options",
]

COUNTER_PREFIX = "loopline."
OptionsT = TypeVar("OptionsT", bound=PipelineOptions)


class FailedRun(RuntimeError):
    """A run that finished but must not count as a success (every row failed, a flag fired)."""


def boolean_flag(value: str | bool) -> bool:
    """An argparse ``type`` for flags given as ``true``/``false`` (how Flex Template parameters
    and Airflow pass booleans), also ``1``/``0`` and ``yes``/``no``."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _all_options_parser() -> argparse.ArgumentParser:
    # The same parser PipelineOptions.get_all_options builds: every loaded options class.
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # noqa: SLF001 - Beam's own extension point
    return parser


def help_text(options_cls: type[PipelineOptions], prog: str) -> str:
    """``--help``: the pipeline's own flags, then a pointer to Beam's standard options."""
    parser = argparse.ArgumentParser(
        prog=f"python -m pipelines.{prog}",
        description=(options_cls.__doc__ or "").strip() or None,
        epilog="Standard Beam options (--runner, --project, --region, --temp_location, "
        "--direct_num_workers, --direct_running_mode, ...) are accepted too.",
    )
    options_cls._add_argparse_args(parser)  # noqa: SLF001
    return parser.format_help()


def parse_options(
    argv: Sequence[str] | None, options_cls: type[OptionsT], prog: str
) -> tuple[PipelineOptions, OptionsT]:
    """Pipeline options from ``argv`` (default ``sys.argv[1:]``), refusing unknown flags.

    ``--help`` prints the pipeline's own flags and exits 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(options_cls, prog))
        raise SystemExit(0)
    try:
        _, unknown = _all_options_parser().parse_known_args(argv)
    except SystemExit:  # argparse already printed why (a flag without its value)
        raise UsageError(f"cannot parse the arguments {' '.join(argv)!r}") from None
    if unknown:
        flag = next((a for a in unknown if a.startswith("-")), unknown[0])
        raise UsageError(
            f"unknown argument {flag!r}; see python -m pipelines.{prog} --help for the flags"
        )
    options = PipelineOptions(argv)
    return options, options.view_as(options_cls)


def counter_summary(result: Any) -> dict[str, int]:
    """Every ``loopline.<step>`` counter of a finished run as ``{"<step>.<name>": value}``,
    summed over the steps that report it (committed values where the runner has them)."""
    counts: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        namespace = counter.key.metric.namespace
        if not namespace.startswith(COUNTER_PREFIX):
            continue
        name = f"{namespace.removeprefix(COUNTER_PREFIX)}.{counter.key.metric.name}"
        value = counter.committed if counter.committed is not None else counter.attempted
        counts[name] = counts.get(name, 0) + int(value or 0)
    return counts


def main(
    run: Callable[[list[str]], Any],
    prog: str,
    argv: Sequence[str] | None = None,
    report: Callable[[Any], None] | None = None,
) -> int:
    """Runs ``run(argv)`` and ``report(result)``; a UsageError becomes ``prog: error: <line>``
    and status 2, a FailedRun ``prog: error: <line>`` and status 1 (after the run's outputs are
    written). Anything else is a bug and raises with its traceback."""
    try:
        result = run(list(sys.argv[1:] if argv is None else argv))
        if report is not None:
            report(result)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except FailedRun as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
