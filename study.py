"""
The whole MoDoMoDo method (arXiv 2505.24871) in one command: seed runs on chosen mixtures, their evaluation, the
mixture predictor on their scores, runs on its proposals, and a report that sets every mixture against uniform next
to the run-to-run noise.

    python prepare_data.py && python study.py        # the embedded CPU testbed -> out/study/report.md
    python study.py --quick                          # fewer steps and test items: a first look (out/study_quick)
    python study.py --print_commands                 # the job list, one command per line (Slurm array, GNU parallel)
    python study.py config/paper_qwen2vl_2b.json --data_dir=data/paper --print_commands    # the paper's study

Training settings (JSON config files and --key=value, as train_grpo.py reads them) go to every run unchanged; the
options below are the study's own.

The stages, each a call of the scripts a user would type (their logs in <out_dir>/logs/):
1. base: cold_start.py, when the runs start from its output (the CPU testbed). Every run starts from the same base,
   as every run of the paper starts from the same Qwen2-VL-2B-Instruct (init_from, no cold start).
2. seed runs: every training domain alone (Single), every one left out (ExcludeOne), all of them uniformly (All);
   uniform again with the next seeds, whose spread is the noise floor. Each is `train_grpo.py --mixture=...`, then
   `evaluate.py <run> --last`; `evaluate.py --table` prints the Table 2 analog.
3. predict: `predict_mixture.py` on the seed runs writes mixtures.json: the paper's heuristics (Alpha in / out / bal,
   Coli, Norm), its QuadSurface top 1 and our model's top proposals.
4. proposal runs: `train_grpo.py --mixture=<mixtures.json> --mixture_proposal=NAME`, evaluated the same way.
5. report: report.md and PNGs: every group's rows with their weights, the noise floor, each proposal's predicted
   against its measured score, and a verdict computed from the numbers.

Python rather than a shell script: the runs are independent jobs run N at a time as single-threaded processes
(on 2 cores, two one-thread runs do about 3 times the work of one two-thread run), each skipped when finished,
resumed from its last complete checkpoint, or reported by name with its log's tail when it fails while the others
go on; and the report is arithmetic on JSON files.

Faults: a re-run skips every finished run, evaluation and prediction. Killed at any moment (SIGKILL too: the
running jobs die with this script) and re-run, a run resumes from its last complete checkpoint (train_grpo.py
--resume), an evaluation from its cached completions (evaluate.py), and nothing complete is done again: this script
only reads files that are written whole or not at all. A study folder takes one study at a time (a lock), with the
settings of its first call (study.json); other settings need another --out_dir.
"""
import argparse
import ctypes
import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import namedtuple

from tqdm import tqdm

import cold_start
import predict_mixture
import train_grpo
import vlm

HERE = os.path.dirname(os.path.abspath(__file__))
HEURISTICS = ["alpha_in", "alpha_out", "alpha_bal", "coli", "norm"]
DEFAULT_PROPOSALS = HEURISTICS + ["quad_surface_1", "proposal_1", "proposal_2", "proposal_3"]
GROUPS = ["Single", "ExcludeOne", "All", "Heuristic", "ModelBased", "Ours"]
QUICK = {"max_steps": 20, "limit": 40}  # 30 steps and 50 items took 10:47 with the 1.5-minute cold start of then
NOISE_Z = 2.0          # a difference counts when it is more than 2 SDs of (one run - the uniform mean)
TAIL_LINES = 20        # of a failed job's log, in the console and the report

Run = namedtuple("Run", "name group mixture_args seed")


# ----------------------------------------------------------------------------------------------------------------
# The plan: which runs, and the command of every job

