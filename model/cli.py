"""The model library's commands: train, finetune, explain (also `python -m model`).

`abn` (backend/cli.py) adds the serving commands on top of these; this module never imports
the backend.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from PIL import Image

from model.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from model.errors import UserError
from model.explain import explain, overlay, side_by_side
from model.maps import load_map_image
from model.paper.decoy_digits import NAME as DECOY_DIGITS
from model.paper.decoy_digits import build_decoy_digits
from model.paper.objectives import OBJECTIVES
from model.paper.texture_shapes import BACKGROUND_NAME as BACKGROUND_SHAPES
from model.paper.texture_shapes import NAME as TEXTURE_SHAPES
from model.paper.texture_shapes import (
    build_background_shapes,
    build_texture_shapes,
    cue_conflicts,
)
from model.resnet import ARCHITECTURES
from model.train import DEFAULT_GAMMA, TrainConfig, finetune, train

log = logging.getLogger(__name__)

BUILTIN_DATA_ROOT = Path("data")
# The built-in shortcut datasets, generated offline under ./data on first use.
BUILTIN_DATASETS = {
    DECOY_DIGITS: build_decoy_digits,
    TEXTURE_SHAPES: build_texture_shapes,
    BACKGROUND_SHAPES: build_background_shapes,
}
# Those that also draw cue-conflict pictures (which cue a model follows).
BUILTIN_CONFLICTS = {TEXTURE_SHAPES: cue_conflicts}


def resolve_data(value: str) -> Path:
    """A dataset directory; a built-in one (`decoy-digits`, ...) is generated under ./data first."""
    if value in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[value](BUILTIN_DATA_ROOT / value)
    path = Path(value)
    if not path.is_dir():
        raise SystemExit(f"error: --data {value}: no such directory (or use {DECOY_DIGITS})")
    return path


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


def add_training_options(parser: argparse.ArgumentParser, epochs: int) -> None:
    """The options every training command shares (README, Commands)."""
    add_device_options(parser)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="default: 0.1 per 256 images (the ABN paper), scaled to the batch",
    )
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes")


def config_from(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        image_size=args.image_size,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
    )


def cmd_train(args: argparse.Namespace) -> None:
    data = resolve_data(args.data)
    model, meta = train(data, args.arch, args.kind, config_from(args), args.pretrained, args.se)
    save_checkpoint(args.out, model, meta)
    print(f"saved {args.out} (test top-1 {meta['metrics']['test_top1']:.4f})")


def cmd_finetune(args: argparse.Namespace) -> None:
    data = resolve_data(args.data)
    model, meta = load_checkpoint(args.checkpoint, expect_kind="abn")
    config = config_from(args)
    config.image_size = meta["image_size"]
    model, meta = finetune(model, meta, data, config, gamma=args.gamma)
    save_checkpoint(args.out, model, meta)
    print(f"saved {args.out}")


def cmd_explain(args: argparse.Namespace) -> None:
    model, meta = load_checkpoint(args.checkpoint, expect_kind="abn")
    try:
        with Image.open(args.image) as img:
            image = img.convert("RGB")
    except OSError as exc:
        raise SystemExit(f"error: {args.image}: cannot decode image ({exc})") from exc
    own = explain(model, meta, image)
    report = {"image": str(args.image), "own_map": own.top}
    panels = [image, overlay(image, own.attention)]
    if args.map:
        side = own.attention.shape[-1]
        edited = explain(model, meta, image, load_map_image(args.map, side))
        report["edited_map"] = edited.top
        panels.append(overlay(image, edited.attention))
    out = Path(args.overlay or Path(args.image).with_suffix(".explain.png").name)
    side_by_side(panels).save(out)
    report["overlay"] = str(out)
    for name in ("own_map", "edited_map"):
        if name in report:
            ranked = ", ".join(f"{c} {p:.3f}" for c, p in report[name])
            print(f"{name.replace('_', ' '):>10}: {ranked}")
    print(f"   overlay: {out}")
    if args.json:
        print(json.dumps(report))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from model.paper.evaluate import candidate_from_checkpoint, resolve_device, run_evaluation
    from model.paper.report import check_output_dir, write_evaluation

    check_output_dir(args.out)
    data = resolve_data(args.data)
    device = resolve_device(args.device)
    candidates = [candidate_from_checkpoint(spec, device) for spec in args.checkpoint]
    evaluation = run_evaluation(
        candidates,
        data,
        args.batch_size,
        device,
        limit=args.limit,
        step=args.step,
        curve_limit=args.curve_limit,
    )
    write_evaluation(evaluation, args.out)
    print(f"wrote {args.out}/metrics.json, report.md and figures")
    print(json.dumps(evaluation.metrics["methods"], indent=1))


def cmd_reproduce(args: argparse.Namespace) -> None:
    from model.paper.reproduce import ReproduceSettings, fill_defaults, reproduce

    builtin = args.data if args.data in BUILTIN_DATASETS else DECOY_DIGITS
    chosen = fill_defaults(args.data, vars(args), builtin=builtin)
    if chosen:
        shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in chosen.items())
        print(f"defaults for {args.data}: {shown}")
    if args.objective:
        cmd_objectives(args)
        return
    data = resolve_data(args.data)
    settings = ReproduceSettings(
        arch=args.arch,
        selection=args.selection,
        budget=args.budget,
        gamma=args.gamma,
        finetune_epochs=args.finetune_epochs,
        limit=args.limit,
        step=args.step,
        curve_limit=args.curve_limit,
        control=args.control,
    )
    metrics = reproduce(
        data, args.out, config_from(args), settings, args.checkpoint_dir, dataset_name=data.name
    )
    print(f"wrote {args.out}/report.md")
    print(json.dumps(metrics["methods"], indent=1))


def cmd_objectives(args: argparse.Namespace) -> None:
    """``reproduce --objective``: the objectives study on a built-in shortcut dataset."""
    from model.paper.objectives import study

    if args.data not in BUILTIN_DATASETS:
        raise SystemExit(
            f"error: --objective needs a built-in shortcut dataset ({', '.join(BUILTIN_DATASETS)}):"
            " it trains on the dataset's shortcut-free twin for the bound"
        )
    names = list(dict.fromkeys(["proposed", "control", *args.objective]))
    summary = study(
        args.data,
        BUILTIN_DATASETS[args.data],
        BUILTIN_DATA_ROOT,
        args.out,
        args.work_dir or Path("runs") / "objectives" / args.data,
        config_from(args),
        [int(s) for s in args.seeds.split(",")],
        [OBJECTIVES[n] for n in names],
        args.finetune_epochs,
        "python -m model " + shlex.join(sys.argv[1:]),
        BUILTIN_CONFLICTS.get(args.data),
    )
    print(f"wrote {args.out}/report.md (chosen on validation: {summary['chosen_on_validation']})")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the model library's commands on a subparser set (shared with `abn`)."""
    p = sub.add_parser("train", help="train an ABN (or the plain ResNet baseline)")
    p.add_argument("--data", required=True, help=f"dataset directory, or {DECOY_DIGITS}")
    p.add_argument("--arch", default="resnet18", choices=list(ARCHITECTURES))
    p.add_argument("--kind", default="abn", choices=["abn", "resnet"])
    p.add_argument(
        "--pretrained",
        default=None,
        help="torchvision weights name (IMAGENET1K_V1) or a local state-dict file",
    )
    p.add_argument("--se", action="store_true", help="squeeze-and-excitation blocks (SENet)")
    p.add_argument("--out", required=True, type=Path)
    add_training_options(p, epochs=10)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune an ABN's branches with human maps (sec. 4.3)")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, help=f"dataset directory, or {DECOY_DIGITS}")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help="weight of the map loss")
    add_training_options(p, epochs=5)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("explain", help="top-3 with the model's own map and with an edited one")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--map", type=Path, help="edited map: grayscale image, 255 = attend")
    p.add_argument("--overlay", type=Path, help="where to write the overlay PNG")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("evaluate", help="the paper's measures for checkpoints on a test split")
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="[NAME=]PATH, NAME in resnet/abn/proposed (default: from the checkpoint); repeatable",
    )
    p.add_argument("--data", required=True, help=f"dataset directory, or {DECOY_DIGITS}")
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json, report.md")
    p.add_argument("--limit", type=int, help="evaluate only N test images (spread over classes)")
    p.add_argument("--step", type=int, help="deletion/insertion pixels per step (default: width)")
    p.add_argument("--curve-limit", type=int, help="deletion/insertion on only N test images")
    add_device_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reproduce", help="the paper's protocol end to end on one dataset")
    p.add_argument("--data", required=True, help=f"dataset directory, or {DECOY_DIGITS}")
    p.add_argument("--out", required=True, type=Path, help="folder for the report")
    p.add_argument("--arch", default="resnet18", choices=list(ARCHITECTURES))
    p.add_argument("--selection", default="misclassified", choices=["misclassified", "confidence"])
    p.add_argument("--budget", type=int, help="most training samples to correct (default: all)")
    p.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help="weight of the map loss")
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--checkpoint-dir", type=Path, help="default: OUTDIR/checkpoints")
    p.add_argument(
        "--control", action="store_true", help="also fine-tune with gamma 0 and report it"
    )
    p.add_argument("--limit", type=int, help="evaluate only N test images (spread over classes)")
    p.add_argument("--step", type=int, help="deletion/insertion pixels per step (default: width)")
    p.add_argument("--curve-limit", type=int, help="deletion/insertion on only N test images")
    p.add_argument(
        "--objective",
        action="append",
        choices=sorted(OBJECTIVES),
        help="study this fine-tuning objective beside ABN, proposed, control and the "
        "shortcut-free bound (repeatable; built-in shortcut datasets only)",
    )
    p.add_argument("--seeds", default="0,1,2", help="with --objective: comma-separated seeds")
    p.add_argument("--work-dir", type=Path, help="with --objective: default runs/objectives/DATA")
    add_training_options(p, epochs=0)
    p.set_defaults(func=cmd_reproduce, epochs=None, image_size=None)

    p = sub.add_parser("sweep", help="choose gamma on a validation split carved from TRAIN")
    add_sweep_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "round-study", help="active-learning strategies, simulated with an oracle annotator"
    )
    add_round_study_options(p)
    p.set_defaults(func=cmd_round_study)


