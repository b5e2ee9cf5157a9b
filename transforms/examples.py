"""The join's training examples (DESIGN.md, "Join outputs"): a joined decision as a tf.Example.

Each example holds the decision-time features exactly as serving encodes them (the feature
encoding is ``loopline.examples``, shared with bulk scoring and the product-side scorer, so
training and serving cannot drift apart), the label, the join's own columns and the decision's
provenance. ``joined_to_example`` encodes one; ``joined_to_examples`` a batch, column by column
through the same Arrow path as ``loopline.examples.features_to_examples``, and parses to the
same examples.

    >>> example = joined_to_example(joined, blueprint, key)   # key: loopline.examples.pii_key
    >>> example.features.feature["join_status"].bytes_list.value
    [b'observed']
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from loopline.blueprint import Blueprint
from loopline.events import DecisionEvent
from loopline.examples import add_features, encode_columns, feature_columns, list_array
from transforms.join import JoinedDecision

# Decision provenance in every example, typed, with these values when the decision did not
# carry one (see joined_to_example).
NO_DECISION = -1
NO_PROPENSITY = -1.0
NO_ARM = ""
NO_MODEL_ID = ""
_INT64 = (-(2**63), 2**63 - 1)


def provenance(decision: DecisionEvent) -> tuple[int, float, str, str]:
    """``(decision, propensity, arm, model_id)`` of a decision, absent ones as the sentinels."""
    value = decision.decision
    if isinstance(value, bool):
        value = int(value)
    if not (isinstance(value, int) and _INT64[0] <= value <= _INT64[1]):
        value = NO_DECISION
    propensity = NO_PROPENSITY if decision.propensity is None else float(decision.propensity)
    # ``arm`` is read when the event type carries it (decisions made during a rollout).
    arm = getattr(decision, "arm", None)
    model_id = decision.model_id
    return (
        value,
        propensity,
        NO_ARM if arm is None else str(arm),
        NO_MODEL_ID if model_id is None else str(model_id),
    )


def joined_to_example(
    joined: JoinedDecision, blueprint: Blueprint, key: bytes | None
) -> tf.train.Example:
    """A joined decision as a training example: its features, the label and the join's columns.

    The label sits under ``blueprint.label.name`` (int64 or float by ``label.type``), next to
    ``decision_id`` (bytes), ``decision_time_ms`` (int64), ``join_status`` (bytes),
    ``blueprint_version`` (bytes: the event's, else the blueprint's) and the decision's
    provenance, present in every example with one type whatever the decision carried:

    * ``decision`` (int64): the action taken; ``-1`` (``NO_DECISION``) when the event had none
      or one that is not an integer (decisions are 0/1 or an arm's index, never negative);
    * ``propensity`` (float): the logging policy's probability of that action; ``-1.0``
      (``NO_PROPENSITY``) when absent (a real propensity is in [0, 1]);
    * ``arm`` (bytes): ``production`` / ``challenger`` during a rollout; empty when absent;
    * ``model_id`` (bytes): the model that scored the decision; empty when absent.

    ``joined_to_examples`` encodes many at once and parses to the same examples.
    """
    decision = joined.decision
    example = tf.train.Example()
    feature = example.features.feature
    add_features(feature, decision.features, blueprint, key)
    if blueprint.label.type == "int":
        feature[blueprint.label.name].int64_list.value.append(int(joined.label))
    else:
        feature[blueprint.label.name].float_list.value.append(float(joined.label))
    feature["decision_id"].bytes_list.value.append(decision.decision_id.encode("utf-8"))
    feature["decision_time_ms"].int64_list.value.append(decision.event_time_ms)
    feature["join_status"].bytes_list.value.append(joined.join_status.encode("utf-8"))
    feature["blueprint_version"].bytes_list.value.append(_version(decision, blueprint))
    value, propensity, arm, model_id = provenance(decision)
    feature["decision"].int64_list.value.append(value)
    feature["propensity"].float_list.value.append(propensity)
    feature["arm"].bytes_list.value.append(arm.encode("utf-8"))
    feature["model_id"].bytes_list.value.append(model_id.encode("utf-8"))
    return example


def joined_to_examples(
    joined: Sequence[JoinedDecision], blueprint: Blueprint, key: bytes | None
) -> list[bytes]:
    """Serialized ``joined_to_example`` for many joined decisions at once, column by column.

    Strict like ``features_to_examples``: a row the columnar path cannot take raises for the
    whole batch; ``joined_to_example`` row by row then says which row and why.
    """
    if not joined:
        return []
    decisions = [j.decision for j in joined]
    names, arrays = feature_columns([d.features for d in decisions], blueprint, key)
    label = blueprint.label
    cast = int if label.type == "int" else float
    columns = {
        label.name: ([[cast(j.label)] for j in joined], label.type),
        "decision_id": ([[d.decision_id] for d in decisions], "string"),
        "decision_time_ms": ([[d.event_time_ms] for d in decisions], "int"),
        "join_status": ([[j.join_status] for j in joined], "string"),
        "blueprint_version": ([[_version(d, blueprint)] for d in decisions], "string"),
    }
    provenances = [provenance(d) for d in decisions]
    for i, (name, base) in enumerate(_PROVENANCE_COLUMNS):
        columns[name] = ([[p[i]] for p in provenances], base)
    for name, (lists, base) in columns.items():
        names.append(name)
        arrays.append(list_array(lists, base, name))
    return encode_columns(names, arrays)


_PROVENANCE_COLUMNS = (
    ("decision", "int"),
    ("propensity", "float"),
    ("arm", "string"),
    ("model_id", "string"),
)


def _version(decision: DecisionEvent, blueprint: Blueprint) -> bytes:
    version = (
        decision.blueprint_version if decision.blueprint_version is not None else blueprint.version
    )
    return str(version).encode("utf-8")
