"""The dashboard page: the newest training run, live, one line per worker, read
from the scheduler's monitor every half second; built like distributed's own pages."""

from __future__ import annotations

import html
import math

from bokeh.layouts import column, gridplot
from bokeh.models import (
    ColumnDataSource,
    Div,
    LayoutDOM,
    NumeralTickFormatter,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from dask.utils import format_bytes, format_time
from distributed.dashboard.components import add_periodic_callback
from distributed.dashboard.components.scheduler import BOKEH_THEME, env
from distributed.utils import log_errors

from . import _view

UPDATE_MS = 500
KEEP_POINTS = 7200  # per worker: an hour of reports at the default report interval
ADJUSTMENTS_SHOWN = 8
LOG_AXES = {"comm_interval", "message_size"}  # they move in factors of sqrt(2) and 2
NO_RUN = "no dask-asgd run yet: fit an estimator on this cluster and it shows here, live"

# (value of a worker's newest report, column title) for the latest-values table
LATEST_COLUMNS = (
    ("worker", "worker"),
    ("state", "state"),
    ("samples", "samples"),
    ("samples_per_second", "samples/s"),
    ("loss", "loss"),
    ("comm_interval", "comm_interval"),
    ("message_size", "message_size"),
    ("accepted", "accepted"),
    ("rejected", "rejected"),
    ("accept_ratio", "accept ratio"),
    ("bandwidth", "bandwidth"),
    ("latency", "latency"),
    ("in_flight", "in flight"),
    ("overwritten", "overwritten"),
)
TABLE_STYLE = (
    "border-collapse:collapse;font-size:12px;width:100%;margin:2px 0 10px 0",
    "text-align:left;padding:3px 8px;border-bottom:1px solid #ccc;white-space:nowrap",
    "padding:3px 8px;border-bottom:1px solid #eee;white-space:nowrap",
)


@log_errors
def asgd_doc(scheduler, extra, doc):
    """The Bokeh document at ``dask_asgd.dashboard.ROUTE``: ``(scheduler, extra, doc)`` as distributed calls it."""
    page = TrainingPage(scheduler)
    page.update()
    add_periodic_callback(doc, page, UPDATE_MS)
    doc.title = "Dask: ASGD training"
    doc.add_root(page.root)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME


class TrainingPage:
    """Per-worker plots and tables of the newest run, redrawn from the monitor.

    Example::

        page = TrainingPage(scheduler)
        page.update()          # from a periodic callback
        doc.add_root(page.root)
    """

    root: LayoutDOM
    run_id: str | None
    sources: dict[str, ColumnDataSource]  # worker address -> its plotted points
    colors: dict[str, str]  # worker address -> its colour in plots and tables
    plotted_until: dict[str, float]  # worker address -> elapsed of its newest point

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.run_id = None
        self.sources, self.colors, self.plotted_until = {}, {}, {}
        self.header = Div(text=_message(NO_RUN), sizing_mode="stretch_width")
        self.figures = {field: _figure(field, title) for field, title in _view.SERIES}
        self.plots = gridplot(
            list(self.figures.values()), ncols=4, sizing_mode="stretch_width", height=240,
            toolbar_location="right", merge_tools=True,
        )
        # Plain HTML tables: Bokeh's DataTable does not redraw when rows keep their count.
        self.latest_table = Div(text="", sizing_mode="stretch_width")
        self.adjustments_table = Div(text="", sizing_mode="stretch_width")
        self.tables = column(self.latest_table, self.adjustments_table, sizing_mode="stretch_width")
        self.root = column(self.header, sizing_mode="stretch_width")

    def update(self) -> None:
        monitor = _view.monitor_of(self.scheduler)
        run = monitor.latest() if monitor is not None else None
        if run is None:
            self._clear()
            self.header.text = _message(NO_RUN)
            return
        if run.run_id != self.run_id:
            self._clear()
            self.run_id = run.run_id
            self._show(True)
        # The monitor's stream handler fills the tracks on this same event loop:
        # they do not change while this reads them.
        for address, track in list(run.workers.items()):
            if address not in self.sources:
                self._add_worker(address)
            new = _view.points_after(track, self.plotted_until[address])
            if new:
                self.sources[address].stream({k: [p[k] for p in new] for k in new[0]}, rollover=KEEP_POINTS)
                self.plotted_until[address] = new[-1]["elapsed"]
        self._update_tables(run)
        self.header.text = _header(run, monitor.dropped, self._legend())

    def _add_worker(self, address: str) -> None:
        color = self.colors[address] = Category10_10[len(self.colors) % len(Category10_10)]
        source = self.sources[address] = ColumnDataSource({"elapsed": [], **{f: [] for f, _ in _view.SERIES}})
        self.plotted_until[address] = -math.inf
        for field, fig in self.figures.items():
            fig.line("elapsed", field, source=source, color=color, line_width=2)
            fig.scatter("elapsed", field, source=source, color=color, size=4)

    def _legend(self) -> str:
        # One legend for all plots, in the header: inside a plot it hides lines.
        return " ".join(_swatch(color) + html.escape(_view.worker_label(self.scheduler, a)) for a, color in self.colors.items())

    def _clear(self) -> None:
        if self.run_id is None and not self.sources:
            return
        for fig in self.figures.values():
            fig.renderers = []
        self.sources.clear()
        self.colors.clear()
        self.plotted_until.clear()
        self.run_id = None
        self._show(False)

    def _show(self, visible: bool) -> None:
        # Without a run the page is the message alone, not a wall of empty plots.
        self.root.children = [self.header, self.plots, self.tables] if visible else [self.header]

    def _update_tables(self, run) -> None:
        rows, adjustments = [], []
        for address, track in list(run.workers.items()):
            name = _swatch(self.colors[address]) + html.escape(_view.worker_label(self.scheduler, address))
            if track.last is not None:
                rows.append(_latest_row(name, track))
            adjustments.extend((elapsed, name, interval, size, reason) for elapsed, interval, size, reason in list(track.adjustments))
        self.latest_table.text = _table("Latest report per worker", [title for _, title in LATEST_COLUMNS], rows)
        adjustments.sort(key=lambda a: a[0], reverse=True)
        if adjustments:
            self.adjustments_table.text = _table(
                "Balancer's latest adjustments, newest first",
                ["at (s)", "worker", "comm_interval", "message_size", "reason"],
                [
                    [f"{elapsed:.1f}", name, f"{interval:,}", f"{size:,}", html.escape(reason)]
                    for elapsed, name, interval, size, reason in adjustments[:ADJUSTMENTS_SHOWN]
                ],
            )
        else:
            self.adjustments_table.text = _message(
                "No balancer adjustments yet" if _view.balanced(run) else "comm_interval and message_size are fixed in this run: no balancer"
            )


def _figure(field: str, title: str):
    fig = figure(
        title=title, height=240, sizing_mode="stretch_width", x_axis_label="seconds since training started",
        y_axis_type="log" if field in LOG_AXES else "linear", tools="pan,wheel_zoom,box_zoom,reset,save",
    )
    fig.xaxis.axis_label_text_font_size = "9pt"
    if field == "bandwidth":
        fig.yaxis.formatter = NumeralTickFormatter(format="0.0 b")
    elif field in ("comm_interval", "message_size", "samples_per_second"):
        fig.yaxis.formatter = NumeralTickFormatter(format="0.[0]a")
    elif field == "accept_ratio":
        fig.y_range.start, fig.y_range.end = 0, 1.05
    return fig


def _latest_row(name: str, track) -> list[str]:
    report, point = track.last, _view.latest(track)
    values = {
        "worker": name,
        "state": html.escape(str(report.get("stop_reason") or "done")) if track.done else "training",
        "samples": _count(report.get("samples")),
        "samples_per_second": _count(point["samples_per_second"]),
        "loss": _real(point["loss"]),
        "comm_interval": _count(point["comm_interval"]),
        "message_size": _count(point["message_size"]),
        "accepted": _count(report.get("accepted")),
        "rejected": _count(report.get("rejected")),
        "accept_ratio": _real(point["accept_ratio"], "{:.3f}"),
        "bandwidth": "&ndash;" if not _finite(point["bandwidth"]) else format_bytes(point["bandwidth"]) + "/s",
        "latency": "&ndash;" if not _finite(point["latency"]) else format_time(point["latency"]),
        "in_flight": _count(point["in_flight"]),
        "overwritten": _count(report.get("overwritten")),
    }
    return [values[name] for name, _ in LATEST_COLUMNS]


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    table, th, td = TABLE_STYLE
    head = "".join(f'<th style="{th}">{h}</th>' for h in header)
    body = "".join("<tr>" + "".join(f'<td style="{td}">{cell}</td>' for cell in row) + "</tr>" for row in rows)
    return f'<b>{title}</b><table style="{table}"><tr>{head}</tr>{body}</table>'


def _swatch(color: str) -> str:
    return f'<span style="color:{color}">&#9632;</span> '


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _count(value) -> str:
    return f"{value:,.0f}" if _finite(value) else "&ndash;"


def _real(value, fmt: str = "{:.6g}") -> str:
    return fmt.format(value) if _finite(value) else "&ndash;"


def _header(run, dropped: int, legend: str) -> str:
    elapsed = max((float(t.last["elapsed"]) for t in run.workers.values() if t.last is not None), default=0.0)
    parts = [
        f"<b>dask-asgd run {html.escape(run.run_id)}</b>",
        f"mode <b>{html.escape(run.mode)}</b>",
        f"{len(run.workers)} worker(s): {legend}",
        f"{'finished' if run.done else 'training'}, {elapsed:.1f} s",
        "balancer on (auto)" if _view.balanced(run) else "fixed comm_interval and message_size",
    ]
    if dropped:
        parts.append(f"{dropped} malformed report(s) dropped")
    return _message(" &middot; ".join(parts), escape=False)


def _message(text: str, escape: bool = True) -> str:
    return f'<div style="font-size:15px;padding:4px 0">{html.escape(text) if escape else text}</div>'
