"""The study runner: notebook discovery, validation before execution, run folders, sweeps, reports, parameter tables.

Executions use `tests/fixtures/nb_fixture.py` (metric = 2 x + seed, failing on purpose when negative), a few seconds
of kernel each; one slow test runs a real sweep over notebook 00.
"""

import json
import os
from pathlib import Path

import pytest
import yaml

from vgstudy import papers, study
from vgstudy.__main__ import main
from vgstudy.config import DataParams, RunParams
from vgstudy.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "nb_fixture.py"

NOTEBOOK_HEADER = (
    "# ---\n# jupyter:\n#   kernelspec:\n#     display_name: Python 3\n#     language: python\n#     name: python3\n"
    '# ---\n\n# %% tags=["parameters"]\n'
)


def write_notebook(path: Path, parameters: str, validation: str) -> Path:
    path.write_text(NOTEBOOK_HEADER + parameters + "\n\n# %%\n" + validation + "\n")
    return path


def write_run(folder: Path, status: str | None, results: dict | None, parameters: dict | None = None) -> Path:
    """A fabricated run folder: run.json with `status` (None: no run.json) and results.json (None: none)."""
    folder.mkdir(parents=True, exist_ok=True)
    if status is not None:
        record = {"notebook": "nb_fixture", "status": status, "parameters": parameters or {}}
        (folder / study.RUN_FILE).write_text(json.dumps(record))
    if results is not None:
        (folder / study.RESULTS_FILE).write_text(json.dumps(results))
    return folder


# --- Notebooks ------------------------------------------------------------------------------------------------------


def test_find_notebook_by_name_prefix_and_path():
    by_prefix = study.find_notebook("00")
    assert by_prefix.name == "00_task_and_data"
    assert by_prefix.source == ROOT / "notebooks" / "00_task_and_data.py"
    assert by_prefix.schema is DataParams
    assert by_prefix.defaults["n_eval"] == 500 and by_prefix.defaults["run_id"] is None
    assert study.find_notebook("00_task_and_data").source == by_prefix.source
    # The .py pair is executed even when the .ipynb is named.
    assert study.find_notebook(ROOT / "notebooks" / "00_task_and_data.ipynb").source == by_prefix.source
    fixture = study.find_notebook(FIXTURE)
    assert fixture.schema.__name__ == "FixtureParams" and fixture.defaults["x"] == 1.0


def test_find_notebook_errors_name_what_exists(tmp_path):
    with pytest.raises(ConfigError, match="matches no notebook.*00_task_and_data"):
        study.find_notebook("99")
    with pytest.raises(ConfigError, match="does not exist"):
        study.find_notebook(tmp_path / "missing.py")
    write_notebook(tmp_path / "01_a.py", "seed = 0", "import vgstudy\nvgstudy.config.load(locals())")
    write_notebook(tmp_path / "01_b.py", "seed = 0", "import vgstudy\nvgstudy.config.load(locals())")
    with pytest.raises(ConfigError, match="ambiguous"):
        study.find_notebook("01", notebooks_dir=tmp_path)


def test_schema_found_through_the_notebooks_imports(tmp_path):
    def schema_of(validation):
        return study.load_notebook(write_notebook(tmp_path / "nb.py", "seed = 0", validation)).schema

    assert schema_of("import vgstudy.config as cfg\nparams = cfg.load(locals(), cfg.DataParams)") is DataParams
    assert schema_of("from vgstudy.config import load, DataParams as D\nparams = load(locals(), D)") is DataParams
    assert schema_of("%matplotlib inline\nimport vgstudy\nparams = vgstudy.config.load(locals())") is RunParams
    with pytest.raises(ConfigError, match="no `vgstudy.config.load"):
        schema_of("print(1)")
    with pytest.raises(ConfigError, match="vgstudy.config.Nope"):
        schema_of("import vgstudy\nparams = vgstudy.config.load(locals(), Nope)")
    with pytest.raises(ConfigError, match="not a vgstudy.config.RunParams subclass"):
        schema_of("from vgstudy.config import load, as_dict\nparams = load(locals(), as_dict)")


