"""Learns a Thompson sampling policy's posteriors from a joined span: each arm's rewards.

    python -m pipelines.update_bandit --span DIR --blueprint FILE [--state PATH]

The bandit's step of the loop: after the join writes a day's span, this adds what each arm
earned to the policy's Beta posteriors and writes them to the state file, which the decision
client and bulk scoring start from (``policy.posterior`` in the blueprint; ``--state``
defaults to it). In an example, the chosen arm is the ``decision`` column and the reward the
blueprint's label (0 or 1); a row whose label the blueprint says is not observable, or without a
recorded decision, is skipped and counted.

A span is learnt once: the state lists the spans it holds (by path and manifest hash), so a
re-run of the same day's task changes nothing. The state is replaced only if no other writer
changed it meanwhile (``loopline.storage.replace_if_unchanged``). Paths may be local or
``gs://``.

The state file (JSON)::

    {"arms": 2, "alpha": [..], "beta": [..],
     "spans": [{"span": "<path>", "manifest_sha256": "..", "rows": N, "skipped": K,
                "successes": [..], "failures": [..]}]}

Prints one line: ``update_bandit: learnt <span>: ...`` or ``update_bandit: no change: ...``.
Exit status 0; 1 when another writer changed the state meanwhile (run it again); 2 with
``update_bandit: error: <one line>`` on bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass, replace

from loopline import storage
from loopline.blueprint import BlueprintError, load_blueprint
from loopline.policy import PolicyError, ThompsonSampling, policy_from_blueprint, reward_counts
from loopline.spans import SPLITS, SpanError, read_span

PROG = "update_bandit"


class UpdateError(ValueError):
    """Bad arguments or inputs, in one line."""


@dataclass(frozen=True)
class Config:
    span_uri: str
    manifest_sha256: str
    example_files: tuple[str, ...]
    label: object  # loopline.blueprint.Label
    policy: ThompsonSampling
    state_path: str
    state_bytes: bytes | None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, like every Loopline entry point
        raise UpdateError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog=f"python -m pipelines.{PROG}", description=__doc__.split("\n")[0])
    parser.add_argument("--span", required=True, help="a complete span directory of the join")
    parser.add_argument("--blueprint", required=True, help="the blueprint (policy: thompson)")
    parser.add_argument("--state", help="the posterior state file (default: policy.posterior)")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> Config:
    """Reads and checks the inputs; UpdateError in one line when one is unusable."""
    try:
        blueprint = load_blueprint(args.blueprint)
    except (BlueprintError, OSError) as e:
        raise UpdateError(str(e)) from None
    section = dict(blueprint.policy or {})
    if section.get("type") != "thompson":
        raise UpdateError(f"blueprint {args.blueprint} has no thompson policy to update")
    state_path = args.state or section.get("posterior")
    if not state_path:
        raise UpdateError("no state file: give --state or the blueprint's policy.posterior")
    try:
        span = read_span(args.span)
        manifest = storage.read_bytes(storage.join(span.uri, "manifest.json"))
        state_bytes = storage.read_if_exists(state_path)
        # From the prior, then the state file at state_path (which --state may point elsewhere).
        prior = {k: v for k, v in section.items() if k != "posterior"}
        policy = policy_from_blueprint(replace(blueprint, policy=prior))
        if state_bytes is not None:
            policy.load_state(_json(state_bytes, state_path))
    except (SpanError, PolicyError, storage.StorageError) as e:
        raise UpdateError(str(e)) from None
    files = tuple(f for split in SPLITS for f in span.example_files(split))
    return Config(
        span.uri,
        hashlib.sha256(manifest).hexdigest(),
        files,
        blueprint.label,
        policy,
        state_path,
        state_bytes,
    )


def _json(data: bytes, path: str) -> dict:
    import json

    try:
        value = json.loads(data)
    except ValueError as e:
        raise UpdateError(f"state {path} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise UpdateError(f"state {path} is not a posterior state")
    return value


def span_rewards(files: tuple[str, ...], label) -> tuple[list[int], list[float]]:
    """(chosen arm, reward) of every example whose label is observable, read with TensorFlow;
    a row without a recorded decision gets arm -1 (``reward_counts`` skips it)."""
    import tensorflow as tf

    arms, rewards = [], []
    for raw in tf.data.TFRecordDataset(list(files), compression_type="GZIP").as_numpy_iterator():
        feature = tf.train.Example.FromString(raw).features.feature
        row = {}
        for column in ("decision", "arm", "model_id"):
            if column in feature:
                values = feature[column].int64_list.value or feature[column].bytes_list.value
                if values:
                    value = values[0]
                    row[column] = value.decode() if isinstance(value, bytes) else value
        if not label.is_observable(row):
            continue
        values = feature[label.name].int64_list.value or feature[label.name].float_list.value
        arms.append(int(row.get("decision", -1)))
        rewards.append(float(values[0]) if values else -1.0)
    return arms, rewards


def update(config: Config, arms: list[int], rewards: list[float]) -> tuple[dict, str]:
    """The new state document and the line to print (pure: nothing is read or written)."""
    policy = config.policy
    previous = _json(config.state_bytes, config.state_path) if config.state_bytes else {}
    spans = list(previous.get("spans", []))
    if any(s.get("manifest_sha256") == config.manifest_sha256 for s in spans):
        return previous, f"no change: span {config.span_uri} was already learnt"
    successes, failures, skipped = reward_counts(policy.arms, arms, rewards)
    policy.learn(successes, failures)
    spans.append(
        {
            "span": config.span_uri,
            "manifest_sha256": config.manifest_sha256,
            "rows": len(arms) - skipped,
            "skipped": skipped,
            "successes": successes,
            "failures": failures,
        }
    )
    state = {**policy.state(), "spans": spans}
    means = ", ".join(
        f"arm {k}: {a / (a + b):.4f}"
        for k, (a, b) in enumerate(zip(policy.alpha, policy.beta, strict=True))
    )
    line = (
        f"learnt {config.span_uri}: {len(arms) - skipped} rewards ({skipped} skipped); "
        f"posterior means {means}"
    )
    return state, line


def run(argv: list[str] | None = None) -> int:
    """Reads the span, updates the posterior state, prints one line; returns the exit status."""
    try:
        config = resolve(parse_args(argv))
        arms, rewards = span_rewards(config.example_files, config.label)
    except UpdateError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    state, line = update(config, arms, rewards)
    if line.startswith("no change"):
        print(f"{PROG}: {line}")
        return 0
    try:
        storage.replace_if_unchanged(config.state_path, config.state_bytes, storage.dumps(state))
    except storage.ConcurrentUpdate as e:
        print(f"{PROG}: no change: {e}", file=sys.stderr)
        return 1
    print(f"{PROG}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
