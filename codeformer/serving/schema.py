"""Write ``.cog/openapi_schema.json``: the OpenAPI document ``cog build`` would produce.

The Cog HTTP server (coglet) validates request inputs only when this file exists, and
``cog build`` (Go CLI + Docker) is what normally writes it. Neither is available outside
the image build, so this module renders the same document from ``predict.py``'s
signature, plus ``minItems``/``maxItems`` on ``images``: Cog's ``Input()`` cannot
express a list length, and without them an empty or oversized list would reach
``run()`` instead of getting a 422.

Usage::

    python -m codeformer.serving.schema                 # writes .cog/openapi_schema.json
    python -m codeformer.serving.schema --stdout        # prints it instead

The input fields are read with cog's own inspector (``cog._inspector``, a private
module of the pinned cog==0.23.1), so types, defaults and constraints are exactly
what the server will normalise against; the JSON layout follows the OpenAPI 3.0.2
document of Cog's schema generator (``Input``, ``Output``, one enum schema per
input with ``choices``, referenced through ``allOf``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any

from codeformer.config import PROJECT_ROOT
from codeformer.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_PREDICTOR_REF = "predict.py:Predictor"
SCHEMA_RELATIVE_PATH = Path(".cog") / "openapi_schema.json"

# List-length bounds Cog's Input() cannot declare; run() enforces the same numbers.
MIN_IMAGES = 1
MAX_IMAGES = 4
LIST_LENGTH_BOUNDS: dict[str, tuple[int, int]] = {"images": (MIN_IMAGES, MAX_IMAGES)}


def _inspect_predictor(predictor_ref: str, project_root: Path) -> Any:
    """cog's ``PredictorInfo`` for ``file.py:Class`` (inputs in signature order, output type)."""
    from cog import _inspector

    file_name, _, class_name = predictor_ref.partition(":")
    if not class_name or not file_name.endswith(".py"):
        raise ConfigError(f"predictor reference must look like 'predict.py:Predictor', got {predictor_ref!r}")
    predictor_file = (project_root / file_name).resolve()
    if not predictor_file.is_file():
        raise ConfigError(f"predictor file {predictor_file} not found; run from the project root")
    module_name = predictor_file.stem
    # the inspector imports the module by name, as the server does from its working directory
    sys.path.insert(0, str(predictor_file.parent))
    try:
        with warnings.catch_warnings():
            # deprecation notices of cog 0.23 say nothing about the schema
            warnings.simplefilter("ignore", DeprecationWarning)
            return _inspector.create_predictor(module_name, class_name)
    finally:
        sys.path.remove(str(predictor_file.parent))


def _default_value(input_field: Any) -> Any:
    """The JSON default of an input, or None when it has none (then the input is required)."""
    default = input_field.default
    if isinstance(default, Field):
        if default.default_factory is not MISSING:
            default = default.default_factory()
        elif default.default is not MISSING:
            default = default.default
        else:
            default = None
    if default is None:
        return None
    return input_field.type.json_encode(input_field.type.normalize(default))


