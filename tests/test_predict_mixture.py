"""predict_mixture.py: the paper's heuristics on hand-checked examples, the Table 2 replication, the model families on
known surfaces, validation metrics, constrained proposals, RegMix's real runs, and every bad input."""
import csv
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import predict_mixture as pm  # noqa: E402  (first: one BLAS thread, when numpy is not loaded yet)
import regmix_benchmark  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

FAST = ["--quiet", "--repeats=1", "--bootstrap=20", "--permutations=2"]
SETTINGS = {"log_floor": 0.01, "seed": 0, "folds": 5, "repeats": 1, "bootstrap": 20, "quiet": True, "permutations": 2}


def write_results(folder, name, mixture, out_score, in_score=0.5, step=100):
    """A results.json shaped like evaluate.py's."""
    path = os.path.join(folder, name, "results.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"model": name, "run": name, "step": step, "mixture": mixture,
                   "benchmarks": {"chartqa": {"score": out_score, "n": 10, "metric": "relaxed"}},
                   "in_score": in_score, "out_score": out_score}, f)
    return path


def run_main(capsys, argv):
    """main() as the command line runs it: the exit code (0 when it returned) and what it printed."""
    try:
        pm.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def assert_error(capsys, argv, message):
    """The command stops with exit code 2 and one clear line holding `message`."""
    code, _, err = run_main(capsys, argv + FAST)
    last = err.strip().splitlines()[-1]  # notes on the input may come first
    assert code == 2 and last.startswith("error: ") and message in last, err


# ---------------------------------------------------------------------------------------------------------------
# The paper's heuristics, by hand

