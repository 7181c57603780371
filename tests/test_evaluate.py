"""`abn evaluate` (model.paper.evaluate, model.paper.report): schema, report, bad input, atomicity.

Everything runs on a 6-image synthetic dataset at 32 px (3 classes, 2 test images each) with
untrained checkpoints, so a full evaluation takes a second or two on a shared CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_dataset

from model import build_abn, build_resnet, save_checkpoint
from model.checkpoint import make_meta
from model.cli import main
from model.data import DatasetError
from model.paper.evaluate import (
    Candidate,
    Evaluation,
    MethodResult,
    candidate_from_checkpoint,
    evaluate_checkpoints,
    paired_top1,
    parse_checkpoint_spec,
    role_of,
    run_evaluation,
)
from model.paper.report import (
    OutputDirError,
    check_output_dir,
    example_columns,
    render_markdown,
    write_evaluation,
)

CLASSES = ["ant", "bee", "cat"]
SIZE = 32
STEP = 8 * SIZE  # 4 steps per curve: enough to exercise the curves, quick to score
METRIC_KEYS = {"top1", "top5", "deletion", "insertion", "map_mse"}


def make_dataset(root: Path, maps: bool = True, per_class: int = 2) -> Path:
    """Random images; the human map is the image's left half (255) for every image."""
    half = np.zeros((SIZE, SIZE), dtype=np.uint8)
    half[:, : SIZE // 2] = 255
    return make_image_dataset(root, CLASSES, half if maps else None, per_class, seed=0)


def make_checkpoint(path: Path, kind: str, classes: list[str] = CLASSES, **extra: object) -> Path:
    torch.manual_seed(0)
    builder = build_abn if kind == "abn" else build_resnet
    model = builder("resnet18", len(classes))
    save_checkpoint(path, model, make_meta(kind, "resnet18", classes, SIZE, **extra))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("eval") / "tiny")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "abn": make_checkpoint(root / "abn.pt", "abn"),
        "resnet": make_checkpoint(root / "resnet.pt", "resnet"),
        "tuned": make_checkpoint(
            root / "tuned.pt", "abn", settings={"gamma": 1.0, "finetuned_from": {}}
        ),
    }