def seed_plan(domains, seed, noise_seeds, only):
    runs = [Run(f"single_{d}", "Single", [f"--mixture={json.dumps({d: 1})}"], seed) for d in domains]
    if len(domains) >= 3:  # with two domains, leaving one out is training on the other alone
        runs += [Run(f"exclude_{d}", "ExcludeOne", [f"--mixture={json.dumps({o: 1 for o in domains if o != d})}"],
                     seed) for d in domains]
    runs += [Run("uniform" if k == 0 else f"uniform_seed{seed + k}", "All", ["--mixture=uniform"], seed + k)
             for k in range(noise_seeds)]
    if only:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            raise SystemExit(f"error: --seed_runs names {unknown}; the seed runs are {[r.name for r in runs]}")
        runs = [r for r in runs if r.name in only or r.group == "All"]
    return runs


def proposal_group(name):
    if name in HEURISTICS:
        return "Heuristic"
    if name.startswith("quad_surface_") and name[13:].isdigit():
        return "ModelBased"
    if name.startswith("proposal_") and name[9:].isdigit():
        return "Ours"
    raise SystemExit(f"error: --proposals names {name!r}; predict_mixture.py proposes {', '.join(HEURISTICS)}, "
                     "quad_surface_K and proposal_K")


def run_folder(out_dir, name):
    return os.path.join(out_dir, "runs", name)


def planned_steps(folder):
    """The run's last step as train_grpo.py planned it (its config.json, written as it starts); None before."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)["planned_steps"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None


def training_state(folder):
    """'done' (its final checkpoint is complete), 'resume' (an earlier one is) or 'fresh'."""
    step, _ = train_grpo.last_good_checkpoint(folder, log=lambda message: print(message, file=sys.stderr))
    if step is None:
        return "fresh"
    return "done" if step == planned_steps(folder) else "resume"


def results_path(folder, limit):
    """evaluate.py's results of the run's final checkpoint (which exist only once that evaluation finished); with
    --limit N evaluate.py writes them to limit-N/ instead."""
    steps = planned_steps(folder)
    if steps is None:
        return None
    return os.path.join(folder, "eval", f"ckpt-{steps:06d}", *([f"limit-{limit}"] if limit else []), "results.json")


def is_evaluated(folder, limit):
    path = results_path(folder, limit)
    return path is not None and os.path.isfile(path)


def script(name):
    return os.path.relpath(os.path.join(HERE, name))


def run_commands(run, out_dir, train_args, data_dir, limit):
    """The commands a run still needs: training (fresh or resumed) unless it is done, then evaluation."""
    folder = run_folder(out_dir, run.name)
    if is_evaluated(folder, limit):  # evaluate.py checked the final checkpoint: no need to hash its weights again
        return []
    commands, state = [], training_state(folder)
    if state != "done":
        train = [sys.executable, script("train_grpo.py"), *train_args, *run.mixture_args, f"--seed={run.seed}",
                 f"--out_dir={folder}"]
        commands.append(("train", train + (["--resume"] if state == "resume" else [])))
    commands.append(("evaluate", [sys.executable, script("evaluate.py"), folder, "--last", "--data_dir", data_dir] +
                     (["--limit", str(limit)] if limit else [])))
    return commands


def base_commands(config, data_dir):
    """cold_start.py when the runs start from its default output (train_grpo.py's default init_from); it does
    nothing when that is up to date. Any other init_from (a hub model, a folder) is used as it is."""
    if config["init_from"] != cold_start.DEFAULTS["out_dir"]:
        return []
    return [("cold_start", [sys.executable, script("cold_start.py"), f"--data_dir={data_dir}"])]


def predict_commands(seed_folders, out_dir, config, objective, n_ours):
    argv = [sys.executable, script("predict_mixture.py"), *seed_folders, f"--objective={objective}", "--out_dir",
            os.path.join(out_dir, "predict"), f"--proposals={n_ours}", "--quiet"]
    if config["max_steps"] > 0:  # the availability caps of the proposal runs (w_d <= |D_d| / prompts drawn)
        argv += ["--manifest", os.path.join(config["data_dir"], "manifest.json"), f"--steps={config['max_steps']}",
                 f"--prompts_per_step={config['prompts_per_step']}"]
    return [("predict", argv)]


def shown(argv):
    return shlex.join(["python" if a == sys.executable else a for a in argv])


# ----------------------------------------------------------------------------------------------------------------
# Running jobs: N at a time, each a sequence of commands, single-threaded, dying with this process

def die_with_parent(parent):
    """In the child before exec: the kernel kills it when this script dies, even by SIGKILL, so a re-run never
    meets an orphan still writing into a run folder (Linux prctl; elsewhere nothing)."""
    def arm():
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)
    return arm


def log_tail(path, lines=TAIL_LINES):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:]).rstrip()


def run_jobs(jobs, parallel, logs_dir, desc):
    """jobs: {name: [(what, argv), ...]}. Each job's commands run in order; a failed one ends its job, the other
    jobs go on. Returns {name: failure text}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    waiting, running, failures = list(jobs.items()), {}, {}
    bar = tqdm(total=len(jobs), desc=desc, unit="job", dynamic_ncols=True, disable=not jobs)

    def start(name, commands):
        what, argv = commands[0]
        path = os.path.join(logs_dir, f"{name}.{what}.log")
        log = open(path, "a")
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shown(argv)}\n")
        log.flush()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=die_with_parent(os.getpid()))
        running[name] = (process, commands, log, path)

    while waiting or running:
        while waiting and len(running) < parallel:
            start(*waiting.pop(0))
        time.sleep(0.2)
        for name, (process, commands, log, path) in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            log.close()
            del running[name]
            if code == 0 and len(commands) > 1:
                start(name, commands[1:])
                continue
            if code != 0:
                failures[name] = f"{commands[0][0]} failed (exit code {code}); last lines of {path}:\n{log_tail(path)}"
                tqdm.write(f"FAILED {name}: {failures[name]}\n")
            bar.update()
    bar.close()
    return failures


