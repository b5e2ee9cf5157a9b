"""Decision policies: from a model's score to a decision, with the propensity that was used.

A policy is what a product (through the decision client) or bulk scoring applies to a score.
Every choice is logged with the probability the policy gave the chosen decision, so later
off-policy evaluation (inverse propensity scoring) can weigh it.

Randomness is derived from ``(seed, decision_id)`` through a hash, never from a shared random
stream: the same decision gets the same choice whatever order, thread or Beam worker decides it.

    >>> policy = EpsilonGreedyPolicy(threshold=0.5, epsilon=0.1, seed=7)
    >>> policy.choose(0.8, "d-1")
    Choice(decision=1, propensity=0.95, explored=False)

Blueprint ``policy`` section (``type`` defaults to ``threshold``)::

    policy: {type: threshold, threshold: 0.5, fallback: 1}
    policy: {type: epsilon_greedy, threshold: 0.5, epsilon: 0.05, seed: 7}
    policy: {type: top_k, k: 3, group_feature: user_id}
    policy: {type: thompson, arms: 2, prior: [1, 1], draws: 2000, seed: 7,
             posterior: gs://bucket/notify/thompson.json}

A Thompson policy's ``posterior`` is the state file ``python -m pipelines.update_bandit`` keeps
up to date from joined spans (``ThompsonSampling.state``); the policy starts from it when it
exists, from the prior when no span has been learnt yet.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

POLICY_TYPES = ("threshold", "epsilon_greedy", "top_k", "thompson")


@dataclass(frozen=True)
class Choice:
    """A decision, the probability the policy gave it, and whether it was exploration."""

    decision: int
    propensity: float
    explored: bool


class PolicyError(ValueError):
    """A blueprint ``policy`` section that cannot be used, in one sentence."""


def unit_uniform(seed: int, decision_id: str, salt: str = "") -> float:
    """A uniform number in [0, 1) fixed by ``(seed, decision_id, salt)``.

    Hash-derived so that it does not depend on call order, process or platform.

        >>> unit_uniform(7, "d-1") == unit_uniform(7, "d-1")
        True
    """
    digest = hashlib.blake2b(f"{seed}\x1f{decision_id}\x1f{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class Policy(ABC):
    """Turns a score into a ``Choice``; deterministic for ``(seed, decision_id)``."""

    @abstractmethod
    def choose(self, score: float, decision_id: str) -> Choice:
        """The decision for one scored decision."""

    def choose_many(self, scores: Sequence[float], decision_ids: Sequence[str]) -> list[Choice]:
        """``choose`` over a batch, in order (bulk scoring calls this once per batch)."""
        return [self.choose(s, d) for s, d in zip(scores, decision_ids, strict=True)]

    def describe(self) -> dict:
        """The policy's settings, for manifests and logs."""
        return {"type": type(self).__name__}


class ThresholdPolicy(Policy):
    """Decision 1 when ``score >= threshold``, else 0; always with propensity 1.

    >>> ThresholdPolicy(0.5).choose(0.5, "d-1").decision
    1
    """

    def __init__(self, threshold: float = 0.5):
        self.threshold = float(threshold)

    def greedy(self, score: float) -> int:
        return 1 if score >= self.threshold else 0

    def choose(self, score: float, decision_id: str) -> Choice:
        return Choice(self.greedy(score), 1.0, False)

    def describe(self) -> dict:
        return {"type": "threshold", "threshold": self.threshold}


