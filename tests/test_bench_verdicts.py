"""The benchmark's verdicts: a target is met only when the unfavourable end of its figure's spread meets it, and
time ratios are taken round by round, so that a slow spell of the machine hitting both sides divides out."""

from lora_engine.bench.targets import TARGETS, Check
from lora_engine.bench.timing import Stats, paired_ratio_spread

AT_MOST_ONE = next(target for target in TARGETS if target.key == "cpu-train-step-time")
AT_LEAST_1_5 = next(target for target in TARGETS if target.key == "cpu-mixed-batch-8")


def test_an_upper_limit_met_by_the_median_but_not_by_the_p80_is_not_met():
    assert Check(AT_MOST_ONE, None, 0.97, (0.93, 1.04)).met is False
    assert Check(AT_MOST_ONE, None, 0.97, (0.93, 0.99)).met is True


def test_a_lower_limit_is_decided_on_the_p20():
    assert Check(AT_LEAST_1_5, None, 1.55, (1.45, 1.6)).met is False
    assert Check(AT_LEAST_1_5, None, 1.55, (1.51, 1.6)).met is True


def test_an_exact_figure_is_decided_on_its_value_and_shown_without_a_spread():
    check = Check(AT_MOST_ONE, None, 0.38, None)
    assert check.met is True and check.describe_value() == "0.38"


def test_the_verdict_line_states_the_spread_and_the_end_it_rests_on():
    described = Check(AT_MOST_ONE, None, 0.97, (0.93, 1.04)).describe()
    assert "0.97 [p20 0.93, p80 1.04]" in described and "(p80): NOT met" in described


def test_paired_ratios_divide_out_a_slow_round_that_hit_both_sides():
    ours = Stats.of([1.0, 1.0, 5.0, 1.0, 1.0], inner=1)
    peft = Stats.of([2.0, 2.0, 10.0, 2.0, 2.0], inner=1)
    assert paired_ratio_spread(ours, peft) == (0.5, 0.5, 0.5)


def test_live_memory_targets_are_checked_on_every_device():
    from lora_engine.bench import suite
    from lora_engine.bench.measure import CaseResult
    from lora_engine.bench.targets import check_targets

    (case,) = [case for case in suite.cases("cpu", "smoke", ("memory",))]
    # A stacked copy of every adapter kept after the batch, and one adapter's cache left after the deletes.
    figures = {"base": 100, "before_batch": 400, "after_batch": 700, "after_deletes": 300, "one_adapter": 100}
    result = CaseResult(case, {}, None, None, None, None, None, None, {"ours": figures, "peft": figures})
    for device in ("cpu", "cuda"):
        verdicts = {
            check.target.key: (check.value, check.met) for check in check_targets([result], device, {})
        }
        assert verdicts == {"live-after-mixed-batch": (1.75, False), "live-after-deletes": (2.0, False)}