# ----------------------------------------------------------------------------------------------------------------
# The report

def write_atomic(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def measure(runs, out_dir, objective, limit):
    """{name: row} of every run with results: its mixture, In, Out and objective scores."""
    terms = predict_mixture.parse_objective(objective)
    rows = {}
    for run in runs:
        path = results_path(run_folder(out_dir, run.name), limit)
        if path is None or not os.path.isfile(path):
            continue
        result = predict_mixture.read_results_json(path)
        try:
            value = predict_mixture.objective_value(result, terms, objective)
        except predict_mixture.InputError as e:
            raise SystemExit(f"error: {e}")
        rows[run.name] = {"run": run, "mixture": result["mixture"], "path": path, "objective": value,
                          "in": result["scores"].get("in_score"), "out": result["scores"].get("out_score")}
    return rows


def noise_floor(rows):
    """Uniform's mean and SD over its seeds, and the margin a single run must clear: NOISE_Z SDs of the difference
    between one run and the mean of n, sd * sqrt(1 + 1/n) (None when fewer than two seeds finished)."""
    values = [r["objective"] for r in rows.values() if r["run"].group == "All"]
    if not values:
        return None
    n, mean = len(values), sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    margin = NOISE_Z * sd * math.sqrt(1 + 1 / n) if sd else None
    return {"n": n, "mean": mean, "sd": sd, "margin": margin}


def verdict(rows, noise, predicted, objective):
    """The conclusion in words, from the numbers only."""
    if noise is None:
        return ["No uniform run finished: there is nothing to compare with."]
    proposals = [r for r in rows.values() if r["run"].group in ("Heuristic", "ModelBased", "Ours")]
    seeds = [r for r in rows.values() if r["run"].group in ("Single", "ExcludeOne")]
    lines = []
    if noise["margin"] is None:
        others = sorted(proposals + seeds, key=lambda r: -r["objective"])
        lines.append(f"The noise floor is unknown ({noise['n']} uniform run{'s' if noise['n'] > 1 else ''} "
                     f"finished{', all with the same score' if noise['sd'] == 0 else ''}): no difference from "
                     "uniform can be called real." + (" Differences from the uniform mean, for the record: " + ", ".join(
                         f"{r['run'].name} {r['objective'] - noise['mean']:+.4f}" for r in others) + "." if others
                                                       else ""))
    else:
        for label, group in (("proposed", proposals), ("seed", seeds)):
            if not group:
                continue
            better = sorted((r for r in group if r["objective"] - noise["mean"] > noise["margin"]),
                            key=lambda r: -r["objective"])
            worse = sorted((r for r in group if noise["mean"] - r["objective"] > noise["margin"]),
                           key=lambda r: r["objective"])
            best = max(group, key=lambda r: r["objective"])

            def listed(rs):
                return ", ".join(f"{r['run'].name} ({r['objective'] - noise['mean']:+.4f}, "
                                 f"{(r['objective'] - noise['mean']) / noise['sd']:+.1f} SD)" for r in rs)
            text = f"Of the {len(group)} {label} mixture{'s' if len(group) > 1 else ''} measured, "
            if better:
                text += f"{len(better)} beat uniform by more than the noise: {listed(better)}"
            else:
                text += (f"none beats uniform by more than the noise; the best, {best['run'].name}, is "
                         f"{best['objective'] - noise['mean']:+.4f} from the uniform mean")
            text += (f"; worse beyond the noise: {listed(worse)}." if worse else "; none is worse beyond the noise.")
            lines.append(text)
    pairs = [(predicted[r["run"].name], r["objective"]) for r in proposals if r["run"].name in predicted]
    if len(pairs) >= 3:
        rho = predict_mixture.spearman([p for p, _ in pairs], [m for _, m in pairs])
        lines.append(f"Predicted against measured {objective} of the proposals: Spearman {rho:.2f} (n = {len(pairs)}).")
    else:
        lines.append(f"{len(pairs)} proposal(s) with a prediction measured: too few to compare rankings (3 needed).")
    return lines


def plot(path_scores, path_predicted, rows, noise, predicted, objective):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ordered = sorted(rows.values(), key=lambda r: (GROUPS.index(r["run"].group), r["run"].name))
    colors = dict(zip(GROUPS, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(ordered) + 1.2))
    ax.barh(range(len(ordered)), [r["objective"] for r in ordered],
            color=[colors[r["run"].group] for r in ordered])
    ax.set_yticks(range(len(ordered)), [f"{r['run'].group}: {r['run'].name}" for r in ordered], fontsize=8)
    ax.invert_yaxis()
    if noise:
        ax.axvline(noise["mean"], color="k", lw=1, label=f"uniform mean (n={noise['n']})")
        if noise["margin"]:
            ax.axvspan(noise["mean"] - noise["margin"], noise["mean"] + noise["margin"], color="k", alpha=0.1,
                       label=f"± {NOISE_Z:g} SD of a difference")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(objective)
    fig.tight_layout()
    save_figure(fig, path_scores)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    points = [(predicted[name], r["objective"], name, r["run"].group) for name, r in rows.items()
              if name in predicted and r["run"].group != "All"]
    if noise and "uniform" in predicted:  # uniform: the mean over its seeds, their SD as the error bar
        points.append((predicted["uniform"], noise["mean"], f"uniform (mean of {noise['n']})", "All"))
        ax.errorbar(predicted["uniform"], noise["mean"], yerr=noise["sd"] or 0, color=colors["All"], capsize=3)
    for x, y, name, group in points:
        ax.scatter(x, y, color=colors[group], s=18)
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
    if points:
        low = min(min(p[0], p[1]) for p in points)
        high = max(max(p[0], p[1]) for p in points)
        ax.plot([low, high], [low, high], "k--", lw=0.8, label="measured = predicted")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"predicted {objective} (mixtures.json)")
    ax.set_ylabel(f"measured {objective}")
    fig.tight_layout()
    save_figure(fig, path_predicted)


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def weights_cell(mixture, domains):
    return " | ".join(f"{mixture.get(d, 0.0):.2f}" if mixture.get(d) else "" for d in domains)