def add_sweep_options(p: argparse.ArgumentParser) -> None:
    """The options of ``abn sweep``."""
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path, help="markdown file for the table")
    p.add_argument("--work-dir", type=Path, default=Path("runs/gamma-sweep"))
    p.add_argument("--gammas", default="0,0.3,1,3,10")
    p.add_argument("--budgets", default="all", help="comma list of ints or 'all'")
    p.add_argument("--selections", default="misclassified")
    p.add_argument(
        "--extra",
        default="",
        help="more settings after the grid: SELECTION:BUDGET:GAMMA,... (BUDGET an int or all)",
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--curve-limit", type=int, default=100)
    p.add_argument("--device", default="auto")


def add_round_study_options(p: argparse.ArgumentParser) -> None:
    """The options of ``round-study`` (model/round_study.py)."""
    from model.round_study import GATE_JUDGES, StudySettings

    d = StudySettings()
    p.add_argument("--data", required=True, help=f"dataset directory, or {DECOY_DIGITS}")
    p.add_argument("--out", required=True, type=Path, help="folder for report.md and plots")
    p.add_argument("--work-dir", type=Path, default=Path("runs/round-study"))
    p.add_argument("--strategies", default=",".join(d.strategies))
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--size", type=int, default=d.size, help="corrections per round")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    p.add_argument("--epochs", type=int, default=d.epochs, help="of the first model")
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--fraction", type=float, default=d.fraction, help="of TRAIN for validation")
    p.add_argument("--device", default=d.device)
    p.add_argument(
        "--counterfactuals",
        type=int,
        default=d.counterfactual_copies,
        help="counterfactual copies of each corrected image per round (0: the paper's objective)",
    )
    p.add_argument(
        "--learning-stages",
        type=int,
        choices=range(4),
        default=d.learning_stages,
        help="trunk stages that learn in each round (0: the branches only)",
    )
    p.add_argument(
        "--replay",
        type=int,
        default=d.replay,
        help="uncorrected pool images each round also learns from by class only (0: none)",
    )
    p.add_argument(
        "--guided-copies",
        action="store_true",
        help="copy every example of a round, cut by a first fine-tune's maps where no human "
        "drew one (opt-in in a project: ABN_GUIDED_COPIES; needs --counterfactuals)",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        default=d.finetune_lr,
        help="each round's learning rate (default: the first model's, 0.1 per 256 images)",
    )
    p.add_argument(
        "--follow-gate",
        choices=GATE_JUDGES,
        default=d.follow_gate,
        help="drop each round this judge of the gate refuses, as a project does "
        "(default: go on from every round)",
    )


def cmd_round_study(args: argparse.Namespace) -> None:
    from model.round_study import StudySettings, parse_list, run_study, seeds_of, write_study

    settings = StudySettings(
        strategies=parse_list(args.strategies),
        rounds=args.rounds,
        size=args.size,
        seeds=seeds_of(args.seeds),
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        gamma=args.gamma,
        fraction=args.fraction,
        device=args.device,
        counterfactual_copies=args.counterfactuals,
        learning_stages=args.learning_stages,
        replay=args.replay,
        guided_copies=args.guided_copies,
        finetune_lr=args.finetune_lr,
        follow_gate=args.follow_gate,
    )
    data = resolve_data(args.data)
    result = run_study(data, args.work_dir, settings)
    command = "python -m model " + shlex.join(sys.argv[1:])
    report = write_study(result, settings, args.out, command)
    print(f"wrote {report}")


def cmd_sweep(args: argparse.Namespace) -> None:
    """``abn sweep``: run the grid and write the markdown table to ``--out``."""
    from model.paper.sweep import render, sweep

    data = resolve_data(args.data)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        seed=args.seed,
        device=args.device,
    )

    def budget(text: str) -> int | None:
        return None if text == "all" else int(text)

    settings = [
        (selection, budget(b), float(g))
        for selection in args.selections.split(",")
        for b in args.budgets.split(",")
        for g in args.gammas.split(",")
    ]
    for item in filter(None, args.extra.split(",")):
        selection, b, g = item.split(":")
        settings.append((selection, budget(b), float(g)))
    rows, facts = sweep(
        data,
        args.work_dir,
        config,
        settings=settings,
        finetune_epochs=args.finetune_epochs,
        fraction=args.fraction,
        step=8 * args.image_size,
        curve_limit=args.curve_limit,
        decoy=args.data == DECOY_DIGITS,
    )
    command = "abn " + shlex.join(sys.argv[1:])
    text = render(rows, facts, command)
    with atomic_write(args.out, "w") as f:
        f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    args.out.chmod(0o666 & ~umask)  # atomic_write's temporary file is private
    print(text)


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def build_parser(prog: str = "python -m model") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def run_command(args: argparse.Namespace) -> None:
    """Run a parsed command; a user's mistake ends with its message, a bug with its traceback."""
    configure_logging(args.verbose)
    try:
        args.func(args)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from exc


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser().parse_args(argv))
