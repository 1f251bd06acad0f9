"""`make demo`'s driver: a failing step names itself and the fix; the summary shows both models."""

import pytest

from daq_vllm.demo import run as demo


def test_a_failing_step_names_the_step_and_the_fix():
    def broken():
        raise FileNotFoundError("wiki.test.raw not found")

    with pytest.raises(demo.StepFailed) as err:
        demo.step(3, "WikiText-2 perplexity", "set DAQ_DATA_DIR", broken)
    assert str(err.value) == ("demo step 3 (WikiText-2 perplexity) failed: wiki.test.raw not found\n"
                              "  fix: set DAQ_DATA_DIR")


def test_a_step_result_is_cached_and_reused(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"full": 1.5}  # noqa: E731
    assert demo._cached(tmp_path / "r.json", compute) == {"full": 1.5}
    assert demo._cached(tmp_path / "r.json", compute) == {"full": 1.5}
    assert calls == [1]


def test_summary_table_has_both_models():
    facts = {"format": "fp4_e2m1", "group_size": 128, "bits_per_weight": 4.25,
             "size_mib": {"full": 513.0, "daq": 162.0}}
    text = demo.summary(facts, {"full": 24.145, "daq": 28.028}, {"full": 60.7, "daq": 7.1},
                        {"completion": " Paris.", "chat": "Paris."}, 4)
    assert "DAQ fp4_e2m1 g128" in text and "4.25" in text and "162" in text
    assert "24.145" in text and "28.028" in text and "60.7" in text and "7.1" in text
    assert "-> ' Paris.'" in text
