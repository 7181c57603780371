"""The generated label config, the shipped one, and the refusals /setup gives."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.label_config import (
    ATTENTION_LABEL,
    CHECK_HOTKEY,
    CHECK_LABEL,
    CLASS_HOTKEYS,
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
    assert (targets.brush, targets.label, targets.choices, targets.top3, targets.check) == (
        "attention",
        ATTENTION_LABEL,
        "class",
        "top3",
        "check",
    )
    li = LabelInterface(config)
    assert li.get_control("class").labels == CLASSES
    assert li.get_control("attention").labels == [ATTENTION_LABEL]
    assert li.get_control("check").labels == [CHECK_LABEL]
    assert default_targets(CLASSES) == targets


def test_the_check_control_is_a_smart_only_key_point() -> None:
    """Label Studio 1.23.2 calls an interactive backend for a smart key point (docs/loop.md,
    section 5); smart only, its tool shows only with Auto-Annotation on."""
    [check] = ET.fromstring(label_config_for(CLASSES)).iter("KeyPointLabels")
    assert (check.get("name"), check.get("toName")) == ("check", "image")
    assert (check.get("smart"), check.get("smartOnly")) == ("true", "true")
    [label] = check.iter("Label")
    assert (label.get("value"), label.get("hotkey")) == (CHECK_LABEL, CHECK_HOTKEY)


def test_a_config_without_the_check_control_is_as_before() -> None:
    """The check is optional: without the control, or with key points of other labels."""
    config = label_config_for(CLASSES, check=None)
    assert "KeyPointLabels" not in config
    assert check_config(config, CLASSES).check is None
    points = (
        '<KeyPointLabels name="kp" toName="img" smart="true"><Label value="eye"/></KeyPointLabels>'
    )
    assert check_config(view(IMAGE, BRUSH, CHOICES, points), CLASSES).check is None
    assert check_config(view(IMAGE, BRUSH, CHOICES), CLASSES).check is None


def test_the_check_control_is_found_by_its_label_under_any_name() -> None:
    check = (
        '<KeyPointLabels name="probe" toName="img" smart="true" smartOnly="true">'
        f'<Label value="{CHECK_LABEL}"/></KeyPointLabels>'
    )
    box = '<TextArea name="t3" toName="img" editable="false" maxSubmissions="0"/>'
    targets = check_config(view(IMAGE, BRUSH, CHOICES, box, check), CLASSES)
    assert (targets.check, targets.top3) == ("probe", "t3")


def test_generated_config_escapes_class_names() -> None:
    classes = ['a "quoted" <class>', "b & c", "日本"]
    config = label_config_for(classes)
    assert LabelInterface(config).get_control("class").labels == classes
    check_config(config, classes)


# The editor's own single-key shortcuts in Label Studio 1.23.2 (tools, unselect region): a class
# hotkey equal to one of them would fight it.
TOOL_KEYS = set("behvukmoprw[]")
# Its shortcuts with shift and a letter or digit (its keymap): the check label's must be none.
SHIFT_KEYS = {"shift+r", "shift+1", "shift+2"}


def test_generated_hotkeys_do_not_shift_with_the_brush_label() -> None:
    """Classes take 1..9 then letters whatever the config holds; the brush label a letter."""
    classes = [f"c{i}" for i in range(len(CLASS_HOTKEYS) + 2)]
    root = ET.fromstring(label_config_for(classes))
    keys = [c.get("hotkey") for c in root.iter("Choice")]
    assert keys[:10] == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "q"]
    assert keys[: len(CLASS_HOTKEYS)] == list(CLASS_HOTKEYS)
    assert keys[len(CLASS_HOTKEYS) :] == [None, None]  # Label Studio gives them its leftovers
    brush_label, check_label = root.iter("Label")
    brush_key = brush_label.get("hotkey")
    assert brush_key and not brush_key.isdigit()
    given = [k for k in keys if k] + [brush_key]
    assert len(set(given)) == len(given)
    assert not TOOL_KEYS & set(given)
    check_key = check_label.get("hotkey")
    assert check_key == CHECK_HOTKEY and check_key not in [*given, "0"]  # "0": Other, by hand
    modifier, _, key = check_key.partition("+")
    assert modifier == "shift" and key not in "0123456789" and check_key not in SHIFT_KEYS
    three = ET.fromstring(label_config_for(CLASSES))
    assert [c.get("hotkey") for c in three.iter("Choice")] == ["1", "2", "3"]


def test_top3_box_shows_the_lines_and_takes_no_input() -> None:
    """``maxSubmissions="0"``: the 1.23.2 editor shows no input box under the top-3 lines."""
    [top3] = ET.fromstring(label_config_for(CLASSES)).iter("TextArea")
    assert (top3.get("editable"), top3.get("maxSubmissions")) == ("false", "0")
    assert check_config(label_config_for(CLASSES), CLASSES).top3 == top3.get("name")


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
        (
            view(
                IMAGE,
                BRUSH,
                CHOICES,
                f'<KeyPointLabels name="check" toName="img"><Label value="{CHECK_LABEL}"/>'
                "</KeyPointLabels>",
            ),
            "its answer is shown in a <TextArea>",
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