def write_report(out_dir, planned, rows, failures, not_proposed, predicted, objective, domains, settings, table):
    noise = noise_floor(rows)
    extra_column = objective not in ("in_score", "out_score")
    lines = ["# Mixture study", "",
             f"Objective `{objective}` (higher is better), {len(rows)} of {len(planned)} planned runs measured. "
             f"Training settings: `{shlex.join(settings['train_args']) or '(defaults)'}`"
             + (f", evaluation limited to {settings['limit']} items per test set" if settings["limit"] else "") + ".",
             "", "## Verdict", ""]
    lines += verdict(rows, noise, predicted, objective)
    lines += ["", "## Noise floor", ""]
    if noise is None:
        lines.append("No uniform run finished.")
    else:
        sd = "unknown (one seed)" if noise["sd"] is None else f"{noise['sd']:.4f}"
        lines.append(f"Uniform over {noise['n']} training seeds: {objective} mean {noise['mean']:.4f}, SD of one run "
                     f"{sd}." + (f" A mixture's single run counts as different from uniform when it is more than "
                                 f"{noise['margin']:.4f} away from that mean ({NOISE_Z:g} × SD × √(1 + 1/n)); an SD "
                                 f"from {noise['n']} runs is itself rough." if noise["margin"] else ""))
    lines += ["", "## Every run", "",
              "Weights as each run was trained (a blank is 0); Δ: objective minus the uniform mean; predicted: the "
              "model's prediction in mixtures.json.", "",
              "| group | run | " + " | ".join(domains) + " | In | Out | " + (f"{objective} | " if extra_column else "")
              + "Δ | predicted |",
              "|---|---|" + "---:|" * (len(domains) + 4 + extra_column)]
    for run in sorted(planned, key=lambda r: GROUPS.index(r.group)):
        r = rows.get(run.name)
        if r is None:
            lines.append(f"| {run.group} | {run.name} | " + " | ".join("" for _ in domains) + " | missing | | " +
                         ("| " if extra_column else "") + "| |")
            continue
        delta = f"{r['objective'] - noise['mean']:+.4f}" if noise else ""
        guess = f"{predicted[run.name]:.4f}" if run.name in predicted else ""
        lines.append(f"| {run.group} | {run.name} | {weights_cell(r['mixture'], domains)} | "
                     f"{format_score(r['in'])} | {format_score(r['out'])} | "
                     + (f"{r['objective']:.4f} | " if extra_column else "") + f"{delta} | {guess} |")
    lines += ["", "![objective of every run](scores.png)", "",
              "![predicted against measured](predicted_vs_measured.png)", ""]
    missing = [run for run in planned if run.name not in rows]
    if missing:
        lines += ["## Missing rows", ""]
        for run in missing:
            if run.name in failures:
                lines += [f"- **{run.name}**: {failures[run.name].splitlines()[0]}", "", "```",
                          "\n".join(failures[run.name].splitlines()[1:]), "```", ""]
            elif run.name in not_proposed:
                lines.append(f"- **{run.name}**: {not_proposed[run.name]}")
            else:
                lines.append(f"- **{run.name}**: not run yet (an earlier stage is missing or failed)")
        lines.append("")
    lines += ["## Table 2 analog (`evaluate.py --table`)", "", table, ""]
    plot(os.path.join(out_dir, "scores.png"), os.path.join(out_dir, "predicted_vs_measured.png"), rows, noise,
         predicted, objective)
    write_atomic(os.path.join(out_dir, "report.md"), "\n".join(lines))
    return lines


