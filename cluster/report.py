"""The tail report: why runs were late, read from a results file.

`build_report` turns run outcomes into latency percentiles, the deadline hit rate, cost per delivered
run, waste (tokens and cost of attempts that did not deliver: lost races, invalid answers, errors,
cancellations), per-model attempt statistics and the slowest runs with their critical path (the
chain of steps that decided when the run ended, with the waits between them). `plot_cdf` draws the
share of runs delivered within t seconds, with the deadline marked (needs matplotlib:
`pip install 'tailrace[plot]'`).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tailrace.cluster.results import quantile
from tailrace.engine.dag import Dag
from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, RunOutcome
from tailrace.engine.specs import WorkflowSpec

PLOT_INSTALL_HINT = "the latency plot needs matplotlib: pip install 'tailrace[plot]'"
_EPS_S = 0.002  # two spans closer than this are back to back


@dataclass(frozen=True)
class StepSpan:
    step_id: str
    start: float  # epoch of its first attempt
    end: float  # epoch its answer (or its last attempt) ended
    models: tuple[str, ...]
    attempts: int
    ok: bool

    @property
    def duration_s(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class PathLeg:
    wait_s: float  # between the previous leg's end (or the run's start) and this step's start
    span: StepSpan


@dataclass(frozen=True)
class SlowRun:
    run_id: str
    latency_s: float
    outcome: str
    over_deadline_s: float
    path: list[PathLeg]
    tail_s: float  # from the last step's end to the run's end


@dataclass(frozen=True)
class ModelStats:
    model: str
    attempts: int
    valid: int
    p50_s: float
    p99_s: float
    ttft_p50_s: float | None
    cost_usd: float


@dataclass
class TailReport:
    workflow: str
    runs: int
    delivered: int
    on_time: int
    deadline_s: float
    failures: dict[str, int]
    percentiles: dict[str, float]
    cost_usd: float
    tokens: int
    wasted_tokens: int
    wasted_cost_usd: float
    attempts_by_outcome: dict[str, int]
    cancel_reasons: dict[str, int]
    models: list[ModelStats]
    slowest: list[SlowRun]
    latencies_s: list[float] = field(repr=False, default_factory=list)
    delivered_latencies_s: list[float] = field(repr=False, default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.on_time / self.runs if self.runs else 0.0

    @property
    def cost_per_delivered_usd(self) -> float | None:
        return self.cost_usd / self.delivered if self.delivered else None

    @property
    def waste_fraction(self) -> float:
        return self.wasted_tokens / self.tokens if self.tokens else 0.0


def read_results(path: str | Path) -> Iterator[RunOutcome]:
    """Every complete line of a results file (a line cut by a crash is skipped)."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                yield RunOutcome.model_validate(json.loads(line))
            except ValueError:
                continue


def step_spans(outcome: RunOutcome) -> dict[str, StepSpan]:
    by_step: dict[str, list[AttemptRecord]] = {}
    for a in outcome.attempts:
        by_step.setdefault(a.step_id, []).append(a)
    spans = {}
    for step, attempts in by_step.items():
        valid = [a for a in attempts if a.outcome == AttemptOutcome.VALID]
        end = min(a.ended_at for a in valid) if valid else max(a.ended_at for a in attempts)
        models = tuple(dict.fromkeys(a.model for a in sorted(attempts, key=lambda a: a.started_at)))
        spans[step] = StepSpan(step, min(a.started_at for a in attempts), end, models, len(attempts), bool(valid))
    return spans


def critical_path(outcome: RunOutcome, dag: Dag | None = None) -> list[PathLeg]:
    """Walk back from the step that ended last: each step's predecessor is the dependency that ended
    last (or, without the workflow, the step that ended last before it started)."""
    spans = step_spans(outcome)
    if not spans:
        return []
    chain = [max(spans.values(), key=lambda s: s.end)]
    while True:
        current = chain[-1]
        if dag is not None:
            candidates = [spans[d] for d in dag.parents(current.step_id) if d in spans]
        else:
            candidates = [s for s in spans.values() if s is not current and s.end <= current.start + _EPS_S]
        if not candidates:
            break
        chain.append(max(candidates, key=lambda s: s.end))
    chain.reverse()
    legs, previous_end = [], outcome.started_at
    for span in chain:
        legs.append(PathLeg(max(0.0, span.start - previous_end), span))
        previous_end = span.end
    return legs


def _label(outcome: RunOutcome) -> str:
    if outcome.delivered:
        return "delivered" if outcome.on_time else "delivered_late"
    return outcome.failure.value if outcome.failure else "failed"


