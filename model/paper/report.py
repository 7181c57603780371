"""Writing an evaluation: metrics.json, report.md laid out like the paper's tables, and figures.

Everything is staged in a temporary folder next to OUTDIR and moved into place only once it is
complete, so a failure (bad data, a crash, Ctrl-C) leaves OUTDIR as it was. OUTDIR may be new,
empty, or an earlier output of this module (it holds a metrics.json); a folder with other
content is refused before any work starts, because it is replaced as a whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from model.errors import UserError
from model.paper.evaluate import METHODS, Evaluation, curve_points

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
FIGURES = "figures"
EXAMPLES_PNG = f"{FIGURES}/examples.png"
CURVES_PNG = f"{FIGURES}/curves.png"

LABELS = {
    "resnet": "{arch}",
    "cam": "CAM",
    "gradcam": "Grad-CAM",
    "abn": "{arch}+ABN",
    "proposed": "Proposed ({arch}+ABN)",
}
MAP_LABELS = {"cam": "CAM", "gradcam": "Grad-CAM", "abn": "ABN", "proposed": "Proposed"}
COLOURS = {"cam": "tab:gray", "gradcam": "tab:orange", "abn": "tab:blue", "proposed": "tab:green"}

__all__ = [
    "check_output_dir",
    "render_markdown",
    "staged_output",
    "write_evaluation",
]


# --------------------------------------------------------------------------------------------
# OUTDIR, all or nothing
# --------------------------------------------------------------------------------------------


class OutputDirError(UserError, ValueError):
    """OUTDIR cannot be (re)written: it holds files this tool did not write."""


def check_output_dir(out_dir: str | Path) -> None:
    """Refuse early an OUTDIR that is a file or holds someone else's files."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / METRICS_FILE).is_file():
        raise OutputDirError(
            f"{out} is not empty and holds no {METRICS_FILE}: it would be replaced as a whole; "
            "choose a new or empty folder"
        )


@contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """A temporary folder that becomes ``out_dir`` when the block ends without error."""
    out = Path(out_dir)
    check_output_dir(out)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; OUTDIR should be an ordinary folder
    try:
        yield staging
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, out: Path) -> None:
    """Swap the staged folder in: one rename, plus moving the previous output aside first."""
    check_output_dir(out)
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=staging.parent))
            os.replace(out, old / "previous")
        else:
            out.rmdir()
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old / "previous", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------


def _arch_label(arch: str) -> str:
    return arch.replace("resnet", "ResNet")


def method_label(method: str, arch: str) -> str:
    return LABELS[method].format(arch=_arch_label(arch))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _best(values: dict[str, float], lower: bool) -> set[str]:
    """The methods holding the best value (all of them on a tie); none when only one ran."""
    if len(values) < 2:
        return set()
    target = (min if lower else max)(values.values())
    return {m for m, v in values.items() if v == target}


def _fmt(value: float, best: bool, percent: bool = False) -> str:
    text = f"{100 * value:.2f}" if percent else f"{value:.4f}"
    return f"**{text}**" if best else text


