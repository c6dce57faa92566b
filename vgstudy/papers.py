"""The papers' own numbers, read from `papers/<key>.yaml`, so a notebook never types a reported number by hand.

Each YAML file holds one paper: its bibliographic facts, every reported number a notebook may compare with (a
`Result`, with the table or figure it comes from and whether we checked it against that source), and optionally the
paper's ablation tables (an `Ablation`: one setting per row). The schema is described in `papers/README.md` and
validated strictly here: an unknown key, a missing field, a value of the wrong type or out of range for its metric, or
a duplicate id raises a `DataError` that names the file and the entry.

    reported("hivg", "main/hivg-b/unc/val").value            # 87.32
    reported("hivg", model="HiVG-B", dataset="unc")          # [Result, Result, Result]
    ablation("hivg", "fig4c/text-length/hivg-b").rows
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from vgstudy.errors import ConfigError, DataError

PAPERS_DIR: Path = Path(__file__).resolve().parent.parent / "papers"

# The evaluation splits each data set has, by vgstudy's data-set names (see `vgstudy.data.refer.DATASETS`).
EVAL_SPLITS: dict[str, tuple[str, ...]] = {
    "unc": ("val", "testA", "testB"),
    "unc+": ("val", "testA", "testB"),
    "gref": ("val",),
    "gref_umd": ("val", "test"),
    "referit": ("val", "test"),
    "flickr": ("val", "test"),
}

# metric -> (lowest, highest) allowed value, inclusive; None = unbounded. Counts must also be whole numbers.
METRIC_RANGES: dict[str, tuple[float | None, float | None]] = {
    "acc50": (0.0, 100.0),  # Acc@0.5 in percent
    "params_total": (1, None),
    "params_trainable": (0, None),
    "params_backbone": (1, None),
    "params_trainable_pct": (0.0, 100.0),
    "params_trainable_m": (0.0, None),  # millions, as papers print them in figures
    "gflops": (0.0, None),
    "gmacs": (0.0, None),
    "fps": (0.0, None),
}
COUNT_METRICS = frozenset({"params_total", "params_trainable", "params_backbone"})


@dataclass(frozen=True)
class Result:
    """One reported number: `value` of `metric` for `model` on `dataset`/`split` (None where not per data set)."""

    id: str
    model: str
    dataset: str | None
    split: str | None
    metric: str
    value: float
    source: str  # the table / figure as the paper numbers it, or "README" for a release's own statement
    verified: bool  # checked by us against `source` (see the note when False)
    note: str | None = None


@dataclass(frozen=True)
class AblationRow:
    """One setting of an ablation table and its value."""

    setting: str
    value: float


@dataclass(frozen=True)
class Ablation:
    """An ablation table of the paper: one metric on one data set / split, one row per setting."""

    id: str
    source: str
    description: str
    metric: str
    dataset: str | None
    split: str | None
    rows: tuple[AblationRow, ...]
    verified: bool = False
    note: str | None = None

    def value(self, setting: str) -> float:
        """The value of the row named `setting`."""
        for row in self.rows:
            if row.setting == setting:
                return row.value
        raise DataError(
            f"ablation {self.id!r} has no setting {setting!r}: expected one of {[r.setting for r in self.rows]}"
        )


@dataclass(frozen=True)
class Paper:
    """One paper's bibliographic facts, reported results and ablation tables."""

    key: str
    title: str
    authors: str
    venue: str
    arxiv: str | None
    code: str | None
    bibtex_key: str
    notes: str
    results: tuple[Result, ...]
    ablations: tuple[Ablation, ...] = ()


def load_paper(key: str, papers_dir: Path = PAPERS_DIR) -> Paper:
    """Read and validate `papers_dir/<key>.yaml`."""
    path = Path(papers_dir) / f"{key}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in Path(papers_dir).glob("*.yaml"))
        raise DataError(f"no paper file {path}: expected one of the papers {available}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc})") from exc
    return _parse_paper(raw, path)


def all_papers(papers_dir: Path = PAPERS_DIR) -> dict[str, Paper]:
    """Every paper in `papers_dir`, by key."""
    return {path.stem: load_paper(path.stem, papers_dir) for path in sorted(Path(papers_dir).glob("*.yaml"))}


