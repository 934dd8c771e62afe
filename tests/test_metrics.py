"""Metrics against values computed by hand (the arithmetic is in the comments)."""

import math

import numpy as np
import pytest

from edge_runtime import metrics as m


# --- AUROC -----------------------------------------------------------------------------

def test_auroc_counts_ordered_pairs():
    # positives {0.35, 0.8}, negatives {0.1, 0.4}: 0.35>0.1, 0.35<0.4, 0.8>both -> 3/4
    assert m.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_auroc_ties_count_one_half():
    # positives {0.5, 0.9}, negatives {0.5, 0.5}: two ties (0.5 each) + 0.9 beats both -> 3/4
    assert m.auroc([0.5, 0.5, 0.5, 0.9], [1, 0, 0, 1]) == pytest.approx(0.75)
    assert m.auroc([0.2] * 6, [1, 0, 1, 0, 0, 1]) == pytest.approx(0.5)


def test_auroc_perfect_inverted_and_undefined():
    assert m.auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert m.auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert math.isnan(m.auroc([0.1, 0.9], [1, 1]))


def test_auroc_matches_brute_force_pair_count():
    rng = np.random.default_rng(7)
    s = rng.integers(0, 5, 200) / 4.0  # many ties on purpose
    y = rng.random(200) < 0.4
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert m.auroc(s, y) == pytest.approx(brute)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        m.auroc([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="0/1"):
        m.auroc([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        m.auroc([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.expected_calibration_error([1.5], [1])


# --- calibration -------------------------------------------------------------------------

def test_ece_by_hand():
    # bin0 {0.05}: acc 0, gap .05 ; bin1 {.15,.15}: acc .5, gap .35 (x2) ; bin9 {.95}: acc 1, gap .05
    # ECE = (1*.05 + 2*.35 + 1*.05) / 4 = 0.2
    assert m.expected_calibration_error([0.05, 0.15, 0.15, 0.95], [0, 1, 0, 1]) == pytest.approx(0.2)


def test_ece_bin_count_is_configurable():
    # one bin: |mean p - accuracy| = |0.325 - 0.5|
    assert m.expected_calibration_error([0.05, 0.15, 0.15, 0.95], [0, 1, 0, 1], n_bins=1) == pytest.approx(0.175)
    with pytest.raises(ValueError, match="n_bins"):
        m.expected_calibration_error([0.5], [1], n_bins=0)


def test_reliability_table_edges():
    table = m.reliability_table([0.1, 1.0, 0.0, 0.55], [1, 1, 0, 0], n_bins=10)
    assert len(table) == 10
    assert [b.count for b in table] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]  # 0.1 opens bin 1, 1.0 closes bin 9
    assert table[9].accuracy == 1.0 and table[9].mean_confidence == 1.0
    assert math.isnan(table[3].accuracy) and table[3].gap == 0.0
    assert table[0].lo == 0.0 and table[9].hi == 1.0


def test_quantile_bins_hold_equal_counts():
    p = np.linspace(0.01, 0.99, 100)
    table = m.reliability_table(p, p > 0.5, n_bins=4, strategy="quantile")
    assert [b.count for b in table] == [25, 25, 25, 25]


def test_perfect_calibration_has_zero_ece():
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert m.expected_calibration_error(p, y) == pytest.approx(0.0)


# --- escalation curve, APGR, CPT --------------------------------------------------------

# ascending confidence: item3 (.1, gain +1), item1 (.2, +1), item2 (.5, -1), item0 (.9, 0)
CONF = [0.9, 0.2, 0.5, 0.1]
LOCAL = [1, 0, 1, 0]  # accuracy .5
CLOUD = [1, 1, 0, 1]  # accuracy .75


def test_escalation_curve_by_hand():
    curve = m.escalation_curve(CONF, LOCAL, CLOUD)
    assert curve.rates.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert curve.accuracy.tolist() == pytest.approx([0.5, 0.75, 1.0, 0.75, 0.75])
    assert curve.accuracy_at(0.125) == pytest.approx(0.625)
    # trapezoids of width .25: (.625 + .875 + .875 + .75) * .25
    assert curve.auc() == pytest.approx(0.78125)


def test_apgr_and_cpt_by_hand():
    curve = m.escalation_curve(CONF, LOCAL, CLOUD)
    assert m.apgr(curve) == pytest.approx((0.78125 - 0.5) / 0.25)  # 1.125
    # targets .625 and .7 lie on the first segment (.5 -> .75 over rate 0 -> .25)
    assert m.cpt(curve, 0.5) == pytest.approx(0.125)
    assert m.cpt(curve, 0.8) == pytest.approx(0.2)
    assert m.cpt(curve, 0.0) == 0.0
    # share 1 is reached at rate .25 already: first crossing, not the last
    assert m.cpt(curve, 1.0) == pytest.approx(0.25)


def test_random_routing_is_the_straight_line():
    rnd = m.random_curve(LOCAL, CLOUD)
    assert rnd.accuracy.tolist() == pytest.approx([0.5, 0.5625, 0.625, 0.6875, 0.75])
    assert m.apgr(rnd) == pytest.approx(0.5)
    assert m.cpt(rnd, 0.5) == pytest.approx(0.5)
    assert m.cpt(rnd, 0.8) == pytest.approx(0.8)


def test_oracle_escalates_cloud_only_wins_first():
    orc = m.oracle_curve(LOCAL, CLOUD)
    # gains sorted +1, +1, 0, -1
    assert orc.accuracy.tolist() == pytest.approx([0.5, 0.75, 1.0, 1.0, 0.75])
    assert m.apgr(orc) == pytest.approx((0.84375 - 0.5) / 0.25)  # (.625+.875+1+.875)*.25 = .84375
    assert m.cpt(orc, 0.8) == pytest.approx(0.2)


def test_ties_give_the_expected_curve_whatever_the_item_order():
    # three tied items with gains +1, 0, +1 then one at .9 with gain 0; local acc .5, cloud 1.0
    conf, local, cloud = [0.3, 0.3, 0.3, 0.9], [0, 1, 0, 1], [1, 1, 1, 1]
    curve = m.escalation_curve(conf, local, cloud)
    assert curve.accuracy.tolist() == pytest.approx([0.5, 0.5 + 2 / 12, 0.5 + 4 / 12, 1.0, 1.0])
    perm = [1, 0, 2, 3]
    again = m.escalation_curve(np.take(conf, perm), np.take(local, perm), np.take(cloud, perm))
    assert again.accuracy.tolist() == pytest.approx(curve.accuracy.tolist())


def test_constant_confidence_equals_random_routing():
    rng = np.random.default_rng(3)
    lc, cc = rng.random(50) < 0.3, rng.random(50) < 0.6
    flat = m.escalation_curve(np.full(50, 0.5), lc, cc)
    assert flat.accuracy == pytest.approx(m.random_curve(lc, cc).accuracy)


def test_no_gap_gives_nan_not_an_error():
    curve = m.escalation_curve([0.2, 0.8], [1, 0], [0, 1])  # both 50%
    assert math.isnan(m.apgr(curve))
    assert math.isnan(m.cpt(curve, 0.5))
    worse_cloud = m.escalation_curve([0.2, 0.8], [1, 1], [0, 1])
    assert math.isnan(m.cpt(worse_cloud, 0.5))
    with pytest.raises(ValueError, match="share"):
        m.cpt(curve, 80)


def test_routing_metrics_bundle():
    r = m.routing_metrics(CONF, LOCAL, CLOUD)
    assert r.n == 4 and r.local_accuracy == 0.5 and r.cloud_accuracy == 0.75
    assert r.apgr == pytest.approx(1.125)
    assert r.cpt == {0.5: pytest.approx(0.125), 0.8: pytest.approx(0.2)}
    assert r.random_apgr == pytest.approx(0.5) and r.random_cpt[0.8] == pytest.approx(0.8)
    assert r.oracle_apgr == pytest.approx(1.375)
    # AUROC of confidence vs local correctness: positives {.9, .5}, negatives {.2, .1} -> 1.0
    assert r.auroc == 1.0
    assert r.ece is not None
    d = r.to_dict()
    assert d["cpt"] == {"50%": 0.125, "80%": 0.2} and d["random"]["apgr"] == 0.5


def test_routing_metrics_on_raw_scores_skips_ece():
    r = m.routing_metrics([-0.1, -2.0, -1.0, -5.0], LOCAL, CLOUD)
    assert r.ece is None and r.to_dict()["ece"] is None
    assert r.apgr == pytest.approx(1.125)  # same order as CONF, same curve


def test_apgr_is_undefined_when_the_local_model_is_the_better_one():
    from edge_runtime.metrics import routing_metrics

    # the worst router escalates first the one item only the local model gets right: it used to score 0.833
    worst = routing_metrics([0.1, 0.2, 0.3], [1, 1, 0], [0, 1, 0])
    assert math.isnan(worst.apgr)
