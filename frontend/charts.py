"""Server-rendered SVG charts: no chart library, a few hundred bytes each, readable without JavaScript.

Each chart is an <svg role="img"> with an aria-label and a <title>; data marks carry `data-value` so tests
(and curious users, via the tooltip <title>) can read the numbers. Series colours come from CSS classes s0..s5.
"""

import math
from collections.abc import Callable, Sequence

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

W, H = 520, 220
PAD_L, PAD_R, PAD_T, PAD_B = 44, 12, 14, 38


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _fmt(value: float) -> str:
    if value == int(value):
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}".rstrip("0").rstrip(".") if value else "0"


def _svg(title: str, body: list[str], *, legend: Sequence[str] = (), kind: str, x_label: str = "",
         y_label: str = "", height: int = H) -> SafeString:
    if x_label:
        body.append(f'<text class="axis" x="{W - PAD_R}" y="{H - PAD_B + 26}" text-anchor="end">{escape(x_label)} →</text>')
    if y_label:
        body.append(f'<text class="axis" x="{PAD_L + 4}" y="{PAD_T + 10}">↑ {escape(y_label)}</text>')
    parts = [
        f'<figure class="chart-box"><figcaption>{escape(title)}</figcaption>',
        f'<svg class="chart chart-{kind}" viewBox="0 0 {W} {height}" role="img" aria-label="{escape(title)}"'
        ' preserveAspectRatio="xMinYMin meet">',
        f"<title>{escape(title)}</title>",
        *body,
    ]
    for i, name in enumerate(legend):
        x = PAD_L + i * 130
        parts.append(
            f'<rect class="s{i % 6}" x="{x}" y="{height - 12}" width="10" height="10"/>'
            f'<text class="legend" x="{x + 14}" y="{height - 3}">{escape(name)}</text>'
        )
    parts.append("</svg></figure>")
    return mark_safe("".join(parts))  # noqa: S308 - every interpolated label is escaped above


def _y_axis(lo: float, hi: float, ticks: int = 4) -> tuple[list[str], Callable[[float], float]]:
    plot_h = H - PAD_T - PAD_B

    def y(value: float) -> float:
        return PAD_T + plot_h * (1 - (value - lo) / (hi - lo or 1))

    body = []
    for i in range(ticks + 1):
        v = lo + (hi - lo) * i / ticks
        body.append(
            f'<line class="grid" x1="{PAD_L}" x2="{W - PAD_R}" y1="{_num(y(v))}" y2="{_num(y(v))}"/>'
            f'<text class="tick" x="{PAD_L - 4}" y="{_num(y(v) + 4)}" text-anchor="end">{_fmt(v)}</text>'
        )
    return body, y


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def empty(title: str, message: str) -> SafeString:
    return mark_safe(f'<p class="empty" role="note"><strong>{escape(title)}</strong>: {escape(message)}</p>')


def bar_chart(items: Sequence[tuple[str, float]], *, title: str, max_value: float | None = None,
              counts: Sequence[int | None] | None = None, y_label: str = "") -> SafeString:
    """One bar per (label, value); `counts`, the n behind each bar, is written on it."""
    return grouped_bar_chart([label for label, _ in items], [("", [v for _, v in items])], title=title,
                             max_value=max_value, counts=[counts] if counts is not None else None,
                             y_label=y_label)  # fmt: skip


