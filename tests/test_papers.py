"""The papers' reported numbers: the files load and are sane, malformed ones are refused, notebook look-ups resolve."""

import ast
import re
from pathlib import Path

import pytest

from vgstudy import papers
from vgstudy.errors import ConfigError, DataError, VGStudyError
from vgstudy.papers import EVAL_SPLITS, PAPERS_DIR, ablation, all_papers, load_paper, reported

ROOT = Path(__file__).resolve().parents[1]
LOOKUPS = {"reported": reported, "ablation": ablation}


def literal_paper_calls(source: str) -> list[tuple[int, str, tuple, dict]]:
    """The `reported(...)` / `ablation(...)` calls in `source` whose arguments are all literals.

    Matches bare names and `papers.` / `vgstudy.papers.` attributes; calls with a computed argument are skipped,
    since they cannot be checked without running the notebook. Returns (line, function name, args, kwargs).
    """
    calls = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name):
            name = func.id
        elif isinstance(func, ast.Attribute) and ast.unparse(func.value) in ("papers", "vgstudy.papers"):
            name = func.attr
        else:
            continue
        if name not in LOOKUPS or any(k.arg is None for k in node.keywords):
            continue
        try:
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            continue
        calls.append((node.lineno, name, args, kwargs))
    return sorted(calls, key=lambda call: call[0])


def unresolved_references(source: str) -> list[str]:
    """One message per literal look-up in `source` that does not resolve."""
    problems = []
    for line, name, args, kwargs in literal_paper_calls(source):
        try:
            LOOKUPS[name](*args, **kwargs)
        except (VGStudyError, TypeError) as exc:
            problems.append(f"line {line}: {name}{args}: {exc}")
    return problems


# --- the committed files -------------------------------------------------------------------------------------------


def test_papers_dir_is_the_repository_folder():
    assert PAPERS_DIR == ROOT / "papers"


def test_every_paper_file_loads_and_its_key_is_its_name():
    loaded = all_papers()
    assert set(loaded) == {"epmvg", "hivg", "mapper", "transvg"}
    for key, paper in loaded.items():
        assert paper.key == key


def test_ids_are_unique_and_values_in_range():
    for paper in all_papers().values():
        ids = [r.id for r in paper.results]
        assert len(ids) == len(set(ids)), paper.key
        assert len({a.id for a in paper.ablations}) == len(paper.ablations), paper.key
        for r in paper.results:
            if r.metric in ("acc50", "params_trainable_pct"):
                assert 0 <= r.value <= 100, r.id
            else:
                assert r.value > 0, r.id
        for a in paper.ablations:
            if a.metric == "acc50":
                assert all(0 <= row.value <= 100 for row in a.rows), a.id


def test_every_bibtex_key_is_in_references_bib():
    bib_keys = set(re.findall(r"^@\w+\{([^,\s]+),", (ROOT / "papers" / "references.bib").read_text(), re.MULTILINE))
    for paper in all_papers().values():
        assert paper.bibtex_key in bib_keys, paper.key


def test_eval_splits_are_splits_of_the_real_loader():
    from vgstudy.data.refer import DATASETS

    for dataset, splits in EVAL_SPLITS.items():
        assert set(splits) <= set(DATASETS[dataset].splits), dataset


def test_main_tables_are_complete():
    for model in ("HiVG-B", "HiVG-L"):
        assert len(reported("hivg", model=model, metric="acc50")) == 10  # 3 + 3 + 2 + ReferIt + Flickr
    assert len(reported("mapper", model="MaPPER", metric="acc50")) == 9  # 3 + 3 + google val + umd val/test
    assert len(reported("transvg", model="TransVG-R101", metric="acc50")) == 10
    assert reported("hivg", "main/hivg-b/unc+/testA").value == 84.81  # the design notes had 83.81


def test_mapper_tunable_count_matches_the_headline_share():
    trainable = reported("mapper", "params/mapper/trainable").value
    backbone = reported("mapper", "params/mapper/backbone").value
    assert round(100 * trainable / backbone, 2) == reported("mapper", "params/mapper/trainable_pct").value


def test_epmvg_has_no_numbers_and_says_why():
    paper = load_paper("epmvg")
    assert paper.results == () and paper.ablations == ()
    assert "EpmVG-R" in paper.notes and "reconstruction" in paper.notes
    with pytest.raises(DataError, match="reports no numbers"):
        reported("epmvg")


# --- look-ups --------------------------------------------------------------------------------------------------------


def test_reported_by_id_and_by_filters():
    result = reported("hivg", "main/hivg-b/unc/val")
    assert (result.value, result.source, result.verified) == (87.32, "Table 1", True)
    unc = reported("hivg", model="HiVG-B", dataset="unc", metric="acc50")
    assert [r.split for r in unc] == ["val", "testA", "testB"]


def test_unknown_id_names_the_paper_and_the_closest_ids():
    with pytest.raises(DataError, match=r"'hivg'.*main/hivg-b/unc/val"):
        reported("hivg", "main/hivg-b/unc/vall")
    with pytest.raises(DataError, match=r"'mapper'.*fig1/petl/acc"):
        ablation("mapper", "fig1/petl/accuracy")


