"""The labeling config this backend needs, generated from a model and checked at /setup.

What a project needs (``label_config/README.md`` for project managers):

- an ``<Image>`` the predictions are drawn on;
- a ``<BrushLabels>`` over that image with a label ``Attention``: the attention map arrives
  there as a graded brush the annotator edits;
- a ``<Choices>`` over that image whose choices are exactly the model's classes (a project
  with no model yet: the classes its first model will learn, in this order), plus, optionally,
  a "none of these" choice (``ABN_OTHER_CHOICES``, default ``Other``) that teaches no class;
- optionally a ``<TextArea>`` over that image (``top3`` in the generated config): the
  backend writes the top-3 classes with their probabilities into it, one line each;
- optionally a smart ``<KeyPointLabels>`` over that image with a label ``Check my map``
  (``check`` in the generated config): with the backend connected as interactive, a point of
  it asks for the top-3 with the annotator's drafted brush (``backend/map_check.py``), which
  the backend answers in the ``<TextArea>``, so a config with it needs that too.

Other tags may sit beside these. Names are free: the backend reads them from the config, so
predictions follow whatever the project calls its controls.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

from label_studio_sdk.label_interface import LabelInterface

from model.errors import UserError

ATTENTION_LABEL = "Attention"
CHECK_LABEL = "Check my map"
CHECK_COLOR = "#2d7dff"
MAX_CONFIG_CHARS = 1_000_000  # real configs are a few KB; parsed configs are cached
ATTENTION_COLOR = "#ff2d55"


class LabelConfigError(UserError, ValueError):
    """A labeling config the backend cannot predict for; the message says what to add or fix."""


@dataclass(frozen=True)
class Targets:
    """Where each part of a prediction goes in a project's config."""

    image: str  # name of the <Image> object (results' to_name)
    data_key: str  # task data field holding the image URL ($image -> "image")
    brush: str  # name of the <BrushLabels> control
    label: str  # the brush label value, "Attention" (or its alias)
    choices: str  # name of the <Choices> control
    top3: str | None  # name of the <TextArea> for the top-3, if the config has one
    check: str | None = None  # name of the <KeyPointLabels> of "check my map", if any


ATTENTION_HOTKEY = "a"
"""The brush label's hotkey: a letter, so the classes keep 1..9 whatever the config holds."""

CLASS_HOTKEYS = tuple("123456789") + tuple("qtsdfgzxcyijln")
"""The classes' hotkeys, in config order: digits first, then letters that no editor tool (brush
B, eraser E, pan H, move V, unselect U, the other tools' K M O P R W) nor the brush label (A)
uses. Classes past these get none in the config; Label Studio then gives them its leftovers."""

CHECK_HOTKEY = "shift+c"
"""The check label's hotkey. Every letter is taken (the classes', the tools', the brush
label's) and so are the digits (``0`` is the README's "Other"); Label Studio 1.23.2's editor
binds no shift+letter but ``shift+r``, and a plain letter's binding does not fire with shift."""


def class_hotkeys(classes: list[str]) -> list[str | None]:
    """Each class's hotkey (None past :data:`CLASS_HOTKEYS`), fixed by its place in the config."""
    return [CLASS_HOTKEYS[i] if i < len(CLASS_HOTKEYS) else None for i in range(len(classes))]