def grouped_bar_chart(
    categories: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    title: str,
    max_value: float | None = None,
    counts: Sequence[Sequence[int | None]] | None = None,
    y_label: str = "",
) -> SafeString:
    """Bars grouped by category, one colour per series (None draws nothing). With `counts` (per series, per
    category) each bar carries its n above it ("n=?" where it is unknown). Category labels are written in
    full: turned when they would not fit under their group, the chart growing to hold them."""
    values = [v for _, vs in series for v in vs if v is not None]
    if not categories or not values:
        return empty(title, "no data yet")
    hi = max_value or _nice_max(max(values))
    body, y = _y_axis(0, hi)
    plot_w = W - PAD_L - PAD_R
    group_w = plot_w / len(categories)
    bar_w = max(2.0, group_w * 0.8 / len(series))
    longest = max(len(c) for c in categories)
    turned = longest * 6 > group_w
    extra = min(160, int(longest * 5.5 * 0.6)) if turned else 0
    for c, category in enumerate(categories):
        x0 = PAD_L + c * group_w + group_w * 0.1
        for s, (name, vs) in enumerate(series):
            v = vs[c]
            if v is None:
                continue
            top = y(min(v, hi))
            n = counts[s][c] if counts is not None else None
            label = f"{name + ' · ' if name else ''}{category}: {_fmt(v)}" + (
                f" (n = {n if n is not None else '?'})" if counts is not None else "")  # fmt: skip
            body.append(
                f'<rect class="bar s{s % 6}" x="{_num(x0 + s * bar_w)}" y="{_num(top)}" width="{_num(bar_w - 1)}"'
                f' height="{_num(y(0) - top)}" data-value="{v}"><title>{escape(label)}</title></rect>'
            )
            if counts is not None:
                body.append(
                    f'<text class="n" x="{_num(x0 + s * bar_w + (bar_w - 1) / 2)}" y="{_num(top - 3)}"'
                    f' text-anchor="middle" data-n="{n if n is not None else ""}">n={n if n is not None else "?"}</text>'
                )
        tx, ty = x0 + group_w * 0.4, H - PAD_B + 14
        turn = f' transform="rotate(-35 {_num(tx)} {ty})"' if turned else ""
        body.append(
            f'<text class="tick" x="{_num(tx)}" y="{ty}" text-anchor="{"end" if turned else "middle"}"{turn}>'
            f"{escape(category)}</text>"
        )
    legend = [name for name, _ in series] if len(series) > 1 else []
    return _svg(title, body, legend=legend, kind="bar", y_label=y_label, height=H + extra)


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    title: str,
    log_x: bool = False,
    x_label: str = "",
    y_label: str = "",
    smooth: bool = False,
) -> SafeString:
    """Lines of (x, y) points, one colour per series. With `smooth`, each series is drawn as its exponential
    moving average over the raw points, which stay faint underneath."""
    points = [p for _, ps in series for p in ps]
    if not points:
        return empty(title, "no data yet")
    fx = (lambda v: math.log2(max(v, 1e-9))) if log_x else float
    xs = [fx(x) for x, _ in points]
    ys = [y for _, y in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if y_lo == y_hi:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    margin = (y_hi - y_lo) * 0.05
    body, y = _y_axis(y_lo - margin, y_hi + margin)
    plot_w = W - PAD_L - PAD_R

    def x(v: float) -> float:
        return PAD_L + plot_w * ((fx(v) - x_lo) / (x_hi - x_lo) if x_hi > x_lo else 0.5)

    for raw in sorted({p[0] for p in points})[:: max(1, len(points) // 8 or 1)][:10]:
        body.append(f'<text class="tick" x="{_num(x(raw))}" y="{H - PAD_B + 14}" text-anchor="middle">{_fmt(raw)}</text>')
    for s, (name, ps) in enumerate(series):
        if not ps:
            continue
        path = " ".join(f"{_num(x(px))},{_num(y(py))}" for px, py in ps)
        raw = " raw" if smooth else ""
        body.append(f'<polyline class="line{raw} s{s % 6}" points="{path}" data-points="{len(ps)}"/>')
        if smooth:
            smoothed = " ".join(f"{_num(x(px))},{_num(y(py))}" for px, py in ema(ps))
            body.append(f'<polyline class="line smooth s{s % 6}" points="{smoothed}" data-points="{len(ps)}"/>')
        if len(ps) <= 40 or smooth:
            for px, py in ps:
                body.append(
                    f'<circle class="dot{raw} s{s % 6}" cx="{_num(x(px))}" cy="{_num(y(py))}" r="{2 if smooth else 3}" data-value="{py}">'
                    f"<title>{escape(name)} @ {_fmt(px)}: {_fmt(py)}</title></circle>"
                )
    legend = [n for n, _ in series] if len(series) > 1 or series[0][0] else []
    return _svg(title, body, legend=legend, kind="line", x_label=x_label, y_label=y_label)


def ema(points: Sequence[tuple[float, float]], span: int | None = None) -> list[tuple[float, float]]:
    """Exponential moving average of the y values (span about a tenth of the points, at least 2), bias-corrected
    at the start as TensorBoard's smoothing is, so the curve starts at the first point rather than at zero."""
    span = span or max(2, len(points) // 10)
    alpha = 2 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for px, py in points:
        avg = (1 - alpha) * avg + alpha * py
        weight = (1 - alpha) * weight + alpha
        out.append((px, avg / weight))
    return out


def scatter_chart(
    points: Sequence[tuple[str, float, float]], *, title: str, x_label: str, y_label: str
) -> SafeString:
    """Labelled points joined in order (a lineage): Figure 11 of the Llama 2 report, helpfulness vs safety."""
    if not points:
        return empty(title, "no data yet")
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    x_lo, x_hi = min(xs), max(xs)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    y_lo, y_hi = min(ys), max(ys)
    if y_lo == y_hi:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    xm, ym = (x_hi - x_lo) * 0.1, (y_hi - y_lo) * 0.1
    body, y = _y_axis(y_lo - ym, y_hi + ym)
    plot_w = W - PAD_L - PAD_R - 40

    def x(v: float) -> float:
        return PAD_L + plot_w * (v - x_lo + xm) / (x_hi - x_lo + 2 * xm)

    body.append(
        f'<polyline class="line s0" points="{" ".join(f"{_num(x(px))},{_num(y(py))}" for _, px, py in points)}"/>'
    )
    for label, px, py in points:
        body.append(
            f'<circle class="dot s1" cx="{_num(x(px))}" cy="{_num(y(py))}" r="4" data-value="{px},{py}">'
            f"<title>{escape(label)}: {escape(x_label)} {_fmt(px)}, {escape(y_label)} {_fmt(py)}</title></circle>"
            f'<text class="point-label" x="{_num(x(px) + 6)}" y="{_num(y(py) - 6)}">{escape(label)}</text>'
        )
    return _svg(title, body, kind="scatter", x_label=x_label, y_label=y_label)


def interval_bar_chart(items: Sequence[tuple[str, float | None, float | None, float | None, int]], *, title: str,
                       max_value: float = 1.0, percent: bool = True) -> SafeString:
    """One bar per (label, value, low, high, n) with its confidence interval as a whisker and `n` under the label
    (the report's Figure 12 and 17-18 bars)."""
    shown = [it for it in items if it[1] is not None]
    if not shown:
        return empty(title, "no ratings yet")
    body, y = _y_axis(0, max_value)
    plot_w = W - PAD_L - PAD_R
    slot = plot_w / len(shown)
    bar_w = min(60.0, slot * 0.6)
    for i, (label, value, low, high, n) in enumerate(shown):
        assert value is not None
        x = PAD_L + i * slot + (slot - bar_w) / 2
        top = y(min(value, max_value))
        text = f"{100 * value:.1f}%" if percent else _fmt(value)
        interval = f" [{100 * low:.1f}, {100 * high:.1f}]" if percent and low is not None and high is not None else (
            f" [{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else "")  # fmt: skip
        body.append(f'<rect class="bar s{i % 6}" x="{_num(x)}" y="{_num(top)}" width="{_num(bar_w)}" '
                    f'height="{_num(y(0) - top)}" data-value="{value}" data-low="{low}" data-high="{high}">'
                    f"<title>{escape(f'{label}: {text}{interval}, n = {n}')}</title></rect>")  # fmt: skip
        if low is not None and high is not None:
            cx = x + bar_w / 2
            body.append(f'<path class="whisker" d="M{_num(cx)} {_num(y(min(high, max_value)))} V{_num(y(max(low, 0)))} '
                        f'M{_num(cx - 6)} {_num(y(min(high, max_value)))} H{_num(cx + 6)} M{_num(cx - 6)} {_num(y(max(low, 0)))} '
                        f'H{_num(cx + 6)}" stroke="currentColor" fill="none"/>')  # fmt: skip
        body.append(f'<text class="point-label" x="{_num(x + bar_w / 2)}" y="{_num(top - 4)}" text-anchor="middle">'
                    f"{escape(text)}</text>")  # fmt: skip
        body.append(f'<text class="tick" x="{_num(x + bar_w / 2)}" y="{H - PAD_B + 14}" text-anchor="middle">'
                    f"{escape(label)} (n = {n})</text>")  # fmt: skip
    return _svg(title, body, kind="bar")