def reported(paper: str, id: str | None = None, **filters: Any) -> Result | list[Result]:
    """The paper's result with this `id`, or the list of its results whose fields equal `filters`.

    Filters are Result fields (model, dataset, split, metric, source, verified). A filter that matches nothing raises
    a `DataError` listing the values the paper has, since in a notebook that is almost always a typo.
    """
    results = load_paper(paper).results
    if not results:
        raise DataError(f"paper {paper!r} reports no numbers that can be compared (see the notes of its file)")
    if id is not None:
        if filters:
            raise ConfigError(f"reported({paper!r}, {id!r}, ...): give an id or filters, not both")
        by_id = {r.id: r for r in results}
        if id not in by_id:
            raise DataError(f"paper {paper!r} has no result {id!r}; closest ids: {_closest(id, list(by_id))}")
        return by_id[id]
    allowed = {f.name for f in fields(Result)} - {"id", "value", "note"}
    unknown = sorted(set(filters) - allowed)
    if unknown:
        raise ConfigError(f"reported({paper!r}): unknown filter(s) {unknown}: expected some of {sorted(allowed)}")
    matches = [r for r in results if all(getattr(r, name) == want for name, want in filters.items())]
    if not matches:
        have = {name: sorted({str(getattr(r, name)) for r in results}) for name in filters}
        raise DataError(f"paper {paper!r} has no result with {filters}; values it has: {have}")
    return matches


def ablation(paper: str, id: str) -> Ablation:
    """The paper's ablation table with this `id`."""
    by_id = {a.id: a for a in load_paper(paper).ablations}
    if id not in by_id:
        raise DataError(f"paper {paper!r} has no ablation {id!r}; closest ids: {_closest(id, list(by_id))}")
    return by_id[id]


def _closest(wanted: str, ids: list[str]) -> list[str]:
    return difflib.get_close_matches(wanted, ids, n=5, cutoff=0.0) if ids else []


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key repeated in one mapping (PyYAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_PAPER_REQUIRED = ("key", "title", "authors", "venue", "arxiv", "code", "bibtex_key", "notes", "results")
_RESULT_REQUIRED = ("id", "model", "dataset", "split", "metric", "value", "source", "verified")
_ABLATION_REQUIRED = ("id", "source", "description", "metric", "dataset", "split", "rows")
_ARXIV_ID = re.compile(r"\d{4}\.\d{4,5}")


def _parse_paper(raw: Any, path: Path) -> Paper:
    where = str(path)
    _check_keys(raw, where, required=_PAPER_REQUIRED, optional=("ablations",))
    if raw["key"] != path.stem:
        raise DataError(f"{where}: key {raw['key']!r} must equal the file name stem {path.stem!r}")
    for name in ("title", "authors", "venue", "bibtex_key", "notes"):
        _text(raw[name], f"{where}: {name}")
    arxiv = _optional_text(raw["arxiv"], f"{where}: arxiv")
    if arxiv is not None and not _ARXIV_ID.fullmatch(arxiv):
        raise DataError(f"{where}: arxiv {arxiv!r}: expected an arXiv id such as '2404.13400' (quoted) or null")
    code = _optional_text(raw["code"], f"{where}: code")
    if code is not None and not code.startswith("https://"):
        raise DataError(f"{where}: code {code!r}: expected an https:// address or null")
    results = tuple(
        _parse_result(entry, f"{where}, results[{i}]") for i, entry in enumerate(_list(raw, "results", where))
    )
    _check_unique([r.id for r in results], f"{where}: results")
    ablations = tuple(
        _parse_ablation(entry, f"{where}, ablations[{i}]") for i, entry in enumerate(_list(raw, "ablations", where))
    )
    _check_unique([a.id for a in ablations], f"{where}: ablations")
    return Paper(
        key=raw["key"],
        title=raw["title"],
        authors=raw["authors"],
        venue=raw["venue"],
        arxiv=arxiv,
        code=code,
        bibtex_key=raw["bibtex_key"],
        notes=raw["notes"],
        results=results,
        ablations=ablations,
    )


def _parse_result(raw: Any, where: str) -> Result:
    _check_keys(raw, where, required=_RESULT_REQUIRED, optional=("note",))
    where = f"{where} (id {raw['id']!r})"
    _text(raw["id"], f"{where}: id")
    _text(raw["model"], f"{where}: model")
    _text(raw["source"], f"{where}: source")
    dataset, split = _dataset_and_split(raw, where)
    metric = _metric(raw["metric"], where)
    if not isinstance(raw["verified"], bool):
        raise DataError(f"{where}: verified must be true or false, got {raw['verified']!r}")
    return Result(
        id=raw["id"],
        model=raw["model"],
        dataset=dataset,
        split=split,
        metric=metric,
        value=_value(raw["value"], metric, f"{where}: value"),
        source=raw["source"],
        verified=raw["verified"],
        note=_optional_text(raw.get("note"), f"{where}: note"),
    )


def _parse_ablation(raw: Any, where: str) -> Ablation:
    _check_keys(raw, where, required=_ABLATION_REQUIRED, optional=("verified", "note"))
    where = f"{where} (id {raw['id']!r})"
    for name in ("id", "source", "description"):
        _text(raw[name], f"{where}: {name}")
    dataset, split = _dataset_and_split(raw, where)
    metric = _metric(raw["metric"], where)
    verified = raw.get("verified", False)
    if not isinstance(verified, bool):
        raise DataError(f"{where}: verified must be true or false, got {verified!r}")
    if not isinstance(raw["rows"], list) or not raw["rows"]:
        raise DataError(f"{where}: rows must be a non-empty list of {{setting, value}}, got {raw['rows']!r}")
    rows = []
    for i, row in enumerate(raw["rows"]):
        row_where = f"{where}, rows[{i}]"
        _check_keys(row, row_where, required=("setting", "value"), optional=())
        rows.append(
            AblationRow(
                setting=_text(row["setting"], f"{row_where}: setting"),
                value=_value(row["value"], metric, f"{row_where}: value"),
            )
        )
    _check_unique([r.setting for r in rows], f"{where}: rows")
    return Ablation(
        id=raw["id"],
        source=raw["source"],
        description=raw["description"],
        metric=metric,
        dataset=dataset,
        split=split,
        rows=tuple(rows),
        verified=verified,
        note=_optional_text(raw.get("note"), f"{where}: note"),
    )


def _check_keys(raw: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a mapping with keys {list(required)}, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in set(raw) - set(required) - set(optional))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}: expected {list(required) + list(optional)}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}")


