"""The promotion gate's decision rule."""

from digitops.release.promote import decide

CHAMPION = {
    "test_accuracy": 0.9950,
    "realworld_accuracy": 0.98,
    "holdout_accuracy": 0.80,
    "test_ece": 0.004,
    "ood_auroc": 0.99,
}
TOLERANCES = {"tolerance_pp": 0.1, "ece_tolerance": 0.005, "auroc_tolerance": 0.01}


def candidate(**scores) -> dict:
    return {**CHAMPION, **scores}


def test_first_model_is_promoted():
    assert decide(candidate(holdout_accuracy=None), None, TOLERANCES) == (True, "no champion yet")


def test_small_mnist_drop_within_tolerance_is_accepted():
    promoted, reason = decide(candidate(test_accuracy=0.9942), CHAMPION, TOLERANCES)
    assert promoted and "ECE 0.40% vs 0.40%" in reason, reason


def test_mnist_drop_beyond_tolerance_is_rejected_with_reason():
    promoted, reason = decide(
        candidate(test_accuracy=0.9930, holdout_accuracy=0.99), CHAMPION, TOLERANCES
    )
    assert not promoted and "0.20 pp below" in reason


def test_worse_feedback_holdout_is_rejected():
    promoted, reason = decide(
        candidate(test_accuracy=0.9960, holdout_accuracy=0.75), CHAMPION, TOLERANCES
    )
    assert not promoted and "hold-out" in reason


def test_no_holdout_yet_compares_mnist_only():
    promoted, _ = decide(
        candidate(holdout_accuracy=None), {**CHAMPION, "holdout_accuracy": None}, TOLERANCES
    )
    assert promoted


def test_worse_calibration_beyond_tolerance_is_rejected_with_reason():
    promoted, reason = decide(candidate(test_ece=0.0095), CHAMPION, TOLERANCES)
    assert promoted is False and "calibration error 0.95%" in reason and "0.40%" in reason
    assert decide(candidate(test_ece=0.0085), CHAMPION, TOLERANCES)[0]


def test_worse_not_a_digit_auroc_beyond_tolerance_is_rejected_with_reason():
    promoted, reason = decide(candidate(ood_auroc=0.975), CHAMPION, TOLERANCES)
    assert promoted is False and "not-a-digit AUROC 0.9750" in reason
    assert decide(candidate(ood_auroc=0.985), CHAMPION, TOLERANCES)[0]


def test_a_champion_from_before_calibration_is_compared_on_accuracy():
    old = {**CHAMPION, "test_ece": None, "ood_auroc": None}
    promoted, reason = decide(candidate(test_ece=0.05, ood_auroc=0.5), old, TOLERANCES)
    assert promoted and "vs n/a" in reason


def test_worse_real_world_accuracy_beyond_tolerance_is_rejected_with_reason():
    promoted, reason = decide(candidate(realworld_accuracy=0.978), CHAMPION, TOLERANCES)
    assert promoted is False and "real-world accuracy 97.80% is 0.20 pp below" in reason
    assert decide(candidate(realworld_accuracy=0.9795), CHAMPION, TOLERANCES)[0]