def render_markdown(
    evaluation: Evaluation,
    title: str | None = None,
    preamble: Sequence[str] = (),
    sections: Sequence[str] = (),
) -> str:
    """The paper's Tables 3-5 (6-8) for the methods that were run, and the figures.

    ``preamble`` lines go under the title, ``sections`` lines after the tables.
    """
    metrics = evaluation.metrics["methods"]
    arch = evaluation.arch
    lines = [f"# {title or f'Evaluation on {evaluation.dataset}'}", ""]
    lines += list(preamble)
    if preamble:
        lines.append("")
    lines += [
        f"Test split: {evaluation.num_samples} images of {len(evaluation.classes)} classes at "
        f"{evaluation.image_size}x{evaluation.image_size} px; "
        f"{evaluation.num_maps} with a human map.",
        "",
    ]
    if evaluation.sources:
        lines += ["Checkpoints:", ""]
        lines += [f"- {role}: `{src}`" for role, src in evaluation.sources.items() if src]
        lines.append("")

    acc = {m: metrics[m] for m in METHODS if m in metrics and "top1" in metrics[m]}
    if acc:
        best1 = _best({m: v["top1"] for m, v in acc.items()}, lower=False)
        best5 = _best({m: v["top5"] for m, v in acc.items()}, lower=False)
        lines += ["## Accuracy (cf. the paper's Tables 3 and 6) [%]", ""]
        rows = [
            [
                method_label(m, arch),
                _fmt(v["top1"], m in best1, percent=True),
                _fmt(v["top5"], m in best5, percent=True),
            ]
            for m, v in acc.items()
        ]
        lines += _table(["Model", "top-1", "top-5"], rows)
        if len(evaluation.classes) <= 5:
            lines += ["", f"With {len(evaluation.classes)} classes top-5 is trivially 100%."]
        lines.append("")

    curves = {m: metrics[m] for m in METHODS if m in metrics and "deletion" in metrics[m]}
    if curves:
        best_del = _best({m: v["deletion"] for m, v in curves.items()}, lower=True)
        best_ins = _best({m: v["insertion"] for m, v in curves.items()}, lower=False)
        points = curve_points(evaluation.image_size, evaluation.step)
        lines += [
            "## Deletion (lower is better) and insertion (higher is better) (cf. Tables 4 and 7)",
            "",
        ]
        rows = [
            [MAP_LABELS[m], _fmt(v["deletion"], m in best_del), _fmt(v["insertion"], m in best_ins)]
            for m, v in curves.items()
        ]
        lines += _table(["Method", f"Deletion ({_arch_label(arch)})", "Insertion"], rows)
        lines += [
            "",
            f"RISE protocol: {evaluation.step} pixels per step ({points} points per curve), "
            "probability of the class predicted on the clean image; deletion fills with zeros "
            "in normalised space, insertion starts from RISE's blur.",
            "",
        ]

    mse = {m: metrics[m] for m in METHODS if m in metrics and "map_mse" in metrics[m]}
    if mse:
        best = _best({m: v["map_mse"] for m, v in mse.items()}, lower=True)
        lines += ["## Mean squared error to the human maps (lower is better) (cf. Tables 5, 8)", ""]
        rows = [[MAP_LABELS[m], _fmt(v["map_mse"], m in best)] for m, v in mse.items()]
        lines += _table(["Method", _arch_label(arch)], rows)
        lines += [
            "",
            "Maps are compared at the human map's resolution (the attention map's, image/16); "
            "CAM and Grad-CAM are min-max normalised first, ABN's sigmoid map is used as is.",
            "",
        ]
    lines += [f"- {note}" for note in evaluation.notes]
    if evaluation.notes:
        lines.append("")
    lines += list(sections)
    if sections:
        lines.append("")
    lines += ["## Figures", ""]
    if len(evaluation.example_images):
        lines += [f"![examples]({EXAMPLES_PNG})", ""]
    if curves:
        lines += [f"![deletion and insertion curves]({CURVES_PNG})", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _pyplot():
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _upsample(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A small map to image size (bilinear), for overlays."""
    from PIL import Image

    img = Image.fromarray(np.nan_to_num(values.astype(np.float32)), mode="F")
    return np.asarray(img.resize((width, height), Image.BILINEAR))


def example_columns(evaluation: Evaluation) -> list[tuple[str, np.ndarray | None]]:
    """The example grid's columns: the image, the human map and each method's map, if they exist."""
    columns: list[tuple[str, np.ndarray | None]] = [("image", None)]
    if evaluation.example_human is not None:
        columns.append(("human map", evaluation.example_human))
    for m in ("cam", "gradcam", "abn", "proposed"):
        r = evaluation.methods.get(m)
        if r is not None and r.example_maps is not None:
            columns.append((MAP_LABELS[m], r.example_maps))
    return columns


def plot_examples(evaluation: Evaluation, path: Path) -> None:
    """Image, human map, CAM, Grad-CAM, ABN, Proposed: one row per example, existing columns."""
    plt = _pyplot()
    images = evaluation.example_images
    columns = example_columns(evaluation)
    rows, cols = len(images), len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    height, width = images.shape[1:3]
    for i in range(rows):
        for j, (name, maps) in enumerate(columns):
            ax = axes[i][j]
            ax.imshow(images[i], interpolation="nearest")
            if maps is not None and not np.isnan(maps[i]).all():
                ax.imshow(
                    _upsample(maps[i], height, width), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(evaluation.classes[evaluation.example_labels[i]], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_curves(evaluation: Evaluation, path: Path) -> None:
    """Mean deletion and insertion curves per method, with their areas in the legend."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for m in ("cam", "gradcam", "abn", "proposed"):
            r = evaluation.methods.get(m)
            if r is None or r.fractions is None:
                continue
            curve = r.deletion_curve if kind == "deletion" else r.insertion_curve
            ax.plot(
                r.fractions,
                curve,
                label=f"{MAP_LABELS[m]} ({r.metrics[kind]:.3f})",
                color=COLOURS[m],
            )
        ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} is better)")
        ax.set_xlabel("fraction of pixels " + ("deleted" if kind == "deletion" else "inserted"))
        ax.set_ylabel("probability of predicted class")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# All of it
# --------------------------------------------------------------------------------------------


def write_evaluation_files(
    evaluation: Evaluation,
    folder: Path,
    title: str | None = None,
    preamble: Sequence[str] = (),
    sections: Sequence[str] = (),
) -> None:
    """Write metrics.json, report.md and figures into an existing (staging) folder."""
    (folder / FIGURES).mkdir(exist_ok=True)
    (folder / METRICS_FILE).write_text(json.dumps(evaluation.metrics, indent=2) + "\n")
    if len(evaluation.example_images):
        plot_examples(evaluation, folder / EXAMPLES_PNG)
    if any(r.fractions is not None for r in evaluation.methods.values()):
        plot_curves(evaluation, folder / CURVES_PNG)
    (folder / REPORT_FILE).write_text(render_markdown(evaluation, title, preamble, sections))


def write_evaluation(evaluation: Evaluation, out_dir: str | Path, **kwargs: Any) -> Path:
    """Write an evaluation to ``out_dir`` all at once (see the module's docstring)."""
    with staged_output(out_dir) as staging:
        write_evaluation_files(evaluation, staging, **kwargs)
    log.info("wrote %s", out_dir)
    return Path(out_dir)
