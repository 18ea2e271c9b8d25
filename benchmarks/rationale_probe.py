"""
Does the model fail to read its picture, or to turn what it read into the answer? From evaluate.py's predictions.

    python evaluate.py out/cold_start && python benchmarks/rationale_probe.py out/base-cold_start/predictions.jsonl
    python benchmarks/rationale_probe.py A/predictions.jsonl B/predictions.jsonl --data_dir data   # one row each

Every record of the synthetic suite carries its reference rationale (meta "rationale": what the picture shows that
the answer needs, e.g. "the red triangle is above the yellow square", "blue and red make purple"), which the cold
start imitates in <think>. For each test set, this prints the share of completions whose <think> is that rationale
word for word (the model read what the answer needs), and the mean score of the completions whose <think> is right
and of those whose <think> is wrong. A cold start with random answers (cold_start.py --answers=random) leaves the
step from a right rationale to its answer to GRPO; the share of right rationales bounds what that can reach
(docs/testbed_log.md, item 18). The match is exact: a run whose wording drifts under RL counts as
wrong, so compare cold starts, or read a run's rows next to its cold start's. Sets without rationales are skipped.

A scan rationale (prepare_data.py --rationale=scan: "<object> in row r column c, ...; so the <named object> is in
...") gets a second table: the share whose list of objects is right, whose claim after "; so " is right, and whose
claim is right among those whose list is; and, for one-object claims (grounding), the share a claim would get right
by picking one of the listed objects at random (the mean of 1 / objects listed). A claim right at that rate reads
where objects are but not which one the question names (docs/testbed_log.md, item 20). A find rationale
(--rationale=find: each listed object judged "yes" or "no" against the question) gets the same table; its grounding
list stops at the named object, so no random pick's rate is given for it (the same scenes' scan rationales give it).
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
SCAN_CLAIM = "; so "  # prepare_data.scan_rationale: the list of objects, then the claim


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


def scan_probe(predictions, rationales):
    """{set: {n, list_right, claim_right, claim_right_if_list_right, claim_by_random_pick}} over the predictions
    whose reference rationale is a scan or a find ("<list>; so <claim>"); claim_by_random_pick is None for claims
    that name more than one object and for find lists, claim_right_if_list_right None where no list is right."""
    groups = defaultdict(list)
    for p in predictions:
        reference = rationales.get((p["set"], p["id"]))
        if reference is None or SCAN_CLAIM not in reference:
            continue
        think = THINK.search(p["completion"])
        listed, claim = reference.split(SCAN_CLAIM, 1)
        got_list, _, got_claim = (think.group(1) if think else "").partition(SCAN_CLAIM)
        whole_list = " yes in " not in listed  # a find rationale's grounding list stops at the named object
        groups[p["set"]].append((got_list == listed, got_claim == claim,
                                 1 / len(listed.split(", ")) if " and the " not in claim and whole_list else None))
    out = {}
    for name, rows in sorted(groups.items()):
        claims_if_list = [claim for listed, claim, _ in rows if listed]
        picks = [pick for _, _, pick in rows]
        out[name] = {"n": len(rows), "list_right": sum(r[0] for r in rows) / len(rows),
                     "claim_right": sum(r[1] for r in rows) / len(rows),
                     "claim_right_if_list_right": sum(claims_if_list) / len(claims_if_list) if claims_if_list else None,
                     "claim_by_random_pick": None if None in picks else sum(picks) / len(picks)}
    return out


def cell(value):
    return "—" if value is None else f"{value:.3f}"


def markdown(columns, results, values):
    """One row per (predictions file, set): `values(row)` gives the cells after the two names."""
    lines = ["| predictions | set | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for path, rows in results.items():
        for name, r in rows.items():
            lines.append(f"| {path} | {name} | " + " | ".join(values(r)) + " |")
    return "\n".join(lines)


def table(results):
    return markdown(["n", "rationale right", "score, rationale right", "score, rationale wrong"], results,
                    lambda r: [str(r["n"]), cell(r["rationale_right"]), cell(r["score_if_right"]),
                               cell(r["score_if_wrong"])])


def scan_table(results):
    return markdown(["n", "list right", "claim right", "claim right, list right", "claim by a random pick"], results,
                    lambda r: [str(r["n"])] + [cell(r[k]) for k in ("list_right", "claim_right",
                                                                    "claim_right_if_list_right",
                                                                    "claim_by_random_pick")])


def main(argv=None):
    args = parse_args(argv)
    loaded = {path: read_predictions(path) for path in args.predictions}
    rationales = reference_rationales(args.data_dir, {p["set"] for rows in loaded.values() for p in rows})
    results = {path: probe(rows, rationales) for path, rows in loaded.items()}
    if not any(results.values()):
        raise SystemExit(f"error: no prediction in {', '.join(args.predictions)} is of a record with a reference "
                         f"rationale in {args.data_dir} (the synthetic suite's records have them)")
    print(table(results))
    scans = {path: scan_probe(rows, rationales) for path, rows in loaded.items()}
    if any(scans.values()):
        print("\nScan rationales (--rationale=scan or find):\n" + scan_table(scans))
    return results, scans


if __name__ == "__main__":
    main()