def build_report(outcomes: Iterable[RunOutcome], workflow: WorkflowSpec | None = None, slowest: int = 5) -> TailReport:
    dag = Dag.from_spec(workflow) if workflow is not None else None
    runs: list[RunOutcome] = []
    failures: Counter[str] = Counter()
    by_outcome: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    model_attempts: dict[str, list[AttemptRecord]] = {}
    tokens = wasted = 0
    cost = wasted_cost = 0.0
    deadlines = []
    from tailrace.cluster.trace import winners

    for outcome in outcomes:
        runs.append(outcome)
        deadlines.append(outcome.deadline_at - outcome.started_at)
        if outcome.failure is not None:
            failures[outcome.failure.value] += 1
        cost += outcome.cost_usd
        used = winners(outcome)
        for a in outcome.attempts:
            by_outcome[a.outcome.value] += 1
            if a.cancel_reason is not None:
                reasons[a.cancel_reason.value] += 1
            model_attempts.setdefault(a.model, []).append(a)
            n = a.input_tokens + a.output_tokens
            tokens += n
            if not outcome.delivered or (a.step_id, a.attempt) not in used:
                wasted += n
                wasted_cost += a.cost_usd
    latencies = sorted(o.latency_s for o in runs)
    delivered = sorted(o.latency_s for o in runs if o.delivered)
    slow = sorted(runs, key=lambda o: o.latency_s, reverse=True)[:slowest]
    return TailReport(
        workflow=runs[0].workflow if runs else (workflow.name if workflow else ""),
        runs=len(runs),
        delivered=len(delivered),
        on_time=sum(o.on_time for o in runs),
        deadline_s=statistics.median(deadlines) if deadlines else float("nan"),
        failures=dict(failures),
        percentiles={
            name: quantile(latencies, q)
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
        },
        cost_usd=cost,
        tokens=tokens,
        wasted_tokens=wasted,
        wasted_cost_usd=wasted_cost,
        attempts_by_outcome=dict(by_outcome),
        cancel_reasons=dict(reasons),
        models=[_model_stats(m, a) for m, a in sorted(model_attempts.items())],
        slowest=[_slow_run(o, dag) for o in slow],
        latencies_s=latencies,
        delivered_latencies_s=delivered,
    )


def _model_stats(model: str, attempts: list[AttemptRecord]) -> ModelStats:
    finished = sorted(a.latency_s for a in attempts if a.outcome != AttemptOutcome.CANCELLED)
    ttfts = sorted(a.ttft_s for a in attempts if a.ttft_s is not None)
    return ModelStats(
        model=model,
        attempts=len(attempts),
        valid=sum(a.outcome == AttemptOutcome.VALID for a in attempts),
        p50_s=quantile(finished, 0.5),
        p99_s=quantile(finished, 0.99),
        ttft_p50_s=quantile(ttfts, 0.5) if ttfts else None,
        cost_usd=sum(a.cost_usd for a in attempts),
    )


def _slow_run(outcome: RunOutcome, dag: Dag | None) -> SlowRun:
    path = critical_path(outcome, dag)
    last_end = path[-1].span.end if path else outcome.started_at
    return SlowRun(
        outcome.run_id,
        outcome.latency_s,
        _label(outcome),
        outcome.ended_at - outcome.deadline_at,
        path,
        max(0.0, outcome.ended_at - last_end),
    )


def describe_path(run: SlowRun) -> str:
    parts = []
    for leg in run.path:
        if leg.wait_s >= 0.01:
            parts.append(f"wait {leg.wait_s:.2f}")
        s = leg.span
        models = " > ".join(s.models)
        mark = "" if s.ok else " FAILED"
        plural = "s" * (s.attempts != 1)
        parts.append(f"{s.step_id} {s.duration_s:.2f} s ({models}, {s.attempts} attempt{plural}){mark}")
    if run.tail_s >= 0.01:
        parts.append(f"wait {run.tail_s:.2f}")
    return " -> ".join(parts) or "(no attempts)"


