"""The bench's report (finereg.train.report): the plot's colours, the digits of summary.md and its closing
sentences (issue 22 items 1 and 7)."""

import pytest

from finereg.train.report import _figure, summarize


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
