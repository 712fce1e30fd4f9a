"""Label-config parsing: the image, its choices fields, and clear errors."""

from __future__ import annotations

import pytest

from echolabel.label_config import LabelConfigError, LabelSchema, TaskError, parse_label_config

ORGAN_PLANE = """
<View>
  <Image name="image" value="$image"/>
  <Choices name="organ" toName="image"><Choice value="liver"/><Choice value="heart"/></Choices>
  <Choices name="plane" toName="image" choice="single"><Choice value="axial"/></Choices>
</View>
"""


def test_default_organ_and_plane():
    schema = parse_label_config(ORGAN_PLANE)
    assert schema.image_name == "image" and schema.image_key == "image"
    assert schema.field_names == ["organ", "plane"]
    assert schema.fields[0].choices == ("liver", "heart")
    assert schema.fields[0].to_name == "image"


def test_any_names_work_and_other_objects_are_ignored():
    schema = parse_label_config(
        '<View><Text name="t" value="$note"/><Image name="us" value="$scan_url"/>'
        '<Choices name="finding" toName="us"><Choice value="benign"/></Choices>'
        '<Choices name="mood" toName="t"><Choice value="ok"/></Choices></View>'
    )
    assert (schema.image_name, schema.image_key, schema.field_names) == (
        "us",
        "scan_url",
        ["finding"],
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("", "empty"),
        ("<View><Image name='i' value='$i'/>", "not valid XML"),
        ('<View><Text name="t" value="$t"/></View>', "no <Image>"),
        ('<View><Image name="i" value="$i"/></View>', "no <Choices> bound"),
        (
            '<View><Image name="a" value="$a"/><Image name="b" value="$b"/>'
            '<Choices name="x" toName="a"><Choice value="1"/></Choices>'
            '<Choices name="y" toName="b"><Choice value="1"/></Choices></View>',
            "several images",
        ),
    ],
)
def test_unservable_configs_are_refused_clearly(config, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(config)


def test_labels_from_result_keeps_known_choices_fields_only():
    schema = parse_label_config(ORGAN_PLANE)
    result = [
        {
            "from_name": "organ",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": ["liver"]},
        },
        {"from_name": "plane", "to_name": "image", "type": "choices", "value": {"choices": []}},
        {"from_name": "other", "to_name": "image", "type": "choices", "value": {"choices": ["x"]}},
        {"from_name": "box", "type": "rectanglelabels", "value": {}},
        "garbage",
    ]
    assert schema.labels_from_result(result) == {"organ": "liver"}


def test_image_ref_names_the_missing_key():
    schema = parse_label_config(ORGAN_PLANE)
    assert schema.image_ref({"id": 1, "data": {"image": " /data/upload/1/a.png "}}) == (
        "/data/upload/1/a.png"
    )
    with pytest.raises(TaskError, match=r"data\.image .* keys present: \['img'\]"):
        schema.image_ref({"id": 1, "data": {"img": "x"}})
    with pytest.raises(TaskError, match="no `data`"):
        schema.image_ref({"id": 1})


def test_schema_json_round_trip():
    schema = parse_label_config(ORGAN_PLANE)
    assert LabelSchema.from_json(schema.to_json()) == schema


FINDINGS = """
<View>
  <Image name="image" value="$image"/>
  <Choices name="organ" toName="image"><Choice value="liver"/><Choice value="heart"/></Choices>
  <Choices name="findings" toName="image" choice="multiple">
    <Choice value="mass"/><Choice value="cyst"/><Choice value="shadowing"/>
  </Choices>
</View>
"""


def test_multiple_choice_fields_are_parsed():
    schema = parse_label_config(FINDINGS)
    assert schema.field_names == ["organ", "findings"]
    assert [f.multiple for f in schema.fields] == [False, True]
    assert schema.multiple_fields == ["findings"]
    assert schema.fields[1].choices == ("mass", "cyst", "shadowing")
    # choice="single" and choice="single-radio" are single-choice.
    assert parse_label_config(ORGAN_PLANE).multiple_fields == []
    radio = ORGAN_PLANE.replace('choice="single"', 'choice="single-radio"')
    assert parse_label_config(radio).multiple_fields == []


def test_labels_from_result_keeps_every_choice_of_a_multiple_field_in_config_order():
    schema = parse_label_config(FINDINGS)
    result = [
        {"from_name": "organ", "type": "choices", "value": {"choices": ["liver"]}},
        {
            "from_name": "findings",
            "type": "choices",
            "value": {"choices": ["shadowing", "mass", "shadowing"]},
        },
    ]
    assert schema.labels_from_result(result) == {
        "organ": "liver",
        "findings": ["mass", "shadowing"],
    }
    one = [{"from_name": "findings", "type": "choices", "value": {"choices": ["cyst"]}}]
    assert schema.labels_from_result(one) == {"findings": ["cyst"]}  # a list even of one
    none = [{"from_name": "findings", "type": "choices", "value": {"choices": []}}]
    assert schema.labels_from_result(none) == {}


def test_multiple_flag_survives_the_json_round_trip_and_old_files_read_as_single():
    schema = parse_label_config(FINDINGS)
    assert LabelSchema.from_json(schema.to_json()) == schema
    old = schema.to_json().replace(', "multiple": false', "").replace(', "multiple": true', "")
    assert "multiple" not in old
    assert LabelSchema.from_json(old).multiple_fields == []
