"""study.py: a smoke study of the tiny model end to end (3 seed mixtures, 2 steps per run, then prediction, a proposal
run and the report), killed with SIGKILL mid-study and re-run; the job runner on real processes; the verdict's
arithmetic by hand; the paper's study as printed commands; bad input."""
import json
import math
import os
import subprocess
import sys
import time

import pytest

import study
from tiny_runs import cold_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
SEED_RUNS = ["single_syn_count", "exclude_syn_count", "uniform", "uniform_seed1"]


def tiny_training(data_dir, base):
    """2 steps at a rate high enough (the default's 1e-4 is not) that the runs' scores differ."""
    return [f"--data_dir={data_dir}", f"--init_from={base}", "--max_steps=2", "--learning_rate=1e-3",
            "--max_completion_length=16", "--prompts_per_step=2", "--checkpoint_every=1"]


def files_under(*folders):
    """{path: mtime_ns} of every file below the folders."""
    found = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                found[path] = os.stat(path).st_mtime_ns
    return found


def processes_mentioning(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The synthetic suite at 40 training and 4 test items per domain, a 40-step cold start on it (the runs must
    earn rewards and differ for the predictor to have something to fit), then the study: killed with SIGKILL once
    its first run is evaluated, and run again to the end."""
    root = tmp_path_factory.mktemp("study")
    data_dir, base, out_dir = root / "data", root / "base", root / "study"
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--n_train", "40", "--n_test", "4",
                    "--data_dir", str(data_dir)], env=ENV, check=True, capture_output=True)
    # the tower trained and the reference answers: in 40 steps the training fixture's recipe (tower frozen, answers
    # random) leaves every run's Out score at 0
    cold_start(data_dir, base, "--steps=40", "--train_vision=true", "--answers=reference")
    argv = [sys.executable, os.path.join(ROOT, "study.py"), *tiny_training(data_dir, base), f"--out_dir={out_dir}",
            "--seed_runs=single_syn_count,exclude_syn_count", "--noise_seeds=2", "--proposals=proposal_1,norm",
            "--jobs=2"]
    started = time.time()
    first = subprocess.Popen(argv, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    complete = []
    while not complete and first.poll() is None:
        time.sleep(0.2)
        complete = [name for name in SEED_RUNS if study.is_evaluated(str(out_dir / "runs" / name), 0)]
    assert first.poll() is None, "the study ended before it could be killed"
    at_kill = files_under(*[out_dir / "runs" / name for name in complete])
    first.kill()  # SIGKILL: no handler runs
    first.wait()
    time.sleep(1)
    orphans = processes_mentioning(str(out_dir))
    second = subprocess.run(argv, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return {"argv": argv, "out_dir": out_dir, "complete": complete, "at_kill": at_kill, "orphans": orphans,
            "second": second, "seconds": time.time() - started}


def test_killed_study_redoes_nothing_complete(smoke):
    assert smoke["orphans"] == []  # the running jobs died with the driver
    assert smoke["second"].returncode == 0, smoke["second"].stdout[-3000:] + smoke["second"].stderr[-3000:]
    assert smoke["at_kill"]
    now = files_under(*[smoke["out_dir"] / "runs" / name for name in smoke["complete"]])
    assert {p: now.get(p) for p in smoke["at_kill"]} == smoke["at_kill"]
    for name in smoke["complete"]:  # one training and one evaluation in all, none after the kill
        for what in ("train", "evaluate"):
            with open(smoke["out_dir"] / "logs" / f"{name}.{what}.log") as f:
                assert f.read().count("\n=== ") == 1


def test_smoke_study_writes_the_report(smoke):
    out_dir = smoke["out_dir"]
    report = (out_dir / "report.md").read_text()
    for name in SEED_RUNS + ["proposal_1"]:
        assert study.is_evaluated(str(out_dir / "runs" / name), 0), name
        assert f"| {name} |" in report
    assert "| Heuristic | norm |" in report and "missing" in report
    assert "- **norm**: not proposed by predict_mixture.py: heuristic norm skipped" in report
    assert "Uniform over 2 training seeds" in report
    assert "## Verdict" in report and "Of the 1 proposed mixture measured" in report
    assert "## Table 2 analog" in report and "| run | step | mixture |" in report
    mixtures = json.loads((out_dir / "predict" / "mixtures.json").read_text())
    proposal = next(p for p in mixtures["proposals"] if p["name"] == "proposal_1")
    trained = json.loads((out_dir / "runs" / "proposal_1" / "config.json").read_text())["mixture_weights"]
    assert trained == pytest.approx({d: w for d, w in proposal["mixture"].items() if w > 0})
    assert f"{proposal['predicted']:.4f} |" in report
    for png in ("scores.png", "predicted_vs_measured.png"):
        assert (out_dir / png).stat().st_size > 1000
    assert "1 of 6 rows missing" in smoke["second"].stdout


def test_rerun_of_a_finished_study_changes_nothing(smoke):
    out_dir = smoke["out_dir"]
    before = files_under(out_dir / "runs", out_dir / "predict", out_dir / "logs")
    again = subprocess.run(smoke["argv"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert files_under(out_dir / "runs", out_dir / "predict", out_dir / "logs") == before
    print_out = subprocess.run(smoke["argv"] + ["--print_commands"], env=ENV, cwd=ROOT, capture_output=True,
                               text=True, timeout=300).stdout
    assert [line for line in print_out.splitlines() if not line.startswith("#")] == []


def test_other_settings_in_the_same_folder_are_an_error(smoke):
    with pytest.raises(SystemExit, match=r"holds a study with other train_args"):
        study.main(smoke["argv"][2:] + ["--max_steps=3"])


# ----------------------------------------------------------------------------------------------------------------
# the parts, on their own

def test_a_limited_evaluation_is_found_where_evaluate_py_writes_it(tmp_path):
    """--quick evaluates with --limit 50, and evaluate.py then writes to limit-50/: the study must look there (it
    once looked only at the full evaluation's place, so a quick study found no row and re-evaluated every run)."""
    (tmp_path / "config.json").write_text(json.dumps({"planned_steps": 30}))
    limited = tmp_path / "eval" / "ckpt-000030" / "limit-50" / "results.json"
    limited.parent.mkdir(parents=True)
    limited.write_text("{}")
    assert study.results_path(str(tmp_path), 50) == str(limited)
    assert study.is_evaluated(str(tmp_path), 50)
    assert not study.is_evaluated(str(tmp_path), 0)  # the full test sets are not evaluated yet
    assert not study.is_evaluated(str(tmp_path), 20)


def test_jobs_run_in_order_and_a_failure_ends_only_its_job(tmp_path):
    python = sys.executable
    jobs = {"bad": [("train", [python, "-c", "import sys; print('loss went NaN'); sys.exit(3)"]),
                    ("evaluate", [python, "-c", "open('never', 'w')"])],
            "good": [("train", [python, "-c", "print('trained')"]),
                     ("evaluate", [python, "-c", f"open({str(tmp_path / 'evaluated')!r}, 'w')"])]}
    failures = study.run_jobs(jobs, 2, str(tmp_path), "test")
    assert list(failures) == ["bad"]
    assert failures["bad"].startswith("train failed (exit code 3); last lines of")
    assert failures["bad"].endswith("loss went NaN")
    assert (tmp_path / "evaluated").exists() and not (tmp_path / "never").exists()
    assert "trained" in (tmp_path / "good.train.log").read_text()


def run(name, group):
    return study.Run(name, group, [], 0)


def test_noise_floor_and_verdict_by_hand():
    rows = {"uniform": {"run": run("uniform", "All"), "objective": 0.1},
            "uniform_seed1": {"run": run("uniform_seed1", "All"), "objective": 0.2},
            "uniform_seed2": {"run": run("uniform_seed2", "All"), "objective": 0.3},
            "coli": {"run": run("coli", "Heuristic"), "objective": 0.5},
            "proposal_1": {"run": run("proposal_1", "Ours"), "objective": 0.45},
            "proposal_2": {"run": run("proposal_2", "Ours"), "objective": 0.0},
            "single_a": {"run": run("single_a", "Single"), "objective": -0.1}}
    noise = study.noise_floor(rows)
    # mean 0.2, SD sqrt((0.01 + 0 + 0.01) / 2) = 0.1, margin 2 * 0.1 * sqrt(1 + 1/3) = 0.2309
    assert noise["n"] == 3 and noise["mean"] == pytest.approx(0.2) and noise["sd"] == pytest.approx(0.1)
    assert noise["margin"] == pytest.approx(0.2 * math.sqrt(4 / 3))
    predicted = {"coli": 0.3, "proposal_1": 0.4, "proposal_2": 0.1}
    lines = study.verdict(rows, noise, predicted, "out_score")
    # +0.30 and +0.25 clear 0.2309; proposal_2's -0.20 does not; single_a's -0.30 is worse beyond it
    assert lines[0] == ("Of the 3 proposed mixtures measured, 2 beat uniform by more than the noise: coli (+0.3000, "
                        "+3.0 SD), proposal_1 (+0.2500, +2.5 SD); none is worse beyond the noise.")
    assert lines[1] == ("Of the 1 seed mixture measured, none beats uniform by more than the noise; the best, "
                        "single_a, is -0.3000 from the uniform mean; worse beyond the noise: single_a (-0.3000, "
                        "-3.0 SD).")
    # predicted order proposal_2 < coli < proposal_1, measured proposal_2 < proposal_1 < coli: rho = 0.5
    assert lines[2] == "Predicted against measured out_score of the proposals: Spearman 0.50 (n = 3)."


def test_one_uniform_seed_gives_no_noise_floor_and_no_claim():
    rows = {"uniform": {"run": run("uniform", "All"), "objective": 0.2},
            "coli": {"run": run("coli", "Heuristic"), "objective": 0.9}}
    noise = study.noise_floor(rows)
    assert noise["sd"] is None and noise["margin"] is None
    lines = study.verdict(rows, noise, {}, "out_score")
    assert lines[0] == ("The noise floor is unknown (1 uniform run finished): no difference from uniform can be "
                        "called real. Differences from the uniform mean, for the record: coli +0.7000.")
    del rows["coli"]
    rows["uniform_seed1"] = {"run": run("uniform_seed1", "All"), "objective": 0.2}
    assert study.verdict(rows, study.noise_floor(rows), {}, "out_score")[0] == (
        "The noise floor is unknown (2 uniform runs finished, all with the same score): no difference from uniform "
        "can be called real.")


def test_failed_run_is_named_in_the_report_with_its_log_tail(tmp_path):
    planned = [run("uniform", "All"), run("coli", "Heuristic")]
    failures = {"coli": "train failed (exit code 1); last lines of logs/coli.train.log:\nerror: out of memory"}
    settings = {"train_args": [], "limit": 0}
    study.write_report(str(tmp_path), planned, {}, failures, {}, {}, "out_score", ["a", "b"], settings, "(none)")
    report = (tmp_path / "report.md").read_text()
    assert "0 of 2 planned runs measured" in report
    assert "- **coli**: train failed (exit code 1); last lines of logs/coli.train.log:\n\n```\nerror: out of memory" \
           in report
    assert "- **uniform**: not run yet" in report


def paper_data(tmp_path):
    domains = ["coco", "lisa", "geoqav", "sat", "scienceqa"]
    manifest = {"format_version": 1, "evaluation": {"in_domain": [], "out_of_domain": []},
                "datasets": {d: {"splits": {"train": {"path": f"{d}/train", "rows": 1000, "fingerprint": d}}}
                             for d in domains}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_the_papers_study_as_printed_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "data").mkdir()
    data_dir = paper_data(tmp_path / "data")
    study.main(["config/paper_qwen2vl_2b.json", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'study'}",
                "--print_commands"])
    lines = capsys.readouterr().out.splitlines()
    stages = {}
    for line in lines:
        if line.startswith("# ") and " " not in line[2:]:
            stage = line[2:]
            stages[stage] = []
        elif not line.startswith("#"):
            stages[stage].append(line)
    assert stages["base"] == []  # the runs start from the hub model itself
    assert len(stages["seed"]) == 13  # 5 single, 5 exclude-one, uniform with 3 seeds
    assert all(line.startswith("python train_grpo.py config/paper_qwen2vl_2b.json") and " && python evaluate.py "
               in line for line in stages["seed"] + stages["proposals"])
    assert sum("--mixture=uniform --seed=4" in line for line in stages["seed"]) == 3  # seeds 42, 43, 44
    assert """'--mixture={"geoqav": 1, "lisa": 1, "sat": 1, "scienceqa": 1}'""" in stages["seed"][5]  # exclude_coco
    assert "--steps=2000 --prompts_per_step=2" in stages["predict"][0]
    assert len(stages["proposals"]) == 9 and "--mixture_proposal=quad_surface_1" in stages["proposals"][5]
    assert not (tmp_path / "study").exists()  # printing writes nothing


def test_the_testbed_study_starts_with_one_cold_start(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    data_dir = paper_data(tmp_path)
    study.main([f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'study'}", "--quick", "--print_commands"])
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert lines[0] == f"python cold_start.py --data_dir={data_dir}"  # train_grpo.py's default init_from is its output
    assert all("--init_from" not in line and "--max_steps=20" in line and "--limit 40" in line for line in lines[1:14])


@pytest.mark.parametrize("argv, message", [
    (["--mixture=uniform"], "the study sets each run's mixture"),
    (["--seed_runs=single_nope"], r"--seed_runs names \['single_nope'\]"),
    (["--proposals=alpha_in,best"], "--proposals names 'best'"),
    (["--jobs=0"], "--jobs and --noise_seeds must be >= 1"),
    (["--learning_rat=1"], "unknown setting 'learning_rat'"),
])
def test_bad_input_is_a_one_line_error(tmp_path, argv, message):
    data_dir = paper_data(tmp_path)
    with pytest.raises(SystemExit, match=message):
        study.main([f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'study'}", "--print_commands", *argv])