def _check_unique(names: list[str], where: str) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{where}: duplicate {repeated}: each id or setting must appear once")


def _list(raw: dict[str, Any], name: str, where: str) -> list[Any]:
    value = raw.get(name, [])
    if not isinstance(value, list):
        raise DataError(f"{where}: {name} must be a list, got {type(value).__name__}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _optional_text(value: Any, where: str) -> str | None:
    return None if value is None else _text(value, where)


def _dataset_and_split(raw: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    dataset, split = raw["dataset"], raw["split"]
    if dataset is not None and dataset not in EVAL_SPLITS:
        raise DataError(f"{where}: dataset {dataset!r}: expected one of {list(EVAL_SPLITS)} or null")
    if split is not None:
        if dataset is None:
            raise DataError(f"{where}: split {split!r} given without a dataset")
        if split not in EVAL_SPLITS[dataset]:
            raise DataError(f"{where}: {dataset} has no evaluation split {split!r}: expected {EVAL_SPLITS[dataset]}")
    return dataset, split


def _metric(value: Any, where: str) -> str:
    if value not in METRIC_RANGES:
        raise DataError(f"{where}: metric {value!r}: expected one of {list(METRIC_RANGES)}")
    return value


def _value(value: Any, metric: str, where: str) -> float:
    # bool is an int to Python; a YAML `87.3` written as a string ("87.3") must not pass either.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{where} must be a finite number, got {type(value).__name__} {value!r}")
    low, high = METRIC_RANGES[metric]
    if (low is not None and value < low) or (high is not None and value > high):
        raise DataError(f"{where} = {value} is outside the range of {metric}: [{low}, {high}]")
    if metric in COUNT_METRICS and not isinstance(value, int):
        raise DataError(f"{where} = {value!r}: {metric} is a count, expected a whole number")
    return value