def label_config_for(
    classes: list[str],
    *,
    image: str = "image",
    brush: str = "attention",
    choices: str = "class",
    top3: str = "top3",
    check: str | None = "check",
) -> str:
    """The config a project manager pastes into Label Studio for a model with `classes`.

    Hotkeys are explicit: left to Label Studio, the brush label takes 1 and every class shifts
    by one. The top-3 box takes no input (``maxSubmissions="0"``: the 1.23 editor then shows
    only the lines the backend wrote, without an empty box to type in). The check control
    (`check`; None leaves it out) is smart only: the editor shows its tool only with
    Auto-Annotation on, which an interactive backend connection offers.
    """
    if not classes:
        raise ValueError("a label config needs at least one class")
    choice_lines = "\n".join(
        f"    <Choice value={quoteattr(str(c))}"
        + (f" hotkey={quoteattr(key)}" if key else "")
        + "/>"
        for c, key in zip(classes, class_hotkeys(classes), strict=True)
    )
    return (
        "<View>\n"
        f'  <Image name={quoteattr(image)} value={quoteattr("$" + image)} zoom="true"/>\n'
        f'  <Header value="Where the model looks (edit the brush where it is wrong)"/>\n'
        f"  <BrushLabels name={quoteattr(brush)} toName={quoteattr(image)}>\n"
        f"    <Label value={quoteattr(ATTENTION_LABEL)} background={quoteattr(ATTENTION_COLOR)} "
        f"hotkey={quoteattr(ATTENTION_HOTKEY)}/>\n"
        "  </BrushLabels>\n"
        '  <Header value="Class"/>\n'
        f'  <Choices name={quoteattr(choices)} toName={quoteattr(image)} choice="single" '
        'showInline="true">\n'
        f"{choice_lines}\n"
        "  </Choices>\n"
        '  <Header value="Model: top-3 classes (after Check my map: with your map)"/>\n'
        f'  <TextArea name={quoteattr(top3)} toName={quoteattr(image)} editable="false" '
        'maxSubmissions="0" rows="3"/>\n'
        + (check_control(check, image) if check else "")
        + "</View>\n"
    )


def check_control(name: str, image: str = "image") -> str:
    """The "check my map" tags of :func:`label_config_for`: a smart-only key point."""
    return (
        '  <Header value="Check my map (with Auto-Annotation on): Ctrl+H to hide the regions, '
        'the smart key point tool, Shift+C, a click on the image"/>\n'
        f"  <KeyPointLabels name={quoteattr(name)} toName={quoteattr(image)} "
        'smart="true" smartOnly="true">\n'
        f"    <Label value={quoteattr(CHECK_LABEL)} background={quoteattr(CHECK_COLOR)} "
        f"hotkey={quoteattr(CHECK_HOTKEY)}/>\n"
        "  </KeyPointLabels>\n"
    )


def default_targets(classes: list[str]) -> Targets:
    """The targets of :func:`label_config_for`, for a /predict that sends no config."""
    return targets_for(label_config_for(classes), tuple(classes))


def parse_config(config: str) -> LabelInterface:
    """Parse with the SDK, refusing DTDs (no entity expansion from a request body)."""
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError("the label config is empty")
    if len(config) > MAX_CONFIG_CHARS:
        raise LabelConfigError(
            f"the label config has {len(config)} characters, more than {MAX_CONFIG_CHARS}"
        )
    if "<!DOCTYPE" in config.upper() or "<!ENTITY" in config.upper():
        raise LabelConfigError("the label config must not contain a DOCTYPE or ENTITY declaration")
    try:
        return LabelInterface(config)
    except Exception as exc:  # the SDK raises bare Exceptions for XML errors
        raise LabelConfigError(f"the label config is not valid XML: {exc}") from exc


@dataclass(frozen=True)
class _Parts:
    """The tags a prediction needs, found in a config (classes not checked yet)."""

    image: Any
    brush: Any
    choices: list[Any]  # the <Choices> over the image, in config order
    top3: str | None
    check: str | None


