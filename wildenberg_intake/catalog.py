"""Catalog schema: where the packaged catalog lives, and validation of an entry's arguments.

The YAML catalog declares the data; this module turns one entry's arguments (declared fields plus
user parameters) into a validated `Request`, raising a clear error naming the parameter, the bad
value and what is allowed. Every public entry point (drivers, torch adapter, command line) goes
through `make_request`, so the rules live in one place.
"""

from __future__ import annotations

import ast
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml

CATALOG_FILE = "wildenberg.yaml"
CACHE_ENV = "WILDENBERG_INTAKE_CACHE"
BASE_URL_ENV = "WILDENBERG_BOSSDB_URL"
URL_SCHEMES = ("http", "https", "file", "s3", "gs")
LABELS = ("psd", "vesicle_cloud", "saturated")
# The user parameters of every voxel entry (the catalog's `parameters`), as Python and the CLI name them.
USER_PARAMETERS = ("bbox_nm", "em_mip", "seg_mip", "cache_dir", "base_url", "raw_codec")


def did_you_mean(name, allowed) -> str:
    """"; did you mean 'bbox_nm'?" for the closest of `allowed` to `name`, or "" if none is close."""
    import difflib
    close = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_name(what: str, name, allowed) -> str:
    """The message for an unknown `what` (parameter, entry, ...): the name, the allowed ones and the
    closest match ("did you mean bbox_nm?")."""
    allowed = sorted(str(a) for a in allowed)
    return f"{what} {name!r} is unknown; allowed: {allowed}{did_you_mean(name, allowed)}"


def check_names(given, allowed, what: str = "parameter"):
    """Refuse the first name of `given` not in `allowed`, with `unknown_name`'s message."""
    for name in given:
        if name not in allowed:
            raise ValueError(unknown_name(what, name, allowed))


class UnknownKeyword(TypeError, ValueError):
    """A keyword a function does not take, named with the allowed ones and the closest match (a
    TypeError as Python's own, and a ValueError as the package's other refusals of bad input)."""


def checked_keywords(function):
    """Decorate a public function or method so that an unknown keyword is refused before it runs,
    naming the allowed keywords and the closest match (Python's own TypeError names neither)."""
    import functools
    import inspect
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    allowed = [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds and p.name != "self"]

    @functools.wraps(function)
    def checked(*args, **kwargs):
        for name in kwargs:
            if not allowed:
                raise UnknownKeyword(f"{function.__qualname__}() takes no keywords; got {name!r}")
            if name not in allowed:
                raise UnknownKeyword(unknown_name(f"{function.__qualname__}() keyword", name, allowed))
        return function(*args, **kwargs)
    return checked


def check_count(name: str, value) -> int:
    """A positive integer (workers, connections, ...); the message names the parameter and the value."""
    if isinstance(value, bool) or not isinstance(value, (int,)) or value < 1:
        try:
            import numpy as np
            if isinstance(value, np.integer) and value >= 1:
                return int(value)
        except ImportError:
            pass
        raise ValueError(f"{name}={value!r} is not valid; allowed: a positive integer")
    return int(value)


def catalog_path() -> str:
    """Path of the packaged catalog YAML (works from a wheel and from a source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "catalog_files" / CATALOG_FILE, here.parent / "catalog" / CATALOG_FILE):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"the packaged catalog {CATALOG_FILE} was not found beside {here}")


def load_catalog_yaml(path: str | os.PathLike | None = None) -> dict:
    """The catalog as plain YAML (no intake), for tools that only inspect it."""
    with open(path or catalog_path()) as f:
        return yaml.safe_load(f)


def entry_names(path: str | os.PathLike | None = None) -> list[str]:
    """Names of the catalog's entries, e.g. ['p105_psd', ...]."""
    return list(load_catalog_yaml(path)["sources"])


def default_cache_dir() -> Path:
    """$WILDENBERG_INTAKE_CACHE, else $XDG_CACHE_HOME/wildenberg-intake, else ~/.cache/wildenberg-intake."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wildenberg-intake"


@dataclass(frozen=True)
class LabelChannel:
    name: str  # label choice: psd, vesicle_cloud, saturated
    channel: str  # BossDB channel
    dtype: str
    kind: str  # binary or instance


@dataclass(frozen=True)
class Request:
    """A validated entry: which layers, which box, which mips, which cache."""

    experiment: str
    label: str
    bossdb_experiment: str
    em_channel: str
    em_dtype: str
    em_axes_swapped: bool
    label_channels: tuple  # every LabelChannel of the experiment (the store's geometry uses all)
    bbox_nm: tuple  # (x0, x1, y0, y1, z0, z1) as requested, before clipping
    em_mip: int
    seg_mip: int
    cache_dir: Path
    base_url: str
    citation: str = ""
    raw_codec: str = "zstd1"
    bbox_given: bool = False  # bbox_nm was given (not the annotated box by default)

    def url(self, channel: str) -> str:
        """cloud-volume URL of a channel of this experiment under the base URL."""
        return f"precomputed://{self.base_url}/{self.bossdb_experiment}/{channel}"

    @property
    def em_url(self) -> str:
        return self.url(self.em_channel)

    def channel(self, label: str | None = None) -> LabelChannel:
        label = label or self.label
        for ch in self.label_channels:
            if ch.name == label:
                return ch
        raise ValueError(f"label={label!r} is unknown; allowed: {[c.name for c in self.label_channels]}")


def _parse(value):
    """Text from templates or the command line becomes Python values ('1' -> 1, '[1, 2]' -> [1, 2]).

    Also reads what str() makes of numpy values ('[1. 2.]', '[np.float64(1.0)]') and 'nan'/'inf',
    so that such values reach validation and are judged there, not lost in parsing.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    text = re.sub(r"np\.\w+\(([^()]*)\)", r"\1", text)
    if text[:1] in "[(" and text[-1:] in "])":
        try:
            return [float(p) for p in re.split(r"[\s,]+", text[1:-1]) if p]
        except ValueError:
            return value
    if re.fullmatch(r"[+-]?(nan|inf|infinity)", text, re.IGNORECASE):
        return float(text)
    return value


