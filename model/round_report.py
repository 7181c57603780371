"""Reports of active-learning rounds: accuracy and map distance against the corrections made.

The input is plain records (:class:`RoundPoint`), one per measurement: which strategy chose the
corrections, after how many corrections in all, and the held-out scores then. The backend makes
them from a project's round records; the simulated study (``model/round_study.py``) from its
runs. Several seeds of one strategy are summed up as their mean, with the range as a band.

Written: ``report.md`` (a table per strategy and round, and what the caller adds), and PNG plots
``accuracy.png`` and ``map_distance.png`` (plus ``shortcut_accuracy.png`` and
``counterfactual_accuracy.png`` when points carry them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

log = logging.getLogger(__name__)

METRICS = {
    "accuracy": ("held-out accuracy", True),
    "map_mse": ("map distance to human maps (MSE)", False),
    "shortcut_accuracy": ("accuracy where the shortcut misleads", True),
    "counterfactual_accuracy": ("accuracy on counterfactual views", True),
}
PLOTS = {"accuracy": "accuracy.png", "map_mse": "map_distance.png",
         "shortcut_accuracy": "shortcut_accuracy.png",
         "counterfactual_accuracy": "counterfactual_accuracy.png"}  # fmt: skip


@dataclass(frozen=True)
class RoundPoint:
    """The held-out scores after `corrections` corrections chosen by `strategy` (round 0: before
    any round)."""

    strategy: str
    round: int
    corrections: int
    accuracy: float | None
    map_mse: float | None
    seed: int = 0
    shortcut_accuracy: float | None = None  # on the held-out tasks a shortcut gets wrong
    # on the held-out tasks' counterfactual views (model/round.py's counterfactual_views)
    counterfactual_accuracy: float | None = None


@dataclass(frozen=True)
class Summary:
    """One strategy's points of one round over its seeds: mean, lowest and highest."""

    strategy: str
    round: int
    corrections: float
    metric: str
    mean: float
    low: float
    high: float
    count: int


def summarise(points: Sequence[RoundPoint], metric: str) -> list[Summary]:
    """Mean and range of `metric` per (strategy, round), strategies in first-seen order."""
    groups: dict[tuple[str, int], list[RoundPoint]] = {}
    for p in points:
        groups.setdefault((p.strategy, p.round), []).append(p)
    out = []
    for (strategy, number), group in groups.items():
        values = [getattr(p, metric) for p in group if getattr(p, metric) is not None]
        if not values:
            continue
        out.append(
            Summary(
                strategy=strategy,
                round=number,
                corrections=sum(p.corrections for p in group) / len(group),
                metric=metric,
                mean=sum(values) / len(values),
                low=min(values),
                high=max(values),
                count=len(values),
            )
        )
    order = list(dict.fromkeys(p.strategy for p in points))
    return sorted(out, key=lambda s: (order.index(s.strategy), s.round))


def corrections_to_reach(
    points: Sequence[RoundPoint], strategy: str, target: float, metric: str = "accuracy"
) -> float | None:
    """The fewest corrections after which `strategy`'s mean `metric` is at least `target`
    (at most, for map distance); None if it never is."""
    higher = METRICS[metric][1]
    for s in summarise([p for p in points if p.strategy == strategy], metric):
        if (s.mean >= target - 1e-12) if higher else (s.mean <= target + 1e-12):
            return s.corrections
    return None


