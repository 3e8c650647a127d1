"""Reading and validating ``weights_manifest.json``, the zoo's single source of truth.

The manifest is checked against ``manifest.schema.json`` (shipped with the package) with a
small validator for a fixed set of JSON Schema keywords (:data:`SUPPORTED_KEYWORDS`), then for
the facts a schema cannot state (a default tag that names one of the model's weights). A schema
using any other keyword is refused (:class:`SchemaError`) instead of being half-enforced. Every
problem is reported as a :class:`ManifestError` naming the file, the entry and the field. JSON
nested deeper than :data:`MAX_DEPTH` levels is refused before anything walks it.
"""
from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, List, Optional, Union

from .fileio import atomic_path

__all__ = ["ManifestError", "SchemaError", "MAX_DEPTH", "SUPPORTED_KEYWORDS", "MANIFEST_PATH", "SCHEMA_PATH", "dump_manifest", "load_manifest", "metric_numbers", "validate"]

MANIFEST_PATH = Path(__file__).with_name("weights_manifest.json")
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")

#: The JSON Schema keywords :func:`validate` enforces; a schema using any other one is refused.
SUPPORTED_KEYWORDS = frozenset({
    "$comment", "$defs", "$ref", "type", "enum", "properties", "propertyNames", "required",
    "additionalProperties", "items", "minItems", "maxItems", "minLength", "pattern", "minimum",
    "maximum", "exclusiveMinimum", "oneOf",
})
#: Deepest nesting of objects/arrays accepted in a manifest (the real one needs 7).
MAX_DEPTH = 32

_JSON_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def metric_numbers(metric: dict) -> dict:
    """The published numbers of a manifest metric entry: every field but task, protocol and source."""
    return {k: v for k, v in metric.items() if k not in ("task", "protocol", "source")}


class ManifestError(ValueError):
    """The manifest is malformed; the message names the file, the entry and the field."""


class SchemaError(ManifestError):
    """``manifest.schema.json`` uses a JSON Schema keyword the validator does not enforce."""


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> Optional[str]:
    """The path of the first object/array nested deeper than ``limit`` (iteratively: no recursion), or None."""
    stack = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, (dict, list)):
            if len(path) >= limit:
                return _where(path)
            children = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((child, path + (key,)) for key, child in children)
    return None


def _check_schema(schema: Any, path: tuple = ()) -> None:
    """Refuse schema keywords outside :data:`SUPPORTED_KEYWORDS` (they would be silently ignored)."""
    if isinstance(schema, list):
        for i, sub in enumerate(schema):
            _check_schema(sub, path + (i,))
        return
    if not isinstance(schema, dict):
        return
    unknown = sorted(set(schema) - SUPPORTED_KEYWORDS)
    if unknown:
        raise SchemaError(f"{SCHEMA_PATH} uses JSON Schema keyword(s) {', '.join(unknown)} at {_where(path)}, which "
                          f"gczoo.manifest does not enforce (supported: {', '.join(sorted(SUPPORTED_KEYWORDS))}); "
                          "express the rule with those, or implement the keyword in gczoo/manifest.py")
    for key, sub in schema.items():
        if key in ("properties", "$defs"):  # maps of names to subschemas
            for name, item in sub.items():
                _check_schema(item, path + (key, name))
        elif key in ("items", "additionalProperties", "propertyNames", "oneOf"):
            _check_schema(sub, path + (key,))


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    if name == "number" and isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, _JSON_TYPES[name])