@pytest.fixture(scope="module")
def cli_run(data: Path, ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real `abn evaluate` of a random ABN and a random ResNet (the end-to-end case)."""
    out = tmp_path_factory.mktemp("cli") / "out"
    main(
        [
            "evaluate",
            "--checkpoint",
            str(ckpts["abn"]),
            "--checkpoint",
            f"resnet={ckpts['resnet']}",
            "--data",
            str(data),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--step",
            str(STEP),
            "--device",
            "cpu",
        ]
    )
    return out


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def test_cli_writes_schema_report_and_figures(cli_run: Path) -> None:
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert set(metrics) == {"dataset", "arch", "image_size", "methods"}
    assert metrics["dataset"] == "tiny"
    assert metrics["arch"] == "resnet18" and metrics["image_size"] == SIZE
    methods = metrics["methods"]
    assert list(methods) == ["resnet", "cam", "gradcam", "abn"]  # the paper's order, no proposed
    assert set(methods["resnet"]) == {"top1", "top5"}
    assert set(methods["cam"]) == set(methods["gradcam"]) == {"deletion", "insertion", "map_mse"}
    assert set(methods["abn"]) == METRIC_KEYS
    for values in methods.values():
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values.values())
    assert methods["abn"]["top5"] == 1.0  # 3 classes: top-5 is clamped to top-3
    for name in ("report.md", "figures/examples.png", "figures/curves.png"):
        assert (cli_run / name).is_file(), name
    report = (cli_run / "report.md").read_text()
    for row in ("ResNet18+ABN", "ResNet18", "CAM", "Grad-CAM", "ABN"):
        assert f"\n| {row} |" in report, row
    assert "Proposed" not in report
    leftovers = [p.name for p in cli_run.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_python_api_matches_cli(cli_run: Path, data: Path, ckpts: dict[str, Path]) -> None:
    metrics = evaluate_checkpoints(
        [ckpts["abn"], ("resnet", ckpts["resnet"])], data, batch_size=4, device="cpu", step=STEP
    )
    written = json.loads((cli_run / "metrics.json").read_text())
    assert metrics.keys() == written.keys()
    for method, values in written["methods"].items():
        for key, value in values.items():
            assert metrics["methods"][method][key] == pytest.approx(value, abs=1e-6)


def test_finetuned_checkpoint_is_proposed_and_limit(data: Path, ckpts: dict[str, Path]) -> None:
    candidates = [candidate_from_checkpoint(ckpts[k], "cpu") for k in ("tuned", "abn")]
    assert [c.role for c in candidates] == ["proposed", "abn"]
    evaluation = run_evaluation(candidates, data, batch_size=8, device="cpu", limit=3, step=STEP)
    assert evaluation.num_samples == 3
    assert list(evaluation.metrics["methods"]) == ["abn", "proposed"]
    assert [name for name, _ in example_columns(evaluation)] == [
        "image",
        "human map",
        "ABN",
        "Proposed",
    ]


# --------------------------------------------------------------------------------------------
# Which methods, which metrics
# --------------------------------------------------------------------------------------------


def fake_evaluation(methods: list[str], with_maps: bool = True) -> Evaluation:
    """An Evaluation built by hand, for rendering tests that need no model."""
    results = {}
    for m in methods:
        metrics: dict[str, float] = {}
        if m in ("resnet", "abn", "proposed"):
            metrics.update(top1=0.5, top5=0.9)
        if m != "resnet":
            metrics.update(deletion=0.2, insertion=0.6)
            if with_maps:
                metrics["map_mse"] = 0.1
        maps = None if m == "resnet" else np.zeros((2, 2, 2))
        results[m] = MethodResult(m, metrics, example_maps=maps)
    return Evaluation(
        dataset="fake",
        arch="resnet18",
        image_size=SIZE,
        classes=CLASSES,
        num_samples=2,
        num_maps=2 if with_maps else 0,
        step=SIZE,
        methods=results,
        sources={},
        example_images=np.zeros((2, SIZE, SIZE, 3), dtype=np.uint8),
        example_labels=[0, 1],
        example_human=np.zeros((2, 2, 2)) if with_maps else None,
    )


ROW = {
    "resnet": "| ResNet18 |",
    "cam": "| CAM |",
    "gradcam": "| Grad-CAM |",
    "abn": "| ResNet18+ABN |",
    "proposed": "| Proposed (ResNet18+ABN) |",
}
MAP_ROW = {
    "cam": "| CAM |",
    "gradcam": "| Grad-CAM |",
    "abn": "| ABN |",
    "proposed": "| Proposed |",
}


@pytest.mark.parametrize(
    "methods",
    [
        ["abn"],
        ["proposed"],
        ["resnet", "cam", "gradcam"],
        ["abn", "proposed"],
        ["resnet", "cam", "gradcam", "abn", "proposed"],
    ],
)
def test_report_renders_exactly_the_methods_run(methods: list[str]) -> None:
    evaluation = fake_evaluation(methods)
    report = render_markdown(evaluation)
    for m in ("resnet", "abn", "proposed"):
        assert ("\n" + ROW[m] in report) == (m in methods), m
    for m in ("cam", "gradcam", "abn", "proposed"):
        assert ("\n" + MAP_ROW[m] in report) == (m in methods), m
    assert list(evaluation.metrics["methods"]) == [
        m for m in ("resnet", "cam", "gradcam", "abn", "proposed") if m in methods
    ]
    columns = [name for name, _ in example_columns(evaluation)]
    labels = {"cam": "CAM", "gradcam": "Grad-CAM", "abn": "ABN", "proposed": "Proposed"}
    assert columns == ["image", "human map", *(labels[m] for m in labels if m in methods)]


def test_without_maps_no_mse_anywhere() -> None:
    evaluation = fake_evaluation(["abn", "proposed"], with_maps=False)
    report = render_markdown(evaluation)
    assert "squared error" not in report
    assert all("map_mse" not in v for v in evaluation.metrics["methods"].values())
    assert "human map" not in [name for name, _ in example_columns(evaluation)]


def test_dataset_without_maps_warns_and_omits_map_metrics(
    tmp_path: Path, ckpts: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    data = make_dataset(tmp_path / "nomaps", maps=False)
    candidate = candidate_from_checkpoint(ckpts["abn"], "cpu")
    with caplog.at_level(logging.WARNING, logger="model.paper.evaluate"):
        evaluation = run_evaluation([candidate], data, batch_size=8, device="cpu", step=STEP)
    assert "no human maps under" in caplog.text and "maps/test" in caplog.text
    assert set(evaluation.metrics["methods"]["abn"]) == METRIC_KEYS - {"map_mse"}
    assert evaluation.example_human is None
    assert "squared error" not in render_markdown(evaluation)


def test_roles_from_names_and_records(ckpts: dict[str, Path]) -> None:
    assert parse_checkpoint_spec("proposed=/x/y.pt") == ("proposed", Path("/x/y.pt"))
    assert parse_checkpoint_spec("/x/y.pt") == (None, Path("/x/y.pt"))
    with pytest.raises(ValueError, match="NAME must be one of"):
        parse_checkpoint_spec("tuned=/x/y.pt")
    assert role_of({"kind": "resnet"}) == "resnet"
    assert role_of({"kind": "abn", "settings": {"epochs": 3}}) == "abn"
    assert role_of({"kind": "abn", "settings": {"gamma": 0.5}}) == "proposed"
    with pytest.raises(ValueError, match="cannot play 'abn'"):
        candidate_from_checkpoint(f"abn={ckpts['resnet']}")
    abn = candidate_from_checkpoint(ckpts["abn"])
    with pytest.raises(ValueError, match="more than one checkpoint plays"):
        run_evaluation([abn, abn], Path("unused"))


# --------------------------------------------------------------------------------------------
# Bad input: clear errors, OUTDIR untouched
# --------------------------------------------------------------------------------------------


def previous_output(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text('{"previous": true}')
    return path


def assert_untouched(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    assert json.loads((out / "metrics.json").read_text()) == {"previous": True}
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def evaluate_cli(ckpt: Path, data: Path, out: Path) -> None:
    main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out)])


def test_no_test_split(tmp_path: Path, data: Path, ckpts: dict[str, Path]) -> None:
    broken = tmp_path / "notest"
    shutil.copytree(data / "train", broken / "train")
    out = previous_output(tmp_path / "out")
    with pytest.raises(SystemExit, match="no 'test' split"):
        evaluate_cli(ckpts["abn"], broken, out)
    assert_untouched(out)


def test_classes_not_matching_checkpoint(
    tmp_path: Path, data: Path, ckpts: dict[str, Path]
) -> None:
    other = make_checkpoint(tmp_path / "other.pt", "abn", classes=["x", "y", "z"])
    out = tmp_path / "new-out"
    with pytest.raises(SystemExit, match=r"classes the model does not know: \['ant', 'bee'"):
        evaluate_cli(other, data, out)
    assert not out.exists()
    with pytest.raises(ValueError, match="classes"):
        run_evaluation(
            [
                candidate_from_checkpoint(ckpts["abn"]),
                candidate_from_checkpoint(f"proposed={other}"),
            ],
            data,
        )


def test_unreadable_image_is_named(tmp_path: Path, data: Path, ckpts: dict[str, Path]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    bad = broken / "test" / "bee" / "1.png"
    bad.write_bytes(b"not a png")
    out = previous_output(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"1 test image\(s\) cannot be decoded: .*bee/1\.png"):
        evaluate_cli(ckpts["abn"], broken, out)
    assert_untouched(out)


def test_outdir_with_foreign_files_is_refused_before_work(
    tmp_path: Path, ckpts: dict[str, Path]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="not empty"):
        check_output_dir(out)
    with pytest.raises(SystemExit, match="not empty"):
        evaluate_cli(ckpts["abn"], tmp_path / "does-not-matter", out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_failure_while_writing_leaves_outdir_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = previous_output(tmp_path / "out")

    def explode(*_args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("model.paper.report.plot_examples", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        write_evaluation(fake_evaluation(["abn"]), out)
    assert_untouched(out)
    monkeypatch.undo()
    write_evaluation(fake_evaluation(["abn"]), out)  # an earlier output is replaced whole
    assert json.loads((out / "metrics.json").read_text())["dataset"] == "fake"
    assert (out / "figures" / "examples.png").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unreadable_map_is_named(tmp_path: Path, data: Path) -> None:
    broken = tmp_path / "badmap"
    shutil.copytree(data, broken)
    (broken / "maps" / "test" / "cat" / "0.png").write_bytes(b"\x89PNG broken")
    model = build_abn("resnet18", len(CLASSES))
    candidate = Candidate("abn", model, make_meta("abn", "resnet18", CLASSES, SIZE))
    with pytest.raises(DatasetError, match=r"human map\(s\) cannot be decoded: .*cat/0\.png"):
        run_evaluation([candidate], broken)


def test_paired_top1_counts_discordant_images() -> None:
    a = MethodResult("abn", correct=np.array([True, True, False, False, True]))
    b = MethodResult("proposed", correct=np.array([True, False, True, True, True]))
    only_a, only_b, p = paired_top1(a, b)
    assert (only_a, only_b) == (1, 2)
    assert p == pytest.approx(1.0)  # 1 vs 2 discordant pairs: no evidence either way
    assert paired_top1(a, MethodResult("cam")) is None