def _input_schema(info: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``Input`` object schema and the enum schemas its ``choices`` inputs refer to."""
    from cog import _adt

    properties: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    required: list[str] = []
    for name, field in info.inputs.items():
        prop: dict[str, Any] = {"x-order": field.order}
        if field.choices is not None:
            # Cog puts choices in a named enum schema and points at it through allOf
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": list(field.choices),
                **field.type.primitive.json_type(),
            }
        else:
            prop["title"] = name.replace("_", " ").title()
            prop.update(field.type.json_type())

        default = _default_value(field)
        if default is not None:
            prop["default"] = default
        elif field.type.repetition in (_adt.Repetition.REQUIRED, _adt.Repetition.REPEATED):
            required.append(name)
        if field.type.repetition is _adt.Repetition.OPTIONAL:
            prop["nullable"] = True

        for attribute, key in (
            ("description", "description"),
            ("ge", "minimum"),
            ("le", "maximum"),
            ("min_length", "minLength"),
            ("max_length", "maxLength"),
            ("regex", "pattern"),
            ("deprecated", "deprecated"),
        ):
            value = getattr(field, attribute)
            if value is not None:
                prop[key] = value
        if name in LIST_LENGTH_BOUNDS:
            prop["minItems"], prop["maxItems"] = LIST_LENGTH_BOUNDS[name]
        properties[name] = prop

    input_schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    return input_schema, enums


def _json_response(schema: dict[str, Any], description: str = "Successful Response") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


VALIDATION_ERROR_RESPONSE = _json_response(
    {"$ref": "#/components/schemas/HTTPValidationError"}, description="Validation Error"
)


def _paths() -> dict[str, Any]:
    return {
        "/": {
            "get": {"summary": "Root", "operationId": "root__get", "responses": {"200": _json_response({})}}
        },
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": _json_response({})},
            }
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}
                    }
                },
                "responses": {
                    "200": _json_response({"$ref": "#/components/schemas/PredictionResponse"}),
                    "422": VALIDATION_ERROR_RESPONSE,
                },
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id",
                        "in": "path",
                    }
                ],
                "responses": {"200": _json_response({}), "422": VALIDATION_ERROR_RESPONSE},
            }
        },
    }


def _envelope_schemas() -> dict[str, Any]:
    """The request/response envelope schemas, identical for every Cog model."""

    def timestamp(title: str) -> dict[str, Any]:
        return {"title": title, "type": "string", "format": "date-time"}

    return {
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/ValidationError"},
                }
            },
        },
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": {"$ref": "#/components/schemas/Input"},
            },
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": {"$ref": "#/components/schemas/Input"},
                "output": {"$ref": "#/components/schemas/Output"},
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": timestamp("Created At"),
                "started_at": timestamp("Started At"),
                "completed_at": timestamp("Completed At"),
                "status": {"title": "Status", "type": "string"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }


def build_schema(
    predictor_ref: str = DEFAULT_PREDICTOR_REF, project_root: Path = PROJECT_ROOT
) -> dict[str, Any]:
    """The OpenAPI 3.0.2 document for the predictor, as a JSON-ready dict."""
    info = _inspect_predictor(predictor_ref, project_root)
    for name in LIST_LENGTH_BOUNDS:
        if name not in info.inputs:
            raise ConfigError(
                f"{predictor_ref} has no input {name!r}; update LIST_LENGTH_BOUNDS in {__name__}"
            )
    input_schema, enums = _input_schema(info)
    schemas = _envelope_schemas()
    schemas["Input"] = input_schema
    schemas["Output"] = info.output.json_type()
    schemas.update(enums)
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": _paths(),
        "components": {"schemas": schemas},
    }


def write_schema(
    predictor_ref: str = DEFAULT_PREDICTOR_REF,
    project_root: Path = PROJECT_ROOT,
    output_path: Path | None = None,
) -> Path:
    """Write the schema (default ``<project_root>/.cog/openapi_schema.json``); returns its path."""
    output_path = output_path or project_root / SCHEMA_RELATIVE_PATH
    schema = build_schema(predictor_ref, project_root)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text(json.dumps(schema, indent=2) + "\n")
    logger.info("wrote OpenAPI schema for %s to %s", predictor_ref, output_path)
    return output_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--predictor", default=DEFAULT_PREDICTOR_REF, help="file.py:Class (default %(default)s)"
    )
    parser.add_argument(
        "--project-root", type=Path, default=PROJECT_ROOT, help="folder holding the predictor file"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="default: <project-root>/.cog/openapi_schema.json"
    )
    parser.add_argument("--stdout", action="store_true", help="print the schema instead of writing it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.stdout:
        json.dump(build_schema(args.predictor, args.project_root), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        write_schema(args.predictor, args.project_root, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