def test_bad_queries_are_refused():
    with pytest.raises(DataError, match="no paper file.*hivg"):
        reported("hivgg", "main/hivg-b/unc/val")
    with pytest.raises(ConfigError, match="unknown filter"):
        reported("hivg", modle="HiVG-B")
    with pytest.raises(DataError, match="HiVG-L"):  # no match: lists the models the paper has
        reported("hivg", model="HiVG-XL")
    with pytest.raises(ConfigError, match="not both"):
        reported("hivg", "main/hivg-b/unc/val", model="HiVG-B")
    with pytest.raises(DataError, match="no setting"):
        ablation("mapper", "fig1/petl/acc").value("BitFit")


def test_ablation_rows_in_order():
    table = ablation("hivg", "fig4c/text-length/hivg-b")
    assert [r.setting for r in table.rows] == ["1-5", "6-7", "8-10", "11+"]
    assert table.value("11+") == 79.3


# --- malformed files -------------------------------------------------------------------------------------------------

VALID = """\
key: demo
title: "A paper"
authors: "A. Author"
venue: "Nowhere 2024"
arxiv: "2401.00001"
code: null
bibtex_key: demo2024
notes: "fabricated"
results:
  - {id: main/m/unc/val, model: M, dataset: unc, split: val, metric: acc50, value: 80.5, source: "T1", verified: true}
  - {id: params/m, model: M, dataset: null, split: null, metric: params_total, value: 1000, source: T2, verified: false}
ablations:
  - id: t3
    source: "Table 3"
    description: "a setting at a time"
    metric: acc50
    dataset: unc
    split: val
    rows: [{setting: "a", value: 1.0}, {setting: "b", value: 2.0}]
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "demo.yaml").write_text(text)
    return tmp_path


def test_the_fabricated_valid_file_loads(tmp_path):
    paper = load_paper("demo", write(tmp_path, VALID))
    assert [r.id for r in paper.results] == ["main/m/unc/val", "params/m"]
    assert paper.ablations[0].verified is False  # an ablation is unverified unless it says so


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('notes: "fabricated"', 'notes: "fabricated"\nextra: 1', "unknown key.*extra"),
        ('source: "T1", verified: true}', 'source: "T1", verified: true, colour: red}', "unknown key.*colour"),
        ("bibtex_key: demo2024\n", "", "missing key.*bibtex_key"),
        ("id: params/m,", "id: main/m/unc/val,", "duplicate.*main/m/unc/val"),
        ("value: 80.5", 'value: "80.5"', "results\\[0\\].*finite number, got str"),
        ("value: 80.5", "value: true", "finite number, got bool"),
        ("value: 80.5", "value: 180.5", "outside the range of acc50"),
        ("value: 1000", "value: 1000.5", "params_total is a count"),
        ("verified: true}", "verified: yes please}", "verified must be true or false"),
        ("dataset: unc, split: val", "dataset: refcoco, split: val", "dataset 'refcoco'"),
        ("dataset: unc, split: val", "dataset: gref, split: test", "gref has no evaluation split 'test'"),
        ("dataset: null, split: null", "dataset: null, split: val", "split 'val' given without a dataset"),
        ("metric: acc50, value: 80.5", "metric: accuracy, value: 80.5", "metric 'accuracy'"),
        ("key: demo", "key: other", "must equal the file name stem"),
        ('arxiv: "2401.00001"', "arxiv: 2401.00001", "arxiv.*non-empty string"),
        ("code: null", "code: github.com/x/y", "https://"),
        ('{setting: "b", value: 2.0}', '{setting: "a", value: 2.0}', "duplicate.*'a'"),
        ("rows: [", "rows: []\nnot_rows: [", "unknown key.*not_rows"),
        ('title: "A paper"', 'title: "A paper"\ntitle: "Again"', "appears twice"),
        (VALID[VALID.index("ablations:") :], "ablations: {}\n", "ablations must be a list"),
    ],
)
def test_malformed_files_raise_data_error_naming_the_file(tmp_path, old, new, message):
    assert old in VALID
    papers_dir = write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(DataError, match=message) as info:
        load_paper("demo", papers_dir)
    assert str(tmp_path / "demo.yaml") in str(info.value)


def test_a_file_that_is_not_yaml_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"demo\.yaml: not valid YAML"):
        load_paper("demo", write(tmp_path, "key: [unclosed\n"))


def test_all_papers_reads_every_file_of_a_folder(tmp_path):
    assert list(all_papers(write(tmp_path, VALID))) == ["demo"]
    assert papers.all_papers(tmp_path / "empty") == {}


# --- notebooks -------------------------------------------------------------------------------------------------------


def test_every_literal_lookup_in_the_notebooks_resolves():
    for notebook in sorted((ROOT / "notebooks").glob("*.py")):
        assert unresolved_references(notebook.read_text()) == [], notebook.name


def test_the_scanner_finds_bad_references_and_skips_computed_ones():
    source = """
from vgstudy import papers
from vgstudy.papers import ablation, reported
good = reported("hivg", "main/hivg-b/unc/val").value
typo = reported("hivg", "main/hivg-b/unc/vall")
table = ablation("mapper", "fig1/petl/acc")
missing = papers.ablation("mapper", "table9")
unknown_paper = vgstudy.papers.reported("hivgg", "main/hivg-b/unc/val")
no_match = reported("hivg", model="HiVG-XL")
computed = reported(name, "main/" + split)
unrelated = frame.reported("x", "y")
"""
    calls = literal_paper_calls(source)
    assert [line for line, *_ in calls] == [4, 5, 6, 7, 8, 9]
    problems = unresolved_references(source)
    assert [p.split(":")[0] for p in problems] == ["line 5", "line 7", "line 8", "line 9"]
