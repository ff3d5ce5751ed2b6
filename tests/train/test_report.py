"""The bench's report (finereg.train.report): the plot's colours, the digits of summary.md and its closing
sentences (issue 22 items 1 and 7)."""

import pytest

from finereg.train.report import _figure, accuracy_table, report_markdown, summarize


def _rows(values: dict[str, list[float]], rates=(15.0, 100.0)) -> list[dict]:
    return [
        {"method": m, "sample_rate": r, "seed": k, "top1": v + r / 10, "shift_top1": v - 30 + r / 10}
        for m, vs in values.items()
        for r in rates
        for k, v in enumerate(vs)
    ]


def test_each_line_of_the_plot_has_the_colour_of_its_legend_entry():
    """The difference panels have no baseline line: each method keeps its own colour there, not the previous
    method's (Bi-Tuning's gains were drawn in Co-Tuning's colour)."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    methods = ["erm", "l2sp", "co_tuning", "bi_tuning"]
    summary = summarize(_rows({m: [80.0 + k, 81.0 + 2 * k, 83.0 + k] for k, m in enumerate(methods)}))
    fig = _figure(summary, methods, "t", plt)
    try:
        upper, lower = fig.axes[: len(fig.axes) // 2], fig.axes[len(fig.axes) // 2 :]
        assert len(upper) == 2  # top1 and shift_top1
        for col, top in enumerate(upper):
            legend = top.get_legend()
            entry = {t.get_text(): to_hex(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles)}
            assert sorted(entry) == sorted(methods) and len(set(entry.values())) == len(methods)
            drawn = {c.get_label(): to_hex(c.lines[0].get_color()) for c in top.containers}
            assert drawn == entry
            below = {c.get_label(): to_hex(c.lines[0].get_color()) for c in lower[col].containers}
            assert sorted(below) == ["bi_tuning", "co_tuning", "l2sp"]  # no line for the baseline itself
            assert below == {m: entry[m] for m in below}
    finally:
        plt.close(fig)


def test_summary_prints_the_digits_its_spread_needs():
    """A std of 0.05 printed as "85.7 ± 0.0"; now each cell has the decimals of its std's first digit."""
    summary = summarize(_rows({"erm": [85.65, 85.7, 85.75], "a": [80.0, 82.0, 84.0]}, rates=(15.0,)))
    table = accuracy_table(summary, ["erm", "a"], [15.0])
    assert "| erm | **87.20 ± 0.05** |" in table and "| a | 83.5 ± 2.0 |" in table  # 2.0: one decimal is enough
    tiny = summarize(_rows({"erm": [85.700, 85.702, 85.704], "a": [85.701, 85.7035, 85.706]}, rates=(15.0,)))
    text = report_markdown(tiny, ["erm", "a"], [15.0], "note")
    assert "87.202 ± 0.002" in text and "± 0.0 " not in text and "± 0.0 |" not in text
    # paired differences 0.001, 0.0015, 0.002: the interval excludes 0 and its lower bound keeps its digit
    assert "| a | **+0.0015 [+0.0003, +0.0027]** |" in text and "[+0.0, +0.0]" not in text


def test_summary_ends_with_a_sentence_per_rate_naming_who_beats_erm():
    rows = _rows({"erm": [80.0, 82.0, 84.0], "a": [81.0, 83.5, 85.0], "b": [79.0, 82.5, 83.0]}, rates=(15.0,))
    rows += _rows({"erm": [90.0, 91.0, 92.0], "a": [90.5, 90.5, 93.0], "b": [90.0, 92.0, 93.0]}, rates=(100.0,))
    text = report_markdown(summarize(rows), ["erm", "a", "b"], [15.0, 100.0], "note")
    end = text[text.index("### Which methods beat erm") :]
    assert text.rstrip().endswith(end.rstrip())  # the last section
    assert "At 15 %, in top-1 accuracy on the test split, a (+1.2 [+0.4, +1.9]) beats erm with certainty; " in end
    assert "in top-1 accuracy on the shifted test set, a (+1.2 [+0.4, +1.9]) beats erm with certainty." in end
    assert "At 100 %, in top-1 accuracy on the test split, no method beats erm with certainty;" in end
    assert "the 95 % interval of the paired difference lies above 0" in end
    one = report_markdown(summarize(_rows({"erm": [80.0], "a": [81.0]})), ["erm", "a"], [15.0, 100.0], "n")
    assert "At 15 %, in top-1 accuracy on the test split, there is no interval (fewer than two seeds" in one
    alone = report_markdown(summarize(_rows({"erm": [80.0, 81.0]})), ["erm"], [15.0, 100.0], "n")
    assert "Which methods" not in alone  # nothing to compare