def test_parameters_cell_must_hold_plain_values(tmp_path):
    validation = "import vgstudy\nvgstudy.config.load(locals())"
    path = write_notebook(tmp_path / "nb.py", 'seed = 0\nout_dir = Path("..")', validation)
    with pytest.raises(ConfigError, match=r"line 2: out_dir must be a plain value.*Path\('..'\)"):
        study.load_notebook(path)
    path.write_text(NOTEBOOK_HEADER.replace(' tags=["parameters"]', "") + "seed = 0\n\n# %%\n" + validation)
    with pytest.raises(ConfigError, match="no code cell tagged 'parameters'"):
        study.load_notebook(path)


# --- Planning -------------------------------------------------------------------------------------------------------


def test_plan_run_same_parameters_same_folder(tmp_path):
    notebook = study.find_notebook(FIXTURE)
    out = str(tmp_path)
    a = study.plan_run(notebook, {"x": "2.5", "seed": "1", "out_dir": out})  # strings, as from -p
    b = study.plan_run(notebook, {"x": 2.5, "seed": 1, "out_dir": out})
    c = study.plan_run(notebook, {"x": 2.5, "seed": 2, "out_dir": out})
    assert a.run_dir == b.run_dir != c.run_dir
    assert a.run_dir.parent == tmp_path / "nb_fixture" and a.run_dir.name.startswith("p-")
    assert a.injected == {"x": 2.5, "seed": 1, "out_dir": out, "run_id": a.run_dir.name}
    assert a.parameters["profile"] == "tiny" and a.parameters["run_id"] == a.run_dir.name
    # Where a run goes is not what it computes: another out_dir keeps the run id.
    assert (
        study.plan_run(notebook, {"x": 2.5, "seed": 1, "out_dir": str(tmp_path / "o")}).run_dir.name == a.run_dir.name
    )
    # The parameters cell's relative out_dir is relative to the notebook's folder, not to the current one.
    assert study.plan_run(notebook, {}).run_dir.parent == ROOT / "runs" / "nb_fixture"
    assert study.plan_run(notebook, {"run_id": "mine", "out_dir": out}).run_dir == tmp_path / "nb_fixture" / "mine"
    with pytest.raises(ConfigError, match="run_id: expected a plain folder name"):
        study.plan_run(notebook, {"run_id": "..", "out_dir": out})


def test_absolute_paths_only_touch_path_parameters(tmp_path):
    values = {"data_root": "split", "image_root": None, "out_dir": "/abs", "dataset": "unc", "run_id": "r"}
    resolved = study.absolute_paths(DataParams, values, tmp_path)
    assert resolved == {**values, "data_root": str(tmp_path / "split")}


