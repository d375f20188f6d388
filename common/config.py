"""Structured job configs: dataclass defaults <- YAML recipe <- ``dotted.key=value`` overrides.

Every job is ``python -m pipelines.<job> --config FILE.yaml [key=value ...]``. The schema is a dataclass
(one per job, composed of per-component dataclasses kept beside their code). Merging is strict: an unknown
key or a value of the wrong type is a :class:`ConfigError` naming the key and the file (or the override)
it came from. A recipe may derive from another with ``_base_: other.yaml`` (a path relative to the file);
the derived file's values win.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.redact import redact

T = TypeVar("T")

BASE_KEY = "_base_"
RESOLVED_NAME = "config.resolved.yaml"


class ConfigError(ValueError):
    """A config file or override that does not fit its schema."""


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = getattr(exc, "msg", None) or str(exc).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read one YAML recipe, following ``_base_`` links (cycles are an error)."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config inheritance cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: name the file
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(cfg).__name__}")
    base = cfg.pop(BASE_KEY, None)
    if base is None:
        return cfg
    if not isinstance(base, str):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a path string, got {base!r}")
    parent = _read_yaml(path.parent / base, (*seen, path))
    return OmegaConf.merge(parent, cfg)


def _open_dict_fields(node: DictConfig) -> None:
    """Fields typed ``dict[str, X]`` take any key (stages, groups by name); their values stay typed and strict."""
    if node._metadata.object_type is dict:
        OmegaConf.set_struct(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _open_dict_fields(child)


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a ``schema`` instance from defaults, an optional YAML file and dotted overrides.

    Raises ConfigError naming the offending key and its origin (file path or override text).
    """
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass")
    merged = OmegaConf.structured(schema)
    OmegaConf.set_struct(merged, True)
    _open_dict_fields(merged)
    if path is not None:
        file_cfg = _read_yaml(Path(path))
        try:
            merged = OmegaConf.merge(merged, file_cfg)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{path}: {_describe(exc)}") from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override '{item}': {_describe(exc)}") from exc
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        origin = f" (config {path})" if path else ""
        raise ConfigError(f"required keys have no value{origin}: {', '.join(missing)}")
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path or 'config'}: {_describe(exc)}") from exc
    except (ValueError, TypeError) as exc:  # raised by a dataclass's __post_init__ validation
        raise ConfigError(f"{path or 'config'}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain containers (what crosses a process boundary, e.g. to Ray workers)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def config_from_dict(schema: type[T], data: dict[str, Any]) -> T:
    """Rebuild (and re-validate) a config from :func:`to_dict` output."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config: {_describe(exc)}") from exc


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (stable key order: the schema's)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """``{"a.b.c": value}`` for parameter logging; lists are kept as JSON text; secrets masked (common.redact)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(node) if isinstance(node, list) else node

    # masked before lists become JSON text, where a tracker could no longer see a secret-named key
    walk("", redact(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)))
    return out


def config_hash(cfg: Any) -> str:
    """A short, stable hash of the resolved config (recorded in manifests)."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def save_resolved(cfg: Any, out_dir: str | Path, name: str = RESOLVED_NAME) -> Path:
    """Write the resolved config next to a job's outputs and return its path. Secret-named keys and secret
    environment values are masked (common.redact): the file is logged to MLflow and shared with outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    tmp = target.with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(redact(to_dict(cfg))))  # logged to MLflow: no secrets
    tmp.replace(target)
    return target


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""One format for every job's log lines (a job's final table is printed as it is)."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str = "INFO") -> None:
    """Every job's logging: ``LOG_FORMAT`` on stderr at ``level`` (the job's ``--log-level``)."""
    import logging

    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {LOG_LEVELS}")
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, datefmt="%H:%M:%S", force=True)


def parse_job_args(schema: type[T], argv: Sequence[str] | None, prog: str, doc: str = "") -> T:
    """The command line every job shares: ``--config FILE [dotted.key=value ...] [--log-level LEVEL]``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--config", "-c", help="YAML recipe (defaults of the schema when omitted)")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="log lines at this level and up")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, applied last")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return load_config(schema, args.config, args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))  # usage + the message on stderr, exit status 2
        raise  # unreachable: parser.error exits
