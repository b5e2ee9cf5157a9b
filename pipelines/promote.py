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
``promote: promoted …``, ``promote: rolled back …`` or ``promote: no change …``.

Exit status: 0 when the aliases are where the verdict puts them (moved, or nothing to do);
1 when nothing moved because the verdict is invalid, or because another writer changed the
aliases meanwhile (run it again); 2 with ``promote: error: <one line>`` on bad arguments
(unknown flags included) or inputs (a verdict file that is missing or malformed, a serving dir
that does not exist or whose aliases are unreadable).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

from loopline import registry, storage

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


class PromoteError(ValueError):
    """A bad argument or input, in one line."""


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
            raise PromoteError(f"verdict {source} is not a JSON object")
        verdict = data.get("verdict")
        known = verdict in (BETTER, WORSE, INCONCLUSIVE) or (
            isinstance(verdict, str) and verdict.startswith(f"{INVALID}:")
        )
        if not known:
            raise PromoteError(
                f"verdict {source}: 'verdict' must be one of {', '.join(VERDICTS)}, got {verdict!r}"
            )
        challenger = data.get("challenger")
        if not isinstance(challenger, str) or not challenger:
            raise PromoteError(f"verdict {source}: 'challenger' must name a model id")
        flags = data.get("flags") or []
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise PromoteError(f"verdict {source}: 'flags' must be a list of strings")
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


@dataclass(frozen=True)
class Config:
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, like every Loopline entry point
        raise PromoteError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog=f"python -m pipelines.{PROG}", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--serving_dir", required=True, help="the serving dir (local or gs://)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--verdict", help="the monitor's verdict JSON file (local or gs://)")
    what.add_argument(
        "--roll_back",
        choices=(registry.CHALLENGER, registry.PRODUCTION),
        help="by hand: take the challenger out of traffic, or put the previous model back in "
        "production",
    )
    parser.add_argument("--why", help="with --roll_back: the reason, kept in the history")
    parser.add_argument(
        "--max_days",
        type=float,
        default=DEFAULT_MAX_DAYS,
        help="roll back a challenger still inconclusive after this many days in traffic "
        f"(default {DEFAULT_MAX_DAYS:g})",
    )
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> Config:
    """Reads and checks the inputs; PromoteError in one line when one is unusable."""
    if not args.max_days > 0:
        raise PromoteError(f"--max_days must be positive, got {args.max_days:g}")
    if args.roll_back and not (args.why or "").strip():
        raise PromoteError("--roll_back needs --why, the reason the history keeps")
    if args.why and not args.roll_back:
        raise PromoteError("--why goes with --roll_back (a verdict carries its own summary)")
    try:
        if not storage.is_dir(args.serving_dir):
            raise PromoteError(f"serving dir {args.serving_dir} does not exist")
        aliases = registry.read_aliases(args.serving_dir)
        data = storage.read_json(args.verdict) if args.verdict else None
    except (storage.StorageError, registry.RegistryError) as e:
        raise PromoteError(str(e)) from None
    if args.roll_back:
        needed = aliases.challenger if args.roll_back == registry.CHALLENGER else aliases.previous
        if needed is None:
            missing = (
                "no challenger" if args.roll_back == registry.CHALLENGER else "no previous model"
            )
            raise PromoteError(f"serving dir {args.serving_dir} has {missing} to roll back to")
        return Config(args.serving_dir, aliases, None, args.max_days, args.roll_back, args.why)
    verdict = Verdict.from_dict(data, args.verdict)
    return Config(args.serving_dir, aliases, verdict, args.max_days)


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
        raise PromoteError(f"{what} is not an RFC 3339 time: {text!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def apply(config: Config, decision: Decision) -> str:
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


def run(argv: list[str] | None = None) -> int:
    """Reads the verdict, moves the aliases, prints one line; returns the exit status."""
    try:
        config = resolve(parse_args(argv))
    except PromoteError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if config.roll_back:
        decision = Decision(ROLL_BACK, f"by hand: {config.why}")
    else:
        decision = decide(config.aliases, config.verdict, config.max_days)
    try:
        print(apply(config, decision))
    except (storage.ConcurrentUpdate, registry.RegistryError) as e:
        # Another writer moved the aliases since they were read: nothing moved; run it again.
        print(f"{PROG}: no change: {e}", file=sys.stderr)
        return 1
    return 1 if decision.action == REFUSE else 0


if __name__ == "__main__":
    sys.exit(run())