def test_alpha_on_a_hand_computed_example():
    # singles 1, 2, 3 and the all-run; alpha_single = 0.5
    W = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]])
    s_in, s_out = np.array([0.2, 0.4, 0.6, 0.5]), np.array([0.3, 0.1, 0.2, 0.4])
    # In sums: 0.1+0.5, 0.2+0.5, 0.3+0.5 -> min-max 0, 0.5, 1.  Out sums: 0.55, 0.45, 0.5 -> 1, 0, 0.5.
    np.testing.assert_allclose(pm.alpha_mixture(W, s_in, s_out, 1.0, 0.5), [0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(pm.alpha_mixture(W, s_in, s_out, 0.0, 0.5), [2 / 3, 0, 1 / 3])
    np.testing.assert_allclose(pm.alpha_mixture(W, s_in, s_out, 0.5, 0.5), [1 / 3, 1 / 6, 1 / 2])


def test_coli_on_a_hand_computed_example():
    # runs {1}, {2}, {1,2}: X^T X = [[2,1],[1,2]], inverse 1/3 [[2,-1],[-1,2]], VIF = 2/3 each (ridge ~ 0);
    # beta = 1/3 (2a - b + c, 2b - a + c) with a, b, c = 0.4, 0.2, 0.5 -> s = beta / VIF = (0.55, 0.25)
    W = np.array([[1, 0], [0, 1], [0.5, 0.5]])
    np.testing.assert_allclose(pm.coli_mixture(W, np.array([0.4, 0.2, 0.5])), [0.6875, 0.3125], rtol=2e-3)


def test_norm_on_table2_by_hand():
    # Exclude-one Out-Scores of Table 2: without coco .5146, lisa .4783, geoqav .4889, sat .4721, scienceqa .4930;
    # min-max over .0425 (s = 1, 62/425, 168/425, 0, 209/425), then 0.2 - 0.1 s: .1, .185412, .160471, .2, .150824,
    # normalised by their sum .796706
    data = pm.build_dataset(pm.read_runs([pm.TABLE2], "last", []), "out_score", [])
    weights = pm.paper_heuristics(data, 1.0, [])["norm"]
    np.testing.assert_allclose(weights, [0.125517, 0.232723, 0.201418, 0.251034, 0.189309], atol=1e-6)


def table2_rows():
    with open(pm.TABLE2, newline="") as f:
        return list(csv.DictReader(f))


def zero_weights_match_the_scores(weights, row, seeds):
    """reference/modomodo/README.md's rule: a dataset with a test set left out (weight 0) scores below every seed
    run that trained on it; one included scores above every seed run trained only on the mixture's other datasets."""
    included = lambda r: {pm.PAPER_DOMAINS[int(c) - 1] for c in r["run"]}
    used = {d for d, w in weights.items() if w > 0}
    for domain, column in (("lisa", "LISA"), ("sat", "SAT"), ("scienceqa", "ScienceQA")):
        if domain not in weights:
            continue
        if domain in used:
            others = [float(r[column]) for r in seeds if included(r) <= used - {domain}]
            if others and float(row[column]) <= max(others):
                return False
        elif float(row[column]) >= min(float(r[column]) for r in seeds if domain in included(r)):
            return False
    return True


def heuristics_of(seeds, alpha_single, without_coco):
    """The paper's Alpha and Coli mixtures from Table 2 seed rows; 'No1': only the runs without COCO."""
    if without_coco:
        seeds = [r for r in seeds if "1" not in r["run"]]
    domains = pm.PAPER_DOMAINS[1:] if without_coco else pm.PAPER_DOMAINS
    W = np.array([[1 / len(r["run"]) if d in pm.table2_mixture(r["run"]) else 0.0 for d in domains] for r in seeds])
    s_in, s_out = (np.array([float(r[c]) for r in seeds]) for c in ("InScore", "OutScore"))
    mixtures = {"Ain": pm.alpha_mixture(W, s_in, s_out, 1.0, alpha_single),
                "Aout": pm.alpha_mixture(W, s_in, s_out, 0.0, alpha_single),
                "Abal": pm.alpha_mixture(W, s_in, s_out, 0.5, alpha_single), "Coli": pm.coli_mixture(W, s_out)}
    return {name: dict(zip(domains, w)) for name, w in mixtures.items()}


def test_default_alpha_is_consistent_with_every_heuristic_row_of_table2():
    """The Heuristic-* and HeuristicNo1-* rows (StepAvg and 2000): the default factor (0.5) with No1 read as 'the
    seed runs without COCO' matches all 16 Alpha and Coli rows; the earlier default 1.0 gives A_out ScienceQA weight
    0 while the paper's A_out runs score ScienceQA 0.718 / 0.710 (trained runs: >= 0.699)."""
    rows = table2_rows()
    seeds = [r for r in rows if r["group"] in ("Single", "ExcludeOne", "All")]
    default = pm.get_args([]).alpha_single
    checked = 0
    for prefix, without_coco in (("Heuristic-", False), ("HeuristicNo1-", True)):
        mixtures = heuristics_of(seeds, default, without_coco)
        for row in [r for r in rows if r["group"].startswith(prefix) and r["run"] in mixtures]:
            assert zero_weights_match_the_scores(mixtures[row["run"]], row, seeds), (row["group"], row["run"])
            checked += 1
    assert checked == 16
    old = heuristics_of(seeds, 1.0, False)["Aout"]
    aout_row = next(r for r in rows if r["group"] == "Heuristic-StepAvg" and r["run"] == "Aout")
    assert old["scienceqa"] == 0 and not zero_weights_match_the_scores(old, aout_row, seeds)
    no1 = heuristics_of(seeds, default, True)  # by hand in the README: SAT 0 in A_in, LISA 0 in A_out
    assert no1["Ain"]["sat"] == 0 and no1["Aout"]["lisa"] == 0


def test_heuristics_need_seed_runs_and_say_so():
    W = np.array([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]])  # no run weights its included domains equally
    with pytest.raises(ValueError, match="exclude-one"):
        pm.norm_mixture(W, np.array([0.1, 0.2, 0.3]))


# ---------------------------------------------------------------------------------------------------------------
# Table 2: the shipped data and the paper's procedure

def test_table2_scores_recompute_from_their_columns():
    """In/Out are test-size-weighted means (README): every row must recompute to 4 decimals."""
    sizes_in = {"LISA": 3397, "SAT": 1928, "ScienceQA": 2017}
    sizes_out = {"ChartQA": 2500, "InfoVQA": 2801, "MathVista": 1000, "MMMU": 900}
    with open(pm.TABLE2) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 42
    for row in rows:
        for sizes, column in ((sizes_in, "InScore"), (sizes_out, "OutScore")):
            mean = sum(float(row[k]) * n for k, n in sizes.items()) / sum(sizes.values())
            assert abs(mean - float(row[column])) < 6e-5, (row["group"], row["run"], column)


def test_table2_seed_rows_become_mixtures():
    notes = []
    runs = pm.read_runs([pm.TABLE2], "last", notes)
    assert [r["label"] for r in runs][:2] == ["Single 1", "Single 2"] and len(runs) == 11
    assert runs[5]["mixture"] == {"lisa": 0.25, "geoqav": 0.25, "sat": 0.25, "scienceqa": 0.25}  # ExcludeOne 2345
    assert "31 rows have no known mixture" in notes[0]


def test_quad_surface_is_the_papers_31_features_and_recovers_a_quadratic():
    rng = np.random.default_rng(1)
    W = rng.dirichlet(np.ones(5), 40)
    quadratic = lambda V: 0.3 + V @ [0.1, -0.2, 0.3, 0.0, 0.05] + 0.4 * V[:, 0] * V[:, 2] - 0.3 * V[:, 1] ** 2
    assert pm.quad_surface_features(W).shape == (40, 31)
    new = rng.dirichlet(np.ones(5), 10)
    np.testing.assert_allclose(pm.fit_quad_surface(W, quadratic(W), seed=0)(new), quadratic(new), atol=1e-8)
    proposals, scores = pm.quad_surface_proposals(W, quadratic(W), k=10, seed=0)
    assert proposals.shape == (10, 5) and (proposals >= 0).all()
    np.testing.assert_allclose(proposals.sum(1), 1)
    np.testing.assert_allclose(scores, quadratic(proposals), atol=1e-8)
    assert (np.diff(scores) <= 0).all()


@pytest.fixture(scope="module")
def table2_output(tmp_path_factory):
    """The default command (no arguments but the output folder), as a user runs it."""
    out = tmp_path_factory.mktemp("table2")
    payload = pm.run(["--quiet", f"--out_dir={out}"])
    return out, payload


def test_default_run_on_table2_writes_a_mixture_file_train_grpo_reads(table2_output):
    out, payload = table2_output
    with open(out / "mixtures.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(payload))
    names = [p["name"] for p in saved["proposals"]]
    assert names[:5] == [f"proposal_{i}" for i in range(1, 6)]
    assert {"uniform", "alpha_in", "alpha_out", "alpha_bal", "coli", "norm", "quad_surface_10"} <= set(names)
    for p in saved["proposals"]:  # only the domains a proposal uses, as evaluate.py records mixtures
        assert set(p["mixture"]) <= set(pm.PAPER_DOMAINS) and min(p["mixture"].values()) > 0
        assert abs(sum(p["mixture"].values()) - 1) < 2e-3
    assert saved["proposals"][names.index("alpha_in")]["mixture"].keys() == {"coco", "lisa", "sat", "scienceqa"}
    first = saved["proposals"][0]
    assert first["interval"][0] <= first["interval"][1] and 0 <= first["p_better_than_uniform"] <= 1
    for p in saved["proposals"][:5]:  # caps from the paper's sizes: LISA 1326 / (2000 x 2), GeoQAV 1969 / 4000
        assert p["mixture"].get("lisa", 0) <= 0.3315 + 1e-3 and p["mixture"].get("geoqav", 0) <= 0.49225 + 1e-3
        assert p["within_constraints"]
    assert {"cv_predicted_vs_actual.png", "proposals_vs_uniform.png", "interactions.png", "report.md"} <= \
        set(os.listdir(out))


def test_default_run_reports_every_family_and_the_papers_model(table2_output):
    out, payload = table2_output
    assert set(payload["validation"]) == {"ensemble", "ridge", "scheffe", "log_lasso", "lightgbm", "quad_surface",
                                          "mean_only", "shuffled"}
    for m in payload["validation"].values():
        for key in ("spearman", "rmse", "regret_top1", "regret_top3"):
            low, high = m[key]["interval"]
            assert low <= high and -1 <= m["spearman"]["value"] <= 1
    assert payload["ensemble_weights"] == {"lightgbm": 1.0}  # measured: 5-fold CV on the 11 runs picks the trees
    report = (out / "report.md").read_text()
    assert "Leave-group-out" in report and "runs without coco" in report and "norm" in report
    assert "mean of the others (reference)" in report and "model on shuffled scores (reference)" in report
    # On the 11 seed runs the mean of the other 10 scores leave-one-out Spearman -1 exactly (holding out a high run
    # lowers the mean of the rest), so the caution compares RMSE with it instead (measured: 0.0335 against 0.0294,
    # better in 28% of bootstrap resamples): the report must say the proposals are exploratory.
    assert payload["validation"]["mean_only"]["spearman"]["value"] == pytest.approx(-1)
    assert any("do not yet rank mixtures reliably" in n and "mean of the others" in n for n in payload["notes"])


# ---------------------------------------------------------------------------------------------------------------
# Model families on surfaces with a known answer

def test_families_recover_their_own_kind_of_surface():
    rng = np.random.default_rng(0)
    W, new = rng.dirichlet(np.ones(4), 40), rng.dirichlet(np.ones(4), 200)
    surfaces = {
        "ridge": (lambda V: V @ [0.2, -0.1, 0.4, 0.0], 0.99),
        "scheffe": (lambda V: V @ [0.2, -0.1, 0.4, 0.0] + 0.8 * V[:, 0] * V[:, 1], 0.99),
        "log_lasso": (lambda V: -np.log(V[:, 2] + 0.01), 0.99),
        "lightgbm": (lambda V: (V[:, 1] > 0.3).astype(float) + V[:, 1], 0.9),  # a step: what trees are for
    }
    for family, (surface, level) in surfaces.items():
        model = pm.FIT[family](W, surface(W), SETTINGS)
        assert pm.spearman(model["predict"](new), surface(new)) > level, family


def test_scheffe_interaction_matrix_finds_the_one_interaction():
    rng = np.random.default_rng(0)
    W = rng.dirichlet(np.ones(4), 60)
    model = pm.fit_scheffe(W, W @ [0.2, -0.1, 0.4, 0.0] + 0.8 * W[:, 0] * W[:, 1], SETTINGS)
    matrix = model["interactions"]
    assert matrix[0, 1] == matrix[1, 0] and abs(matrix[0, 1] - 0.8) < 0.05
    assert np.abs(matrix - np.diag(np.diag(matrix)))[2:, :].max() < 0.05


def test_lasso_is_sparse_with_fewer_runs_than_domains():
    """12 runs, 17 domains, the objective driven by one domain's log weight."""
    rng = np.random.default_rng(3)
    W, new = rng.dirichlet(np.ones(17) * 0.3, 12), rng.dirichlet(np.ones(17) * 0.3, 300)
    target = lambda V: -np.log(V[:, 11] + 0.01)
    assert pm.spearman(pm.fit_log_lasso(W, target(W), SETTINGS)["predict"](new), target(new)) > 0.95


def test_model_ranks_by_what_cross_validation_chose_and_falls_back_to_what_it_has():
    rng = np.random.default_rng(0)
    W = rng.dirichlet(np.ones(4), 30)
    lasso_surface = -np.log(W[:, 2] + 0.01)  # exactly the lasso's form: it ranks held-out runs perfectly alone
    assert pm.fit_model(W, lasso_surface, pm.FAMILIES, SETTINGS)["weights"] == {"log_lasso": 1.0}
    both = ((W[:, 0] > 0.25) & (W[:, 1] > 0.25)).astype(float)  # an AND of two domains: additive logs cannot fit it
    assert pm.fit_model(W, both, pm.FAMILIES, SETTINGS)["weights"] == {"lightgbm": 1.0}
    u = 1.0 + 2.0 * np.exp(-3 * W[:, 0] + W[:, 1]) + rng.normal(0, 0.01, 30)
    model = pm.fit_model(W, u, pm.FAMILIES, SETTINGS, voters=["log_lasso", "lightgbm"])  # given: no choice made
    assert model["weights"] == {"log_lasso": 0.5, "lightgbm": 0.5} and set(model["members"]) == set(pm.FAMILIES)
    expected = (pm.rankdata(model["members"]["log_lasso"]["predict"](W)) +
                pm.rankdata(model["members"]["lightgbm"]["predict"](W))) / 2 / len(W)
    np.testing.assert_allclose(pm.rank_scores(model, W), expected)
    assert pm.spearman(pm.rank_scores(model, W), u) > 0.95
    assert pm.fit_model(W, u, ["ridge"], SETTINGS)["weights"] == {"ridge": 1.0}
    assert pm.fit_model(W, u, ["ridge", "log_lasso"], SETTINGS)["weights"] == {"log_lasso": 1.0}  # one voter: no CV


def test_caution_compares_rmse_with_the_mean_of_the_others():
    """Three runs by hand: the mean of the other two misses by 1.5, 0, 1.5; a model that misses by 0.1 each time
    beats it in most bootstrap resamples (all but those that draw only the middle run); one that misses by 2 never."""
    actual = np.array([1.0, 2.0, 3.0])
    mean_only = np.array([2.5, 2.0, 1.5])
    assert pm.beats_mean_share(actual + 0.1, mean_only, actual) > 0.9
    assert pm.beats_mean_share(actual + 2.0, mean_only, actual) == 0.0
    validation = {"scheme": "leave-one-out", "actual": actual,
                  "held_out": {"ensemble": actual + 2.0, "mean_only": mean_only},
                  "families": {"ensemble": pm.metrics_with_intervals(actual + 2.0, actual, 0),
                               "mean_only": pm.metrics_with_intervals(mean_only, actual, 0)}}
    assert validation["families"]["mean_only"]["spearman"]["value"] == pytest.approx(-1)
    assert "in only 0% of bootstrap resamples" in pm.caution_of(validation, "ensemble")


def test_metrics_by_hand():
    m = pm.metrics_with_intervals(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0]), seed=0)
    assert m["spearman"]["value"] == pytest.approx(-1)
    assert m["rmse"]["value"] == pytest.approx(np.sqrt(8 / 3))
    assert m["regret_top1"]["value"] == pytest.approx(2.0)  # picks actual 1 where 3 was possible
    assert m["regret_top3"]["value"] == pytest.approx(0.0)
    assert pm.spearman(np.ones(3), np.arange(3.0)) == 0.0  # a constant prediction ranks nothing


