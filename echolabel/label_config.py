"""What a Label Studio label config asks of us: one image and the choices fields bound to it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.control_tags import ChoicesTag, TextAreaTag
from label_studio_sdk.label_interface.object_tags import ImageTag

# A <TextArea> of this name bound to the image receives a link to the task's neighbour gallery
# in every prediction (docs/review.md).
GALLERY_TAG = "neighbours"


class LabelConfigError(ValueError):
    """The label config cannot be served: no image, no choices, or ambiguous binding."""


class TaskError(ValueError):
    """A task lacks what the label config says it must carry."""


@dataclass(frozen=True)
class ChoicesField:
    name: str  # the <Choices> tag's name: the `from_name` of results
    to_name: str  # the <Image> it is bound to
    choices: tuple[str, ...]
    multiple: bool = False  # choice="multiple": an annotation may tick several choices


@dataclass(frozen=True)
class LabelSchema:
    image_name: str  # the <Image> tag's name: the `to_name` of results
    image_key: str  # the task data key holding the image URL (`value="$image"` → "image")
    fields: tuple[ChoicesField, ...]
    gallery_link: bool = False  # has a <TextArea name="neighbours"> bound to the image

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def multiple_fields(self) -> list[str]:
        """The multi-choice fields: their labels are lists of choices."""
        return [f.name for f in self.fields if f.multiple]

    def image_ref(self, task: Mapping[str, Any]) -> str:
        """The task's image reference; TaskError names the missing key."""
        data = task.get("data")
        if not isinstance(data, Mapping):
            raise TaskError(f"task {task.get('id')!r} has no `data` object")
        value = data.get(self.image_key)
        if not isinstance(value, str) or not value.strip():
            raise TaskError(
                f"task {task.get('id')!r}: data.{self.image_key} (the image of <Image "
                f'name="{self.image_name}">) is missing or not a string; keys present: '
                f"{sorted(data)}"
            )
        return value.strip()

    def labels_from_result(self, result: Sequence[Mapping[str, Any]]) -> dict[str, str | list[str]]:
        """Labels per choices field from an annotation's `result` list.

        A single-choice field's label is its choice (a string); a multi-choice field's is the
        list of every ticked choice, in the label config's order (so equal sets compare
        equal). A field with nothing ticked carries no label.
        """
        by_name = {f.name: f for f in self.fields}
        labels: dict[str, str | list[str]] = {}
        for item in result or ():
            if not isinstance(item, Mapping) or item.get("type") != "choices":
                continue
            name = item.get("from_name")
            value = item.get("value")
            choices = value.get("choices") if isinstance(value, Mapping) else None
            if name not in by_name or not isinstance(choices, list) or not choices:
                continue
            spec = by_name[name]
            if spec.multiple:
                order = {choice: i for i, choice in enumerate(spec.choices)}
                ticked = {str(c) for c in choices}
                labels[spec.name] = sorted(ticked, key=lambda c: (order.get(c, len(order)), c))
            else:
                labels[spec.name] = str(choices[0])
        return labels

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LabelSchema:
        raw = json.loads(text)
        fields = tuple(
            ChoicesField(f["name"], f["to_name"], tuple(f["choices"]), f.get("multiple", False))
            for f in raw["fields"]
        )
        return cls(raw["image_name"], raw["image_key"], fields, raw.get("gallery_link", False))


def parse_label_config(config: str) -> LabelSchema:
    """Find the image and every <Choices> bound to it; LabelConfigError says what is wrong."""
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError("the label config is empty")
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises several types for malformed XML
        raise LabelConfigError(f"the label config is not valid XML: {exc}") from None
    images = {tag.name: tag for tag in interface.find_tags_by_class(ImageTag)}
    if not images:
        raise LabelConfigError(
            "the label config has no <Image> tag: echolabel suggests labels for images "
            '(add e.g. <Image name="image" value="$image"/>)'
        )
    fields_by_image: dict[str, list[ChoicesField]] = {}
    for tag in interface.find_tags_by_class(ChoicesTag):
        for target in tag.to_name or ():
            if target in images:
                choices = tuple(str(c) for c in (tag.labels or ()))
                fields_by_image.setdefault(target, []).append(
                    ChoicesField(tag.name, target, choices, tag.is_multiple_choice)
                )
    if not fields_by_image:
        raise LabelConfigError(
            f"the label config has no <Choices> bound to an image (images: {sorted(images)}): "
            'add e.g. <Choices name="organ" toName="image"> with <Choice value="..."/> items'
        )
    if len(fields_by_image) > 1:
        raise LabelConfigError(
            f"choices are bound to several images ({sorted(fields_by_image)}): echolabel votes "
            "one image per task; bind all <Choices> to one <Image>"
        )
    image_name, fields = next(iter(fields_by_image.items()))
    value = str(images[image_name].value or "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(
            f'<Image name="{image_name}"> has value={value!r}; expected a task field like "$image"'
        )
    gallery = [
        tag
        for tag in interface.find_tags_by_class(TextAreaTag)
        if tag.name == GALLERY_TAG and image_name in (tag.to_name or ())
    ]
    return LabelSchema(
        image_name=image_name,
        image_key=value[1:],
        fields=tuple(fields),
        gallery_link=bool(gallery),
    )