def read_mixtures(path):
    """predict_mixture.py's mixtures.json: {name: predicted objective} of every mixture it proposes, and its notes."""
    with open(path) as f:
        mixtures = json.load(f)
    return {p["name"]: p["predicted"] for p in mixtures["proposals"]}, mixtures["notes"]


def why_not_proposed(name, notes):
    """predict_mixture.py's notes that say why it made no mixture of this name (all of them if none does)."""
    family = "QuadSurface" if name.startswith("quad_surface_") else name
    said = [n for n in notes if family in n] or notes or ["(no notes)"]
    return "not proposed by predict_mixture.py: " + " / ".join(said)


def format_score(value):
    return "" if value is None else f"{value:.4f}"


def results_table(paths):
    if not paths:
        return "(no results yet)"
    done = subprocess.run([sys.executable, script("evaluate.py"), "--table", *paths], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else f"(evaluate.py --table failed: {done.stderr.strip()})"


# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False,
                                usage="python study.py [train config.json ...] [--key=value ...] [options]")
    p.add_argument("--out_dir", default="", help="the study's folder (default out/study; --quick: out/study_quick)")
    p.add_argument("--jobs", type=int, default=cores,
                   help=f"runs at a time, each a single-threaded process (default: one per core, here {cores})")
    p.add_argument("--quick", action="store_true",
                   help=f"a first look: {QUICK['max_steps']} steps per run, the first {QUICK['limit']} items of each "
                        "test set")
    p.add_argument("--print_commands", nargs="?", const="all",
                   choices=["all", "base", "seed", "predict", "proposals"],
                   help="print the commands still to run (all, or one stage), one per line, and exit")
    p.add_argument("--objective", default="out_score",
                   help="what the predictor maximises and the verdict compares: a score or a weighted sum "
                        "(predict_mixture.py --objective; default %(default)s)")
    p.add_argument("--seed_runs", default="",
                   help="comma-separated subset of the seed runs (single_<domain>, exclude_<domain>); the uniform "
                        "runs always run (default: all)")
    p.add_argument("--noise_seeds", type=int, default=3,
                   help="uniform runs with seeds seed, seed+1, ...: their spread is the noise floor (default 3)")
    p.add_argument("--proposals", default=",".join(DEFAULT_PROPOSALS),
                   help="mixtures.json entries to train (default %(default)s)")
    args, train_args = p.parse_known_args(argv)
    for arg in train_args:
        key = arg[2:].partition("=")[0]
        if key in ("mixture", "mixture_proposal", "resume"):
            raise SystemExit(f"error: {arg}: the study sets each run's mixture and resumption itself; see "
                             "python study.py --help")
    if args.jobs < 1 or args.noise_seeds < 1:
        raise SystemExit("error: --jobs and --noise_seeds must be >= 1")
    args.proposals = [n for n in args.proposals.split(",") if n]
    args.seed_runs = [n for n in args.seed_runs.split(",") if n]
    if args.quick:
        train_args = train_args + [f"--max_steps={QUICK['max_steps']}"]
    args.out_dir = args.out_dir or ("out/study_quick" if args.quick else "out/study")
    return args, train_args


