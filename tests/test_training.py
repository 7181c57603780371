"""backend/training.py in-process: which model a project's job trains, and where it goes.

Images come from the fake Label Studio host of conftest.py; the store and registries are real
files under a temporary MODEL_DIR. (tests/test_loop.py runs the same jobs in a real RQ worker.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, TOKEN, FakeLabelStudio, png_bytes

from backend.corrections import Correction
from backend.label_config import label_config_for
from backend.registry import ModelRegistry
from backend.settings import Settings, SettingsError
from backend.store import LoopStore
from backend.training import TrainingRefused, train_project, write_last_result
from model import load_checkpoint
from model.first_model import FirstModelError

FRUIT = ["apple", "pear"]
FRUIT_CONFIG = label_config_for([*FRUIT, "Other"])


def settings_for(tmp_path: Path, fake: FakeLabelStudio) -> Settings:
    return Settings(
        model_dir=tmp_path / "model_dir",
        label_studio_url=fake.url,
        label_studio_api_key=TOKEN,
        first_image_size=32,
        first_epochs=2,
        finetune_epochs=1,
        gate_accuracy_margin=1.0,
        gate_map_margin=1.0,
        gate_min_evidence=1,
        train_device="cpu",
    )


def labelled(project: str, aid: int, label: str, target: np.ndarray | None = None) -> Correction:
    return Correction(
        project=project,
        annotation_id=aid,
        task_id=aid,
        image=f"/data/upload/{project}/{aid}.png",
        label=label,
        target=target,
        edited=target is not None,
        model_version=None,
    )


def test_a_new_project_trains_its_first_model_from_class_labels(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path
) -> None:
    settings = settings_for(tmp_path, fake_ls)
    ModelRegistry(settings.model_dir).publish_file(tiny_checkpoint)  # cat/dog/fox: not fruit
    store = LoopStore(settings.layout.corrections_db)
    store.remember_label_config("7", FRUIT_CONFIG)
    for aid in range(1, 13):
        label = FRUIT[aid % 2]
        fake_ls.add(f"/data/upload/7/{aid}.png", png_bytes(color=(40 + 200 * (aid % 2), 90, 90)))
        store.put(labelled("7", aid, label))
    store.put(labelled("7", 20, "Other"))  # no class: never taught
    fake_ls.add("/data/upload/7/20.png", png_bytes())
    store.put(labelled("7", 21, "apple"))  # its image is gone
    fake_ls.add("/data/upload/7/22.png", b"not an image")
    store.put(labelled("7", 22, "pear"))  # its image does not decode

    record = train_project("7", settings, "START_TRAINING")

    assert (record["status"], record["version"]) == ("published", "p7-v1")
    assert sorted(record["skipped_images"].values()) == [1, 1]
    first = record["first_model"]
    assert first["trained_on"] + first["validated_on"] + first["held_out"] == 12
    assert first["class_counts"] == {"apple": 6, "pear": 6}
    own = ModelRegistry(settings.model_dir, "7")
    _, meta = load_checkpoint(own.current_checkpoint())
    assert meta.classes == FRUIT and meta.image_size == 32 and meta.version == "p7-v1"
    assert ModelRegistry(settings.model_dir).current()["version"] == "v1"  # shared untouched
    # The labels it learnt from are the reference its first round is judged against.
    trained_in = {a.annotation_id: a.trained_in for a in store.annotations("7")}
    assert {a for a, v in trained_in.items() if v == "p7-v1"} == set(range(1, 13))
    assert trained_in[20] is trained_in[21] is trained_in[22] is None


def test_a_project_on_the_shared_model_forks_it_and_the_shared_model_stays(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path
) -> None:
    settings = settings_for(tmp_path, fake_ls)
    shared = ModelRegistry(settings.model_dir)
    shared.publish_file(tiny_checkpoint)
    store = LoopStore(settings.layout.corrections_db)
    store.remember_label_config("8", label_config_for(CLASSES))
    for aid in range(1, 5):
        fake_ls.add(f"/data/upload/8/{aid}.png", png_bytes())
        store.put(labelled("8", aid, CLASSES[aid % 3], np.full((4, 4), 0.5, np.float32)))

    record = train_project("8", settings, "4 new corrections")

    assert (record["status"], record["version"]) == ("published", "p8-v2")
    assert record["parent_version"] == "v1"
    assert shared.current()["version"] == "v1" and len(shared.versions()) == 1
    own = ModelRegistry(settings.model_dir, "8")
    assert own.current()["parent_version"] == "v1"
    assert store.untrained_count("8") == 0
    # The next round starts from the project's own version.
    store.put(labelled("8", 9, "cat", np.full((4, 4), 0.9, np.float32)))
    fake_ls.add("/data/upload/8/9.png", png_bytes())
    again = train_project("8", settings, "more")
    assert (again["version"], again["parent_version"]) == ("p8-v3", "p8-v2")
    assert shared.current()["version"] == "v1"


def test_a_project_without_model_or_label_config_is_refused(
    tmp_path: Path, fake_ls: FakeLabelStudio
) -> None:
    settings = settings_for(tmp_path, fake_ls)
    with pytest.raises(TrainingRefused, match="no label config seen yet"):
        train_project("9", settings)


def test_labels_of_one_class_only_are_refused_with_what_to_label(
    tmp_path: Path, fake_ls: FakeLabelStudio
) -> None:
    settings = settings_for(tmp_path, fake_ls)
    store = LoopStore(settings.layout.corrections_db)
    store.remember_label_config("10", FRUIT_CONFIG)
    for aid in (1, 2):
        fake_ls.add(f"/data/upload/10/{aid}.png", png_bytes())
        store.put(labelled("10", aid, "apple"))
    with pytest.raises(FirstModelError, match=r"label some tasks of another class \(pear\)"):
        train_project("10", settings)
    assert ModelRegistry(settings.model_dir, "10").current() is None


def test_a_round_learns_from_every_labelled_task_and_never_twice_from_the_same(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path
) -> None:
    settings = settings_for(tmp_path, fake_ls)
    ModelRegistry(settings.model_dir, "11").publish_file(tiny_checkpoint)  # its own p11-v1
    store = LoopStore(settings.layout.corrections_db)
    store.remember_label_config("11", label_config_for(CLASSES))
    for aid in range(1, 9):  # class labels alone, from before the model existed
        fake_ls.add(f"/data/upload/11/{aid}.png", png_bytes(color=(30 * aid, 90, 90)))
        store.put(labelled("11", aid, CLASSES[aid % 3]))
    fake_ls.add("/data/upload/11/9.png", png_bytes())
    store.put(labelled("11", 9, "dog", np.full((4, 4), 0.7, np.float32)))  # one edited map

    refused = settings.replace(gate_map_margin=-1.0)  # nothing can pass this gate
    record = train_project("11", refused, "START_TRAINING")
    write_last_result(settings, "11", record)  # as the RQ job does

    assert record["status"] == "rejected"
    used = set(record["annotation_ids"]) | set(record["held_out_annotation_ids"])
    assert used == set(range(1, 10))  # the labels alone too, not only the new edit
    paired = record["gate"]["paired"]
    assert set(paired) >= {"fixed", "broken", "p_accuracy_worse", "maps_closer"}
    assert record["gate"]["before"]["count"] == len(record["held_out_annotation_ids"])
    # No version has learnt from or been judged on any of them: the gate judges them all.
    assert record["judged_annotation_ids"] == record["held_out_annotation_ids"]
    # Start Training again with nothing new: the refused round is not tried again.
    again = train_project("11", settings, "START_TRAINING")
    assert again["status"] == "skipped"
    assert again["reasons"] == ["nothing new since p11-v1: no annotation was stored after it"]
    # A new annotation makes the next round train (and this gate lets it through).
    fake_ls.add("/data/upload/11/10.png", png_bytes())
    store.put(labelled("11", 10, "fox", np.full((4, 4), 0.2, np.float32)))
    trained = train_project("11", settings.replace(gate_min_evidence=1), "START_TRAINING")
    assert trained["status"] in ("published", "rejected") and "gate" in trained


def test_the_round_objective_settings_are_read_and_bad_values_refused() -> None:
    defaults = Settings.from_env({})
    assert (
        defaults.learning_stages,
        defaults.counterfactuals,
        defaults.guided_copies,
        defaults.verdict_tab,
    ) == (0, 0, False, True)
    chosen = Settings.from_env(
        {"ABN_LEARNING_STAGES": "1", "ABN_COUNTERFACTUALS": "4", "ABN_GUIDED_COPIES": "1",
         "ABN_VERDICT_TAB": "0"}
    )  # fmt: skip
    assert (chosen.learning_stages, chosen.counterfactuals, chosen.verdict_tab) == (1, 4, False)
    assert chosen.guided_copies
    assert defaults.gate_on == "tasks"
    assert Settings.from_env({"ABN_GATE_ON": " Counterfactual "}).gate_on == "counterfactual"
    for name, bad in (("ABN_LEARNING_STAGES", "4"), ("ABN_LEARNING_STAGES", "-1"),
                      ("ABN_LEARNING_STAGES", "layer3"), ("ABN_VERDICT_TAB", "maybe"),
                      ("ABN_GUIDED_COPIES", "often"), ("ABN_GATE_ON", "views")):  # fmt: skip
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: bad})


def test_a_round_judged_on_counterfactual_views_records_both_and_says_what_it_lacks(
    tmp_path: Path, fake_ls: FakeLabelStudio, tiny_checkpoint: Path
) -> None:
    settings = settings_for(tmp_path, fake_ls).replace(
        gate_on="counterfactual", holdout_fraction=0.5
    )
    ModelRegistry(settings.model_dir, "12").publish_file(tiny_checkpoint)
    store = LoopStore(settings.layout.corrections_db)
    store.remember_label_config("12", label_config_for(CLASSES))
    for aid in range(1, 13):  # classes alone: nothing a view can be made of
        fake_ls.add(f"/data/upload/12/{aid}.png", png_bytes(color=(20 * aid, 90, 90)))
        store.put(labelled("12", aid, CLASSES[aid % 3]))
    record = train_project("12", settings, "START_TRAINING")
    assert record["status"] == "rejected" and record["gate"]["judged_on"] == "counterfactual"
    assert "counterfactual" not in record["gate"]  # no held-out task has a map
    [reason] = record["reasons"]
    assert reason.startswith("on the held-out tasks' counterfactual views, too little")
    assert "with both a class and a map" in reason

    for aid in range(13, 25):  # now with maps: the views exist and are the gate's evidence
        fake_ls.add(f"/data/upload/12/{aid}.png", png_bytes(color=(9 * aid, 30, 160)))
        store.put(labelled("12", aid, CLASSES[aid % 3], np.full((4, 4), 0.5, np.float32)))
    record = train_project("12", settings, "START_TRAINING")
    views = record["gate"]["counterfactual"]
    held = set(record["judged_annotation_ids"])
    assert 2 <= views["before"]["count"] == len(held & set(range(13, 25)))
    assert views["after"]["count"] == views["before"]["count"]
    assert set(views["paired"]) >= {"fixed", "broken", "p_accuracy_worse"}
    assert record["status"] in ("published", "rejected")