def _pyplot():
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(points: Sequence[RoundPoint], metric: str, path: Path, title: str) -> bool:
    """`metric` against corrections, one line per strategy (mean, range shaded); False when no
    point has that metric."""
    rows = summarise(points, metric)
    if not rows:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for strategy in dict.fromkeys(r.strategy for r in rows):
        mine = [r for r in rows if r.strategy == strategy]
        xs = [r.corrections for r in mine]
        ax.plot(xs, [r.mean for r in mine], marker="o", label=strategy)
        if any(r.count > 1 for r in mine):
            ax.fill_between(xs, [r.low for r in mine], [r.high for r in mine], alpha=0.15)
    ax.set_xlabel("corrections made")
    ax.set_ylabel(METRICS[metric][0])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _cell(value: float | None, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"


def table(points: Sequence[RoundPoint]) -> list[str]:
    """A markdown table: per strategy and round, the corrections and the mean scores."""
    metrics = [m for m in METRICS if any(getattr(p, m) is not None for p in points)]
    header = ["strategy", "round", "corrections", "runs"]
    header += [METRICS[m][0] + (" [%]" if METRICS[m][1] else "") for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    by_metric = {m: {(s.strategy, s.round): s for s in summarise(points, m)} for m in metrics}
    order = list(dict.fromkeys(p.strategy for p in points))
    keys = dict.fromkeys((p.strategy, p.round) for p in points)
    for strategy, number in sorted(keys, key=lambda k: (order.index(k[0]), k[1])):
        group = [p for p in points if (p.strategy, p.round) == (strategy, number)]
        cells = [strategy, str(number), f"{sum(p.corrections for p in group) / len(group):g}"]
        cells.append(str(len(group)))
        for m in metrics:
            s = by_metric[m].get((strategy, number))
            cells.append(_cell(s.mean if s else None, METRICS[m][1]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(
    points: Sequence[RoundPoint],
    out_dir: str | Path,
    title: str,
    intro: Sequence[str] = (),
    outro: Sequence[str] = (),
) -> Path:
    """``report.md`` and the plots in `out_dir` (created); returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for metric, name in PLOTS.items():
        if plot(points, metric, out / name, METRICS[metric][0]):
            figures.append(f"![{METRICS[metric][0]}]({name})")
    lines = [f"# {title}", "", *intro, "", *table(points), "", *figures, "", *outro]
    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    log.info("wrote %s and %d plot(s)", report, len(figures))
    return report


@dataclass(frozen=True)
class ProjectRound:
    """One round of a project as the report needs it (the backend's record, in plain terms)."""

    number: int
    strategy: str
    tasks: int
    annotated: int
    corrected: int
    lead_time_s: float
    version: str
    version_after: str | None
    training: str | None  # "published", "rejected" or None (not trained yet)
    before_accuracy: float | None = None
    before_map_mse: float | None = None
    after_accuracy: float | None = None
    after_map_mse: float | None = None


def project_points(rounds: Sequence[ProjectRound]) -> list[RoundPoint]:
    """The project's rounds as points: corrections add up round after round; a round's point is
    the held-out score after its training (rounds not trained yet have none). The first point is
    the first round's "before"."""
    rounds = sorted(rounds, key=lambda r: r.number)
    points: list[RoundPoint] = []
    if rounds and (rounds[0].before_accuracy is not None or rounds[0].before_map_mse is not None):
        first = rounds[0]
        points.append(RoundPoint(first.strategy, 0, 0, first.before_accuracy, first.before_map_mse))
    made = 0
    for r in rounds:
        made += r.corrected
        if r.after_accuracy is None and r.after_map_mse is None:
            continue
        points.append(RoundPoint(r.strategy, r.number, made, r.after_accuracy, r.after_map_mse))
    return points


def round_lines(rounds: Sequence[ProjectRound]) -> list[str]:
    """A markdown table of the rounds themselves."""
    header = ["round", "strategy", "tasks", "submitted", "corrected", "annotators' time [s]",
              "version", "trained", "accuracy before -> after [%]",
              "map distance before -> after"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in sorted(rounds, key=lambda r: r.number):
        trained = {"published": f"published {r.version_after}", "rejected": "refused by the gate"}
        cells = [
            str(r.number),
            r.strategy,
            str(r.tasks),
            str(r.annotated),
            str(r.corrected),
            f"{r.lead_time_s:.1f}",
            r.version,
            trained.get(r.training or "", "not yet"),
            f"{_cell(r.before_accuracy, True)} -> {_cell(r.after_accuracy, True)}",
            f"{_cell(r.before_map_mse, False)} -> {_cell(r.after_map_mse, False)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_project_report(rounds: Sequence[ProjectRound], out_dir: str | Path, project: str) -> Path:
    """``report.md`` and plots of one project's rounds."""
    if not rounds:
        raise ValueError(f"project {project} has no rounds to report")
    per_strategy: dict[str, list[ProjectRound]] = {}
    for r in rounds:
        per_strategy.setdefault(r.strategy, []).append(r)
    outro = ["## Per strategy", "", "| strategy | rounds | corrected | annotators' time [s] |",
             "|---|---|---|---|"]  # fmt: skip
    for strategy, mine in per_strategy.items():
        outro.append(
            f"| {strategy} | {len(mine)} | {sum(r.corrected for r in mine)} | "
            f"{sum(r.lead_time_s for r in mine):.1f} |"
        )
    intro = [
        "Held-out scores are the training gate's, on the project's held-out labelled tasks: "
        '"before" is the round\'s version, "after" the model trained from the round. '
        "Corrections add up over rounds.",
        "",
        *round_lines(rounds),
        "",
        "## Held-out scores against corrections made",
    ]
    return write_report(
        project_points(rounds),
        out_dir,
        f"Active-learning rounds of project {project}",
        intro,
        outro,
    )