def _where(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _errors(value: Any, schema: dict, root: dict, path: tuple) -> List[str]:
    """All violations of ``schema`` by ``value``, each as ``"<path>: <what is wrong>"``."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return _errors(value, target, root, path)
    where = _where(path)
    if "oneOf" in schema:
        branches = [_errors(value, s, root, path) for s in schema["oneOf"]]
        matching = [b for b in branches if not b]
        if len(matching) == 1:
            return []
        if matching:
            return [f"{where}: matches more than one allowed form"]
        return min(branches, key=len)  # the closest form explains best what is wrong
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_is_type(value, t) for t in names):
            return [f"{where}: expected {' or '.join(names)}, got {json.dumps(value)[:60]}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {json.dumps(value)[:60]} is not one of {schema['enum']}"]
    out: List[str] = []
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            out.append(f"{where}: must not be empty")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{where}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where}: {value} is above the maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            out.append(f"{where}: {value} must be greater than {schema['exclusiveMinimum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{where}: needs at least {schema['minItems']} items")
        if len(value) > schema.get("maxItems", len(value)):
            out.append(f"{where}: allows at most {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                out += _errors(item, schema["items"], root, path + (i,))
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{_where(path + (key,))}: required field is missing")
        for key, item in value.items():
            if "propertyNames" in schema:
                out += _errors(key, schema["propertyNames"], root, path + (key,))
            if key in props:
                out += _errors(item, props[key], root, path + (key,))
            elif schema.get("additionalProperties") is False:
                out.append(f"{_where(path + (key,))}: unknown field (allowed: {', '.join(sorted(props))})")
            elif isinstance(schema.get("additionalProperties"), dict):
                out += _errors(item, schema["additionalProperties"], root, path + (key,))
    return out


def validate(data: Any, source: Union[str, Path] = "manifest") -> dict:
    """Validate manifest ``data``; return it, or raise :class:`ManifestError` listing every problem."""
    schema = _schema()
    deep = _too_deep(data)
    if deep is not None:
        raise ManifestError(f"{source} is malformed: {deep} is nested more than {MAX_DEPTH} levels deep "
                            "(no manifest field needs that); fix that field")
    problems = _errors(data, schema, schema, ())
    if not problems:
        for name, model in data["models"].items():
            tag = model["default_tag"]
            if tag is not None and tag not in model["weights"]:
                problems.append(f"models.{name}.default_tag: {tag!r} is not one of its weights "
                                f"({', '.join(model['weights']) or 'none'})")
            if tag is None and model["weights"]:
                problems.append(f"models.{name}.default_tag: must name one of its weights ({', '.join(model['weights'])})")
            for wtag, weights in model["weights"].items():
                start = weights.get("imagenet_start")
                if start and start["backbone"] not in data.get("backbones", {}):
                    problems.append(f"models.{name}.weights.{wtag}.imagenet_start.backbone: {start['backbone']!r} "
                                    "is not an entry of backbones")
                if "recipe" in weights and weights["recipe"] not in data.get("recipes", {}):
                    problems.append(f"models.{name}.weights.{wtag}.recipe: {weights['recipe']!r} is not a key of recipes")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ManifestError(f"{source} is malformed ({len(problems)} problem(s)); fix these fields:\n  {shown}{more}")
    return data


@lru_cache(maxsize=None)
def _schema() -> dict:
    schema = json.loads(SCHEMA_PATH.read_text())
    _check_schema(schema)
    return schema


@lru_cache(maxsize=None)
def _load_cached(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"cannot read the manifest {path}: {e.strerror}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except RecursionError:
        raise ManifestError(f"{path} is nested too deeply to parse (a manifest needs {MAX_DEPTH} levels at most); "
                            "it is not a gczoo manifest") from None
    return validate(data, path)


def load_manifest(path: Optional[Union[str, Path]] = None) -> dict:
    """Load and validate a manifest (the packaged one by default). Results are cached per path.

    The returned dict is shared: treat it as read-only.
    """
    return _load_cached(str(Path(path or MANIFEST_PATH).resolve()))


def dump_manifest(data: dict, path: Optional[Union[str, Path]] = None) -> None:
    """Validate ``data`` and write it in the manifest's layout (two-space indent, numeric
    lists on one line), atomically. For maintainer tools such as ``gczoo pin``."""
    validate(data)
    text = json.dumps(data, indent=2, ensure_ascii=False)
    text = re.sub(r"\[\s*([-0-9.e,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    with atomic_path(Path(path or MANIFEST_PATH).resolve()) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    _load_cached.cache_clear()