# ---------------------------------------------------------------------------------------------------------------
# Proposals

def test_proposals_respect_bounds_caps_and_trust_region(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i, w in enumerate(rng.dirichlet(np.ones(3), 12)):
        mixture = dict(zip(["a", "b", "c"], w.tolist()))
        write_results(tmp_path / "runs", f"r{i}", mixture, out_score=float(0.3 + 0.2 * w[0] - 0.1 * w[1] ** 2))
    out = tmp_path / "out"
    code, _, _ = run_main(capsys, [str(tmp_path / "runs"), f"--out_dir={out}", "--bounds=c:0.1-0.5",
                                     "--sizes=a:300,b:1000,c:1000", "--steps=100", "--prompts_per_step=4",
                                     "--trust_radius=0.2", "--proposals=3"] + FAST)
    assert code == 0
    saved = json.loads((out / "mixtures.json").read_text())
    W = np.array([[m for m in json.load(open(p))["mixture"].values()] for p in
                  sorted(str(q) for q in (tmp_path / "runs").glob("*/results.json"))])
    proposals = [p for p in saved["proposals"] if p["source"] == "model"]
    assert len(proposals) == 3
    for p in proposals:
        v = np.array([p["mixture"].get(d, 0.0) for d in "abc"])
        assert v[0] <= 0.75 + 1e-3 and 0.1 - 1e-3 <= v[2] <= 0.5 + 1e-3  # cap a = 300 / (100 x 4)
        assert np.sqrt(((W - v) ** 2).sum(1)).min() <= 0.2 + 1e-3
    vs = [np.array([p["mixture"].get(d, 0.0) for d in "abc"]) for p in proposals]
    assert min(np.linalg.norm(a - b) for i, a in enumerate(vs) for b in vs[i + 1:]) >= 0.05 - 1e-3


# ---------------------------------------------------------------------------------------------------------------
# RegMix: real outcomes (the full table: benchmarks/regmix_benchmark.py, 10 draws)

def test_regmix_n512_on_two_loss_columns():
    """Fit on all 512 1M-parameter runs, rank the 64 1B runs. Measured once after the design was fixed
    (benchmarks/regmix_benchmark.py --target=all): pile_cc 0.928 (cross-validation keeps the mean rank), arxiv 0.981
    (it picks the trees; OLS 0.879 and 0.839); guarded with a margin of 0.02, and above plain least squares."""
    settings = pm.settings_of(pm.get_args(["--quiet"]))
    for target, measured in (("pile_cc", 0.928), ("arxiv", 0.981)):
        row = regmix_benchmark.benchmark_row(512, 10, regmix_benchmark.load(target), "test_1b", settings, seed=512)
        assert row["draws"] == 1  # every training run: only one draw is possible
        ours = row["spearman"]["ensemble"][0]
        assert ours >= measured - 0.02 and ours > row["spearman"]["ols"][0], target


def test_regmix_60m_runs_load_as_the_development_set():
    """RegMix's 256 held-out 60M runs, the data predict_mixture.py's design was chosen on: same 17 domains as the 1M
    runs, weights normalised, one loss per run."""
    domains, W, loss, W_60m, loss_60m = regmix_benchmark.load("pile_cc", "60m")
    assert W_60m.shape == (256, 17) and loss_60m.shape == (256,) and len(domains) == 17
    np.testing.assert_allclose(W_60m.sum(1), 1.0)
    assert 2 < loss_60m.min() < loss_60m.max() < 6  # nats per token of a 60M model on Pile-CC


def test_regmix_other_loss_columns_work_the_same_way():
    domains, W, loss, W_test, loss_test = regmix_benchmark.load("github")
    assert W.shape == (512, 17) and W_test.shape == (64, 17) and domains[6] == "github"
    with pytest.raises(SystemExit, match="no loss column"):
        regmix_benchmark.load("nih_exporter")  # a training domain without a validation loss column


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear message naming the file, row or field, never a traceback

def seed_runs_for(folder, domains=("a", "b", "c")):
    """Exclude-one, single and all-runs over three domains."""
    scores = {"a": 0.40, "b": 0.45, "c": 0.42, "ab": 0.47, "ac": 0.44, "bc": 0.49, "abc": 0.46}
    for name, score in scores.items():
        write_results(folder, name, {d: 1 / len(name) for d in name}, score)


def test_weights_not_summing_to_one_are_normalised_with_a_note(tmp_path, capsys):
    seed_runs_for(tmp_path / "runs")
    write_results(tmp_path / "runs", "unnormalised", {"a": 2, "b": 2}, 0.47)  # = the ab mixture: averaged
    code, _, err = run_main(capsys, [str(tmp_path / "runs"), f"--out_dir={tmp_path / 'o'}"] + FAST)
    assert code == 0
    assert "1 mixtures did not sum to 1 (sums 4 to 4" in err and "unnormalised" in err and "normalised" in err
    assert "1 mixtures were run more than once (2 runs): averaged" in err


def test_repeated_runs_are_averaged_and_give_the_noise(tmp_path):
    seed_runs_for(tmp_path / "runs")
    write_results(tmp_path / "runs", "again", {"a": 1.0}, 0.44)  # "a" scored 0.40 before: SD of (0.40, 0.44)
    notes = []
    data = pm.build_dataset(pm.read_runs([str(tmp_path / "runs")], "last", notes), "out_score", notes)
    assert len(data["y"]) == 7 and data["n_runs"] == 8
    assert data["y"][data["labels"].index("a = again")] == pytest.approx(0.42)
    assert data["noise_sd"] == pytest.approx(np.sqrt(0.02 ** 2 * 2))


def test_negative_weight_is_an_error_naming_file_and_domain(tmp_path, capsys):
    seed_runs_for(tmp_path / "runs")
    bad = write_results(tmp_path / "runs", "neg", {"a": 1.2, "b": -0.2}, 0.4)
    assert_error(capsys, [str(tmp_path / "runs")], f"error: {bad}: weight of 'b' is negative (-0.2)")


def test_non_numeric_weight_and_bad_json_are_errors(tmp_path, capsys):
    seed_runs_for(tmp_path / "runs")
    bad = write_results(tmp_path / "runs", "text", {"a": "half", "b": 0.5}, 0.4)
    assert_error(capsys, [str(tmp_path / "runs")], f"{bad}: weight of 'a' is 'half', not a finite number")
    with open(bad, "w") as f:
        f.write("{not json")
    assert_error(capsys, [str(tmp_path / "runs")], f"error: {bad}: cannot read it as JSON")


def test_domain_sets_differ_across_files(tmp_path, capsys):
    seed_runs_for(tmp_path / "runs")  # results files list only the domains a run trained on: missing = weight 0
    notes = []
    data = pm.build_dataset(pm.read_runs([str(tmp_path / "runs")], "last", notes), "out_score", notes)
    assert data["domains"] == ["a", "b", "c"] and any("missing domains count as weight 0" in n for n in notes)
    for name, mixture in {"x1": {"x": 0.5, "y": 0.5}, "x2": {"x": 1.0}}.items():  # another study's runs
        write_results(tmp_path / "runs", name, mixture, 0.3)
    code, _, err = run_main(capsys, [str(tmp_path / "runs"), f"--out_dir={tmp_path / 'o'}"] + FAST)
    assert code == 0 and "no trained domain in common (['a', 'b', 'c']; ['x', 'y'])" in err


def test_too_few_runs_for_a_family_falls_back_and_says_so(tmp_path, capsys):
    for name, score in {"a": 0.40, "b": 0.45, "ab": 0.47, "abc": 0.46}.items():
        write_results(tmp_path / "runs", name, {d: 1 / len(name) for d in name}, score)
    code, _, err = run_main(capsys, [str(tmp_path / "runs"), "--model=scheffe",
                                     f"--out_dir={tmp_path / 'o'}"] + FAST)
    assert code == 0
    assert "scheffe needs at least 5 distinct mixtures for 3 domains, got 4: using ridge instead" in err
    assert "log_lasso needs at least 5 distinct mixtures for 3 domains, got 4: left out" in err
    assert "QuadSurface needs at least 5 distinct mixtures" in err
    write_results(tmp_path / "runs", "abc", {"a": 0.5, "b": 0.5}, 0.46)  # now only 3 -> 2 distinct mixtures
    os.remove(tmp_path / "runs" / "a" / "results.json")
    assert_error(capsys, [str(tmp_path / "runs")], "need at least 3 distinct mixtures to fit anything; got 2")


def test_csv_errors_name_the_row_and_column(tmp_path, capsys):
    bad = tmp_path / "t.csv"
    bad.write_text("group,run,OutScore\nSingle,1,0.4\nSingle,6,0.5\n")
    assert_error(capsys, [str(bad)], f"{bad} row 3: run '6' names dataset digit 6 (the paper's datasets are 1-5)")
    bad.write_text("w_a,w_b,OutScore\n0.5,0.5,0.4\n1,0,n/a\n0,1,0.3\n")
    assert_error(capsys, [str(bad)], f"{bad} row 3 column OutScore: 'n/a' is not a number")
    bad.write_text("name,OutScore\nx,0.4\n")
    assert_error(capsys, [str(bad)], "no mixture columns")
    assert_error(capsys, [str(tmp_path / "missing.csv")], "missing.csv: no such file or folder")


@pytest.mark.parametrize("options, message", [
    (["--objective=mmmu"], "no score 'mmmu' for --objective='mmmu'; it has ['chartqa', 'in_score', 'out_score']"),
    (["--objective=half*out_score"], "'half' is not a number"),
    (["--objective=in_score"], "is the same (0.5) for every run: nothing to learn"),
    (["--bounds=a:0.6-1,b:0.6-1"], "no mixture satisfies the bounds and caps: lower bounds sum to 1.200"),
    (["--bounds=z:0-1"], "--bounds: unknown domain 'z'; the runs' domains are ['a', 'b', 'c']"),
    (["--bounds=a:0.5"], "--bounds: a:0.5 should be a:low-high"),
    (["--step=best"], "--step=best: expected 'last', 'stepavg' or a step number"),
])
def test_bad_options_are_errors_that_say_what_exists(tmp_path, capsys, options, message):
    seed_runs_for(tmp_path / "runs")
    assert_error(capsys, [str(tmp_path / "runs")] + options, message)


def test_help_explains_the_script(capsys):
    code, printed, _ = run_main(capsys, ["--help"])
    assert code == 0 and "--objective" in printed and "mixtures.json" in printed and "Alpha" in printed


def test_several_checkpoints_of_a_run_use_the_last_or_the_stepavg(tmp_path):
    seed_runs_for(tmp_path / "runs")
    write_results(tmp_path / "runs" / "a" / "eval", "ckpt-50", {"a": 1.0}, 0.30, step=50)
    stepavg = write_results(tmp_path / "runs" / "a" / "eval", "stepavg", {"a": 1.0}, 0.35, step=None)
    for path in (tmp_path / "runs" / "a" / "eval").glob("*/results.json"):  # same run name as the step-100 file
        path.write_text(path.read_text().replace('"run": "ckpt-50"', '"run": "a"').replace('"run": "stepavg"',
                                                                                           '"run": "a"'))
    notes = []
    last = pm.build_dataset(pm.read_runs([str(tmp_path / "runs")], "last", notes), "out_score", notes)
    assert last["y"][last["labels"].index("a")] == pytest.approx(0.40)  # step 100 beats step 50
    assert any("run a: 3 results files; using step 100" in n for n in notes)
    notes = []
    averaged = pm.read_runs([str(tmp_path / "runs")], "stepavg", notes)  # only run a has a StepAvg file
    assert [(r["where"], r["scores"]["out_score"]) for r in averaged] == [(stepavg, 0.35)]
    assert "run b: no results for --step=stepavg (it has steps ['100']); left out" in notes


def test_availability_caps_from_a_manifest(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format_version": 1, "datasets": {
        "a": {"role": "train", "splits": {"train": {"path": "a/train", "rows": 100}}},
        "b": {"role": "train", "splits": {"train": {"path": "b/train", "rows": 1000}}}}}))
    args = pm.get_args([f"--manifest={manifest}", "--steps=50", "--prompts_per_step=4"])
    W = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    low, high, caps = pm.constraints(args, ["a", "b"], W, [])
    assert caps == {"a": 0.5, "b": 1.0}  # 100 rows / (50 steps x 4 prompts)
    np.testing.assert_allclose(high, [0.5, 1.0])
    np.testing.assert_allclose(low, [0.0, 0.0])


