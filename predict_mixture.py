"""
Which data mixture gives the best model? From the results of runs on several mixtures, predict the score of any
mixture and propose the best ones (MoDoMoDo, arXiv 2505.24871, Section 4).

    python predict_mixture.py                                   # the paper's Table 2 seed runs (shipped)
    python predict_mixture.py out/                              # every results.json under out/ (evaluate.py)
    python predict_mixture.py runs.csv --objective="0.5*in_score+0.5*out_score" --proposals=8
    python train_grpo.py ... --mixture=out/predict_mixture/mixtures.json     # trains on the first proposal

Input: evaluate.py's results.json files (or folders holding them), or a CSV shaped like the paper's Table 2 (the
`run` column lists the included datasets 1-5 = coco, lisa, geoqav, sat, scienceqa, equally weighted) or with one
`w_<domain>` weight column per domain. The objective is one score (default out_score) or a weighted sum of scores.

What it does, top to bottom:
1. The paper, exactly: the Alpha (A_in, A_out, A_bal), Coli and Norm heuristics from the seed runs' in_score and
   out_score (whatever the objective), and its QuadSurface model (least squares on [1, w, w (x) w], Gaussian
   sampling, top-k). Table 2 rows whose weights the paper did not publish (heuristic, model-based, base) are not
   fitted.
2. Our model (scikit-learn and LightGBM, penalties by cross-validation on the runs given): a lasso in
   log(w + floor), gradient-boosted trees, or the mean rank of both, whichever 5-fold cross-validation on the runs
   given ranks best. Also fitted and validated: ridge (linear in w) and the Scheffe quadratic (w_i and w_i w_j
   terms, ridge).
3. Validation on every call: leave-one-out and repeated K-fold Spearman, RMSE, top-1/top-3 regret with bootstrap
   intervals, leave-group-out (all runs without domain d held out at once), and two references to read them
   against: the mean of the training runs, and the model refitted on shuffled scores.
4. Proposals: SLSQP from several starts plus Dirichlet samples on the simplex, within per-domain bounds,
   availability caps (w_d <= |D_d| / (steps x prompts per step), so that the interleave_under pool lasts the run
   and no row is trained on twice) and a trust region around the observed mixtures; q diverse proposals, each with a bootstrap interval and
   P(better than uniform).
Outputs in --out_dir: mixtures.json (train_grpo.py --mixture reads it), report.md, and PNG plots.
"""
import argparse
import csv
import glob
import json
import math
import os
import re
import sys
import time
import warnings

# Every matrix here is small (runs x terms): BLAS threads only add synchronisation, which on a busy 2-core machine
# made a 153 x 153 solve 200x slower (97 ms instead of 0.5 ms). numpy's OpenBLAS reads this when numpy loads; an
# explicit setting wins. (OMP_NUM_THREADS is left alone: torch, in a process that imports this, reads it.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import lightgbm  # noqa: E402
from scipy.optimize import minimize  # noqa: E402
from scipy.stats import rankdata, spearmanr  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import Lasso, LassoCV, Ridge, RidgeCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from tqdm import tqdm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE2 = os.path.join(HERE, "reference", "modomodo", "table2.csv")

# The paper's datasets: the digits of Table 2's `run` column, and their training-set sizes (paper, Section 5.1).
PAPER_DOMAINS = ["coco", "lisa", "geoqav", "sat", "scienceqa"]
PAPER_TRAIN_SIZES = {"coco": 5997, "lisa": 1326, "geoqav": 1969, "sat": 15000, "scienceqa": 6218}
PAPER_STEPS, PAPER_PROMPTS_PER_STEP = 2000, 2

INTERVAL = 0.90            # coverage of every bootstrap interval reported
LARGEST_OBJECTIVE = 1e100  # squared errors and variances of larger values overflow a float
LOO_MAX_RUNS = 60          # above this, 10-fold cross-validation stands in for leave-one-out (speed)


class InputError(ValueError):
    """Bad input: main() prints the message (which names the file, row or field) instead of a traceback."""


def note(notes, message):
    """Warnings go to stderr as they happen and into the report, so nothing is lost."""
    print(f"note: {message}", file=sys.stderr)
    notes.append(message)


# ----------------------------------------------------------------------------------------------------------------
# The paper's heuristics (Algorithms 1-3), computed from the seed runs: runs whose included datasets are weighted
# equally (single-dataset, exclude-one, all).

def seed_runs(W):
    """Indices of runs that weight their included domains equally, and the 0/1 inclusion matrix."""
    included = W > 1e-9
    equal = [i for i in range(len(W)) if np.ptp(W[i][included[i]]) < 1e-6]
    return equal, included.astype(float)


def alpha_mixture(W, in_scores, out_scores, alpha, alpha_single):
    """Alpha: per domain, the sums of In and Out scores of the seed runs that include it (single-domain runs scaled
    by alpha_single), each min-max normalised across domains; C = alpha In + (1 - alpha) Out; w = C / sum(C)."""
    seeds, included = seed_runs(W)
    X = included[seeds]
    scale = np.where(X.sum(1) == 1, alpha_single, 1.0)
    sums_in = (X * (scale * in_scores[seeds])[:, None]).sum(0)
    sums_out = (X * (scale * out_scores[seeds])[:, None]).sum(0)
    combined = alpha * min_max(sums_in) + (1 - alpha) * min_max(sums_out)
    if combined.sum() <= 0:
        raise ValueError("every domain scores the same")
    return combined / combined.sum()


def min_max(v):
    return (v - v.min()) / np.ptp(v) if np.ptp(v) > 0 else np.zeros_like(v)


def coli_mixture(W, out_scores, ridge=1e-3):
    """Coli: ridge regression (no intercept) of the Out score on the 0/1 inclusion matrix of the seed runs;
    VIF_d = diag((X^T X + ridge I)^-1); s_d = max(beta_d / VIF_d, 0); w = s / sum(s)."""
    seeds, included = seed_runs(W)
    X, y = included[seeds], out_scores[seeds]
    inverse = np.linalg.inv(X.T @ X + ridge * np.eye(X.shape[1]))
    beta = inverse @ X.T @ y
    s = np.maximum(beta / np.diag(inverse), 0)
    if s.sum() <= 0:
        raise ValueError("no domain has a positive coefficient")
    return s / s.sum()


def norm_mixture(W, out_scores):
    """Norm: min-max normalise the exclude-one runs' Out scores to s; the domain each run leaves out gets
    0.2 - 0.1 s; w = those / their sum. Needs one exclude-one run per domain."""
    d = W.shape[1]
    seeds, included = seed_runs(W)
    excluded_scores = {}
    for i in seeds:
        if included[i].sum() == d - 1:
            excluded_scores[int(np.argmin(included[i]))] = out_scores[i]
    missing = [j for j in range(d) if j not in excluded_scores]
    if missing:
        raise ValueError(f"no exclude-one run leaves out domain(s) {missing}")
    s = min_max(np.array([excluded_scores[j] for j in range(d)]))
    weights = 0.2 - 0.1 * s
    return weights / weights.sum()


def paper_heuristics(data, alpha_single, notes):
    """The five heuristic mixtures of Table 2, from in_score and out_score (higher is better) of the seed runs."""
    runs_scores = {}
    for name in ("in_score", "out_score"):
        values = [[score_of(r, name) for r in group] for group in data["groups"]]
        if any(v is None for group in values for v in group):
            note(notes, f"the paper's heuristics need {name} for every run; skipped")
            return {}
        runs_scores[name] = np.array([np.mean(group) for group in values])  # repeated runs averaged
    W, s_in, s_out = data["W"], runs_scores["in_score"], runs_scores["out_score"]
    recipes = {"alpha_in": lambda: alpha_mixture(W, s_in, s_out, 1.0, alpha_single),
               "alpha_out": lambda: alpha_mixture(W, s_in, s_out, 0.0, alpha_single),
               "alpha_bal": lambda: alpha_mixture(W, s_in, s_out, 0.5, alpha_single),
               "coli": lambda: coli_mixture(W, s_out),
               "norm": lambda: norm_mixture(W, s_out)}
    if len(seed_runs(W)[0]) < 2:
        note(notes, "the paper's heuristics need seed runs (datasets included with equal weights); found none")
        return {}
    mixtures = {}
    for name, recipe in recipes.items():
        try:
            mixtures[name] = recipe()
        except (ValueError, np.linalg.LinAlgError) as e:
            note(notes, f"heuristic {name} skipped: {e}")
    return mixtures


