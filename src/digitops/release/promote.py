"""Gated promotion: the candidate gets the registry alias only if it is not worse than the
champion, or, before there is one, than the shipped model that is being served."""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from digitops import checkpoint, scoring
from digitops.data import feedback, mnist, notdigits
from digitops.release.evaluate import load_evalsets, score
from digitops.tracking import Tracking

log = logging.getLogger(__name__)


def decide(candidate: dict, champion: dict | None, tolerances: dict) -> tuple[bool, str]:
    """Compare scores measured on the same data: {'test_accuracy', 'realworld_accuracy',
    'holdout_accuracy', 'test_ece', 'ood_auroc'}; `tolerances`: how much worse the candidate
    may be on MNIST test and real-world accuracy (`tolerance_pp`, points), ECE
    (`ece_tolerance`) and OOD AUROC (`auroc_tolerance`)."""
    if champion is None:
        return True, "no champion yet"
    # Real-world digits too: a candidate better on MNIST must not be worse on what users send
    # (a champion from before they were scored has no figure for them).
    for name, key in (("MNIST test", "test_accuracy"), ("real-world", "realworld_accuracy")):
        if champion.get(key) is None:
            continue
        drop_pp = (champion[key] - candidate[key]) * 100
        if drop_pp > tolerances["tolerance_pp"]:
            return False, (
                f"{name} accuracy {candidate[key]:.2%} is {drop_pp:.2f} pp below the "
                f"champion's {champion[key]:.2%} (tolerance {tolerances['tolerance_pp']} pp)"
            )
    cand_h, champ_h = candidate.get("holdout_accuracy"), champion.get("holdout_accuracy")
    if cand_h is not None and champ_h is not None and cand_h < champ_h:
        return (
            False,
            f"feedback hold-out accuracy {cand_h:.2%} is below the champion's {champ_h:.2%}",
        )
    # A champion trained before calibration existed has no ECE or AUROC to compare with.
    if champion.get("test_ece") is not None:
        worse = candidate["test_ece"] - champion["test_ece"]
        if worse > tolerances["ece_tolerance"]:
            return False, (
                f"MNIST test calibration error {candidate['test_ece']:.2%} is worse than the "
                f"champion's {champion['test_ece']:.2%} (tolerance {tolerances['ece_tolerance']})"
            )
    if champion.get("ood_auroc") is not None:
        worse = champion["ood_auroc"] - candidate["ood_auroc"]
        if worse > tolerances["auroc_tolerance"]:
            return False, (
                f"not-a-digit AUROC {candidate['ood_auroc']:.4f} is below the champion's "
                f"{champion['ood_auroc']:.4f} (tolerance {tolerances['auroc_tolerance']})"
            )
    return True, (
        f"MNIST test {candidate['test_accuracy']:.4%} vs champion "
        f"{champion['test_accuracy']:.4%}; real-world {candidate['realworld_accuracy']:.2%} vs "
        f"{_maybe(champion.get('realworld_accuracy'), '.2%')}; hold-out "
        f"{'n/a' if cand_h is None else f'{cand_h:.2%}'} vs "
        f"{'n/a' if champ_h is None else f'{champ_h:.2%}'}; ECE "
        f"{candidate['test_ece']:.2%} vs {_maybe(champion.get('test_ece'), '.2%')}; "
        f"not-a-digit AUROC {candidate['ood_auroc']:.4f} vs "
        f"{_maybe(champion.get('ood_auroc'), '.4f')}"
    )


def _maybe(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _scores(path: Path, test: tuple, holdout: tuple, digits: dict, others: dict) -> dict:
    """A checkpoint's scores on the gate's data; ECE and AUROC only if it has a scoring."""
    model, metadata = checkpoint.load(path)
    fitted = metadata.get("scoring")
    realworld = (digits["pixels"], digits["labels"])
    if fitted is None:  # trained before calibration existed: accuracy only (argmax of logits)
        t, r, h = (
            score(scoring.softmax(scoring.outputs(model, x)["logits"]), y)
            for x, y in (test, realworld, holdout)
        )
        return {"test_accuracy": t["accuracy"], "realworld_accuracy": r["accuracy"],
                "holdout_accuracy": h["accuracy"], "holdout_count": h["count"],
                "test_ece": None, "ood_auroc": None}  # fmt: skip
    on_test = scoring.answers(model, fitted, test[0])
    on_holdout = scoring.answers(model, fitted, holdout[0])
    on_others = scoring.answers(model, fitted, others["pixels"])
    judged = others["categories"] != notdigits.MULTI_DIGIT
    h = score(on_holdout["probabilities"], holdout[1])
    return {
        "test_accuracy": score(on_test["probabilities"], test[1])["accuracy"],
        "realworld_accuracy": score(
            scoring.answers(model, fitted, realworld[0])["probabilities"], realworld[1]
        )["accuracy"],
        "holdout_accuracy": h["accuracy"],
        "holdout_count": h["count"],
        "test_ece": scoring.calibration(on_test["probabilities"], test[1])["ece"],
        "ood_auroc": scoring.auroc(on_test["typicality"], on_others["typicality"][judged]),
    }


def promote(cfg) -> dict:
    """The `promote` stage: re-score the incumbent and the candidate on today's data; move the
    alias?"""
    alias = cfg.promotion.alias
    tracking = Tracking.from_config(cfg)
    tracking.check()
    _, meta = checkpoint.load(cfg.paths.candidate)
    version = meta.get("registered_version")
    if version is None:
        raise RuntimeError(
            f"{cfg.paths.candidate} was not registered (no MLflow run); nothing to promote"
        )

    test = mnist.load(Path(cfg.paths.mnist), "t10k")
    holdout = feedback.load(Path(cfg.paths.feedback), split="holdout")
    digits, others = load_evalsets(Path(cfg.paths.evalsets))
    candidate = _scores(Path(cfg.paths.candidate), test, holdout, digits, others)
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
            champion = _scores(incumbent_path, test, holdout, digits, others) if incumbent else None
            promoted, reason = decide(candidate, champion, cfg.promotion)

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
        "tolerances": {k: v for k, v in cfg.promotion.items() if k != "alias"},
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
