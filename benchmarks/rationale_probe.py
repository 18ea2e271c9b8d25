"""
Does the model fail to read its picture, or to turn what it read into the answer? From evaluate.py's predictions.

    python evaluate.py out/cold_start && python benchmarks/rationale_probe.py out/base-cold_start/predictions.jsonl
    python benchmarks/rationale_probe.py A/predictions.jsonl B/predictions.jsonl --data_dir data   # one row each

Every record of the synthetic suite carries its reference rationale (meta "rationale": what the picture shows that
the answer needs, e.g. "the red triangle is above the yellow square", "blue and red make purple"), which the cold
start imitates in <think>. For each test set, this prints the share of completions whose <think> is that rationale
word for word (the model read what the answer needs), and the mean score of the completions whose <think> is right
and of those whose <think> is wrong. A cold start with random answers (cold_start.py --answers=random) leaves the
step from a right rationale to its answer to GRPO; the share of right rationales bounds what that can reach (README,
"Why the tiny model ignores its image", item 18). The match is exact: a run whose wording drifts under RL counts as
wrong, so compare cold starts, or read a run's rows next to its cold start's. Sets without rationales are skipped.
"""
import argparse
import json
import os
import re
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

THINK = re.compile(r"<think>\s*(.*?)\s*</think>", re.S)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("predictions", nargs="+", help="evaluate.py predictions.jsonl files (each gets its own rows)")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "data"),
                   help="the prepare_data.py output they were scored on (default data/)")
    return p.parse_args(argv)


def reference_rationales(data_dir, sets):
    """{(set, id): rationale} for the records of the given "domain/split" sets that carry one."""
    import vlm
    manifest = vlm.load_manifest(data_dir)
    rationales = {}
    for name in sorted(sets):
        domain, _, split = name.partition("/")
        if split not in manifest["datasets"].get(domain, {}).get("splits", {}):
            raise SystemExit(f"error: {name} is not in {data_dir}/manifest.json; give the --data_dir the "
                             "predictions were scored on")
        dataset = vlm.open_split(data_dir, manifest, domain, split).select_columns(["id", "meta"])
        for record in dataset:
            meta = json.loads(record["meta"]) if record["meta"] else {}
            if meta.get("rationale"):
                rationales[(name, record["id"])] = meta["rationale"].strip()
    return rationales


def read_predictions(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read {path} ({e}); give evaluate.py's predictions.jsonl")


def probe(predictions, rationales):
    """{set: {n, rationale_right, score_if_right, score_if_wrong}} over the predictions whose record has a
    rationale; a score is None where no completion falls in its group."""
    groups = defaultdict(lambda: {True: [], False: []})
    for p in predictions:
        reference = rationales.get((p["set"], p["id"]))
        if reference is None:
            continue
        think = THINK.search(p["completion"])
        groups[p["set"]][think is not None and think.group(1) == reference].append(p["score"])
    out = {}
    for name, g in sorted(groups.items()):
        n = len(g[True]) + len(g[False])
        out[name] = {"n": n, "rationale_right": len(g[True]) / n,
                     "score_if_right": sum(g[True]) / len(g[True]) if g[True] else None,
                     "score_if_wrong": sum(g[False]) / len(g[False]) if g[False] else None}
    return out


def table(results):
    def cell(value):
        return "—" if value is None else f"{value:.3f}"
    lines = ["| predictions | set | n | rationale right | score, rationale right | score, rationale wrong |",
             "|---|---|---|---|---|---|"]
    for path, rows in results.items():
        for name, r in rows.items():
            lines.append(f"| {path} | {name} | {r['n']} | {r['rationale_right']:.3f} | {cell(r['score_if_right'])} "
                         f"| {cell(r['score_if_wrong'])} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    loaded = {path: read_predictions(path) for path in args.predictions}
    rationales = reference_rationales(args.data_dir, {p["set"] for rows in loaded.values() for p in rows})
    results = {path: probe(rows, rationales) for path, rows in loaded.items()}
    if not any(results.values()):
        raise SystemExit(f"error: no prediction in {', '.join(args.predictions)} is of a record with a reference "
                         f"rationale in {args.data_dir} (the synthetic suite's records have them)")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
