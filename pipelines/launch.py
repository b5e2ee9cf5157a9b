"""The one launch path of every Loopline pipeline: flags in, one line out on any usage error.

Each entry point (``python -m pipelines.<name>``, also a Flex Template's main file) has the
shape Options → ``resolve(options) -> Config`` (every check of arguments, files and secrets) →
``build(pipeline, config)``. This module owns what they share:

- ``parse_options`` refuses unknown or misspelt flags (Beam itself only logs and drops them, so
  ``--alowed_lateness 1h`` would run with the default) and answers ``--help`` with the
  pipeline's own options;
- ``parse_flags`` does the same for the entry points that are not Beam pipelines themselves
  (``train``, which hands Beam's standard options on to its TFX components, and ``promote``):
  their ``EntryOptions`` stay out of Beam's registry of options;
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
    "EntryOptions",
    "FailedRun",
    "UsageError",
    "boolean_flag",
    "counter_summary",
    "help_text",
    "main",
    "parse_flags",
    "parse_options",
]

COUNTER_PREFIX = "loopline."
OptionsT = TypeVar("OptionsT", bound=PipelineOptions)
BEAM_OPTIONS_HELP = (
    "Standard Beam options (--runner, --project, --region, --temp_location, "
    "--direct_num_workers, --direct_running_mode, ...) are accepted too."
)


class EntryOptions:
    """The flags of an entry point that is not itself a Beam pipeline (``train``, ``promote``),
    declared the way a ``PipelineOptions`` subclass declares them (``_add_argparse_args``), so
    ``help_text`` and ``parse_flags`` treat both alike. It is not a ``PipelineOptions``
    subclass on purpose: Beam parses every loaded subclass's flags for every pipeline, so
    importing ``pipelines.promote`` would make ``--verdict`` a flag the join accepts."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError(f"{cls.__name__} declares no flags")


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are UsageErrors (one line), not usage text and exit 2."""

    def error(self, message: str):
        raise UsageError(message)


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


def _options_parser(beam_only: bool = False) -> argparse.ArgumentParser:
    # The same parser PipelineOptions.get_all_options builds: every loaded options class, or
    # (beam_only) Beam's standard options alone.
    parser = _Parser(add_help=False, allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        if not beam_only or cls.__module__.startswith("apache_beam."):
            cls._add_argparse_args(parser)  # noqa: SLF001 - Beam's own extension point
    return parser


def help_text(
    options_cls: type[PipelineOptions] | type[EntryOptions], prog: str, beam_options: bool = True
) -> str:
    """``--help``: the pipeline's own flags, then (``beam_options``) a pointer to Beam's
    standard options."""
    parser = argparse.ArgumentParser(
        prog=f"python -m pipelines.{prog}",
        description=(options_cls.__doc__ or "").strip() or None,
        epilog=BEAM_OPTIONS_HELP if beam_options else None,
    )
    options_cls._add_argparse_args(parser)  # noqa: SLF001
    return parser.format_help()


def _print_help_on_request(argv: list[str], text: Callable[[], str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(text())
        raise SystemExit(0)


def _refuse_unknown(unknown: list[str], prog: str) -> None:
    if unknown:
        flag = next((a for a in unknown if a.startswith("-")), unknown[0])
        raise UsageError(
            f"unknown argument {flag!r}; see python -m pipelines.{prog} --help for the flags"
        )


def parse_options(
    argv: Sequence[str] | None, options_cls: type[OptionsT], prog: str
) -> tuple[PipelineOptions, OptionsT]:
    """Pipeline options from ``argv`` (default ``sys.argv[1:]``), refusing unknown flags.

    ``--help`` prints the pipeline's own flags and exits 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _print_help_on_request(argv, lambda: help_text(options_cls, prog))
    _, unknown = _options_parser().parse_known_args(argv)
    _refuse_unknown(unknown, prog)
    options = PipelineOptions(argv)
    return options, options.view_as(options_cls)


def parse_flags(
    argv: Sequence[str] | None,
    options_cls: type[EntryOptions],
    prog: str,
    beam_options: bool = False,
) -> tuple[argparse.Namespace, list[str]]:
    """An entry point's own flags from ``argv`` (default ``sys.argv[1:]``), and the rest when
    ``beam_options`` allows Beam's standard options (``--runner=...``), handed on as they came.

    Unknown, misspelt or abbreviated flags are refused, and so is any Beam option when
    ``beam_options`` is false; argparse's own checks (a required flag, a choice, a type) become
    UsageErrors too. ``--help`` prints the entry point's own flags and exits 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _print_help_on_request(argv, lambda: help_text(options_cls, prog, beam_options))
    parser = _Parser(prog=f"python -m pipelines.{prog}", add_help=False, allow_abbrev=False)
    options_cls._add_argparse_args(parser)  # noqa: SLF001
    flags, rest = parser.parse_known_args(argv)
    unknown = _options_parser(beam_only=True).parse_known_args(rest)[1] if beam_options else rest
    _refuse_unknown(unknown, prog)
    return flags, rest


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