class EpsilonGreedyPolicy(ThresholdPolicy):
    """The threshold decision, except with probability ``epsilon`` a uniform pick over {0, 1}.

    The logged propensity is the probability of the chosen decision under this policy:
    ``1 - epsilon + epsilon / 2`` for the greedy decision and ``epsilon / 2`` for the other,
    whether or not this particular choice came from exploring.

        >>> EpsilonGreedyPolicy(0.5, epsilon=0.2, seed=1).choose(0.9, "d-1").propensity
        0.9
    """

    def __init__(self, threshold: float = 0.5, epsilon: float = 0.05, seed: int = 0):
        super().__init__(threshold)
        if not 0 <= epsilon <= 1:
            raise PolicyError(f"policy.epsilon must be in [0, 1], got {epsilon!r}")
        self.epsilon = float(epsilon)
        self.seed = int(seed)

    def choose(self, score: float, decision_id: str) -> Choice:
        greedy = self.greedy(score)
        u = unit_uniform(self.seed, decision_id, "epsilon")
        # One uniform splits [0, 1): [0, eps/2) explores 0, [eps/2, eps) explores 1, else greedy.
        explored = u < self.epsilon
        decision = (0 if u < self.epsilon / 2 else 1) if explored else greedy
        propensity = 1.0 - self.epsilon / 2 if decision == greedy else self.epsilon / 2
        return Choice(decision, propensity, explored)

    def describe(self) -> dict:
        return {
            "type": "epsilon_greedy",
            "threshold": self.threshold,
            "epsilon": self.epsilon,
            "seed": self.seed,
        }


