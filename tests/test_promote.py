"""The promotion gate's decision rule."""

from digitops.release.promote import decide

CHAMPION = {"test_accuracy": 0.9950, "holdout_accuracy": 0.80}


def test_first_model_is_promoted():
    assert decide({"test_accuracy": 0.9, "holdout_accuracy": None}, None, 0.1) == (
        True,
        "no champion yet",
    )


def test_small_mnist_drop_within_tolerance_is_accepted():
    promoted, _ = decide({"test_accuracy": 0.9942, "holdout_accuracy": 0.95}, CHAMPION, 0.1)
    assert promoted


def test_mnist_drop_beyond_tolerance_is_rejected_with_reason():
    promoted, reason = decide({"test_accuracy": 0.9930, "holdout_accuracy": 0.99}, CHAMPION, 0.1)
    assert not promoted and "0.20 pp below" in reason


def test_worse_feedback_holdout_is_rejected():
    promoted, reason = decide({"test_accuracy": 0.9960, "holdout_accuracy": 0.75}, CHAMPION, 0.1)
    assert not promoted and "hold-out" in reason


def test_no_holdout_yet_compares_mnist_only():
    promoted, _ = decide(
        {"test_accuracy": 0.9950, "holdout_accuracy": None},
        {"test_accuracy": 0.9950, "holdout_accuracy": None},
        0.1,
    )
    assert promoted
