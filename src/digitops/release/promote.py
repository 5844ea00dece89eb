"""Gated promotion: the candidate gets the registry alias only if it is not worse than the
champion, or, before there is one, than the shipped model that is being served."""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from digitops import checkpoint
from digitops.data import feedback, mnist
from digitops.release.evaluate import predict_proba, score
from digitops.tracking import Tracking

log = logging.getLogger(__name__)


def decide(candidate: dict, champion: dict | None, tolerance_pp: float) -> tuple[bool, str]:
    """Compare scores measured on the same data: {'test_accuracy', 'holdout_accuracy'}."""
    if champion is None:
        return True, "no champion yet"
    drop_pp = (champion["test_accuracy"] - candidate["test_accuracy"]) * 100
    if drop_pp > tolerance_pp:
        return False, (
            f"MNIST test accuracy {candidate['test_accuracy']:.4%} is {drop_pp:.2f} pp "
            f"below the champion's {champion['test_accuracy']:.4%} "
            f"(tolerance {tolerance_pp} pp)"
        )
    cand_h, champ_h = candidate.get("holdout_accuracy"), champion.get("holdout_accuracy")
    if cand_h is not None and champ_h is not None and cand_h < champ_h:
        return (
            False,
            f"feedback hold-out accuracy {cand_h:.2%} is below the champion's {champ_h:.2%}",
        )
    return True, (
        f"MNIST test {candidate['test_accuracy']:.4%} vs champion "
        f"{champion['test_accuracy']:.4%}; hold-out "
        f"{'n/a' if cand_h is None else f'{cand_h:.2%}'} vs "
        f"{'n/a' if champ_h is None else f'{champ_h:.2%}'}"
    )


def _scores(model, test: tuple, holdout: tuple) -> dict:
    t = score(predict_proba(model, test[0]), test[1])
    h = score(predict_proba(model, holdout[0]), holdout[1])
    return {
        "test_accuracy": t["accuracy"],
        "holdout_accuracy": h["accuracy"],
        "holdout_count": h["count"],
    }


def promote(cfg) -> dict:
    """The `promote` stage: re-score the incumbent and the candidate on today's data; move the
    alias?"""
    alias = cfg.promotion.alias
    tracking = Tracking.from_config(cfg)
    tracking.check()
    candidate_model, meta = checkpoint.load(cfg.paths.candidate)
    version = meta.get("registered_version")
    if version is None:
        raise RuntimeError(
            f"{cfg.paths.candidate} was not registered (no MLflow run); nothing to promote"
        )

    test = mnist.load(Path(cfg.paths.mnist), "t10k")
    holdout = feedback.load(Path(cfg.paths.feedback), split="holdout")
    candidate = _scores(candidate_model, test, holdout)
    shipped = Path(cfg.paths.shipped_model)
    with tempfile.TemporaryDirectory() as tmp:
        holder = tracking.aliased(alias, Path(tmp))
        if holder is not None:
            incumbent, incumbent_path = f"champion v{holder.version}", holder.path
        elif shipped.is_file():
            # No champion in the registry yet: the model being served is the one to beat.
            incumbent, incumbent_path = f"shipped model {shipped}", shipped
        else:
            incumbent, incumbent_path = None, None
        if holder is not None and holder.version == version:
            champion, promoted, reason = None, True, "candidate already is the champion"
        else:
            champion = (
                _scores(checkpoint.load(incumbent_path)[0], test, holdout) if incumbent else None
            )
            promoted, reason = decide(candidate, champion, cfg.promotion.tolerance_pp)

    if promoted:
        tracking.set_alias(alias, version)
    decision = {
        "promoted": promoted,
        "reason": reason,
        "candidate_version": version,
        "champion_version": holder.version if holder is not None else None,
        "incumbent": incumbent,  # what `champion` scored: the registry's or the shipped model
        "serving_version": version if promoted else (holder.version if holder else None),
        "candidate": candidate,
        "champion": champion,
        "tolerance_pp": cfg.promotion.tolerance_pp,
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tags = {
        "promotion.decision": "promoted" if promoted else "rejected",
        "promotion.reason": reason,
        "promotion.candidate": json.dumps(candidate),
        "promotion.champion": json.dumps(champion),
    }
    tracking.tag_version(version, tags)
    path = Path(cfg.paths.promotion)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(decision, indent=2) + "\n")
    log.info("%s version %s: %s", "promoted" if promoted else "rejected", version, reason)
    return decision
