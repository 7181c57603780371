"""The ABN model library: architecture, edited maps, fine-tuning, checkpoints, human maps."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import build_abn, build_resnet, load_checkpoint, save_checkpoint
from model.checkpoint import CheckpointError, make_meta
from model.data import (
    AttentionDataset,
    DatasetError,
    InMemoryMapsDataset,
    find_classes,
    list_samples,
)
from model.losses import map_loss
from model.maps import bubbles_to_map, mask_to_map
from model.paper.decoy_digits import build_decoy_digits
from model.pretrained import PretrainedWeightsError
from model.train import TrainConfig, finetune, train

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


@pytest.fixture(scope="module")
def decoy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_decoy_digits(tmp_path_factory.mktemp("data") / "decoy-digits")


@pytest.mark.parametrize("se", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_map_shape_and_range(arch: str, se: bool) -> None:
    torch.manual_seed(0)
    model = build_abn(arch, num_classes=5, se=se)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 48))  # train mode: BatchNorm on batch statistics
    assert out.attention.shape == (2, 1, 4, 3)
    assert float(out.attention.min()) > 0.0 and float(out.attention.max()) < 1.0
    assert out.attention_logits.shape == out.perception_logits.shape == (2, 5)
    with torch.no_grad():  # untrained running statistics can saturate the sigmoid in float32
        frozen = model.eval()(torch.randn(2, 3, 64, 48)).attention
    assert float(frozen.min()) >= 0.0 and float(frozen.max()) <= 1.0


def test_map_is_input_over_16_for_224() -> None:
    model = build_abn("resnet18", 10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).attention.shape == (1, 1, 14, 14)


def test_edited_map_reaches_the_perception_branch() -> None:
    torch.manual_seed(0)
    model = build_abn("resnet18", 4).eval()
    x = torch.randn(1, 3, 64, 64)
    ones, zeros = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    with torch.no_grad():
        own = model(x)
        a, b, a_again = model(x, attention=ones), model(x, attention=zeros), model(x, ones)
    assert not torch.allclose(a.perception_logits, b.perception_logits)
    assert torch.equal(a.perception_logits, a_again.perception_logits)
    # The attention branch is untouched by the edit; the map reported is the one used.
    assert torch.equal(a.attention_logits, own.attention_logits)
    assert torch.equal(a.attention, ones)


def test_edited_map_of_wrong_shape_is_refused() -> None:
    model = build_abn("resnet18", 4).eval()
    with pytest.raises(ValueError, match="edited attention map has shape"):
        model(torch.randn(1, 3, 64, 64), attention=torch.ones(1, 1, 5, 5))


def test_map_loss_matches_hand_computation() -> None:
    pred = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]], [[[0.0, 1.0], [1.0, 0.0]]]])
    human = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    # sample 0: sqrt(4 * 0.25) = 1; sample 1: sqrt(2) ; mean over both
    both = map_loss(pred, human, torch.tensor([True, True]))
    assert both.item() == pytest.approx((1.0 + 2**0.5) / 2)
    only_second = map_loss(pred, human, torch.tensor([False, True]))
    assert only_second.item() == pytest.approx(2**0.5)
    assert map_loss(pred, human, torch.tensor([False, False])).item() == 0.0


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_finetune_step_touches_only_the_branches(decoy: Path) -> None:
    torch.manual_seed(0)
    model = build_abn("resnet18", 10)
    meta = make_meta("abn", "resnet18", find_classes(decoy), image_size=32)
    trunk_before = _snapshot(model.trunk())
    branches_before = [_snapshot(b) for b in model.branches()]
    data = AttentionDataset(decoy, "train", meta["classes"], 32, meta["mean"], meta["std"])
    data.samples = data.samples[:16]
    finetune(model, meta, decoy, TrainConfig(epochs=1, batch_size=8, device="cpu"), dataset=data)
    trunk_after = _snapshot(model.trunk())
    assert trunk_before.keys() == trunk_after.keys()
    assert any("running_mean" in k for k in trunk_after)
    for key, value in trunk_before.items():
        assert torch.equal(value, trunk_after[key]), key
    for before, branch in zip(branches_before, model.branches(), strict=True):
        after = _snapshot(branch)
        assert any(not torch.equal(before[k], after[k]) for k in before)


def test_finetune_on_a_single_sample_learns_without_batch_statistics() -> None:
    """A round with one training correction used to crash in BatchNorm ("more than 1 value")."""
    torch.manual_seed(0)
    model = build_abn("resnet18", 3)
    meta = make_meta("abn", "resnet18", ["a", "b", "c"], image_size=32)
    data = InMemoryMapsDataset(
        torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.rand(1, 1, 2, 2), torch.tensor([True])
    )
    branches_before = [_snapshot(b) for b in model.branches()]
    config = TrainConfig(epochs=2, batch_size=8, device="cpu")
    tuned, new_meta = finetune(model, meta, "one correction", config, dataset=data)
    assert len(new_meta["history"]) == 2
    for before, branch in zip(branches_before, tuned.branches(), strict=True):
        after = _snapshot(branch)
        assert any(not torch.equal(before[k], after[k]) for k in before if "running" not in k)
        for key in (k for k in before if "running" in k):  # statistics were used, not moved
            assert torch.equal(before[key], after[key]), key


def test_feature_cache_gives_the_same_loss_as_recomputing(decoy: Path) -> None:
    torch.manual_seed(0)
    start = build_abn("resnet18", 10)
    classes = find_classes(decoy)
    meta = make_meta("abn", "resnet18", classes, image_size=32)
    data = AttentionDataset(decoy, "train", classes, 32, meta["mean"], meta["std"])
    data.samples = data.samples[:24]
    config = TrainConfig(epochs=2, batch_size=8, device="cpu")
    runs = {}
    for use_cache in (True, False):
        model, new_meta = finetune(
            copy.deepcopy(start), meta, decoy, config, dataset=data, use_cache=use_cache
        )
        runs[use_cache] = ([row["loss"] for row in new_meta["history"]], model.state_dict())
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for key, value in runs[True][1].items():
        assert torch.allclose(value.float(), runs[False][1][key].float(), atol=1e-5), key


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_abn("resnet18", 3, se=True)
    meta = make_meta("abn", "resnet18", ["a", "b", "c"], 64, se=True, parent_version="v1")
    path = save_checkpoint(tmp_path / "m.pt", model, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta
    assert not loaded.training
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_checkpoint_refusals(tmp_path: Path) -> None:
    model = build_abn("resnet18", 3)
    meta = make_meta("abn", "resnet18", ["a", "b", "c"], 64)
    good = save_checkpoint(tmp_path / "m.pt", model, meta)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(truncated)

    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(CheckpointError, match="not an abn-checkpoint"):
        load_checkpoint(bare)

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")

    with pytest.raises(CheckpointError, match="arch is 'resnet18', expected 'resnet50'"):
        load_checkpoint(good, expect_arch="resnet50")
    with pytest.raises(CheckpointError, match="classes is"):
        load_checkpoint(good, expect_classes=["a", "b"])
    with pytest.raises(CheckpointError, match="kind is 'abn', expected 'resnet'"):
        load_checkpoint(good, expect_kind="resnet")

    # Weights of one model under the record of another.
    lying = save_checkpoint(
        tmp_path / "lying.pt", model, make_meta("abn", "resnet18", ["a", "b"], 64)
    )
    with pytest.raises(CheckpointError, match="do not fit a abn resnet18 with 2 classes"):
        load_checkpoint(lying)
    other_arch = save_checkpoint(
        tmp_path / "arch.pt", model, make_meta("abn", "resnet34", ["a", "b", "c"], 64)
    )
    with pytest.raises(CheckpointError, match="resnet34"):
        load_checkpoint(other_arch)


def test_mask_to_map_averages_cells() -> None:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:32, :32] = 255  # top-left quadrant
    mask[32:48, 32:64] = 255  # half of the bottom-right quadrant
    out = mask_to_map(mask, 2)
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
    assert torch.allclose(mask_to_map(mask.astype(bool), 2), out)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        mask_to_map(np.zeros((2, 2, 3)), 2)


def test_bubbles_give_a_density_peaking_at_the_bubble() -> None:
    one = bubbles_to_map([(8.0, 8.0, 4.0)], image_size=(64, 64), size=4)
    assert one.max().item() == pytest.approx(1.0)
    assert one.argmax().item() == 0  # the cell holding (8, 8)
    assert one[3, 3].item() < 0.01
    # Two users agreeing on a spot outweigh one user elsewhere.
    two = bubbles_to_map([(8, 8, 4), (9, 8, 4), (56, 56, 4)], image_size=(64, 64), size=(4, 4))
    assert two[0, 0].item() == pytest.approx(1.0) and 0.3 < two[3, 3].item() < 0.7
    assert bubbles_to_map([], (64, 64), 4).abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="radius"):
        bubbles_to_map([(1, 1, 0)], (8, 8), 2)


def _resnet18_weights_file(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    state = build_resnet("resnet18", 1000).state_dict()
    torch.save(state, path)
    return state


def test_pretrained_from_local_file(tmp_path: Path) -> None:
    state = _resnet18_weights_file(tmp_path / "r18.pth")
    model = build_abn("resnet18", 7, pretrained=str(tmp_path / "r18.pth"))
    own = model.state_dict()
    assert torch.equal(own["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    assert torch.equal(own["layer4.0.conv1.weight"], state["layer4.0.conv1.weight"])
    assert torch.equal(own["att.layer4.0.conv1.weight"], state["layer4.0.conv1.weight"])
    assert own["fc.weight"].shape == (7, 512)  # the 1000-class head is not loaded
    plain = build_resnet("resnet18", 7, pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(plain.state_dict()["conv1.weight"], state["conv1.weight"])


def test_pretrained_weights_api_reads_torch_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models import ResNet18_Weights

    # The weights API looks in $TORCH_HOME/hub/checkpoints/<file name of its URL>; placing a
    # file there is exactly what a user's first download leaves behind.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    filename = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    state = _resnet18_weights_file(cache / filename)
    model = build_abn("resnet18", 3, pretrained="IMAGENET1K_V1")
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])


def test_pretrained_refusals(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="neither a file nor a torchvision weight"):
        build_abn("resnet18", 3, pretrained="NOT_A_WEIGHT")
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_abn("resnet18", 3, pretrained=str(tmp_path / "missing.pth"))
    r50 = tmp_path / "r50.pth"
    torch.save(build_resnet("resnet50", 10).state_dict(), r50)
    with pytest.raises(PretrainedWeightsError, match="does not hold resnet18 weights"):
        build_abn("resnet18", 3, pretrained=str(r50))


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_decoy_digits_is_deterministic_and_complete(decoy: Path, tmp_path: Path) -> None:
    classes = find_classes(decoy)
    assert classes == [str(i) for i in range(10)]
    train, test = list_samples(decoy, "train", classes), list_samples(decoy, "test", classes)
    assert len(train) + len(test) == 1797
    assert all(s.map is not None for s in train + test)
    again = build_decoy_digits(tmp_path / "again")
    assert _digest(again) == _digest(decoy)


def test_dataset_errors(tmp_path: Path, decoy: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        find_classes(tmp_path)
    with pytest.raises(DatasetError, match="no 'valid' split"):
        list_samples(decoy, "valid", find_classes(decoy))
    with pytest.raises(DatasetError, match="classes the model does not know"):
        list_samples(decoy, "test", ["0", "1"])


@pytest.mark.slow  # trains for real
def test_short_training_run_beats_chance(tmp_path: Path) -> None:
    # The shortcut-free twin: on decoy-digits itself a network is meant to learn the patch's
    # colour, which is random on its test split.
    free = build_decoy_digits(tmp_path / "free", correlation=0.0)
    config = TrainConfig(epochs=3, batch_size=32, image_size=32, device="cpu")
    model, meta = train(free, "resnet18", "abn", config)
    assert meta["metrics"]["test_top1"] > 0.3  # chance is 0.1
    assert meta["classes"] == [str(i) for i in range(10)]
    assert len(meta["history"]) == 3 and not model.training


def test_the_model_library_keeps_torchs_compiler_cache_out_of_the_temporary_folder(
    tmp_path: Path,
) -> None:
    scratch, cache = tmp_path / "tmp", tmp_path / "cache"
    scratch.mkdir()
    environment = {**os.environ, "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(cache)}
    environment.pop("TORCHINDUCTOR_CACHE_DIR", None)
    subprocess.run([sys.executable, "-c", "import model, torchvision"], env=environment, check=True)
    assert list(scratch.iterdir()) == []  # was torchinductor_<user>
    assert (cache / "abn" / "torch").is_dir()
