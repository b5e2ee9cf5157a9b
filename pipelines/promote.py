"""Moves the registry's aliases on the monitor's verdict: promote a challenger or roll it back.

    python -m pipelines.promote --serving_dir DIR --verdict FILE [--max_days 14]
    python -m pipelines.promote --serving_dir DIR --roll_back challenger|production --why TEXT

The last step of the loop (DESIGN.md, "The loop"), run by a DAG task after the monitor, or by
hand. ``DIR`` is the serving dir the Pusher pushes to (``loopline.registry``); ``FILE`` is the
monitor's verdict. Both may be local or ``gs://``.

The verdict file (JSON)::

    {
      "verdict": "challenger_better" | "challenger_worse" | "inconclusive" | "invalid: <reason>",
      "challenger": "<model id>",          the model the readout is about (required)
      "production": "<model id>" | null,   the arm it was compared with (null: the fallback)
      "flags": ["<flag>", ...],            guardrails or monitor flags that fired for the
                                           challenger (optional, default none)
      "summary": "<one sentence>",         the figures, quoted in the history (optional)
      "at": "<RFC 3339 time>"              when the readout was made (optional, default now)
    }

What it does, in this order:

1. a verdict about a model that is not the current challenger (it was replaced by a newer
   push or rolled back by hand meanwhile) moves nothing: ``no change``;
2. any flag fired: the challenger is rolled back, whatever the verdict says (a guardrail is
   a veto, not a vote);
3. ``challenger_better``: the challenger becomes production, the old production previous;
4. ``challenger_worse``: the challenger is rolled back (production keeps all the traffic);
5. ``inconclusive``: the split is kept until the challenger has been in traffic for
   ``--max_days`` (counted from its registration to the readout's ``at``), then rolled back,
   the history saying it stayed inconclusive;
6. ``invalid: <reason>`` (a broken experiment, such as a sample-ratio mismatch): no alias moves
   and the exit status is 1, so the DAG task fails and a person looks; the challenger keeps its
   share until then (rolling back is one command, below).

By hand, ``--roll_back challenger`` takes the challenger out of traffic and ``--roll_back
production`` puts the previous model back in production; ``--why`` is the reason the history
keeps (``by hand: <why>``).

Every move is appended to ``aliases.json``'s history with its reason. Prints one line:
``promote: promoted …``, ``promote: rolled back …`` or ``promote: no change …`` (on standard
error as ``promote: error: no change …`` when nothing moved that should have).

Exit status (``pipelines.launch``): 0 when the aliases are where the verdict puts them (moved,
or nothing to do); 1 with ``promote: error: no change (<why>)`` when nothing moved because the
verdict is invalid, or because another writer changed the aliases meanwhile (run it again); 2
with ``promote: error: <one line>`` on bad arguments (unknown flags included) or inputs (a
verdict file that is missing or malformed, a serving dir that does not exist or whose aliases
are unreadable).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

from loopline import registry, storage
from loopline.errors import UsageError
from pipelines.launch import EntryOptions, FailedRun, parse_flags
from pipelines.launch import main as launch_main

PROG = "promote"
BETTER = "challenger_better"
WORSE = "challenger_worse"
INCONCLUSIVE = "inconclusive"
INVALID = "invalid"
VERDICTS = (BETTER, WORSE, INCONCLUSIVE, f"{INVALID}: <reason>")
DEFAULT_MAX_DAYS = 14.0

PROMOTE = "promote"
ROLL_BACK = "roll_back"
KEEP = "keep"
REFUSE = "refuse"


@dataclass(frozen=True)
class Verdict:
    """The monitor's verdict on one challenger (the module docstring has the file's schema)."""

    verdict: str
    challenger: str
    production: str | None = None
    flags: tuple[str, ...] = ()
    summary: str = ""
    at: str | None = None

    @classmethod
    def from_dict(cls, data, source: str) -> Verdict:
        if not isinstance(data, dict):
            raise UsageError(f"verdict {source} is not a JSON object")
        verdict = data.get("verdict")
        known = verdict in (BETTER, WORSE, INCONCLUSIVE) or (
            isinstance(verdict, str) and verdict.startswith(f"{INVALID}:")
        )
        if not known:
            raise UsageError(
                f"verdict {source}: 'verdict' must be one of {', '.join(VERDICTS)}, got {verdict!r}"
            )
        challenger = data.get("challenger")
        if not isinstance(challenger, str) or not challenger:
            raise UsageError(f"verdict {source}: 'challenger' must name a model id")
        flags = data.get("flags") or []
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise UsageError(f"verdict {source}: 'flags' must be a list of strings")
        at = data.get("at")
        if at is not None:
            _parse_time(at, f"verdict {source}: 'at'")
        return cls(
            verdict=verdict,
            challenger=challenger,
            production=data.get("production"),
            flags=tuple(flags),
            summary=str(data.get("summary") or ""),
            at=at,
        )


class PromoteOptions(EntryOptions):
    """Moves the registry's aliases on the monitor's verdict: promote a challenger or roll it
    back (or roll back by hand)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--serving_dir", required=True, help="the serving dir (local or gs://)")
        what = parser.add_mutually_exclusive_group(required=True)
        what.add_argument("--verdict", help="the monitor's verdict JSON file (local or gs://)")
        what.add_argument(
            "--roll_back",
            choices=(registry.CHALLENGER, registry.PRODUCTION),
            help="by hand: take the challenger out of traffic, or put the previous model back "
            "in production",
        )
        parser.add_argument("--why", help="with --roll_back: the reason, kept in the history")
        parser.add_argument(
            "--max_days",
            type=float,
            default=DEFAULT_MAX_DAYS,
            help="roll back a challenger still inconclusive after this many days in traffic "
            f"(default {DEFAULT_MAX_DAYS:g})",
        )


@dataclass(frozen=True)
class PromoteConfig:
    """Everything a run needs, checked: the serving dir, its aliases, the verdict."""

    serving_dir: str
    aliases: registry.Aliases
    verdict: Verdict | None
    max_days: float
    roll_back: str | None = None  # by hand: the alias to roll back
    why: str = ""


@dataclass(frozen=True)
class Decision:
    """What to do with the aliases (PROMOTE, ROLL_BACK, KEEP or REFUSE) and why."""

    action: str
    why: str


def resolve(options: argparse.Namespace) -> PromoteConfig:
    """Reads and checks the inputs; UsageError in one line when one is unusable."""
    if not options.max_days > 0:
        raise UsageError(f"--max_days must be positive, got {options.max_days:g}")
    if options.roll_back and not (options.why or "").strip():
        raise UsageError("--roll_back needs --why, the reason the history keeps")
    if options.why and not options.roll_back:
        raise UsageError("--why goes with --roll_back (a verdict carries its own summary)")
    try:
        if not storage.is_dir(options.serving_dir):
            raise UsageError(f"serving dir {options.serving_dir} does not exist")
        aliases = registry.read_aliases(options.serving_dir)
        data = storage.read_json(options.verdict) if options.verdict else None
    except (storage.StorageError, registry.RegistryError) as e:
        raise UsageError(str(e)) from None
    if options.roll_back:
        needed = (
            aliases.challenger if options.roll_back == registry.CHALLENGER else aliases.previous
        )
        if needed is None:
            missing = (
                "no challenger" if options.roll_back == registry.CHALLENGER else "no previous model"
            )
            raise UsageError(f"serving dir {options.serving_dir} has {missing} to roll back to")
        return PromoteConfig(
            options.serving_dir, aliases, None, options.max_days, options.roll_back, options.why
        )
    verdict = Verdict.from_dict(data, options.verdict)
    return PromoteConfig(options.serving_dir, aliases, verdict, options.max_days)


def decide(aliases: registry.Aliases, verdict: Verdict, max_days: float) -> Decision:
    """What the verdict means for the aliases (the rules of the module docstring)."""
    said = verdict.verdict + (f" ({verdict.summary})" if verdict.summary else "")
    if aliases.challenger is None:
        return Decision(
            KEEP, f"no challenger in traffic; the verdict on {verdict.challenger} is stale"
        )
    if verdict.challenger != aliases.challenger:
        return Decision(
            KEEP,
            f"the verdict is about {verdict.challenger}, but the challenger is now "
            f"{aliases.challenger}; a stale verdict moves nothing",
        )
    if verdict.flags:
        return Decision(ROLL_BACK, f"flags fired: {', '.join(verdict.flags)}; verdict {said}")
    if verdict.verdict == BETTER:
        return Decision(PROMOTE, said)
    if verdict.verdict == WORSE:
        return Decision(ROLL_BACK, said)
    if verdict.verdict == INCONCLUSIVE:
        days = _days_in_traffic(aliases, verdict)
        if days >= max_days:
            return Decision(
                ROLL_BACK,
                f"still inconclusive after {days:.1f} days in traffic (--max_days "
                f"{max_days:g}); {said}",
            )
        return Decision(KEEP, f"inconclusive after {days:.1f} of {max_days:g} days; split kept")
    return Decision(REFUSE, f"{said}; no alias moved, the experiment needs a person")


def _days_in_traffic(aliases: registry.Aliases, verdict: Verdict) -> float:
    since = aliases.since(registry.CHALLENGER)
    if since is None:
        return 0.0
    at = _parse_time(verdict.at, "'at'") if verdict.at else datetime.now(timezone.utc)
    return (at - _parse_time(since, "the challenger's registration time")).total_seconds() / 86400


def _parse_time(text, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{what} is not an RFC 3339 time: {text!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def apply(config: PromoteConfig, decision: Decision) -> str:
    """Moves the aliases as decided; returns the line to print."""
    if config.roll_back:
        was = getattr(config.aliases, config.roll_back)
        moved = registry.roll_back(config.serving_dir, decision.why, alias=config.roll_back)
        now_serving = moved.production or "the fallback decision"
        return (
            f"{PROG}: rolled back {config.roll_back} {was} ({decision.why}); production is "
            f"{now_serving}"
        )
    challenger = config.verdict.challenger
    if decision.action == PROMOTE:
        registry.promote(config.serving_dir, decision.why, challenger=challenger)
        return f"{PROG}: promoted {challenger} to production ({decision.why})"
    if decision.action == ROLL_BACK:
        registry.roll_back(config.serving_dir, decision.why, challenger=challenger)
        return f"{PROG}: rolled back {challenger} ({decision.why})"
    return f"{PROG}: no change ({decision.why})"


def run(argv: list[str] | None = None) -> str:
    """Reads the verdict and moves the aliases; returns the line to print.

    UsageError (exit 2) when an argument or input is unusable; FailedRun (exit 1) when nothing
    moved because the verdict is invalid or another writer moved the aliases meanwhile."""
    options, _ = parse_flags(argv, PromoteOptions, PROG)
    config = resolve(options)
    if config.roll_back:
        decision = Decision(ROLL_BACK, f"by hand: {config.why}")
    else:
        decision = decide(config.aliases, config.verdict, config.max_days)
    if decision.action == REFUSE:
        raise FailedRun(f"no change ({decision.why})")
    try:
        return apply(config, decision)
    except (storage.ConcurrentUpdate, registry.RegistryError) as e:
        # Another writer moved the aliases since they were read: nothing moved; run it again.
        raise FailedRun(f"no change: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.promote``: prints the one line and returns the exit status."""
    return launch_main(run, PROG, argv, report=print)


if __name__ == "__main__":
    sys.exit(main())