def check_settings(out_dir, settings, record):
    """The study's settings are those of the first call in its folder; a later call with others is an error."""
    path = os.path.join(out_dir, "study.json")
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != settings:
            changed = sorted(k for k in settings if settings[k] != previous.get(k))
            raise SystemExit(f"error: {out_dir} holds a study with other {', '.join(changed)} ({path}); use another "
                             "--out_dir, or delete that folder to start over")
    elif record:
        vlm.write_json_atomic(path, settings)


def lock(out_dir):
    handle = open(os.path.join(out_dir, ".lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"error: another study.py is running in {out_dir}; wait for it or stop it")
    return handle  # the lock lasts as long as this process (the kernel drops it however the process ends)


def print_commands(stage, stages):
    print("# Run each line as a job (OMP_NUM_THREADS=1 on CPU); a stage starts when the one before has finished.")
    for name, jobs in stages:
        if stage in ("all", name):
            print(f"# {name}")
            for commands in jobs:
                print(" && ".join(shown(argv) for _, argv in commands))
    print("# then: the same study.py command again, which finds these done and writes the report")


def main(argv=None):
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    config = train_grpo.parse_config(train_args)
    data_dir, out_dir, limit = config["data_dir"], args.out_dir, QUICK["limit"] if args.quick else 0
    domains = train_grpo.training_domains(vlm.load_manifest(data_dir))
    seed_runs = seed_plan(domains, config["seed"], args.noise_seeds, args.seed_runs)
    mixtures_path = os.path.join(out_dir, "predict", "mixtures.json")
    proposal_runs = [Run(name, proposal_group(name), [f"--mixture={mixtures_path}", f"--mixture_proposal={name}"],
                         config["seed"]) for name in args.proposals]
    n_ours = max([int(r.name[9:]) for r in proposal_runs if r.group == "Ours"] + [1])
    settings = {"train_args": train_args, "limit": limit, "objective": args.objective,
                "seed_runs": [r.name for r in seed_runs], "proposals": args.proposals}
    seed_folders = [run_folder(out_dir, r.name) for r in seed_runs]

    def commands_of(runs):
        return {r.name: c for r in runs if (c := run_commands(r, out_dir, train_args, data_dir, limit))}

    if args.print_commands:
        check_settings(out_dir, settings, record=False)
        base = base_commands(config, data_dir)
        predict = [] if os.path.isfile(mixtures_path) else predict_commands(seed_folders, out_dir, config,
                                                                         args.objective, n_ours)
        if not predict:  # only what the prediction proposed
            proposal_runs = [r for r in proposal_runs if r.name in read_mixtures(mixtures_path)[0]]
        print_commands(args.print_commands, [("base", [base] if base else []),
                                             ("seed", list(commands_of(seed_runs).values())),
                                             ("predict", [predict] if predict else []),
                                             ("proposals", list(commands_of(proposal_runs).values()))])
        return 0

    logs_dir = os.path.join(out_dir, "logs")
    os.makedirs(logs_dir, exist_ok=True)
    held = lock(out_dir)
    check_settings(out_dir, settings, record=True)
    started = time.time()
    base = base_commands(config, data_dir)
    failures = run_jobs({"base": base} if base else {}, 1, logs_dir, "base")
    if not failures:  # every run starts from the base
        failures.update(run_jobs(commands_of(seed_runs), args.jobs, logs_dir, "seed runs"))
        finished = [f for f in seed_folders if is_evaluated(f, limit)]
        if not os.path.isfile(mixtures_path) and finished:
            failures.update(run_jobs({"predict": predict_commands(finished, out_dir, config, args.objective, n_ours)},
                                     1, logs_dir, "predict"))
    predicted, notes = read_mixtures(mixtures_path) if os.path.isfile(mixtures_path) else ({}, [])
    chosen = [r for r in proposal_runs if r.name in predicted]
    if chosen and "base" not in failures:
        failures.update(run_jobs(commands_of(chosen), args.jobs, logs_dir, "proposal runs"))
    not_proposed = {r.name: why_not_proposed(r.name, notes) for r in proposal_runs
                    if predicted and r.name not in predicted}
    planned = seed_runs + proposal_runs
    rows = measure(planned, out_dir, args.objective, limit)
    table = results_table([r["path"] for r in rows.values()])
    lines = write_report(out_dir, planned, rows, failures, not_proposed, predicted, args.objective, domains,
                         settings, table)
    print(table + "\n\n" + "\n".join(lines[lines.index("## Verdict"):lines.index("## Noise floor")]).strip())
    print(f"\n{os.path.join(out_dir, 'report.md')} written ({time.time() - started:.0f} s); "
          f"{len(planned) - len(rows)} of {len(planned)} rows missing" +
          (f", failed: {', '.join(sorted(failures))}" if failures else ""))
    held.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