def plot_cdf(report: TailReport, path: str | Path) -> Path:
    """Share of runs delivered within t seconds (failed runs never reach the top), deadline marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import PercentFormatter
    except ImportError as exc:
        raise RuntimeError(PLOT_INSTALL_HINT) from exc

    out = Path(path)
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=110)
    n = max(1, report.runs)
    if report.latencies_s:
        ended = [(i + 1) / n for i in range(len(report.latencies_s))]
        ax.step(
            [0.0, *report.latencies_s],
            [0.0, *ended],
            where="post",
            color="#aaaaaa",
            linewidth=1.2,
            linestyle="--",
            label="ended (delivered or failed)",
        )
    deadline = report.deadline_s
    right = max([*(report.latencies_s or [1.0]), deadline if deadline == deadline else 0.0]) * 1.08
    xs = report.delivered_latencies_s
    ys = [(i + 1) / n for i in range(len(xs))]
    ax.step(
        [0.0, *xs, right],
        [0.0, *ys, ys[-1] if ys else 0.0],
        where="post",
        color="#1f6fb2",
        linewidth=2.2,
        label="delivered (valid)",
    )
    if deadline == deadline:  # not NaN
        ax.axvline(deadline, color="#c0392b", linewidth=1.6, label=f"deadline {deadline:g} s")
        ax.axhline(report.hit_rate, color="#c0392b", linewidth=0.8, linestyle=":")
        ax.annotate(
            f"{report.hit_rate:.1%} delivered by the deadline",
            (deadline, report.hit_rate),
            textcoords="offset points",
            xytext=(-8, -14),
            ha="right",
            color="#c0392b",
            fontsize=10,
        )
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        if xs and len(xs) / n >= q:
            x = xs[min(len(xs) - 1, max(0, round(q * n) - 1))]
            ax.plot([x], [q], "o", color="#1f6fb2", markersize=5)
            ax.annotate(f"{name} {x:.2f} s", (x, q), textcoords="offset points", xytext=(8, -12), fontsize=9)
    ax.set_xlim(0, right)
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("seconds from run start")
    ax.set_ylabel("share of runs")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(
        f"{report.workflow}: {report.runs} runs, {report.delivered} delivered, "
        f"{report.on_time} on time ({report.hit_rate:.1%})"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def render(report: TailReport) -> list[object]:
    """Rich renderables for the console: summary, money and waste, per-model table, slowest runs."""
    from rich.table import Table
    from rich.text import Text

    summary = Table(title=f"{report.workflow}: {report.runs} runs, deadline {report.deadline_s:g} s")
    for column in ("runs", "delivered", "on time", "hit rate", "p50 s", "p90 s", "p95 s", "p99 s", "max s"):
        summary.add_column(column, justify="right")
    p = report.percentiles
    summary.add_row(
        str(report.runs),
        str(report.delivered),
        str(report.on_time),
        f"{report.hit_rate:.1%}",
        *(f"{p[k]:.2f}" for k in ("p50", "p90", "p95", "p99", "max")),
    )
    per = report.cost_per_delivered_usd
    lines = [
        f"cost: ${report.cost_usd:.4f} in all, "
        + ("nothing delivered" if per is None else f"${per:.5f} per delivered run"),
        f"waste: {report.wasted_tokens:,} of {report.tokens:,} tokens ({report.waste_fraction:.1%}), "
        f"${report.wasted_cost_usd:.4f}, in attempts that did not deliver (lost, invalid, failed, cancelled)",
        "attempts: " + ", ".join(f"{k} {v}" for k, v in sorted(report.attempts_by_outcome.items())),
    ]
    if report.failures:
        lines.insert(0, "failures: " + ", ".join(f"{k} {v}" for k, v in sorted(report.failures.items())))
    if report.cancel_reasons:
        lines.append("cancelled: " + ", ".join(f"{k} {v}" for k, v in sorted(report.cancel_reasons.items())))

    models = Table(title="attempts by model")
    for column in ("model", "attempts", "valid", "p50 s", "p99 s", "TTFT p50 s", "cost $"):
        models.add_column(column, justify="right")
    for m in report.models:
        models.add_row(
            m.model,
            str(m.attempts),
            f"{m.valid / m.attempts:.0%}" if m.attempts else "-",
            f"{m.p50_s:.2f}",
            f"{m.p99_s:.2f}",
            "-" if m.ttft_p50_s is None else f"{m.ttft_p50_s:.2f}",
            f"{m.cost_usd:.4f}",
        )

    slow = Text(f"slowest {len(report.slowest)} runs and their critical path:\n", style="bold")
    for r in report.slowest:
        slow.append(
            f"  {r.run_id}  {r.latency_s:.2f} s  {r.outcome} ({r.over_deadline_s:+.2f} s vs deadline)\n",
            style="bold" if r.over_deadline_s > 0 else "",
        )
        slow.append(f"    {describe_path(r)}\n")
    return [summary, Text("\n".join(lines)), models, slow]


def report_json(report: TailReport) -> dict[str, object]:
    return {
        "workflow": report.workflow,
        "runs": report.runs,
        "delivered": report.delivered,
        "on_time": report.on_time,
        "hit_rate": report.hit_rate,
        "deadline_s": report.deadline_s,
        "percentiles": report.percentiles,
        "failures": report.failures,
        "cost_usd": report.cost_usd,
        "cost_per_delivered_usd": report.cost_per_delivered_usd,
        "tokens": report.tokens,
        "wasted_tokens": report.wasted_tokens,
        "waste_fraction": report.waste_fraction,
        "wasted_cost_usd": report.wasted_cost_usd,
        "attempts_by_outcome": report.attempts_by_outcome,
        "cancel_reasons": report.cancel_reasons,
        "slowest": [
            {"run_id": r.run_id, "latency_s": r.latency_s, "outcome": r.outcome, "critical_path": describe_path(r)}
            for r in report.slowest
        ],
    }