def test_bad_parameters_stop_run_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["run", str(FIXTURE), "-p", "x=abc", "-p", "sed=1", "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 2
    assert "x: expected a number, got 'abc'" in message
    assert "sed: unknown parameter (did you mean 'seed'?)" in message
    assert not out.exists()
    assert main(["run", str(FIXTURE), "-p", "x"]) == 2
    assert "-p 'x': expected key=value" in capsys.readouterr().err


def test_read_parameter_file_errors(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        study.read_parameter_file(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        study.read_parameter_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="missing.yaml: cannot read it"):
        study.read_parameter_file(tmp_path / "missing.yaml")


# --- Run states, sweeps, shards -------------------------------------------------------------------------------------


def test_run_state(tmp_path):
    assert study.run_state(tmp_path / "never") == "new"
    assert study.run_state(write_run(tmp_path / "done", "done", {"m": 1})) == "done"
    assert study.run_state(write_run(tmp_path / "failed", "failed", None)) == "failed"
    assert study.run_state(write_run(tmp_path / "killed", "running", None)) == "unfinished"
    assert study.run_state(write_run(tmp_path / "results-deleted", "done", None)) == "unfinished"
    # A stale results.json does not finish a run that is running again.
    assert study.run_state(write_run(tmp_path / "rerunning", "running", {"m": 1})) == "unfinished"
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / study.RUN_FILE).write_text('{"status": "do')
    assert study.run_state(tmp_path / "corrupt") == "unfinished"


def write_sweep(path: Path, **content) -> Path:
    path.write_text(yaml.safe_dump({"notebook": str(FIXTURE), **content}, sort_keys=False))
    return path


def test_sweep_points_in_file_order_last_key_fastest(tmp_path):
    sweep = study.load_sweep(
        write_sweep(tmp_path / "s.yaml", parameters={"profile": "tiny"}, grid={"x": [1, 2], "seed": [0, 1, 2]})
    )
    assert sweep.points() == [{"x": x, "seed": s} for x in (1, 2) for s in (0, 1, 2)]
    runs = study.plan_sweep(sweep, {"out_dir": str(tmp_path)})
    assert [r.parameters["seed"] for r in runs] == [0, 1, 2, 0, 1, 2]
    assert len({r.run_dir for r in runs}) == 6


def test_sweep_file_problems_all_reported(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", parameters={"x": 1}, grid={"x": [1], "seed": 3}, extra=1)
    with pytest.raises(ConfigError) as error:
        study.load_sweep(path)
    for expected in ("unknown key(s) ['extra']", "grid.seed: expected a non-empty list", "x: both fixed"):
        assert expected in str(error.value)


def test_every_bad_grid_point_reported_before_anything_runs(tmp_path):
    sweep = study.load_sweep(write_sweep(tmp_path / "s.yaml", grid={"x": [1, "abc", "1e400"], "seed": [0, -1]}))
    with pytest.raises(ConfigError) as error:
        study.plan_sweep(sweep, {"out_dir": str(tmp_path / "runs")})
    message = str(error.value)
    assert "5 of 6 grid points are invalid" in message
    assert "expected a number, got 'abc'" in message and "expected a finite number" in message
    assert "seed: must be >= 0" in message
    assert not (tmp_path / "runs").exists()
    duplicated = study.load_sweep(write_sweep(tmp_path / "d.yaml", grid={"seed": [0, 1, 0]}))
    with pytest.raises(ConfigError, match="grid points 0 and 2 are the same run"):
        study.plan_sweep(duplicated, {"out_dir": str(tmp_path)})


def test_parse_shard_from_flag_or_slurm():
    assert study.parse_shard(None, {}) == (0, 1)
    assert study.parse_shard("2/4", {}) == (2, 4)
    assert study.parse_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    slurm_from_one = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert study.parse_shard(None, slurm_from_one) == (3, 4)
    assert study.parse_shard("0/2", slurm_from_one) == (0, 2)  # the flag wins
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="shard: expected i/n"):
            study.parse_shard(bad, {})


def test_gpu_assignment():
    assert [study.gpu_assignment(s, 2, 8) for s in range(2)] == ["0,1,2,3", "4,5,6,7"]
    assert [study.gpu_assignment(s, 8, 8) for s in range(8)] == [str(g) for g in range(8)]
    assert [study.gpu_assignment(s, 3, 2) for s in range(3)] == ["0", "1", "0"]
    assert study.gpu_assignment(1, 2, 2, visible="3,5") == "5"
    with pytest.raises(ConfigError, match="lists 1"):
        study.gpu_assignment(0, 1, 2, visible="3")


def test_sweep_with_started_runs_needs_resume(tmp_path):
    sweep = study.load_sweep(write_sweep(tmp_path / "s.yaml", grid={"seed": [0, 1, 2, 3]}))
    runs = study.plan_sweep(sweep, {"out_dir": str(tmp_path)})
    write_run(runs[0].run_dir, "done", {"metric": 1})
    write_run(runs[1].run_dir, "failed", None)
    write_run(runs[2].run_dir, "running", None)
    with pytest.raises(ConfigError) as error:
        study.run_sweep(runs)
    message = str(error.value)
    assert "2 run(s) of this sweep started before" in message and "--resume" in message
    assert f"{runs[1].run_dir}: failed" in message and f"{runs[2].run_dir}: unfinished" in message
    assert not runs[3].run_dir.exists()  # nothing started
    # Finished runs alone do not block a sweep: the whole sweep done is a no-op.
    assert study.run_sweep(runs[:1]) == {runs[0].run_dir: "skipped"}


# --- Executions (fixture notebook) ----------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_run_then_sweep_in_shards_with_a_failure(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "runs"
    # run: -f then -p (later wins, strings coerced); prints the run folder.
    (tmp_path / "p.yaml").write_text("x: 5\nseed: 1\n")
    assert main(["run", str(FIXTURE), "-f", str(tmp_path / "p.yaml"), "-p", "x=3", "--out", str(out)]) == 0
    first = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert first.parent == out / "nb_fixture"
    assert read_json(first / "results.json")["metric"] == 7.0
    record = read_json(first / "run.json")
    assert record["status"] == "done" and record["error"] is None
    assert record["parameters"]["x"] == 3.0 and record["parameters"]["seed"] == 1
    assert record["vgstudy_version"] and (record["git_commit"] is None or len(record["git_commit"]) == 40)
    assert (first / "nb_fixture.ipynb").is_file()

    # A sweep whose first point is the run above: (x, seed) = (3, 1), (3, 0), (-0.5, 1), (-0.5, 0); the last fails.
    sweep = write_sweep(tmp_path / "sweep.yaml", grid={"x": [3, -0.5], "seed": [1, 0]})
    runs = study.plan_sweep(study.load_sweep(sweep), {"out_dir": str(out)})
    assert runs[0].run_dir == first
    assert main(["sweep", str(sweep), "--out", str(out), "--shard", "0/2"]) == 0
    shard0 = capsys.readouterr().out
    assert main(["sweep", str(sweep), "--out", str(out), "--shard", "1/2", "--gpus", "2"]) == 1
    shard1 = capsys.readouterr().out
    assert f"skipped  {runs[0].run_dir}" in shard0 and f"done     {runs[2].run_dir}" in shard0
    assert f"done     {runs[1].run_dir}" in shard1 and f"failed   {runs[3].run_dir}" in shard1
    assert sum(str(run.run_dir) in shard0 + shard1 for run in runs) == 4
    failed = read_json(runs[3].run_dir / "run.json")
    assert failed["status"] == "failed" and "ValueError: metric = -1.0 is negative" in failed["error"]
    assert not (runs[3].run_dir / "results.json").exists()
    # --gpus reaches the kernel: one job on a 2-GPU machine gets both (parallel jobs: the slow test).
    assert read_json(runs[1].run_dir / "results.json")["cuda_visible_devices"] == "0,1"
    assert read_json(runs[3].run_dir / "run.json")["cuda_visible_devices"] == "0,1"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # restored after the sweep

    # The report groups by x (seed varies too, but seeds are what a cell averages over).
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "grouped by x" in table
    assert "| metric | x=-0.5 | x=3.0 |" in table
    assert "| metric | 0 (1) | 6.5 ± 0.7071 (2) |" in table
    assert (out / "report.md").read_text() == table.rstrip("\n") + "\n"


def test_resume_skips_finished_runs_and_reruns_a_killed_one(tmp_path, capsys):
    out = tmp_path / "runs"
    sweep = write_sweep(tmp_path / "sweep.yaml", grid={"x": [1, 2]})
    finished, killed = study.plan_sweep(study.load_sweep(sweep), {"out_dir": str(out)})
    write_run(finished.run_dir, "done", {"metric": 99})  # 99: not what an execution would write
    write_run(killed.run_dir, "running", {"metric": 99})  # killed after a previous attempt's results
    assert main(["sweep", str(sweep), "--out", str(out)]) == 2
    assert f"{killed.run_dir}: unfinished" in capsys.readouterr().err
    assert read_json(killed.run_dir / "run.json")["status"] == "running"  # nothing started
    assert main(["sweep", str(sweep), "--out", str(out), "--resume"]) == 0
    assert capsys.readouterr().out.split() == ["skipped", str(finished.run_dir), "done", str(killed.run_dir)]
    assert read_json(finished.run_dir / "results.json") == {"metric": 99}
    assert read_json(killed.run_dir / "results.json")["metric"] == 4.0
    assert read_json(killed.run_dir / "run.json")["status"] == "done"


# --- Reports --------------------------------------------------------------------------------------------------------


def test_flatten_numbers():
    tree = {"a": {"b": 1, "c": {"d": 2.5}}, "flag": True, "name": "x", "list": [1, 2], "nan": float("nan")}
    assert study.flatten_numbers(tree) == {"a.b": 1.0, "a.c.d": 2.5}


def fabricated_runs(root: Path) -> Path:
    """Two learning rates x two or three seeds, an unfinished run, a run without the runner, a trainer's results."""
    reported = {"val.acc50": "transvg:main/transvg-r50/unc/val"}
    values = {(1e-4, 0): 80.0, (1e-4, 1): 82.0, (1e-4, 2): 84.0, (3e-4, 0): 70.0, (3e-4, 1): 71.0}
    for i, ((lr, seed), acc) in enumerate(values.items()):
        results = {"val": {"acc50": acc, "n": 100}, "params": {"lr": lr}, "reported": reported}
        write_run(root / "nb_fixture" / f"r{i}", "done", results, {"lr": lr, "seed": seed, "run_id": f"r{i}"})
        # A trainer's results inside a run are not a run of their own.
        (root / "nb_fixture" / f"r{i}" / "train").mkdir()
        (root / "nb_fixture" / f"r{i}" / "train" / "results.json").write_text('{"val": {"acc50": 0}}')
    write_run(root / "nb_fixture" / "killed", "running", {"val": {"acc50": 0.0}}, {"lr": 1e-4, "seed": 3})
    # A notebook executed with papermill directly: no run.json, but results.json names its notebook.
    write_run(root / "other" / "x", None, {"notebook": "other", "params": {"seed": 0}, "score": 3})
    return root


def test_report_mean_std_n_per_group_beside_the_paper(tmp_path):
    runs, unfinished = study.collect([fabricated_runs(tmp_path)])
    assert unfinished == [tmp_path / "nb_fixture" / "killed"]
    assert sorted(r.notebook for r in runs) == ["nb_fixture"] * 5 + ["other"]
    tables = {t.notebook: t for t in study.summarise(runs)}
    table = tables["nb_fixture"]
    assert table.by == ("lr",) and table.groups == [(1e-4,), (3e-4,)]
    (metric, cells, paper), (n_metric, _, _) = table.rows
    assert metric == "val.acc50" and n_metric == "val.n"
    assert cells[0] == study.Cell(82.0, 2.0, 3)
    assert cells[1].mean == pytest.approx(70.5) and cells[1].std == pytest.approx(0.5**0.5) and cells[1].n == 2
    assert paper == papers.reported("transvg", "main/transvg-r50/unc/val").value
    assert tables["other"].by == () and tables["other"].rows == [("score", [study.Cell(3.0, None, 1)], None)]
    markdown = study.report_markdown(study.summarise(runs))
    assert "| val.acc50 | 82 ± 2 (3) | 70.5 ± 0.7071 (2) | 80.32 |" in markdown
    assert "<td>82 ± 2 (3)</td>" in study.report_html(study.summarise(runs))
    assert "nb_fixture,lr=0.0001,val.acc50,82.0,2.0,3,80.32" in study.report_csv(study.summarise(runs))
    # --by overrides the grouping; an unknown key is named.
    assert study.summarise(runs, by=["seed"])[0].groups == [(0,), (1,), (2,)]
    with pytest.raises(ConfigError, match="no parameter\\(s\\) \\['lrr'\\]"):
        study.summarise(runs, by=["lrr"])


def test_report_command_writes_md_html_csv(tmp_path, capsys):
    root = fabricated_runs(tmp_path / "runs")
    assert main(["report", str(root / "nb_fixture"), "--out", str(tmp_path / "report"), "--by", "lr"]) == 0
    printed = capsys.readouterr()
    assert "left out 1 run(s) that did not finish" in printed.err
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.csv", "report.html", "report.md"]
    assert (tmp_path / "report" / "report.md").read_text().strip() == printed.out.strip()
    assert main(["report", str(tmp_path / "report")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_bad_reported_reference_names_the_run(tmp_path):
    write_run(tmp_path / "r", "done", {"acc": 1.0, "reported": {"acc": "transvg:no/such/id"}}, {"seed": 0})
    runs, _ = study.collect([tmp_path])
    with pytest.raises(DataError, match=r"r: reported value 'transvg:no/such/id'"):
        study.summarise(runs)


# --- Parameter tables -----------------------------------------------------------------------------------------------


def test_readme_parameters_section_is_what_params_prints(capsys):
    assert main(["params"]) == 0
    printed = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert study.readme_parameters(readme) == printed, (
        "README is stale: run `python -m vgstudy params --readme README.md`"
    )
    for source in study.project_notebooks():  # one table per notebook, growing with them
        assert f"### `{source.stem}`" in printed


def test_parameters_table_rows():
    text = study.parameters_markdown([study.find_notebook(FIXTURE)])
    assert "| `profile` | `'tiny' \\| 'study' \\| 'paper'` | `'tiny'` |" in text
    assert "| `x` | `float` | `1.0` | the input of metric = 2 x + seed |" in text
    assert "| `out_dir` | `Path` | `'../../runs'` |" in text  # the notebook's default, not the schema's


def test_update_readme_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{study.README_BEGIN}\nold\n{study.README_END}\n\n## after\n")
    assert study.update_readme(readme, "new table\n") is True
    assert readme.read_text() == f"# title\n\n{study.README_BEGIN}\nnew table\n{study.README_END}\n\n## after\n"
    assert study.update_readme(readme, "new table\n") is False
    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="no .* markers"):
        study.update_readme(readme, "x")


# --- End to end on the real notebook 00 -----------------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_sweep_and_report_on_notebook_00(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("notebook: '00'\nparameters: {n_train: 100, n_eval: 60}\ngrid: {seed: [0, 1]}\n")
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "runs"), "--jobs", "2", "--gpus", "2"]) == 0
    capsys.readouterr()
    records = [read_json(p) for p in (tmp_path / "runs" / "00_task_and_data").glob("*/run.json")]
    assert [r["status"] for r in records] == ["done", "done"]
    assert {r["cuda_visible_devices"] for r in records} == {"0", "1"}  # each job process its own GPU
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "runs")]) == 0  # idempotent: both skipped
    assert capsys.readouterr().out.split().count("skipped") == 2
    assert main(["report", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "2 finished runs, in one group" in table
    assert "| baselines.random object.val.acc50 |" in table and "(2) |" in table


@pytest.mark.slow
def test_sweep_of_two_parameters_and_two_seeds_in_shards_with_a_killed_run_resumed(tmp_path, capsys, monkeypatch):
    """A real notebook (00, tiny profile): a 2 x 2 grid x 2 seeds, two shards, one run killed and resumed, a report."""
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    out = tmp_path / "runs"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "notebook: '00'\nparameters: {n_train: 100}\ngrid: {image_size: [96, 128], n_eval: [40, 80], seed: [0, 1]}\n"
    )
    runs = study.plan_sweep(study.load_sweep(sweep), {"out_dir": str(out)})
    assert len(runs) == 8
    assert main(["sweep", str(sweep), "--out", str(out), "--shard", "0/2"]) == 0
    assert capsys.readouterr().out.split().count("done") == 4
    # Shard 1 is "killed" after its first run started: run.json says running and there are no results.
    killed = runs[1]
    assert main(["sweep", str(sweep), "--out", str(out), "--shard", "1/2"]) == 0
    capsys.readouterr()
    record = read_json(killed.run_dir / "run.json")
    (killed.run_dir / "results.json").unlink()
    (killed.run_dir / "run.json").write_text(json.dumps({**record, "status": "running", "ended": None}))
    assert main(["sweep", str(sweep), "--out", str(out)]) == 2  # unfinished work is not silently redone
    assert f"{killed.run_dir}: unfinished" in capsys.readouterr().err
    assert main(["sweep", str(sweep), "--out", str(out), "--resume"]) == 0
    assert capsys.readouterr().out.split().count("skipped") == 7
    assert all(study.run_state(run.run_dir) == "done" for run in runs)
    assert main(["report", str(out), "--by", "image_size,n_eval"]) == 0
    table = capsys.readouterr().out
    assert "8 finished runs" in table
    assert "image_size=96, n_eval=40" in table and "(2) |" in table
    print(table)
