"""The generated label config, the shipped one, and the refusals /setup gives."""

from __future__ import annotations

from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.label_config import (
    ATTENTION_LABEL,
    LabelConfigError,
    check_config,
    default_targets,
    label_config_for,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox"]

IMAGE = '<Image name="img" value="$picture"/>'
BRUSH = '<BrushLabels name="att" toName="img"><Label value="Attention"/></BrushLabels>'
CHOICES = (
    '<Choices name="cls" toName="img"><Choice value="cat"/><Choice value="dog"/>'
    '<Choice value="fox"/></Choices>'
)


def view(*tags: str) -> str:
    return "<View>" + "".join(tags) + "</View>"


def test_generated_config_is_accepted_and_names_the_targets() -> None:
    config = label_config_for(CLASSES)
    targets = check_config(config, CLASSES)
    assert (targets.image, targets.data_key) == ("image", "image")
    assert (targets.brush, targets.label, targets.choices, targets.top3) == (
        "attention",
        ATTENTION_LABEL,
        "class",
        "top3",
    )
    li = LabelInterface(config)
    assert li.get_control("class").labels == CLASSES
    assert li.get_control("attention").labels == [ATTENTION_LABEL]
    assert default_targets(CLASSES) == targets


def test_generated_config_escapes_class_names() -> None:
    classes = ['a "quoted" <class>', "b & c", "日本"]
    config = label_config_for(classes)
    assert LabelInterface(config).get_control("class").labels == classes
    check_config(config, classes)


def test_shipped_config_is_the_generated_one_for_the_builtin_dataset() -> None:
    shipped = (ROOT / "label_config" / "attention.xml").read_text()
    assert shipped == label_config_for([str(d) for d in range(10)])


def test_names_are_read_from_the_config_and_extra_tags_are_fine() -> None:
    config = view(IMAGE, '<Header value="hi"/>', BRUSH, CHOICES, '<Rating name="r" toName="img"/>')
    targets = check_config(config, CLASSES)
    assert (targets.image, targets.data_key, targets.brush, targets.choices) == (
        "img",
        "picture",
        "att",
        "cls",
    )
    assert targets.top3 is None


def test_choice_order_does_not_matter() -> None:
    choices = CHOICES.replace('"cat"', '"tmp"').replace('"fox"', '"cat"').replace('"tmp"', '"fox"')
    check_config(view(IMAGE, BRUSH, choices), CLASSES)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (view(BRUSH, CHOICES), "<Image>"),
        (view(IMAGE, CHOICES), "<BrushLabels>"),
        (
            view(IMAGE, BRUSH.replace("Attention", "Focus"), CHOICES),
            '<Label value="Attention"/>',
        ),
        (view(IMAGE, BRUSH), "<Choices>"),
        (
            view(IMAGE, BRUSH, CHOICES.replace('<Choice value="fox"/>', "")),
            "lacks the model's classes: fox",
        ),
        (
            view(IMAGE, BRUSH, CHOICES.replace('"fox"', '"cow"')),
            "does not know: cow",
        ),
        ("<View><Image", "not valid XML"),
        ("", "empty"),
        ('<!DOCTYPE x [<!ENTITY e "x">]><View/>', "DOCTYPE"),
    ],
)
def test_refusals_name_what_is_missing(config: str, needle: str) -> None:
    with pytest.raises(LabelConfigError) as err:
        check_config(config, CLASSES)
    assert needle in str(err.value)


def test_brush_must_point_at_an_image() -> None:
    config = view(
        IMAGE,
        '<Text name="t" value="$text"/>',
        '<BrushLabels name="att" toName="t"><Label value="Attention"/></BrushLabels>',
        CHOICES,
    )
    with pytest.raises(LabelConfigError, match="must point at an <Image>"):
        check_config(config, CLASSES)


def test_non_string_config_is_refused() -> None:
    with pytest.raises(LabelConfigError, match="must be a string"):
        check_config(["<View/>"], CLASSES)  # type: ignore[arg-type]


def test_oversized_config_is_refused() -> None:
    config = label_config_for(CLASSES).replace("</View>", "<!--" + "x" * 1_000_000 + "--></View>")
    with pytest.raises(LabelConfigError, match="more than"):
        check_config(config, CLASSES)