class TopKPolicy(Policy):
    """Decision 1 for the ``k`` highest scores within a group, 0 for the rest.

    Exact and deterministic: ties in score go to the smaller ``decision_id``. Groups are formed
    by the caller (bulk scoring groups by the feature ``group_feature``). A decision scored
    alone is a group of one, so ``choose`` selects it whenever ``k >= 1``.

        >>> [c.decision for c in TopKPolicy(k=1).choose_group([("a", 0.2), ("b", 0.7)])]
        [0, 1]
    """

    def __init__(self, k: int = 1, group_feature: str | None = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise PolicyError(f"policy.k must be a non-negative integer, got {k!r}")
        self.k = k
        self.group_feature = group_feature

    def choose(self, score: float, decision_id: str) -> Choice:
        return self.choose_group([(decision_id, score)])[0]

    def choose_group(self, scored: Sequence[tuple[str, float]]) -> list[Choice]:
        """One Choice per ``(decision_id, score)``, in the order given."""
        ranked = sorted(range(len(scored)), key=lambda i: (-scored[i][1], scored[i][0]))
        chosen = set(ranked[: self.k])
        return [Choice(1 if i in chosen else 0, 1.0, False) for i in range(len(scored))]

    def describe(self) -> dict:
        return {"type": "top_k", "k": self.k, "group_feature": self.group_feature}


class ThompsonSampling(Policy):
    """Thompson sampling over arms ``0 .. arms-1`` with Beta posteriors on a [0, 1] reward.

    ``choose`` samples an arm with the probability that it is the best under the current
    posteriors. That probability is estimated with ``draws`` Monte Carlo draws whose generator
    is fixed by the seed and the posterior state, so the estimate is deterministic, and the arm
    is then picked by inverse CDF with the decision's own hash-derived uniform: the logged
    propensity is exactly the probability with which this policy picks that arm. The score is
    not used (the arms are context-free); ``explored`` marks an arm other than the one with the
    best posterior mean.

        >>> ts = ThompsonSampling(arms=2, seed=3)
        >>> for _ in range(50): ts.update(1, 1.0); ts.update(0, 0.0)
        >>> ts.choose(0.0, "d-1").decision
        1
    """

    def __init__(
        self, arms: int = 2, prior: Sequence[float] = (1.0, 1.0), draws: int = 2000, seed: int = 0
    ):
        if isinstance(arms, bool) or not isinstance(arms, int) or arms < 1:
            raise PolicyError(f"policy.arms must be a positive integer, got {arms!r}")
        if len(prior) != 2 or min(prior) <= 0:
            raise PolicyError(
                f"policy.prior must be two positive numbers [alpha, beta], got {prior!r}"
            )
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise PolicyError(f"policy.draws must be a positive integer, got {draws!r}")
        self.arms = arms
        self.draws = draws
        self.seed = int(seed)
        self.alpha = [float(prior[0])] * arms
        self.beta = [float(prior[1])] * arms
        self._cached: tuple[tuple, np.ndarray] | None = None

    def update(self, arm: int, reward: float) -> None:
        """Adds one observed reward in [0, 1] for ``arm`` to its posterior."""
        if not 0 <= arm < self.arms:
            raise ValueError(f"arm must be in 0..{self.arms - 1}, got {arm!r}")
        if not 0 <= reward <= 1:
            raise ValueError(f"reward must be in [0, 1], got {reward!r}")
        self.alpha[arm] += reward
        self.beta[arm] += 1.0 - reward

    def learn(self, successes: Sequence[float], failures: Sequence[float]) -> None:
        """Adds each arm's summed rewards and summed (1 - reward)s (``reward_counts``)."""
        if len(successes) != self.arms or len(failures) != self.arms:
            raise ValueError(f"counts for {self.arms} arms are needed")
        for arm in range(self.arms):
            self.alpha[arm] += float(successes[arm])
            self.beta[arm] += float(failures[arm])

    def state(self) -> dict:
        """The posterior as a JSON-able document: ``{"arms", "alpha", "beta"}``."""
        return {"arms": self.arms, "alpha": list(self.alpha), "beta": list(self.beta)}

    def load_state(self, state: dict) -> ThompsonSampling:
        """Replaces the posterior with ``state`` (as ``state()`` writes it); returns self.

        PolicyError when it is for another number of arms or is not a posterior."""
        alpha, beta = state.get("alpha"), state.get("beta")
        if state.get("arms") != self.arms or not _posterior_side(alpha, self.arms):
            raise PolicyError(f"a posterior state for {self.arms} arms is needed, got {state!r}")
        if not _posterior_side(beta, self.arms):
            raise PolicyError(f"a posterior state for {self.arms} arms is needed, got {state!r}")
        self.alpha = [float(a) for a in alpha]
        self.beta = [float(b) for b in beta]
        return self

    def arm_probabilities(self) -> np.ndarray:
        """P(arm is best) under the posteriors, estimated with ``draws`` seeded draws."""
        state = (tuple(self.alpha), tuple(self.beta))
        if self._cached is None or self._cached[0] != state:
            digest = hashlib.blake2b(repr((self.seed, state)).encode(), digest_size=8).digest()
            rng = np.random.default_rng(int.from_bytes(digest, "big"))
            samples = rng.beta(self.alpha, self.beta, size=(self.draws, self.arms))
            wins = np.bincount(samples.argmax(axis=1), minlength=self.arms)
            self._cached = (state, wins / self.draws)
        return self._cached[1]

    def choose(self, score: float, decision_id: str) -> Choice:
        probabilities = self.arm_probabilities()
        u = unit_uniform(self.seed, decision_id, "thompson")
        cumulative = np.cumsum(probabilities)
        arm = int(min(np.searchsorted(cumulative, u, side="right"), self.arms - 1))
        while probabilities[arm] == 0:  # float round-off at the top end of the CDF
            arm -= 1
        means = [a / (a + b) for a, b in zip(self.alpha, self.beta, strict=True)]
        best = int(np.argmax(means))
        return Choice(arm, float(probabilities[arm]), arm != best)

    def describe(self) -> dict:
        return {
            "type": "thompson",
            "arms": self.arms,
            "draws": self.draws,
            "seed": self.seed,
            "alpha": list(self.alpha),
            "beta": list(self.beta),
        }


class FallbackPolicy(Policy):
    """The blueprint's fallback decision with propensity 1, used while no model exists.

    >>> FallbackPolicy(1).choose(float("nan"), "d-1")
    Choice(decision=1, propensity=1.0, explored=False)
    """

    def __init__(self, decision: Any = 0):
        self.decision = decision

    @classmethod
    def from_blueprint(cls, blueprint) -> FallbackPolicy:
        return cls(blueprint.fallback_decision)

    def choose(self, score: float, decision_id: str) -> Choice:
        return Choice(self.decision, 1.0, False)

    def describe(self) -> dict:
        return {"type": "fallback", "decision": self.decision}


def reward_counts(
    arms: int, chosen: Sequence[int], rewards: Sequence[float]
) -> tuple[list[float], list[float], int]:
    """(successes per arm, failures per arm, rows skipped) from logged outcomes: row ``i`` chose
    arm ``chosen[i]`` and earned ``rewards[i]`` in [0, 1] (a clicked label: 0 or 1).

    A pure function over a span's columns (``pipelines.update_bandit`` reads them): a row whose
    arm is not one of the policy's (an absent decision, -1) or whose reward is not in [0, 1] is
    skipped and counted, never guessed.

        >>> reward_counts(2, [0, 1, 1, -1], [1, 0, 1, 1])
        ([1.0, 1.0], [0.0, 1.0], 1)
    """
    successes, failures, skipped = [0.0] * arms, [0.0] * arms, 0
    for arm, reward in zip(chosen, rewards, strict=True):
        reward = float(reward)
        if not (0 <= arm < arms) or not 0.0 <= reward <= 1.0:
            skipped += 1
            continue
        successes[int(arm)] += reward
        failures[int(arm)] += 1.0 - reward
    return successes, failures, skipped


def policy_from_blueprint(blueprint, seed: int | None = None) -> Policy:
    """The policy a blueprint's ``policy`` section describes.

    ``seed`` overrides ``policy.seed`` (default 0). Raises PolicyError naming the field. A
    Thompson policy with a ``posterior`` path starts from the state stored there (through
    loopline.storage, so local or ``gs://``), from its prior while there is none yet.

        >>> policy_from_blueprint(load_blueprint("examples/notify.yaml")).describe()["type"]
        'epsilon_greedy'
    """
    config = dict(blueprint.policy or {})
    kind = config.get("type", "threshold")
    if seed is None:
        seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PolicyError(f"policy.seed must be an integer, got {seed!r}")
    known = {
        "threshold": {"threshold"},
        "epsilon_greedy": {"threshold", "epsilon"},
        "top_k": {"k", "group_feature"},
        "thompson": {"arms", "prior", "draws", "posterior"},
    }
    if kind not in known:
        raise PolicyError(f"policy.type must be one of {', '.join(POLICY_TYPES)}, got {kind!r}")
    extra = set(config) - known[kind] - {"type", "seed", "fallback", "description"}
    if extra:
        raise PolicyError(f"policy keys {sorted(extra)} are not used by a {kind} policy")
    threshold = config.get("threshold", 0.5)
    if kind in ("threshold", "epsilon_greedy") and not _is_probability(threshold):
        raise PolicyError(f"policy.threshold must be a number, got {threshold!r}")
    if kind == "threshold":
        return ThresholdPolicy(threshold)
    if kind == "epsilon_greedy":
        epsilon = config.get("epsilon", 0.05)
        if not _is_probability(epsilon):
            raise PolicyError(f"policy.epsilon must be a number in [0, 1], got {epsilon!r}")
        return EpsilonGreedyPolicy(threshold, epsilon, seed)
    if kind == "top_k":
        group = config.get("group_feature")
        if group is not None and group not in blueprint.feature_names:
            raise PolicyError(f"policy.group_feature {group!r} is not a feature of the blueprint")
        return TopKPolicy(config.get("k", 1), group)
    thompson = ThompsonSampling(
        config.get("arms", 2),
        tuple(config.get("prior", (1.0, 1.0))),
        config.get("draws", 2000),
        seed,
    )
    posterior = config.get("posterior")
    if posterior is None:
        return thompson
    if not isinstance(posterior, str) or not posterior:
        raise PolicyError(f"policy.posterior must be a path, got {posterior!r}")
    from loopline import storage

    data = storage.read_if_exists(posterior)
    if data is None:
        return thompson
    try:
        return thompson.load_state(json.loads(data))
    except (ValueError, AttributeError) as e:
        raise PolicyError(f"policy.posterior {posterior} is not a posterior state ({e})") from None


def _posterior_side(values: Any, arms: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == arms
        and all(_is_number(v) and v > 0 for v in values)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_probability(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= 1
    )