def test_a_domain_missing_from_the_manifest_is_an_error(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format_version": 1, "datasets": {
        "a": {"role": "train", "splits": {"train": {"path": "a/train", "rows": 100}}}}}))
    args = pm.get_args([f"--manifest={manifest}"])
    with pytest.raises(pm.InputError, match=r"manifest.json: no train split for \['b'\].*--sizes=b:"):
        pm.constraints(args, ["a", "b"], np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), [])


def test_objective_with_a_star_and_no_number_is_an_error(tmp_path, capsys):
    seed_runs_for(tmp_path / "runs")
    assert_error(capsys, [str(tmp_path / "runs"), "--objective=0.5*in_score+*out_score"],
                 "the term '*out_score' has a '*' with no number before it")


def test_a_domain_with_one_weight_in_every_run_is_held_there(tmp_path, capsys):
    """c is 0.2 in all 8 runs: nothing says what more or less c does, so every proposal keeps c = 0.2, and the
    predictions stay near the observed range of scores (the old mixing law predicted 3.77e21 here)."""
    for i, a in enumerate(np.linspace(0.05, 0.75, 8)):
        write_results(tmp_path / "runs", f"r{i}", {"a": a, "b": 0.8 - a, "c": 0.2}, out_score=0.3 + 0.1 * a)
    out = tmp_path / "out"
    code, _, err = run_main(capsys, [str(tmp_path / "runs"), f"--out_dir={out}"] + FAST)
    assert code == 0 and "same in every run ({'c': 0.2}): their effect cannot be estimated" in err
    proposals = [p for p in json.loads((out / "mixtures.json").read_text())["proposals"] if p["source"] == "model"]
    assert proposals and all(p["mixture"]["c"] == 0.2 for p in proposals)
    assert all(0.305 <= p["predicted"] <= 0.375 + 0.07 for p in proposals)  # observed 0.305-0.375, plus its spread