def _number(name: str, value, what: str = "a finite number") -> float:
    value = _parse(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not valid; allowed: {what}")
    return float(value)


def check_mip(name: str, value) -> int:
    """A mip level: a non-negative integer (whether the layer has it is checked against its info)."""
    value = _parse(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} is not valid; allowed: a non-negative integer mip level")
    return value


def check_bbox(value, default) -> tuple:
    """A box (x0, x1, y0, y1, z0, z1) in nm with x0 < x1, y0 < y1, z0 < z1; empty or None for `default`."""
    value = _parse(value)
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0) or value == "":
        value = default
    if not isinstance(value, (list, tuple)) or len(value) != 6:
        raise ValueError(f"bbox_nm={value!r} is not valid; allowed: six numbers "
                         "(x0, x1, y0, y1, z0, z1) in nm")
    parsed = [_parse(v) for v in value]  # numbers as numbers in messages, even from the command line
    bad = [v for v in parsed if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        raise ValueError(f"bbox_nm={parsed!r} is not valid: {', '.join(map(repr, bad))} "
                         f"{'is not a finite number' if len(bad) == 1 else 'are not finite numbers'}; "
                         "allowed: six finite numbers (x0, x1, y0, y1, z0, z1) in nm")
    box = tuple(float(v) for v in parsed)
    for axis, (lo, hi) in zip("xyz", (box[0:2], box[2:4], box[4:6])):
        if not lo < hi:
            raise ValueError(f"bbox_nm={parsed!r} is empty or inverted along {axis} "
                             f"({axis}0={lo:g} must be below {axis}1={hi:g})")
    return box


def check_base_url(value, default: str) -> str:
    """A base URL with a scheme cloud-volume reads; empty for $WILDENBERG_BOSSDB_URL or `default`."""
    value = "" if value is None else value
    if not isinstance(value, str):
        raise ValueError(f"base_url={value!r} is not valid; allowed: a URL string")
    value = value.strip() or os.environ.get(BASE_URL_ENV, "").strip() or default
    value = value.removeprefix("precomputed://").rstrip("/")
    scheme = urlparse(value).scheme
    if scheme not in URL_SCHEMES:
        raise ValueError(f"base_url={value!r} has unsupported scheme {scheme!r}; allowed: {list(URL_SCHEMES)}")
    return value


def check_codec(value) -> str:
    """The raw EM codec: a name from cache.CODECS; empty for the default (zstd1)."""
    from .store.format import CODECS
    value = _parse(value)
    if value in (None, "", []):
        return "zstd1"
    if value not in CODECS:
        raise ValueError(f"raw_codec={value!r} is not supported; allowed: {list(CODECS)}")
    return value


def check_cache_dir(value) -> Path:
    """A folder (created if missing); empty for the default cache folder. A file is refused."""
    value = "" if value is None else value
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"cache_dir={value!r} is not valid; allowed: a folder path")
    path = Path(value).expanduser() if str(value).strip() else default_cache_dir()
    if path.exists() and not path.is_dir():
        raise ValueError(f"cache_dir={str(path)!r} is a file; allowed: a folder (existing or to create)")
    return path


def make_request(*, experiment, label, bossdb_experiment, em_channel, em_axes_swapped,
                 annotated_bbox_nm, label_channels, bossdb_url, em_dtype="uint8",
                 bbox_nm=None, em_mip=1, seg_mip=0, cache_dir=None, base_url=None,
                 raw_codec=None, citation="", **_declared) -> Request:
    """Validate one catalog entry's arguments (declared fields plus user parameters)."""
    channels = tuple(LabelChannel(name, spec["channel"], spec["dtype"], spec["kind"])
                     for name, spec in label_channels.items())
    if label not in label_channels:
        raise ValueError(f"label={label!r} is unknown; allowed: {list(label_channels)}")
    if not isinstance(_parse(em_axes_swapped), bool):
        raise ValueError(f"em_axes_swapped={em_axes_swapped!r} is not valid; allowed: true or false")
    return Request(
        experiment=str(experiment), label=label, bossdb_experiment=str(bossdb_experiment),
        em_channel=str(em_channel), em_dtype=str(em_dtype),
        em_axes_swapped=_parse(em_axes_swapped), label_channels=channels,
        bbox_nm=check_bbox(bbox_nm, annotated_bbox_nm),
        em_mip=check_mip("em_mip", em_mip), seg_mip=check_mip("seg_mip", seg_mip),
        cache_dir=check_cache_dir(cache_dir), base_url=check_base_url(base_url, bossdb_url),
        citation=str(citation or "").strip(), raw_codec=check_codec(raw_codec),
        bbox_given=check_bbox(bbox_nm, annotated_bbox_nm) != check_bbox(None, annotated_bbox_nm),
    )
