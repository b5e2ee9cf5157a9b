"""How close can any model get to the simulator's ground truth? The AUC ceiling of the demo.

    python -m bench.auc_ceiling                 # 5 simulations the size of `make demo`'s cycle 1
    python -m bench.auc_ceiling --days 6 --simulations 3

The demo compares its model's AUC on the sent eval rows with the AUC of the hidden click
probability on the same rows. That probability holds a per-user taste and favourite topic. The
notify blueprint logs them (the product's profile of the user: ``click_rate_90d``,
``favourite_topic``, ``favourite_topic_match``), so its ceiling is the truth itself. A blueprint
without those features leaves a model to infer them from each user's own rows, and then the
ground truth is not reachable: this measures by how much. It prints, per simulation (3 days x
4000 decisions by default, seeds like the demo's days, every notification sent as before a
first model), on the eval rows (a stable 20% of decision ids):

* ``truth``: the AUC of the hidden click probability;
* ``bayes``: the AUC of the Bayes-optimal predictor given the training rows: it knows the
  simulator's true coefficients, and averages over each user's taste and favourite topic
  under their posterior given that user's training rows (exact, on a grid): no model trained on
  these rows can expect to do better;
* ``no_user``: the hidden probability without the per-user parts;

with the gap truth - bayes and its paired (DeLong) standard error. Labels are drawn from each
decision's true probability of a click within the label window, seeded by its decision id.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
DAY_MS = 86_400_000


def delong(labels, *scores) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs, their covariance matrix) of several scorers on the same rows (DeLong et al.)."""
    y = np.asarray(labels, dtype=bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    v10, v01 = [], []
    for s in scores:
        s = np.asarray(s, dtype=float)
        wins = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        v10.append(wins.mean(axis=1))
        v01.append(wins.mean(axis=0))
    aucs = np.array([v.mean() for v in v10])
    return aucs, np.cov(np.array(v10)) / len(pos) + np.cov(np.array(v01)) / len(neg)


def simulate(blueprint, seed: int, days: int, decisions_per_day: int, workdir: Path) -> list:
    """(features, true p_click, label, is_eval) of every decision, one simulated day per seed."""
    from loopline.simulate import FaultRates, Simulator, read_decisions

    rows = []
    for day in range(days):
        out = workdir / f"{seed}-{day}"
        Simulator(blueprint, seed=seed + day, faults=FaultRates(0, 0, 0)).run(
            out, decisions=decisions_per_day, days=1, start_ms=START_MS + day * DAY_MS
        )
        truth = {}
        for line in (out / "truth.jsonl").read_text(encoding="utf-8").splitlines():
            t = json.loads(line)
            truth[t["decision_id"]] = t
        decisions, _ = read_decisions(str(out / "decisions-*.jsonl"), blueprint)
        for d in decisions:
            t = truth[d.decision_id]
            label = random.Random(f"label/{d.decision_id}").random() < t["probability"]
            digest = hashlib.sha256(d.decision_id.encode()).digest()
            rows.append((d.features, t["p_click"], label, digest[0] < 0.2 * 256))
    return rows


def bayes_scores(response, train: list, evaluation: list) -> list[float]:
    """E[p_click] of each eval row under the posterior of its user's taste and favourite topic."""
    from loopline.simulate import TASTE_SD, TOPICS, DelayModel

    topics = sorted(TOPICS)
    grid = np.linspace(-3, 3, 61)
    prior = np.exp(-0.5 * grid**2)
    prior /= prior.sum()
    in_window = DelayModel().share_within(response.blueprint.label.window_ms)

    def logits(features) -> np.ndarray:  # [taste grid, favourite topic]
        base = response.logit({**features, "user_id": None})
        lift = np.array([response.FAVOURITE_LIFT * (t in features["topics"]) for t in topics])
        return base + TASTE_SD * grid[:, None] + lift[None, :]

    loglik: dict = defaultdict(lambda: np.zeros((len(grid), len(topics))))
    for features, _, label, _ in train:
        p = in_window / (1 + np.exp(-logits(features)))
        loglik[features["user_id"]] += np.log(p) if label else np.log1p(-p)
    scores = []
    for features, *_ in evaluation:
        ll = loglik[features["user_id"]]
        w = np.exp(ll - ll.max()) * prior[:, None]
        scores.append(float((w / w.sum() / (1 + np.exp(-logits(features)))).sum()))
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auc_ceiling", description=__doc__)
    parser.add_argument("--simulations", type=int, default=5)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--decisions_per_day", type=int, default=4000)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from loopline.blueprint import load_blueprint
    from loopline.simulate import ResponseModel

    blueprint = load_blueprint(REPO / "examples" / "notify.yaml")
    response = ResponseModel(blueprint)
    gaps = []
    with tempfile.TemporaryDirectory() as workdir:
        for i in range(args.simulations):
            rows = simulate(blueprint, 100 * i, args.days, args.decisions_per_day, Path(workdir))
            train = [r for r in rows if not r[3]]
            evaluation = [r for r in rows if r[3]]
            labels = [r[2] for r in evaluation]
            no_user = [response.logit({**r[0], "user_id": None}) for r in evaluation]
            aucs, cov = delong(
                labels,
                [r[1] for r in evaluation],
                bayes_scores(response, train, evaluation),
                no_user,
            )
            se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
            gaps.append(aucs[0] - aucs[1])
            print(
                f"simulation {i}: {len(evaluation)} eval rows, {sum(labels)} clicks: "
                f"truth {aucs[0]:.4f}  bayes {aucs[1]:.4f}  no_user {aucs[2]:.4f}  "
                f"gap truth-bayes {gaps[-1]:.4f} (paired SE {se:.4f})",
                flush=True,
            )
    sd = float(np.std(gaps, ddof=1)) if len(gaps) > 1 else float("nan")
    print(f"mean gap truth-bayes {np.mean(gaps):.4f} (sd over simulations {sd:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