def test_runs_whose_folders_share_a_last_name_stay_apart(tmp_path):
    """out/mixN/grpo/eval/ckpt-000100/results.json, evaluate.py's layout, all with run 'grpo': eight runs, named by
    their path below the folder given."""
    for i, a in enumerate(np.linspace(0.1, 0.8, 8)):
        folder = tmp_path / "out" / f"mix{i}" / "grpo" / "eval" / "ckpt-000100"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"run": "grpo", "step": 100, "mixture": {"a": a, "b": 1 - a},
                                                         "in_score": 0.5, "out_score": 0.3 + 0.1 * a}))
    runs = pm.read_runs([str(tmp_path / "out")], "last", [])
    assert sorted(r["label"] for r in runs) == [f"mix{i}/grpo" for i in range(8)]


def test_limited_evaluations_are_named_by_their_run(tmp_path):
    """evaluate.py --limit 50 writes <run>/eval/ckpt-000030/limit-50/results.json (study.py --quick): three runs, not
    one run called eval/ckpt-000030/limit-50 (which once left the quick study with '1 distinct mixture')."""
    for i, a in enumerate((0.2, 0.5, 0.8)):
        folder = tmp_path / "runs" / f"mix{i}" / "eval" / "ckpt-000030" / "limit-50"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"run": f"mix{i}", "step": 30, "mixture": {"a": a, "b": 1 - a},
                                                         "in_score": 0.5, "out_score": 0.3}))
    runs = pm.read_runs([str(tmp_path / "runs")], "last", [])
    assert sorted(r["label"] for r in runs) == ["mix0", "mix1", "mix2"]


@pytest.mark.parametrize("objective, shown", [("in_score", "1e+308"), ("2*in_score+-2*in_score", "nan")])
def test_a_score_too_large_to_fit_is_an_error_naming_the_file(tmp_path, capsys, objective, shown):
    seed_runs_for(tmp_path / "runs")
    path = write_results(tmp_path / "runs", "huge", {"a": 0.7, "b": 0.3}, 0.4, in_score=1e308)
    assert_error(capsys, [str(tmp_path / "runs"), f"--objective={objective}"],
                 f"{path}: --objective={objective!r} comes to {shown} for this run")
