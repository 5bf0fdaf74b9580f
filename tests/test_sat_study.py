"""docs/sat/sat_study.py: the study's plan (folder order) and its check of issue 15's target."""

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def sat_study():
    return load_script("docs/sat/sat_study.py")


def test_the_table_folders_run_before_the_measured_at_runs(sat_study):
    names = list(sat_study.specs(sat_study.FULL))
    assert names[:8] == [f"eps{e}-{c}" for e in (0.1, 0.2) for c in ("none", "eps", "p-sat", "h-sat")]
    assert names[8:] == ["eps0.1-none-measured", "eps0.2-none-measured"]
    measured = sat_study.specs(sat_study.FULL)["eps0.2-none-measured"]
    assert measured["seeds"] == [0] and measured["train"]["curriculum"] == "none"
    assert measured["train"]["curriculum_every"] == 100 and measured["train"]["eps"] == 0.2


def _row(curriculum, clean, aa, method="dnr", eps=0.2):
    return dict(eps=eps, method=method, curriculum=curriculum, clean=clean, autoattack=aa)


def test_target_check_against_hand_computed_verdicts(sat_study):
    rows = [_row("none", (0.80, 0.01, 2), (0.50, 0.03, 2)),
            _row("eps", (0.83, 0.01, 2), (0.48, 0.04, 2)),     # +3 clean, -2 AA inside noise 5: met
            _row("p-sat", (0.81, 0.01, 2), (0.50, 0.00, 2)),   # +1 clean: short by 1
            _row("h-sat", (0.83, 0.02, 2), (0.40, 0.04, 2)),   # +3 clean, -10 AA, noise 5: 5 below beyond it
            _row("none", (0.80, None, 1), (0.50, None, 1), method="dense-at"),
            _row("eps", (0.83, None, 1), (0.48, None, 1), method="dense-at")]  # one seed: no verdict
    got = {t["curriculum"]: t for t in sat_study.target_check(rows)}
    assert set(got) == {"eps", "p-sat", "h-sat"}
    assert got["eps"]["met"] and got["eps"]["verdict"] == "met"
    assert got["eps"]["clean_delta"] == pytest.approx(3.0) and got["eps"]["noise"] == pytest.approx(5.0)
    assert not got["p-sat"]["met"] and got["p-sat"]["verdict"] == "missed: clean short by 1.00"
    assert got["h-sat"]["autoattack_delta"] == pytest.approx(-10.0)
    assert got["h-sat"]["verdict"] == "missed: AutoAttack 5.00 below AT beyond the noise"


def test_lambda_summary_against_hand_computed_values(sat_study):
    curves = {("eps0.2", "dnr", "H-SAT"): [[0, 10.0, 0.0, True], [100, 20.0, 0.25, True], [200, 9000.0, 0.5, False],
                                          [300, 50.0, 0.5, False], [400, 40.0, 0.5, True], [500, 30.0, 1.0, True],
                                          [600, 65.0, 1.0, False]],
              ("eps0.2", "dnr", "AT"): [[0, 12.0, 1.0, True], [100, 8.0, 1.0, True]],
              ("eps0.1", "dense-at", "AT"): []}
    got = {m["kind"]: m for m in sat_study.lambda_summary(curves)}
    assert set(got) == {"H-SAT", "AT"}                        # an empty curve is left out
    h = got["H-SAT"]
    assert h["measurements"] == 7 and h["median"] == 40.0 and (h["max"], h["max_step"]) == (9000.0, 200)
    assert h["held_steps"] == [200, 300]                      # at lambda 1.0 there is nothing left to hold
    a = got["AT"]
    assert a["median"] == 10.0 and a["held_steps"] == []