def _parts(config: str) -> _Parts:
    li = parse_config(config)
    images = [o for o in list(li.objects or []) if o.tag.lower() == "image"]
    if not images:
        raise LabelConfigError(
            'the label config has no <Image> tag: add <Image name="image" value="$image"/>'
        )
    controls = list(li.controls or [])

    brushes = [c for c in controls if c.tag.lower() == "brushlabels"]
    if not brushes:
        raise LabelConfigError(
            'the label config has no <BrushLabels> tag: add <BrushLabels name="attention" '
            f'toName="{images[0].name}"><Label value="{ATTENTION_LABEL}"/></BrushLabels>'
        )
    with_label = [c for c in brushes if ATTENTION_LABEL in _label_names(c)]
    if not with_label:
        names = ", ".join(f'<BrushLabels name="{c.name}">' for c in brushes)
        raise LabelConfigError(
            f'{names} has no <Label value="{ATTENTION_LABEL}"/>: add that label; '
            "the attention map is predicted under it"
        )
    brush = with_label[0]
    image_names = {o.name for o in images}
    brush_images = [n for n in brush.to_name if n in image_names]
    if not brush_images:
        raise LabelConfigError(
            f'<BrushLabels name="{brush.name}"> must point at an <Image> '
            f'(toName="{images[0].name}")'
        )
    image = li.get_object(brush_images[0])
    choices = [c for c in controls if c.tag.lower() == "choices" and image.name in c.to_name]
    if not choices:
        raise LabelConfigError(
            f'the label config has no <Choices> tag over the image "{image.name}": add '
            f'<Choices name="class" toName="{image.name}"> with one <Choice> per class'
        )
    top3 = next(
        (c.name for c in controls if c.tag.lower() == "textarea" and image.name in c.to_name),
        None,
    )
    check = _check_control(controls, image.name)
    if check is not None and top3 is None:
        raise LabelConfigError(
            f'<KeyPointLabels name="{check}"> checks the map, and its answer is shown in a '
            f'<TextArea> over the image: add <TextArea name="top3" toName="{image.name}" '
            'editable="false" maxSubmissions="0"/>'
        )
    return _Parts(image, brush, choices, top3, check)


def _check_control(controls: list[Any], image: str) -> str | None:
    """The name of the first <KeyPointLabels> over `image` with the label "Check my map"."""
    return next(
        (
            c.name
            for c in controls
            if c.tag.lower() == "keypointlabels"
            and image in c.to_name
            and CHECK_LABEL in _label_names(c)
        ),
        None,
    )


@functools.lru_cache(maxsize=64)
def config_classes(config: str, other: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The classes a project's config names: its first <Choices> over the image, in config
    order, without the choices in `other` ("none of these" answers, which are no class)."""
    names = _label_names(_parts(config).choices[0])
    classes = tuple(n for n in names if n not in other)
    if len(set(classes)) != len(classes):
        raise LabelConfigError(f"the <Choices> repeat a class: {', '.join(classes)}")
    return classes


@functools.lru_cache(maxsize=64)
def targets_for(config: str, classes: tuple[str, ...], other: tuple[str, ...] = ()) -> Targets:
    """Check `config` against a model with `classes`; say where predictions go.

    Choices in `other` may sit beside the classes. Cached: Label Studio sends the same config
    with every /setup and /predict.
    """
    parts = _parts(config)
    wanted = set(classes)
    best = None
    problems = []
    for control in parts.choices:
        have = _label_names(control)
        missing = [c for c in classes if c not in have]
        extra = [c for c in have if c not in wanted and c not in other]
        if not missing and not extra:
            best = control
            break
        detail = []
        if missing:
            detail.append(f"lacks the model's classes: {', '.join(missing)}")
        if extra:
            detail.append(f"has classes the model does not know: {', '.join(extra)}")
        problems.append(f'<Choices name="{control.name}"> ' + " and ".join(detail))
    if best is None:
        raise LabelConfigError(
            "; ".join(problems) + f" (the model's classes are: {', '.join(classes)})"
        )
    value = parts.image.value or ""
    return Targets(
        image=parts.image.name,
        data_key=value[1:] if value.startswith("$") else value,
        brush=parts.brush.name,
        label=ATTENTION_LABEL,
        choices=best.name,
        top3=parts.top3,
        check=parts.check,
    )


def check_config(config: str, classes: list[str], other: tuple[str, ...] = ()) -> Targets:
    """What /setup calls: the targets, or a :class:`LabelConfigError` naming what is missing."""
    if not isinstance(config, str):
        raise LabelConfigError(f"the label config must be a string, got {type(config).__name__}")
    return targets_for(config, tuple(classes), other)


def _label_names(control: Any) -> list[str]:
    """A control's label values (alias where given, as results carry them), in config order."""
    return list(control.labels or [])
