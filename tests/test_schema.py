"""The OpenAPI schema rendered from ``run()``'s signature: what coglet validates inputs against."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codeformer.config import COMPILE_BACKENDS, PROFILES, STABILITY_MODES, RequestOptions
from codeformer.errors import ConfigError
from codeformer.serving.schema import MAX_IMAGES, MIN_IMAGES, build_schema, write_schema


@pytest.fixture(scope="module")
def schema() -> dict:
    return build_schema()


def test_images_are_required_and_bounded_in_number(schema: dict) -> None:
    inputs = schema["components"]["schemas"]["Input"]
    assert inputs["required"] == ["images"]
    images = inputs["properties"]["images"]
    assert (images["type"], images["minItems"], images["maxItems"]) == ("array", MIN_IMAGES, MAX_IMAGES)


def test_options_carry_the_librarys_defaults_bounds_and_choices(schema: dict) -> None:
    components = schema["components"]["schemas"]
    properties = components["Input"]["properties"]
    defaults = RequestOptions()
    fidelity = properties["codeformer_fidelity"]
    assert (fidelity["default"], fidelity["minimum"], fidelity["maximum"]) == (defaults.fidelity, 0.0, 1.0)
    for name, choices, default in (
        ("runtime_profile", PROFILES, defaults.profile.name),
        ("stability_mode", STABILITY_MODES, defaults.stability.name),
        ("compile_backend", COMPILE_BACKENDS, defaults.compile_backend),
    ):
        # Cog's layout: the choices in an enum schema of the input's name, referred to through allOf
        assert properties[name]["allOf"] == [{"$ref": f"#/components/schemas/{name}"}]
        assert components[name]["enum"] == list(choices), name
        assert properties[name]["default"] == default, name
    assert [properties[name]["x-order"] for name in properties] == list(range(len(properties)))


def test_the_written_file_is_the_built_schema(tmp_path: Path, schema: dict) -> None:
    output = write_schema(output_path=tmp_path / "openapi_schema.json")
    assert json.loads(output.read_text()) == schema


def test_a_predictor_without_an_images_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other_predict.py").write_text(
        "from cog import BaseRunner, Input\n\n\n"
        "class Predictor(BaseRunner):\n"
        "    def run(self, prompt: str = Input(description='a prompt')) -> str:\n"
        "        return prompt\n"
    )
    with pytest.raises(ConfigError, match="has no input 'images'; update LIST_LENGTH_BOUNDS"):
        build_schema("other_predict.py:Predictor", tmp_path)


@pytest.mark.parametrize("reference", ["predict.py", "predict:Predictor"])
def test_a_malformed_predictor_reference_is_refused(reference: str) -> None:
    with pytest.raises(ConfigError, match="must look like 'predict.py:Predictor'"):
        build_schema(reference)