# ----------------------------------------------------------------------------------------------------------------
# The paper's model (Algorithm 4, "QuadSurface")

def quad_surface_features(W):
    """[1, w, w (x) w]: 1 + d + d^2 columns (31 for 5 domains), collinear as in the paper."""
    return np.hstack([np.ones((len(W), 1)), W, np.einsum("ni,nj->nij", W, W).reshape(len(W), -1)])


def fit_quad_surface(W, y, seed, splits=5):
    """Least squares on 5 random 80/20 splits; keeps the fit with the best test R^2 (the paper's selection)."""
    rng = np.random.default_rng(seed)
    F = quad_surface_features(W)
    best = None
    for _ in range(splits):
        order = rng.permutation(len(y))
        test, train = order[:max(1, len(y) // 5)], order[max(1, len(y) // 5):]
        coef = np.linalg.lstsq(F[train], y[train], rcond=None)[0]
        residual = y[test] - F[test] @ coef
        total = np.sum((y[test] - y[test].mean()) ** 2)
        r2 = 1 - np.sum(residual ** 2) / total if total > 0 else -np.inf
        if best is None or r2 > best[0]:
            best = (r2, coef)
    coef = best[1]
    return lambda V: quad_surface_features(V) @ coef


def quad_surface_proposals(W, y, k, seed, samples=20000):
    """Fit one Gaussian to the observed mixtures, sample, drop samples with negative entries, renormalise, and
    return the k with the highest predicted objective."""
    predict = fit_quad_surface(W, y, seed)
    rng = np.random.default_rng(seed)
    draws = rng.multivariate_normal(W.mean(0), np.cov(W.T), size=samples, check_valid="ignore")
    draws = draws[(draws >= 0).all(1) & (draws.sum(1) > 0)]
    draws /= draws.sum(1, keepdims=True)
    if len(draws) == 0:
        return np.zeros((0, W.shape[1])), np.zeros(0)
    scores = predict(draws)
    top = np.argsort(-scores)[:k]
    return draws[top], scores[top]


# ----------------------------------------------------------------------------------------------------------------
# Our model. Each fit_<family>(W, u, settings, hyper=None) returns {"predict": f(W) -> u, "hyper": ...}; u is the
# objective oriented so that higher is better. With `hyper` given, the penalty search is skipped (bootstrap refits
# keep the penalty chosen on all runs). The default model, "ensemble", ranks by ENSEMBLE's two families: the lasso,
# the trees or their mean rank, whichever cross-validation on the runs given ranks best (the lasso or the mean rank
# with few runs, the trees with hundreds). Chosen on development data only (README, "Predicting the best mixture"):
# RegMix's 1M-parameter runs and its 60M-parameter test runs, never its 1B runs.

RIDGE_PENALTIES = np.logspace(-4, 4, 33)
ENSEMBLE = ["log_lasso", "lightgbm"]


def fit_scaled(features, estimator, W, u):
    """An estimator on standardised features: the penalties then weigh every feature alike."""
    pipeline = make_pipeline(StandardScaler(), estimator).fit(features(W), u)
    return pipeline, lambda V: pipeline.predict(features(V))


def fit_ridge(W, u, settings, hyper=None):
    """Linear in the weights; the ridge penalty by exact leave-one-out (RidgeCV)."""
    pipeline, predict = fit_scaled(lambda V: V, Ridge(hyper) if hyper else RidgeCV(RIDGE_PENALTIES), W, u)
    return {"predict": predict, "hyper": hyper or float(pipeline[-1].alpha_)}


def scheffe_terms(W):
    """Scheffe's quadratic mixture terms: w_i and w_i w_j (i < j), d + d(d-1)/2 of them (15 for 5 domains)."""
    i, j = np.triu_indices(W.shape[1], 1)
    return np.hstack([W, W[:, i] * W[:, j]])


def fit_scheffe(W, u, settings, hyper=None):
    """Scheffe quadratic, ridge penalty by leave-one-out (which keeps it well-posed with fewer runs than terms)."""
    pipeline, predict = fit_scaled(scheffe_terms, Ridge(hyper) if hyper else RidgeCV(RIDGE_PENALTIES), W, u)
    d = W.shape[1]
    interactions = np.zeros((d, d))
    i, j = np.triu_indices(d, 1)
    interactions[i, j] = interactions[j, i] = (pipeline[-1].coef_ / pipeline[0].scale_)[d:]
    # interactions: objective change per unit of w_i w_j, the plot of pairwise effects
    return {"predict": predict, "hyper": hyper or float(pipeline[-1].alpha_), "interactions": interactions}


def fit_log_lasso(W, u, settings, hyper=None):
    """Sparse and log-linear: a few domains move the objective most, and each one's effect flattens as its weight
    grows. A lasso in log(w + floor), its penalty by K-fold cross-validation (LassoCV)."""
    floor = settings["log_floor"]
    features = lambda V: np.log(V + floor)
    search = LassoCV(alphas=30, cv=min(5, len(u)), random_state=settings["seed"])
    with warnings.catch_warnings():  # at the smallest penalties on ~20 runs the last 1e-3 of duality gap remains:
        warnings.simplefilter("ignore", ConvergenceWarning)  # the fold errors that pick the penalty are unaffected
        pipeline, predict = fit_scaled(features, Lasso(hyper) if hyper else search, W, u)
    return {"predict": predict, "hyper": hyper or float(pipeline[-1].alpha_)}


def fit_lightgbm(W, u, settings, hyper=None):
    """Gradient-boosted trees with RegMix's settings (1,000 trees, learning rate 0.01), leaves of at least n/20 runs
    (between 2 and LightGBM's default 20): 20 runs can split at all, and 400 or more get RegMix's model exactly."""
    leaf = min(20, max(2, len(u) // 20))
    model = lightgbm.LGBMRegressor(n_estimators=1000, learning_rate=0.01, min_child_samples=leaf,
                                   random_state=settings["seed"], n_jobs=1, verbose=-1).fit(W, u)
    return {"predict": model.predict, "hyper": None}


FIT = {"ridge": fit_ridge, "scheffe": fit_scheffe, "log_lasso": fit_log_lasso, "lightgbm": fit_lightgbm}
FAMILIES = list(FIT)


def min_runs(family, d):
    """Fewest distinct mixtures a family is fitted on: its cross-validation needs some runs, and the Scheffe
    quadratic is only worth fitting with more runs than it has linear terms."""
    return {"ridge": 3, "log_lasso": 5, "lightgbm": 5, "scheffe": d + 2}[family]


def usable_families(families, n, d, notes=None):
    usable = [f for f in families if n >= min_runs(f, d)]
    for f in families:
        if f not in usable and notes is not None:
            note(notes, f"{f} needs at least {min_runs(f, d)} distinct mixtures for {d} domains, got {n}: "
                        f"{'left out' if len(usable) else 'using ridge instead'}")
    return usable or ["ridge"]


def folds_of(n, k, seed):
    return np.array_split(np.random.default_rng(seed).permutation(n), min(k, n))


def chosen_voters(W, u, voters, settings):
    """Which of the voting families to rank by, chosen on these runs: each alone or the mean rank of all, by the
    Spearman of their 5-fold held-out predictions (pooled). Trees need many runs to beat the lasso; this lets the
    runs say when they have enough. A tie keeps the mean rank."""
    if len(voters) < 2:
        return voters
    held = {f: np.zeros(len(u)) for f in voters}
    for fold in folds_of(len(u), 5, settings["seed"]):
        train = np.setdiff1d(np.arange(len(u)), fold)
        for f in voters:
            held[f][fold] = FIT[f](W[train], u[train], settings)["predict"](W[fold])
    options = [voters] + [[f] for f in voters]
    return max(options, key=lambda fams: spearman(sum(rankdata(held[f]) for f in fams), u))


def fit_model(W, u, families, settings, voters=None):
    """Every family in `families` fitted on all runs; the model ranks by `voters`, or, when not given, by those of
    ENSEMBLE (all families when none is) that cross-validation on these runs chose."""
    members = {f: FIT[f](W, u, settings) for f in families}
    if voters is None:
        voters = chosen_voters(W, u, [f for f in families if f in ENSEMBLE] or families, settings)
    return {"members": members, "weights": {f: 1 / len(voters) for f in voters}}


def model_text(model):
    """What the model ranks by, in words: one family, or the mean rank of several."""
    names = list(model["weights"])
    return names[0] + " alone" if len(names) == 1 else "mean rank of " + " and ".join(names)


def predict_value(model, V):
    """The model's prediction in objective units: the weighted mean of its members' predictions."""
    return sum(w * model["members"][f]["predict"](V) for f, w in model["weights"].items())


def rank_scores(model, V):
    """The rank ensemble: each member ranks the mixtures V, the model orders them by the weighted mean rank.
    Ranks make one member's wild extrapolation count no more than its place in the order."""
    return sum(w * rankdata(model["members"][f]["predict"](V)) / len(V) for f, w in model["weights"].items())


def refit(model, W, u, settings):
    """The same model on other runs (a bootstrap sample), keeping the penalties chosen on all runs."""
    members = {f: FIT[f](W, u, settings, m["hyper"]) for f, m in model["members"].items()}
    return {"members": members, "weights": model["weights"]}


# ----------------------------------------------------------------------------------------------------------------
# Validation

def spearman(a, b):
    """Spearman correlation; 0 when either side is constant (a model that ranks nothing)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b)[0])


def metrics_with_intervals(predicted, actual, seed, resamples=1000):
    """Spearman, RMSE, top-1 and top-3 regret of held-out predictions, each with a bootstrap interval over runs
    (all resamples at once: row 0 is the data itself)."""
    rng = np.random.default_rng(seed)
    rows = np.vstack([np.arange(len(actual)), rng.integers(0, len(actual), (resamples, len(actual)))])
    P, A = predicted[rows], actual[rows]
    rp, ra = rankdata(P, axis=1), rankdata(A, axis=1)
    rp, ra = rp - rp.mean(1, keepdims=True), ra - ra.mean(1, keepdims=True)
    spread = np.sqrt((rp ** 2).sum(1) * (ra ** 2).sum(1))
    rho = np.where(spread > 0, (rp * ra).sum(1) / np.where(spread > 0, spread, 1), 0.0)
    order = np.argsort(-P, axis=1, kind="stable")
    best = A.max(1)
    draws = np.column_stack([rho, np.sqrt(np.mean((P - A) ** 2, 1)),
                             best - np.take_along_axis(A, order[:, :1], 1).max(1),
                             best - np.take_along_axis(A, order[:, :3], 1).max(1)])
    low, high = np.quantile(draws[1:], [(1 - INTERVAL) / 2, (1 + INTERVAL) / 2], axis=0)
    names = ["spearman", "rmse", "regret_top1", "regret_top3"]
    return {name: {"value": float(draws[0, j]), "interval": [float(low[j]), float(high[j])]}
            for j, name in enumerate(names)}


def held_out_predictions(W, u, families, voters, settings, splits, desc):
    """For each (train, held-out) split: the model (ranking by `voters`, chosen once on all runs) and every member,
    fitted on train, predicting held-out; and two references: the paper's QuadSurface and the mean of the training
    runs (a model that knows nothing)."""
    names = ["ensemble"] + families + ["quad_surface", "mean_only"]
    out = {name: np.full(len(u), np.nan) for name in names}
    for train, held in tqdm(splits, desc=desc, leave=False, disable=settings["quiet"]):
        model = fit_model(W[train], u[train], families, settings, voters)
        out["ensemble"][held] = predict_value(model, W[held])
        for f in families:
            out[f][held] = model["members"][f]["predict"](W[held])
        out["quad_surface"][held] = fit_quad_surface(W[train], u[train], settings["seed"])(W[held])
        out["mean_only"][held] = u[train].mean()
    return out


def shuffled_metrics(W, u, voters, settings, splits):
    """The model's held-out metrics on scores shuffled across runs, where no mixture predicts its score: the mean
    over permutations and the range (5-95%) they span. A real score below that range is chance."""
    rng = np.random.default_rng(settings["seed"])
    draws = []
    for i in range(settings["permutations"]):
        shuffled = rng.permutation(u)
        p = held_out_predictions(W, shuffled, voters, voters, settings, splits,
                                 f"shuffled scores {i + 1}")["ensemble"]
        draws.append(metrics_with_intervals(p, shuffled, settings["seed"], resamples=1))
    return {key: {"value": float(np.mean([d[key]["value"] for d in draws])),
                  "interval": np.quantile([d[key]["value"] for d in draws], [0.05, 0.95]).tolist()}
            for key in draws[0]}


def validate(W, u, families, voters, settings, domains):
    """Leave-one-out (10-fold above LOO_MAX_RUNS runs), repeated K-fold, and leave-group-out. The model ranks by
    `voters` in every split: the choice among families is made once, on all runs (as the penalties of bootstrap
    refits are), because repeating it in every split multiplied the fits tenfold."""
    n = len(u)
    everything = np.arange(n)
    if n <= LOO_MAX_RUNS:
        loo_splits, loo_name = [(np.delete(everything, i), np.array([i])) for i in range(n)], "leave-one-out"
    else:
        loo_splits = [(np.setdiff1d(everything, h), h) for h in folds_of(n, 10, settings["seed"])]
        loo_name = "10-fold"
    loo = held_out_predictions(W, u, families, voters, settings, loo_splits, loo_name)
    table = {name: metrics_with_intervals(p, u, settings["seed"]) for name, p in loo.items()}
    kfold = {name: [] for name in loo}
    for repeat in range(settings["repeats"]):
        splits = [(np.setdiff1d(everything, h), h) for h in folds_of(n, settings["folds"], settings["seed"] + 1 + repeat)]
        for name, p in held_out_predictions(W, u, families, voters, settings, splits,
                                            f"{settings['folds']}-fold, repeat {repeat + 1}").items():
            kfold[name].append(spearman(p, u))
    for name in table:
        table[name]["kfold_spearman"] = {"mean": float(np.mean(kfold[name])), "sd": float(np.std(kfold[name]))}
    if settings["permutations"]:
        table["shuffled"] = shuffled_metrics(W, u, voters, settings, loo_splits)
    groups = []
    for j, domain in enumerate(domains):
        held = np.where(W[:, j] <= 1e-9)[0]
        train = np.setdiff1d(everything, held)
        if len(held) < 2 or len(train) < 3:
            continue
        fams = usable_families(families, len(train), W.shape[1])
        kept = [f for f in voters if f in fams] or fams
        p = held_out_predictions(W, u, fams, kept, settings, [(train, held)], f"without {domain}")
        groups.append({"held_out": f"runs without {domain}", "n": int(len(held)), "fitted_on": int(len(train)),
                       **{name: {"spearman": spearman(p[name][held], u[held]) if len(held) >= 3 else None,
                                 "rmse": float(np.sqrt(np.mean((p[name][held] - u[held]) ** 2)))}
                          for name in ["ensemble"] + fams}})
    return {"scheme": loo_name, "families": table, "held_out": loo, "leave_group_out": groups, "actual": u}


# ----------------------------------------------------------------------------------------------------------------
# Proposals on the simplex

def parse_pairs(text, what, domains):
    """'coco:0.1-0.5,lisa:0-0.3' or 'coco:5997,sat:15000' -> {domain: value text}; unknown domains are errors."""
    pairs = {}
    for item in filter(None, (text or "").split(",")):
        domain, sep, value = item.partition(":")
        if not sep:
            raise InputError(f"--{what}: {item!r} should be domain:value")
        if domain not in domains:
            raise InputError(f"--{what}: unknown domain {domain!r}; the runs' domains are {domains}")
        pairs[domain] = value
    return pairs


def domain_sizes(args, domains, notes):
    """|D_d| per domain: --sizes, else the manifest's train splits, else the paper's sizes for its domains."""
    if args.sizes:
        sizes = {d: parse_number(v, f"--sizes {d}") for d, v in parse_pairs(args.sizes, "sizes", domains).items()}
    elif args.manifest:
        try:
            with open(args.manifest) as f:
                datasets = json.load(f)["datasets"]
            missing = [d for d in domains if d not in datasets]
            sizes = {d: datasets[d]["splits"]["train"]["rows"] for d in domains if d in datasets}
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{args.manifest}: cannot read train sizes from this manifest ({e!r})")
        if missing:
            raise InputError(f"{args.manifest}: no train split for {missing}, which the runs trained on; give its "
                             f"size with --sizes (e.g. --sizes={missing[0]}:5000) or the manifest of the data used")
    elif set(domains) <= set(PAPER_TRAIN_SIZES):
        sizes = {d: PAPER_TRAIN_SIZES[d] for d in domains}
        note(notes, "availability caps use the paper's training-set sizes (--sizes or --manifest to change)")
    else:
        return {}
    return sizes


def constraints(args, domains, W, notes):
    """Per-domain [low, high]: --bounds, availability caps, and 0 for domains never trained on."""
    low, high = np.zeros(len(domains)), np.ones(len(domains))
    for d, value in parse_pairs(args.bounds, "bounds", domains).items():
        lo, sep, hi = value.partition("-")
        if not sep:
            raise InputError(f"--bounds: {d}:{value} should be {d}:low-high")
        j = domains.index(d)
        low[j], high[j] = parse_number(lo, f"--bounds {d} low"), parse_number(hi, f"--bounds {d} high")
        if not 0 <= low[j] <= high[j] <= 1:
            raise InputError(f"--bounds: {d}:{value} must satisfy 0 <= low <= high <= 1")
    caps = {}
    prompts = args.steps * args.prompts_per_step
    for d, size in domain_sizes(args, domains, notes).items():
        caps[d] = min(1.0, size / prompts)
        high[domains.index(d)] = min(high[domains.index(d)], caps[d])
    fixed = np.ptp(W, 0) <= 1e-9  # one weight in every run: its effect cannot be estimated, so it is held there
    clash = [d for j, d in enumerate(domains) if low[j] > high[j] or (fixed[j] and not low[j] <= W[0, j] <= high[j])]
    if clash:
        raise InputError(f"--bounds: {clash}: the lower bound exceeds the cap, or the bounds exclude the one weight "
                         f"every run gave it (such a domain is held at that weight)")
    low[fixed] = high[fixed] = W[0, fixed]
    if low.sum() > 1 + 1e-9 or high.sum() < 1 - 1e-9:
        raise InputError(f"no mixture satisfies the bounds and caps: lower bounds sum to {low.sum():.3f}, upper "
                         f"bounds (caps {caps}) to {high.sum():.3f}; relax --bounds or raise --steps x "
                         f"--prompts_per_step = {prompts}")
    return low, high, caps


def feasible(V, low, high, W, radius):
    inside = ((V >= low - 1e-9) & (V <= high + 1e-9)).all(1)
    nearest = np.sqrt(((V[:, None] - W[None]) ** 2).sum(-1)).min(1)
    return inside & (nearest <= radius + 1e-9)


def dirichlet_candidates(W, low, high, radius, count, seed):
    """Uniform Dirichlet samples on the simplex, plus samples pulled towards each observed mixture (so the trust
    region is populated even with many domains), kept where bounds, caps and trust region allow."""
    rng = np.random.default_rng(seed)
    d = W.shape[1]
    uniform = rng.dirichlet(np.ones(d), count)
    anchors = W[rng.integers(0, len(W), count)]
    pull = rng.uniform(0, 1, (count, 1))
    local = (1 - pull) * anchors + pull * rng.dirichlet(np.ones(d), count)
    V = np.vstack([uniform, local])
    fixed = low == high  # held domains (never trained, or one weight in every run): set, the rest rescaled
    V[:, fixed] = low[fixed]
    V[:, ~fixed] *= (1 - low[fixed].sum()) / V[:, ~fixed].sum(1, keepdims=True)
    return V[feasible(V, low, high, W, radius)]


def slsqp_optima(model, W, u, low, high, radius, starts):
    """Maximise the ensemble's prediction with SLSQP, from the best observed mixtures, each start kept within the
    trust radius of its own observed mixture."""
    found = []
    for i in np.argsort(-u)[:starts]:
        anchor = W[i]
        begin = np.clip(anchor, low, high)
        begin = begin / begin.sum() if begin.sum() > 0 else np.full(len(anchor), 1 / len(anchor))
        cons = [{"type": "eq", "fun": lambda v: v.sum() - 1}]
        if radius < 2:  # 2 exceeds every distance on the simplex: the trust region is off
            cons.append({"type": "ineq", "fun": lambda v, a=anchor: radius ** 2 - np.sum((v - a) ** 2)})
        result = minimize(lambda v: -predict_value(model, np.clip(v, 0, 1)[None])[0], begin, method="SLSQP",
                          bounds=list(zip(low, high)), constraints=cons, options={"maxiter": 200, "ftol": 1e-10})
        v = np.clip(result.x, 0, 1)
        v /= v.sum()
        if feasible(v[None], low, high, W, radius)[0]:
            found.append(v)
    return np.array(found).reshape(-1, W.shape[1])


def pick_diverse(V, scores, q, min_distance):
    """The best-scored mixture, then the next best that is at least min_distance from every one picked."""
    picked = []
    for i in np.argsort(-scores, kind="stable"):
        if all(np.linalg.norm(V[i] - V[j]) >= min_distance for j in picked):
            picked.append(i)
        if len(picked) == q:
            break
    return V[picked]


def bootstrap_predictions(model, W, u, V, settings):
    """Predictions for mixtures V from models refitted on bootstrap samples of the runs: (resamples x len(V))."""
    rng = np.random.default_rng(settings["seed"])
    out = []
    for _ in tqdm(range(settings["bootstrap"]), desc="bootstrap refits", leave=False, disable=settings["quiet"]):
        sample = rng.integers(0, len(u), len(u))
        if len(np.unique(sample)) < 3 or np.ptp(u[sample]) == 0:
            continue
        out.append(predict_value(refit(model, W[sample], u[sample], settings), V))
    return np.array(out)


# ----------------------------------------------------------------------------------------------------------------
# Report and plots

def mixture_dict(v, domains):
    """{domain: weight} for mixtures.json: only positive weights, like the mixtures evaluate.py records, so that
    train_grpo.py does not ask for a domain the proposal does not use."""
    return {d: round(float(w), 4) for d, w in zip(domains, v) if round(float(w), 4) > 0}


def mixture_text(v, domains):
    return ", ".join(f"{d} {w:.3f}" for d, w in zip(domains, v) if w >= 0.0005)


def plot_all(out_dir, data, sign, validation, proposals, model, objective):
    """cv_predicted_vs_actual.png, proposals_vs_uniform.png, interactions.png (when the Scheffe model is fitted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    names = [name for name in validation["held_out"] if name != "mean_only"]  # a flat line says nothing
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.3), squeeze=False)
    y = data["y"]
    for ax, name in zip(axes[0], names):
        p = sign * validation["held_out"][name]
        ax.scatter(y, p, s=14)
        lo, hi = min(y.min(), p.min()), max(y.max(), p.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_title(f"{name}\nSpearman {validation['families'][name]['spearman']['value']:.2f}", fontsize=9)
        ax.set_xlabel(f"actual {objective}", fontsize=8)
    axes[0][0].set_ylabel(f"{validation['scheme']} prediction", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cv_predicted_vs_actual.png"), dpi=110)
    plt.close(fig)
    written.append("cv_predicted_vs_actual.png")

    shown = [p for p in proposals if p.get("interval")]
    colours = {"model": "tab:blue", "baseline": "tab:grey", "paper heuristic": "tab:orange",
               "paper QuadSurface": "tab:purple"}
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(shown) + 2), 3.8))
    values = np.array([p["predicted"] for p in shown])
    low = np.array([p["interval"][0] for p in shown])
    high = np.array([p["interval"][1] for p in shown])
    ax.bar(range(len(shown)), values, yerr=[np.maximum(values - low, 0), np.maximum(high - values, 0)],
           color=[colours[p["source"]] for p in shown], capsize=3)
    best = y.max() if sign > 0 else y.min()
    ax.axhline(best, color="green", lw=0.8, ls="--")
    for source, colour in colours.items():
        ax.bar([0], [0], color=colour, label=source)  # legend entries only (zero height)
    ax.plot([], [], color="green", lw=0.8, ls="--", label="best observed run")
    ax.set_xticks(range(len(shown)), [p["name"] for p in shown], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"predicted {objective}")
    bottom, top = min(low.min(), best), max(high.max(), best)
    ax.set_ylim(bottom - 0.1 * (top - bottom), top + 0.1 * (top - bottom))
    ax.legend(fontsize=7, ncol=5, loc="lower center")
    ax.set_title(f"predicted {objective} with {int(INTERVAL * 100)}% bootstrap intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "proposals_vs_uniform.png"), dpi=110)
    plt.close(fig)
    written.append("proposals_vs_uniform.png")

    scheffe = model["members"].get("scheffe")
    if scheffe is not None:
        matrix = sign * scheffe["interactions"]
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        limit = np.abs(matrix).max() or 1.0
        image = ax.imshow(matrix, cmap="coolwarm_r" if sign < 0 else "coolwarm", vmin=-limit, vmax=limit)
        ax.set_xticks(range(len(data["domains"])), data["domains"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(data["domains"])), data["domains"], fontsize=7)
        fig.colorbar(image, label=f"{objective} per unit w_i w_j")
        ax.set_title("Scheffe quadratic: pairwise interactions", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "interactions.png"), dpi=110)
        plt.close(fig)
        written.append("interactions.png")
    return written


def validation_table(validation):
    """Held-out figures of the model, each family, the paper's QuadSurface, and the two references a reader needs
    to judge them: the mean of the training runs, and the model on shuffled scores."""
    lines = ["| family | LOO Spearman | 5-fold Spearman (mean ± sd over repeats) | RMSE | top-1 regret | "
             "top-3 regret |", "|---|---|---|---|---|---|"]
    shown = {"mean_only": "mean of the others (reference)", "shuffled": "model on shuffled scores (reference)"}
    for name, m in validation["families"].items():
        cell = lambda k: f"{m[k]['value']:.3f} [{m[k]['interval'][0]:.3f}, {m[k]['interval'][1]:.3f}]"
        kfold = (f"{m['kfold_spearman']['mean']:.3f} ± {m['kfold_spearman']['sd']:.3f}" if "kfold_spearman" in m
                 else "-")
        lines.append(f"| {shown.get(name, name)} | {cell('spearman')} | {kfold} | {cell('rmse')} | "
                     f"{cell('regret_top1')} | {cell('regret_top3')} |")
    if validation["scheme"] != "leave-one-out":
        lines[0] = lines[0].replace("LOO", validation["scheme"])
    return lines


def beats_mean_share(predicted, mean_only, actual, resamples=1000):
    """Share of bootstrap resamples of the runs in which the predictions' RMSE is below the mean-only RMSE."""
    rows = np.random.default_rng(0).integers(0, len(actual), (resamples, len(actual)))
    ours, theirs = (predicted - actual) ** 2, (mean_only - actual) ** 2
    return float(np.mean(ours[rows].mean(1) < theirs[rows].mean(1)))


def caution_of(validation, model_name):
    """What a reader can act on: does the model predict held-out runs better than their mean, and does it rank them
    better than it ranks shuffled scores? (Spearman against 0 misleads with few runs: the mean of the other runs
    scores exactly -1 leave-one-out, since holding out a high run lowers the mean of the rest.)"""
    table = validation["families"]
    ours, mean_only, shuffled = table[model_name], table["mean_only"], table.get("shuffled")
    scheme = validation["scheme"]
    share = beats_mean_share(validation["held_out"][model_name], validation["held_out"]["mean_only"],
                             validation["actual"])
    if share < 0.9:
        finding = (f"its {scheme} RMSE {ours['rmse']['value']:.4f} beats predicting each held-out run by the mean "
                   f"of the others ({mean_only['rmse']['value']:.4f}) in only {share:.0%} of bootstrap resamples "
                   f"of the runs")
    elif shuffled and ours["spearman"]["value"] <= shuffled["spearman"]["interval"][1]:
        finding = (f"its {scheme} Spearman {ours['spearman']['value']:.2f} lies within what it reaches on shuffled "
                   f"scores (up to {shuffled['spearman']['interval'][1]:.2f})")
    else:
        return None
    return (f"the {model_name} model: {finding}; these runs do not yet rank mixtures reliably, so treat the "
            f"proposals as the next round of exploration, not as a forecast")


def write_report(path, data, args, notes, validation, model, proposals, quad, plots, seconds):
    d = data["domains"]
    goal = "lower" if args.minimize else "higher"
    lines = ["# Mixture prediction report", "",
             f"Objective `{args.objective}` ({goal} is better), {len(data['y'])} distinct mixtures from "
             f"{data['n_runs']} runs, domains {', '.join(d)}. Inputs: {', '.join(map(shown_path, args.inputs))}. "
             f"Run time {seconds:.1f} s.", ""]
    if notes:
        lines += ["## Input notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Runs", "", "| run | mixture | objective |", "|---|---|---|"]
    lines += [f"| {label} | {mixture_text(w, d)} | {y:.4f} |" for label, w, y in zip(data["labels"], data["W"], data["y"])]
    lines += ["", f"## Validation ({validation['scheme']}, {args.repeats} x {args.folds}-fold, leave-group-out)", "",
              "Held-out predictions of every family, each refitted without the runs it predicts. References: the "
              "mean of the training runs (leave-one-out Spearman -1 by construction: read its RMSE), and the model "
              f"refitted on {args.permutations} shufflings of the scores (mean, and the 5-95% range in brackets). "
              f"Intervals: {int(INTERVAL * 100)}% bootstrap over runs. Regret: how far the best of the top-1 / top-3 "
              "runs the model ranks highest falls short of the best run, in objective units.", ""]
    lines += validation_table(validation)
    if data["noise_sd"] is not None:
        lines += ["", f"Run-to-run noise SD from repeated mixtures: {data['noise_sd']:.4f} (compare with RMSE)."]
    if validation["leave_group_out"]:
        names = ["ensemble"] + [f for f in FAMILIES if any(f in g for g in validation["leave_group_out"])]
        lines += ["", "Leave-group-out (fitted without any run in which the domain has weight 0, predicting those):",
                  "", "| held out | n | fitted on | " + " | ".join(f"{k} Spearman / RMSE" for k in names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for g in validation["leave_group_out"]:
            cells = ["-" if k not in g else  # a family that needs more runs than this group left
                     f"{'-' if g[k]['spearman'] is None else format(g[k]['spearman'], '.2f')} / {g[k]['rmse']:.4f}"
                     for k in names]
            lines.append(f"| {g['held_out']} | {g['n']} | {g['fitted_on']} | " + " | ".join(cells) + " |")
    chosen_how = ("chosen by 5-fold cross-validation on all runs, and kept in every validation split and bootstrap "
                  "refit" if args.model == "ensemble" else f"--model={args.model}")
    lines += ["", "## Model", "", f"Ranks by the {model_text(model)} ({chosen_how}).",
              "", "## Proposals", "",
              f"Constraints: bounds {args.bounds or 'none'}; availability caps "
              f"{ {k: round(v, 3) for k, v in data['caps'].items()} or 'none'} "
              f"(steps {args.steps} x {args.prompts_per_step} prompts); trust radius {args.trust_radius} "
              f"(Euclidean distance to the nearest observed mixture). Predicted by the `{args.model}` model with "
              f"{int(INTERVAL * 100)}% bootstrap intervals ({args.bootstrap} refits): the uncertainty of the model's "
              f"prediction given which runs were observed, not the spread of a single new run (add the run-to-run "
              f"noise for that).", "",
              "| name | source | mixture | predicted | interval | P(better than uniform) |", "|---|---|---|---|---|---|"]
    for p in proposals:
        v = [p["mixture"].get(k, 0.0) for k in d]
        interval = f"[{p['interval'][0]:.4f}, {p['interval'][1]:.4f}]" if p.get("interval") else "-"
        chance = f"{p['p_better_than_uniform']:.2f}" if p.get("p_better_than_uniform") is not None else "-"
        lines.append(f"| {p['name']} | {p['source']} | {mixture_text(v, d)} | {p['predicted']:.4f} | {interval} | "
                     f"{chance} |")
    if len(quad[0]):
        lines += ["", "The paper's QuadSurface top proposals are listed above as `quad_surface_*` (their own "
                      "prediction in `source_prediction` of mixtures.json)."]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def shown_path(path):
    """A path relative to the working directory when it lies below it (reports stay free of home folders)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


# ----------------------------------------------------------------------------------------------------------------
# Reading runs

def score_key(name):
    """'OutScore', 'out_score' and 'out-score' all name the same score."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def run_name(path, root):
    """A run's name: its folder (the one above eval/<checkpoint>/, where evaluate.py writes) relative to the folder
    the user gave, so that out/mix1/grpo and out/mix2/grpo stay two runs. A file given directly: that folder.
    evaluate.py --limit N writes to eval/<checkpoint>/limit-N/: the same run."""
    folder = os.path.dirname(os.path.abspath(path))
    if re.fullmatch(r"limit-\d+", os.path.basename(folder)):
        folder = os.path.dirname(folder)
    if os.path.basename(os.path.dirname(folder)) == "eval":
        folder = os.path.dirname(os.path.dirname(folder))
    if root is None:
        return os.path.basename(folder)
    relative = os.path.relpath(folder, os.path.abspath(root))
    return os.path.basename(folder) if relative == "." else relative


def read_results_json(path, root=None):
    """One run from evaluate.py's results.json: its mixture and every score (in_score, out_score, each benchmark)."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read it as JSON ({e})")
    if not isinstance(results, dict) or "mixture" not in results:
        raise InputError(f"{path}: not an evaluate.py results file (no 'mixture' field)")
    scores = {}
    for name, bench in (results.get("benchmarks") or {}).items():
        if isinstance(bench, dict) and bench.get("score") is not None:
            scores[name] = bench["score"]
    for name in ("in_score", "out_score"):
        if results.get(name) is not None:
            scores[name] = results[name]
    name = run_name(path, root)
    return {"label": name, "where": path, "mixture": results["mixture"], "scores": scores, "run": name,
            "step": results.get("step")}


def table2_mixture(run):
    """Table 2's convention: the digits of `run` list the included datasets, weighted equally."""
    digits = [int(c) for c in run]
    bad = [d for d in digits if not 1 <= d <= len(PAPER_DOMAINS)]
    if bad:
        raise ValueError(f"dataset digit {bad[0]} (the paper's datasets are 1-{len(PAPER_DOMAINS)})")
    return {PAPER_DOMAINS[d - 1]: 1.0 / len(digits) for d in digits}


def read_table_csv(path, notes):
    """Runs from a CSV: weight columns `w_<domain>`, or Table 2's `run` digits. Other numeric columns are scores."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read it as CSV ({e})")
    if not rows:
        raise InputError(f"{path}: no rows")
    columns = list(rows[0])
    weight_columns = [c for c in columns if c.startswith("w_")]
    if not weight_columns and "run" not in columns:
        raise InputError(f"{path}: no mixture columns: expected `w_<domain>` weight columns or Table 2's `run` "
                         f"column; found {columns}")
    score_columns = [c for c in columns if c not in ("group", "run", "label") and c not in weight_columns]
    runs, skipped = [], []
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        where = f"{path} row {i}"
        label = " ".join(row[c] for c in ("group", "run", "label") if row.get(c)) or f"row {i}"
        if weight_columns:
            mixture = {c[2:]: parse_number(row[c], f"{where} column {c}") for c in weight_columns}
        elif re.fullmatch(r"\d+", row["run"] or "") and len(set(row["run"])) == len(row["run"]):
            try:
                mixture = table2_mixture(row["run"])
            except ValueError as e:
                raise InputError(f"{where}: run {row['run']!r} names {e}")
        else:  # Base (no training), the heuristic and model-based rows: the paper did not publish their weights
            skipped.append(label)
            continue
        # kept as text: a column is parsed (and a bad cell reported) only when the objective uses it
        scores = {c: row[c] for c in score_columns if (row[c] or "").strip()}
        runs.append({"label": label, "where": where, "mixture": mixture, "scores": scores, "run": None, "step": None})
    if skipped:
        note(notes, f"{path}: {len(skipped)} rows have no known mixture and are not used for fitting "
                    f"({', '.join(skipped[:4])}{', ...' if len(skipped) > 4 else ''})")
    return runs


def parse_number(text, where):
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {text!r} is not a number")
    if not math.isfinite(value):
        raise InputError(f"{where}: {text!r} is not a finite number")
    return value


def find_inputs(paths):
    """(file, the folder it was found under or None) to read: CSVs and results.json files as given; folders give
    every results.json below them."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "**", "results.json"), recursive=True))
            if not found:
                raise InputError(f"{path}: no results.json below this folder")
            files += [(f, path) for f in found]
        elif os.path.isfile(path):
            files.append((path, None))
        else:
            raise InputError(f"{path}: no such file or folder")
    return files


def pick_steps(runs, step, notes):
    """One results file per training run: its last checkpoint, the StepAvg file, or a given step."""
    by_run = {}
    for r in runs:
        by_run.setdefault(r["run"] if r["run"] is not None else id(r), []).append(r)
    chosen = []
    for name, group in by_run.items():
        if step == "stepavg":
            pick = [r for r in group if r["step"] is None and r["run"] is not None]
        elif step == "last":
            checkpoints = [r for r in group if r["step"] is not None] or group
            pick = [max(checkpoints, key=lambda r: r["step"] or 0)]
        else:
            pick = [r for r in group if r["step"] == int(step)]
        if not pick:
            note(notes, f"run {name}: no results for --step={step} (it has steps "
                        f"{sorted(str(r['step']) for r in group)}); left out")
        elif len(group) > 1 and step == "last":
            note(notes, f"run {name}: {len(group)} results files; using step {pick[0]['step']} "
                        f"(--step=stepavg uses the checkpoint average, the paper's StepAvg)")
        chosen += pick[:1]
    return chosen


def read_runs(paths, step, notes):
    runs = []
    for path, root in find_inputs(paths):
        if path.lower().endswith(".csv"):
            runs += read_table_csv(path, notes)
        else:
            runs.append(read_results_json(path, root))
    json_runs = [r for r in runs if r["where"].endswith(".json")]
    if json_runs:
        runs = [r for r in runs if not r["where"].endswith(".json")] + pick_steps(json_runs, step, notes)
    untrained = [r for r in runs if not r["mixture"]]
    if untrained:
        note(notes, f"{len(untrained)} results without a training mixture (a base model?) are not used: "
                    f"{', '.join(r['where'] for r in untrained[:3])}")
    return [r for r in runs if r["mixture"]]


def parse_objective(text):
    """'out_score', 'ChartQA' or '0.7*out_score + 0.3*in_score' -> [(coefficient, score name)]. Only '+' separates
    terms (score names may contain '-'); a negative weight is written '-0.5*name'."""
    terms = []
    for term in text.replace(" ", "").split("+"):
        coefficient, times, name = term.rpartition("*")
        if times and not coefficient:
            raise InputError(f"--objective={text!r}: the term {term!r} has a '*' with no number before it "
                             f"(write e.g. 0.5*{name or 'out_score'})")
        if not name:
            raise InputError(f"--objective={text!r}: expected a score name or a weighted sum such as "
                             f"0.5*in_score+0.5*out_score")
        try:
            terms.append((float(coefficient) if coefficient else 1.0, name))
        except ValueError:
            raise InputError(f"--objective={text!r}: {coefficient!r} is not a number (write e.g. 0.5*out_score)")
    return terms


def score_of(run, name):
    """A run's score by name (case and _ ignored), as a float; None when the run lacks it."""
    found = [k for k in run["scores"] if score_key(k) == score_key(name)]
    if not found:
        return None
    value = run["scores"][found[0]]
    if isinstance(value, str):
        return parse_number(value, f"{run['where']} column {found[0]}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{run['where']}: score {found[0]!r} is {value!r}, not a finite number")
    return float(value)


def objective_value(run, terms, objective):
    total = 0.0
    for coefficient, name in terms:
        value = score_of(run, name)
        if value is None:
            raise InputError(f"{run['where']}: no score {name!r} for --objective={objective!r}; "
                             f"it has {sorted(run['scores'])}")
        total += coefficient * value
    if not abs(total) < LARGEST_OBJECTIVE:  # also catches inf and nan (inf - inf)
        raise InputError(f"{run['where']}: --objective={objective!r} comes to {total!r} for this run; scores must "
                         f"be finite and below {LARGEST_OBJECTIVE:g} in size (their squares must fit a float): "
                         f"check this file's scores")
    return total


def check_mixture(mixture, where, notes_sums):
    """Weights as floats summing to 1. Negative or non-numeric weights are errors; other sums are normalised."""
    if not isinstance(mixture, dict):
        raise InputError(f"{where}: the mixture must be {{domain: weight}}, got {mixture!r}")
    clean = {}
    for domain, w in mixture.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InputError(f"{where}: weight of {domain!r} is {w!r}, not a finite number")
        if w < 0:
            raise InputError(f"{where}: weight of {domain!r} is negative ({w}); weights must be >= 0")
        clean[domain] = float(w)
    total = sum(clean.values())
    if total <= 0:
        raise InputError(f"{where}: all mixture weights are zero")
    if abs(total - 1) > 1e-6:
        notes_sums.append((where, total))
    return {d: w / total for d, w in clean.items()}


def check_domain_sets(runs, notes):
    """Results files list only the domains a run trained on, so a domain missing from a file means weight 0. Runs
    that share no domain with the others at all are probably from another study: say so."""
    domains = list(dict.fromkeys(d for r in runs for d in r["mixture"]))  # first-seen order
    partial = [r for r in runs if set(r["mixture"]) != set(domains)]
    if partial and any(r["where"].endswith(".json") for r in partial):
        note(notes, f"{len(partial)} runs do not list every domain; their missing domains count as weight 0 "
                    f"(e.g. {partial[0]['where']} lacks {sorted(set(domains) - set(partial[0]['mixture']))})")
    groups = []  # connected components of runs linked by a shared domain with positive weight
    for r in runs:
        used = {d for d, w in r["mixture"].items() if w > 0}
        linked = [g for g in groups if g & used]
        merged = used.union(*linked) if linked else used
        groups = [g for g in groups if not g & used] + [merged]
    if len(groups) > 1 and len(runs) > len(groups):
        note(notes, f"the runs fall into {len(groups)} groups with no trained domain in common "
                    f"({'; '.join(str(sorted(g)) for g in groups)}): check that they belong to one study")
    return domains


def build_dataset(runs, objective, notes):
    """Matrix of mixtures W (one row per distinct mixture), objective values y, and the noise estimate from
    repeated runs of one mixture (averaged here)."""
    if not runs:
        raise InputError("no runs with a known mixture to learn from")
    terms = parse_objective(objective)
    sums = []
    for r in runs:
        r["mixture"] = check_mixture(r["mixture"], r["where"], sums)
        r["y"] = objective_value(r, terms, objective)
    if sums:
        totals = [t for _, t in sums]
        note(notes, f"{len(sums)} mixtures did not sum to 1 (sums {min(totals):.4g} to {max(totals):.4g}, e.g. "
                    f"{sums[0][0]}): normalised")
    domains = check_domain_sets(runs, notes)
    groups = {}
    for r in runs:
        key = tuple(round(r["mixture"].get(d, 0.0), 6) for d in domains)
        groups.setdefault(key, []).append(r)
    W = np.array([list(k) for k in groups])
    W /= W.sum(1, keepdims=True)
    y = np.array([np.mean([r["y"] for r in g]) for g in groups.values()])
    labels = [" = ".join(r["label"] for r in g) for g in groups.values()]
    repeated = [g for g in groups.values() if len(g) > 1]
    noise_sd = None
    if repeated:
        # pooled within-mixture standard deviation: the run-to-run noise of one objective value
        dev = sum(np.sum((np.array([r["y"] for r in g]) - np.mean([r["y"] for r in g])) ** 2) for g in repeated)
        noise_sd = float(np.sqrt(dev / sum(len(g) - 1 for g in repeated)))
        note(notes, f"{len(repeated)} mixtures were run more than once ({sum(len(g) for g in repeated)} runs): "
                    f"averaged; their spread gives a run-to-run noise SD of {noise_sd:.4g}")
    if len(y) < 3:
        raise InputError(f"need at least 3 distinct mixtures to fit anything; got {len(y)}")
    if np.ptp(y) == 0:
        raise InputError(f"the objective {objective!r} is the same ({y[0]:.4g}) for every run: nothing to learn")
    fixed = {d: round(float(W[0, j]), 4) for j, d in enumerate(domains) if np.ptp(W[:, j]) <= 1e-9}
    if fixed:
        note(notes, f"weights that are the same in every run ({fixed}): their effect cannot be estimated, so "
                    f"proposals hold them there")
    return {"domains": domains, "W": W, "y": y, "labels": labels, "noise_sd": noise_sd, "n_runs": len(runs),
            "groups": list(groups.values())}


# ----------------------------------------------------------------------------------------------------------------
# Main

def get_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", default=[TABLE2],
                   help="results.json files, folders holding them, or CSV files (default: the paper's Table 2)")
    p.add_argument("--objective", default="out_score",
                   help="score to optimise, or a weighted sum such as '0.5*in_score+0.5*out_score' (default "
                        "%(default)s); names are matched ignoring case and _ (OutScore = out_score)")
    p.add_argument("--minimize", action="store_true", help="lower objective is better (losses)")
    p.add_argument("--step", default="last",
                   help="for runs with several results.json: 'last' checkpoint, 'stepavg', or a step number")
    p.add_argument("--model", default="ensemble", choices=["ensemble"] + FAMILIES,
                   help="model that proposes mixtures (default %(default)s); every family is validated anyway")
    p.add_argument("--out_dir", default="out/predict_mixture", help="where mixtures.json, report.md, PNGs go")
    p.add_argument("--proposals", type=int, default=5, help="q: how many diverse proposals (default %(default)s)")
    p.add_argument("--min_distance", type=float, default=0.05,
                   help="smallest Euclidean distance between two proposals (default %(default)s)")
    p.add_argument("--trust_radius", type=float, default=0.3,
                   help="proposals stay within this Euclidean distance of an observed mixture; 2 switches it off "
                        "(default %(default)s)")
    p.add_argument("--bounds", default="", help="per-domain bounds, e.g. coco:0-0.3,sat:0.1-1")
    p.add_argument("--sizes", default="", help="training rows per domain for availability caps, e.g. coco:5997,sat:15000")
    p.add_argument("--manifest", default="", help="prepare_data.py's manifest.json: train sizes for the caps")
    p.add_argument("--steps", type=int, default=PAPER_STEPS, help="training steps of the planned run (default %(default)s)")
    p.add_argument("--prompts_per_step", type=int, default=PAPER_PROMPTS_PER_STEP,
                   help="prompts per step of the planned run (default %(default)s)")
    p.add_argument("--alpha_single", type=float, default=0.5,
                   help="Alpha heuristic: factor on single-dataset runs. The paper did not publish it; Table 2's "
                        "heuristic rows allow (0, 0.663) and rule out 1 (reference/modomodo/README.md); default "
                        "%(default)s")
    p.add_argument("--top_k", type=int, default=10, help="the paper's QuadSurface: how many proposals (default 10)")
    p.add_argument("--log_floor", type=float, default=0.01,
                   help="log_lasso uses log(w + floor): a weight of 0 counts like 1%% of the data (default %(default)s)")
    p.add_argument("--permutations", type=int, default=5,
                   help="validation: refits on shuffled scores, the chance level of every held-out figure "
                        "(default %(default)s; 0 skips)")
    p.add_argument("--folds", type=int, default=5, help="K of repeated K-fold validation (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of K-fold validation (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits per proposal (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.step not in ("last", "stepavg") and not args.step.isdigit():
        raise InputError(f"--step={args.step}: expected 'last', 'stepavg' or a step number")
    for name in ("proposals", "folds", "bootstrap", "steps", "prompts_per_step", "top_k"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1")
    if args.folds < 2 or args.repeats < 0 or args.permutations < 0 or args.trust_radius <= 0 or args.log_floor <= 0:
        raise InputError("--folds must be >= 2, --repeats and --permutations >= 0, --trust_radius and --log_floor > 0")
    return args


def settings_of(args):
    return {"log_floor": args.log_floor, "seed": args.seed, "folds": args.folds, "repeats": args.repeats,
            "permutations": args.permutations,
            "bootstrap": args.bootstrap, "quiet": args.quiet}


def propose(args, data, model, u, low, high, heuristics, quad):
    """Candidates (SLSQP optima and Dirichlet samples), ranked by the rank ensemble, q diverse ones kept; then
    every proposal, uniform, heuristic and QuadSurface mixture gets a bootstrap interval."""
    W, d, sign = data["W"], data["domains"], (-1 if args.minimize else 1)
    optima = slsqp_optima(model, W, u, low, high, args.trust_radius, starts=min(8, len(u)))
    samples = dirichlet_candidates(W, low, high, args.trust_radius, 4000, args.seed)
    candidates = np.vstack([optima, samples])
    if len(candidates) == 0:
        raise InputError("no mixture within the bounds, caps and trust radius: relax --bounds or --trust_radius")
    chosen = pick_diverse(candidates, rank_scores(model, candidates), args.proposals, args.min_distance)
    entries = [(f"proposal_{i + 1}", "model", v, None) for i, v in enumerate(chosen)]
    entries.append(("uniform", "baseline", np.full(len(d), 1 / len(d)), None))
    entries += [(name, "paper heuristic", v, None) for name, v in heuristics.items()]
    entries += [(f"quad_surface_{i + 1}", "paper QuadSurface", v, s) for i, (v, s) in enumerate(zip(*quad))]
    V = np.array([e[2] for e in entries])
    point = predict_value(model, V)
    boot = bootstrap_predictions(model, W, u, V, settings_of(args))
    uniform = len(chosen)
    proposals = []
    for k, (name, source, v, own) in enumerate(entries):
        entry = {"name": name, "source": source, "mixture": mixture_dict(v, d), "predicted": float(sign * point[k])}
        if len(boot):
            low_q, high_q = np.quantile(sign * boot[:, k], [(1 - INTERVAL) / 2, (1 + INTERVAL) / 2])
            entry["interval"] = [float(low_q), float(high_q)]
            entry["p_better_than_uniform"] = None if k == uniform else float(np.mean(boot[:, k] > boot[:, uniform]))
        if own is not None:
            entry["source_prediction"] = float(sign * own)
        entry["within_constraints"] = bool(feasible(v[None], low, high, W, args.trust_radius)[0])
        proposals.append(entry)
    return proposals


def run(argv=None):
    started = time.time()
    args = get_args(argv)
    notes = []
    data = build_dataset(read_runs(args.inputs, args.step, notes), args.objective, notes)
    W, d = data["W"], data["domains"]
    sign = -1 if args.minimize else 1
    u = sign * data["y"]  # oriented so that every model maximises
    settings = settings_of(args)
    families = usable_families(FAMILIES, len(u), len(d), notes)
    chosen = families if args.model == "ensemble" else usable_families([args.model], len(u), len(d), notes)
    if args.minimize:
        heuristics = {}
        note(notes, "the paper's heuristics read in_score and out_score as higher-is-better: skipped with --minimize")
    else:
        heuristics = paper_heuristics(data, args.alpha_single, notes)
    low, high, data["caps"] = constraints(args, d, W, notes)
    if len(u) >= 5:
        quad = quad_surface_proposals(W, u, args.top_k, args.seed)
    else:
        quad = (np.zeros((0, len(d))), np.zeros(0))
        note(notes, "the paper's QuadSurface needs at least 5 distinct mixtures (80/20 splits); skipped")
    print(f"{len(u)} distinct mixtures from {data['n_runs']} runs, {len(d)} domains ({', '.join(d)}); "
          f"objective {args.objective} ({'lower' if args.minimize else 'higher'} is better)")
    model = fit_model(W, u, chosen, settings)
    validation = validate(W, u, families, list(model["weights"]), settings, d)
    caution = caution_of(validation, "ensemble" if args.model == "ensemble" else chosen[0])
    if caution:
        note(notes, caution)
    proposals = propose(args, data, model, u, low, high, heuristics, quad)
    os.makedirs(args.out_dir, exist_ok=True)
    plots = plot_all(args.out_dir, data, sign, validation, proposals, model, args.objective)
    payload = {"format_version": 1, "objective": args.objective, "goal": "minimize" if args.minimize else "maximize",
               "domains": d, "inputs": [shown_path(p) for p in args.inputs], "model": args.model, "ensemble_weights": model["weights"],
               "proposals": proposals,
               "validation": {name: m for name, m in validation["families"].items()},
               "notes": notes}
    import vlm  # the shared atomic writer; vlm imports torch, which nothing before this point needs
    vlm.write_json_atomic(os.path.join(args.out_dir, "mixtures.json"), payload)
    seconds = time.time() - started
    write_report(os.path.join(args.out_dir, "report.md"), data, args, notes, validation, model, proposals, quad,
                 plots, seconds)
    print_summary(args, data, validation, proposals, model, seconds, caution)
    return payload


def print_summary(args, data, validation, proposals, model, seconds, caution):
    d = data["domains"]
    print(f"\nvalidation ({validation['scheme']}; {int(INTERVAL * 100)}% bootstrap intervals):")
    for line in validation_table(validation):
        print("  " + line)
    print("\nmodel: " + model_text(model))
    print(f"\nmixtures ({args.model} model predictions of {args.objective}):")
    width = max(len(p["name"]) for p in proposals)
    for i, p in enumerate(proposals):
        if i == 0 or p["source"] != proposals[i - 1]["source"]:
            print(f"  {p['source']}:")
        interval = f" [{p['interval'][0]:.4f}, {p['interval'][1]:.4f}]" if p.get("interval") else ""
        chance = (f"  P(>uniform) {p['p_better_than_uniform']:.2f}" if p.get("p_better_than_uniform") is not None
                  else "")
        print(f"    {p['name']:<{width}}  {p['predicted']:.4f}{interval}{chance}  "
              f"{mixture_text([p['mixture'].get(k, 0.0) for k in d], d)}")
    if caution:
        print(f"\ncaution: {caution}")
    print(f"\nwrote {os.path.join(args.out_dir, 'mixtures.json')}, report.md and plots ({seconds:.1f} s)")


def main(argv=None):
    try:
        run(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
