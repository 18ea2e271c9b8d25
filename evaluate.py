"""
Scores checkpoints (or a base model) on the in-domain and out-of-domain test sets of prepare_data.py, as MoDoMoDo
(arXiv 2505.24871) reports them, and prints the paper's Table 2 from the results.

    python evaluate.py out/grpo                        # every checkpoint of a run, then the run's StepAvg
    python evaluate.py out/grpo/ckpt-000200            # one checkpoint
    python evaluate.py out/grpo --last                 # the run's newest checkpoint only
    python evaluate.py tiny --max_new_tokens 128       # a base model: "tiny", a hub name or a save_pretrained folder
    torchrun --nproc_per_node 8 evaluate.py out/grpo   # data-parallel: each process generates a slice
    python evaluate.py --table out                     # Table 2 from every results.json under out/

Outputs, per checkpoint <run>/ckpt-NNNNNN: <run>/eval/ckpt-NNNNNN/results.json (model, step, the run's mixture,
per-benchmark {score, n, metric, role}, in_score, out_score) and predictions.jsonl (one line per item: set, id,
completion, parsed answer, solution, score). Several checkpoints of a run also give <run>/eval/stepavg/results.json,
the paper's "StepAvg" (each benchmark's score averaged over the checkpoints). A base model's results go to
out/base-<name>/ (--out_dir); a quick look with --limit N writes them to <folder>/limit-N/ instead, so it never
replaces a full evaluation. Both files are written to a temporary name and renamed: a results.json is never
half-written, and its presence means the evaluation finished. Completions are cached as they are generated
(<folder>/.partial/), so a killed evaluation resumes where it stopped, with any number of processes.

Which sets are in-domain and which out-of-domain comes from the manifest's "evaluation" lists; In and Out scores are
test-size-weighted means over those sets, as the paper computes them. The model's answer is the inside of its last
<answer>...</answer> tag (the prompts ask for one), else its whole completion. Metrics:
- every domain of rewards.py (the paper's LISA, SAT, ScienceQA and the whole synthetic suite): that domain's accuracy
  reward (LISA: IoU, so the set's score is the mean IoU; SAT, ScienceQA: choice accuracy), scored on the answer alone,
  never gated on the format reward: a metric measures the answer, not the layout. --reward_mode official: the
  official code's accuracy rewards instead (metric names "<reward>_official"), on the whole completion (LISA then
  scores IoU only above 0.5, and only a one-line <answer> tag is read; rewards.py lists every difference). The
  official evaluation ran these sets in a fork of lmms-eval whose task code we could not read; its training
  rewards are the official scoring we can reproduce.
- relaxed_accuracy (ChartQA): a number within 5 % of a numeric reference, else case-insensitive exact match
  (Methani et al. 2020, as ChartQA and lmms-eval define it).
- anls (InfoVQA): average normalised Levenshtein similarity, threshold 0.5, best over the reference answers.
- mathvista_accuracy: rule-based answer extraction (no LLM judge), then a match: the option for multiple choice,
  the number at the question's precision (or the list) for free-form. Differences to lmms-eval: see mathvista_answer.
- mmmu_accuracy: MMMU's own parsing of option letters and of open answers. Differences: see mmmu_choice.
- --exact_match: the benchmarks scored the paper's plain way instead, the answer equal (case and spacing aside) to
  a reference answer.
- --lmms_eval: InfoVQA and MMMU exactly as lmms-eval scores them, to put our numbers next to published ones:
  ANLS over the raw (not normalised) lengths, kept at >= 0.5 (ours: > 0.5); MMMU letters found as substrings ("A "
  at the end of "NASA "), no option-text answers, a random letter (seeded: lmms-eval's seed 0, the record's source
  row and the answer) when none is found, and open answers split into sentences only at line breaks. ChartQA's
  relaxed accuracy and MathVista's rule-based matching are ours either way (lmms-eval scores MathVista with an LLM
  judge). The answer scored is the one we read from the <answer> tag in both cases.
Prompts: --system_prompt (vlm.SYSTEM_PROMPTS; default: the checkpoint's training setting, else the chat template's
own), the same for HF and vLLM generation.
"""
import argparse
import datetime
import glob
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from collections import namedtuple

# Idle OpenMP threads that spin instead of sleeping make torch 10-20x slower when another program uses a core
# (measured: GRPO 9-17 s/step instead of 0.6 s); set before torch loads, and a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One torch thread: at the tiny testbed's size the per-op work is too small to split, and one thread beat two on a
# 2-core machine (wall time, same hour: 30 GRPO steps 0.70x, evaluation 0.60x, cold start 0.92x). torchrun sets
# the same default for its workers; OMP_NUM_THREADS=N gives a CPU run with a larger model more.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from tqdm import tqdm

import rewards
import vlm

# ----------------------------------------------------------------------------------------------------------------
# Reading answers

def answer_of(text):
    """What a completion (or a solution) answers: the inside of its last <answer> tag, else the whole text."""
    inside = rewards.extract_answer(text)
    return (text if inside is None else inside).strip()


def normalize_spaces(text):
    return " ".join(text.lower().split())


def references_of(solution, meta):
    """Every accepted answer: meta["answers"] when the benchmark has several (InfoVQA, some MMMU), else the solution's."""
    return [str(a) for a in meta["answers"]] if meta.get("answers") else [answer_of(solution)]


# ----------------------------------------------------------------------------------------------------------------
# Benchmark metrics. Each is (answer, solution, meta) -> (parsed answer, score in [0, 1]); a solution or meta it
# cannot read raises ValueError.

def _relaxed_number(text):
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_accuracy(prediction, target, tolerance=0.05):
    """1.0 when both are numbers ("12%" is 0.12) and the prediction is within `tolerance` of a non-zero target
    (relative), else when the two strings are equal ignoring case."""
    predicted, expected = _relaxed_number(prediction), _relaxed_number(target)
    if predicted is not None and expected:  # a zero target has no relative tolerance: compared as text
        return float(abs(predicted - expected) / abs(expected) <= tolerance)
    return float(prediction.lower() == target.lower())


def score_chartqa(answer, solution, meta):
    return answer, max(relaxed_accuracy(answer, ref) for ref in references_of(solution, meta))


def levenshtein(a, b):
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction, references, threshold=0.5):
    """Best over the references of 1 - NL when NL < threshold, else 0, with NL = edit distance / longer length of the
    two (lower-cased, whitespace collapsed); Biten et al. 2019. Two empty strings are equal (NL = 0)."""
    predicted, best = normalize_spaces(prediction), 0.0
    for reference in references:
        expected = normalize_spaces(reference)
        longest = max(len(predicted), len(expected))
        # The distance is at least the length difference: skip the O(n*m) edit distance when that already fails
        # (a model that answers with a page of text against a one-word reference).
        if longest and abs(len(predicted) - len(expected)) >= threshold * longest:
            continue
        distance = levenshtein(predicted, expected) / longest if longest else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


def score_infovqa(answer, solution, meta):
    return answer, anls(answer, references_of(solution, meta))


_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def _to_float(text):
    return float(text.replace(",", ""))


def choice_letter(answer, options):
    """The option an answer names, or None: the option's text, a letter in brackets "(B)", a bare letter "B" / "B." /
    "B)", or a leading "B. text"; else the option whose text is closest in edit distance (as MathVista does)."""
    text = answer.strip()
    for letter, option in options.items():
        if normalize_spaces(option) == normalize_spaces(text):
            return letter
    bracketed = [m.upper() for m in re.findall(r"\(([A-Za-z])\)", text) if m.upper() in options]
    if bracketed:
        return bracketed[0]
    leading = re.match(r"([A-Z])(?:[.):]|\s*$)", text)
    if leading and leading.group(1) in options:
        return leading.group(1)
    if not text:
        return None
    return min(options, key=lambda letter: levenshtein(normalize_spaces(text), normalize_spaces(options[letter])))


def mathvista_answer(text, meta):
    """The answer normalised as MathVista compares it: an option letter (multi_choice), int(float(x)) (integer:
    truncated, as MathVista does), round(float(x), precision) (float), or a tuple of numbers (list); None when there
    is none. lmms-eval without its LLM judge only reads a response that is exactly a choice or a number; we read the
    last number in the answer (the hints ask for the value at the end), a "(B)" / "B." letter, and compare lists by
    their numbers rather than as strings. An empty answer is no answer (lmms-eval picks the option closest to "")."""
    if meta.get("question_type") == "multi_choice":
        if not meta.get("options"):
            raise ValueError("mathvista multi_choice record without meta options")
        return choice_letter(text, meta["options"])
    answer_type = meta.get("answer_type")
    if answer_type == "list":
        inside = re.search(r"\[([^\[\]]*)\]", text)
        numbers = _NUMBER.findall(inside.group(1)) if inside else []
        return tuple(_to_float(n) for n in numbers) or None
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = _to_float(numbers[-1])
    if answer_type == "integer":
        return int(value)
    if answer_type == "float":
        return round(value, int(meta.get("precision") or 0))
    raise ValueError(f"mathvista answer_type {answer_type!r} is not integer, float or list")


def score_mathvista(answer, solution, meta):
    expected = mathvista_answer(answer_of(solution), meta)
    if expected is None:
        raise ValueError(f"mathvista solution {solution!r} has no answer of type {meta.get('answer_type')!r}")
    parsed = mathvista_answer(answer, meta)
    return parsed, float(parsed == expected)


def mmmu_choice(text, options):
    """MMMU's parse_multi_choice_response, in our words: the option letter written "(B)", else as a word "B", else
    "B.", else (answers over 5 words) an option's text contained in the answer; several found: the last one in the
    text. Differences: letters count only as standalone words (MMMU's substring test also finds "A " at the end of
    "NASA "), an answer that is exactly an option's text counts, and no letter found is no answer (MMMU picks one at
    random)."""
    text = " " + text.strip().strip(",.!?;:'") + " "
    patterns = [r"\(({})\)", r"(?<![A-Za-z0-9])({})(?= )", r"(?<![A-Za-z0-9])({})\."]
    for pattern in patterns:
        found = {}
        for letter in options:
            for match in re.finditer(pattern.format(letter), text):
                found[letter] = match.start()
        if found:
            return max(found, key=found.get)
    for letter, option in options.items():
        if normalize_spaces(option) == normalize_spaces(text):
            return letter
    if len(text.split()) > 5:
        lowered = text.lower()
        found = {letter: lowered.rfind(option.lower()) for letter, option in options.items()
                 if option.strip() and option.lower() in lowered}
        if found:
            return max(found, key=found.get)
    return None


def _mmmu_normalize(value):
    """MMMU's normalize_str: a number becomes a float rounded to 2 decimals; a string is lower-cased, and a single
    character is padded with a space on either side so that it does not match inside any word."""
    value = value.strip()
    try:
        return [round(_to_float(value), 2)]
    except ValueError:
        value = value.lower()
        return [" " + value, value + " "] if len(value) == 1 else [value]


_MMMU_INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]


def mmmu_open_candidates(text):
    """MMMU's parse_open_response: for each sentence, the shortest tail after a key phrase ("the answer is ", "so ",
    ...; also "=" in the last sentence), else the whole answer; then every number in those; all normalised. MMMU
    lower-cases before splitting sentences, so its split at ". " before a capital never fires; we split first."""
    sentences = [s for s in re.split(r"\.\s(?=[A-Z])|\n", text.strip().strip(".")) if s.strip()]
    keys = []
    for index, sentence in enumerate(sentences):
        sentence = sentence.lower()
        indicators = _MMMU_INDICATORS + (["="] if index == len(sentences) - 1 else [])
        tails = [sentence.split(indicator)[-1].strip() for indicator in indicators if indicator in sentence]
        tails = [t for t in tails if t not in ("", ":", ",", ".", "!", "?", ";", "'")]
        if tails:
            keys.append(min(tails, key=len))
    keys = keys or [text.strip().lower()]
    candidates = keys + [n for key in keys for n in _NUMBER.findall(key)]
    return sorted({c for value in candidates for c in _mmmu_normalize(value)}, key=str)


def mmmu_open_match(candidates, references):
    """MMMU's eval_open: a text reference contained in a text candidate, or a numeric reference equal to a number."""
    normalized = [n for reference in references for n in _mmmu_normalize(reference)]
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(n, str) and n in candidate for n in normalized):
                return True
        elif candidate in normalized:
            return True
    return False


def score_mmmu(answer, solution, meta):
    if meta.get("question_type") == "multiple-choice":
        if not meta.get("options"):
            raise ValueError("mmmu multiple-choice record without meta options")
        parsed = mmmu_choice(answer, meta["options"])
        return parsed, float(parsed == answer_of(solution))
    parsed = mmmu_open_candidates(answer)
    return parsed, float(mmmu_open_match(parsed, references_of(solution, meta)))


# ----------------------------------------------------------------------------------------------------------------
# lmms-eval's exact behaviour where our metrics differ (--lmms_eval), so our numbers sit next to published ones
# computed with it (lmms_eval/api/metrics.py anls, lmms_eval/tasks/mmmu/utils.py; read, rebuilt in our words).

def anls_lmms_eval(prediction, references, threshold=0.5):
    """lmms-eval's ANLS: the edit distance of the normalised strings (lower-cased, whitespace collapsed) over the
    longer RAW length of reference and prediction; the best reference's 1 - NL, kept when >= threshold (ours: the
    normalised lengths, kept when > threshold)."""
    predicted, best = normalize_spaces(prediction), 0.0
    for reference in references:
        expected, longest = normalize_spaces(reference), max(len(reference), len(prediction))
        if not longest:
            return 1.0
        if abs(len(predicted) - len(expected)) > (1 - threshold) * longest:
            continue  # the distance is at least the length difference: below the threshold already
        similarity = 1.0 - levenshtein(predicted, expected) / longest
        if similarity >= threshold:
            best = max(best, similarity)
    return best


def score_infovqa_lmms_eval(answer, solution, meta):
    return answer, anls_lmms_eval(answer, references_of(solution, meta))


# The random guess lmms-eval makes when it finds no option (MMMU's own rule), seeded so a re-scoring gives the
# same number: with lmms-eval's default seed 0, the record's source row and the answer.
MMMU_GUESS_SEED = 0


def mmmu_choice_lmms_eval(text, options, rng):
    """lmms-eval's parse_multi_choice_response: "(B)" anywhere, else "B " anywhere (so "NASA " names A), else
    "B.", else (answers over 5 words) an option's text contained in it; several: the one found last; none: a
    letter drawn at random."""
    for char in ",.!?;:'":  # one character after the other, as lmms-eval strips them
        text = text.strip(char)
    text = f" {text} "
    letters = list(options)
    found = [c for c in letters if f"({c})" in text]
    last = [text.rfind(f"({c})") for c in found]
    if not found:
        found = [c for c in letters if f"{c} " in text] or [c for c in letters if f"{c}." in text]
        last = [text.rfind(f" {c} ") for c in found]
    if not found and len(text.split()) > 5:
        found = [c for c, option in options.items() if option.lower() in text.lower()]
        last = [text.lower().rfind(options[c].lower()) for c in found]
    if not found:
        return rng.choice(letters)
    return found[last.index(max(last))]


_LMMS_NUMBER_PATTERNS = [r"-?\b\d{1,3}(?:,\d{3})+\b", r"-?\d+(?:\.\d+)?[eE][+-]?\d+",
                         r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"]


def mmmu_open_candidates_lmms_eval(text):
    """lmms-eval's parse_open_response: lower-cased first, so only line breaks split sentences; per sentence the
    shortest tail after a key phrase (and "=" in the last one); numbers found by three patterns (with commas,
    scientific, plain); all normalised."""
    text = text.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", text)
    keys = []
    for index, sentence in enumerate(sentences):
        shortest = None
        for indicator in _MMMU_INDICATORS + (["="] if index == len(sentences) - 1 else []):
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):  # an empty tail gives way to the next one
                    shortest = tail
        if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [text]
    candidates = keys + [n for key in keys for pattern in _LMMS_NUMBER_PATTERNS for n in re.findall(pattern, key)]
    return sorted({c for value in candidates for c in _mmmu_normalize(value)}, key=str)


def score_mmmu_lmms_eval(answer, solution, meta):
    if meta.get("question_type") == "multiple-choice":
        if not meta.get("options"):
            raise ValueError("mmmu multiple-choice record without meta options")
        rng = random.Random(json.dumps([MMMU_GUESS_SEED, meta.get("source"), answer], sort_keys=True))
        parsed = mmmu_choice_lmms_eval(answer, meta["options"], rng)
        return parsed, float(parsed == answer_of(solution))
    parsed = mmmu_open_candidates_lmms_eval(answer)
    return parsed, float(mmmu_open_match(parsed, references_of(solution, meta)))


def score_exact_match(answer, solution, meta):
    return answer, float(any(normalize_spaces(answer) == normalize_spaces(r) for r in references_of(solution, meta)))


# Named as prepare_data.py's manifest names them in the "reward" field of each benchmark.
BENCHMARK_METRICS = {
    "relaxed_accuracy": score_chartqa,
    "anls": score_infovqa,
    "mathvista_accuracy": score_mathvista,
    "mmmu_accuracy": score_mmmu,
    "exact_match": score_exact_match,
    "anls_lmms_eval": score_infovqa_lmms_eval,
    "mmmu_accuracy_lmms_eval": score_mmmu_lmms_eval,
}
LMMS_EVAL_METRICS = {"anls": "anls_lmms_eval", "mmmu_accuracy": "mmmu_accuracy_lmms_eval"}


def accuracy_reward(domain):
    """rewards.py's accuracy reward of a domain (the one that is not "format")."""
    return next(name for name, _ in rewards.DOMAIN_REWARDS[domain] if name != "format")


OFFICIAL = "_official"  # a rewards.py metric scored as the official code scores it (--reward_mode official)


def text_to_score(metric, completion):
    """What a metric reads: the whole completion for the official rewards (they find the answer their own way),
    else the answer (answer_of)."""
    return completion if metric.endswith(OFFICIAL) else answer_of(completion)


def score_answer(metric, answer, solution, domain, meta):
    """(parsed answer, score) of one answer (text_to_score) under a set's metric."""
    if metric in BENCHMARK_METRICS:
        return BENCHMARK_METRICS[metric](answer, solution, meta)
    if metric.endswith(OFFICIAL):
        scores = rewards.score(answer, solution, domain, meta, reward_mode="official")
        return rewards.official_answer(answer), scores[metric[:-len(OFFICIAL)]]
    # rewards.py reads the answer from <answer> tags; the tags are put back around the answer we read, and the
    # format reward is ignored (gate_on_format=False).
    scores = rewards.score(f"<answer>{answer}</answer>", solution, domain, meta, gate_on_format=False)
    return answer, scores[metric]


# ----------------------------------------------------------------------------------------------------------------
# Test sets: the manifest's evaluation lists, checked against the folders on disk

TestSet = namedtuple("TestSet", "name domain split path rows fingerprint metric role dataset")
RECORD_COLUMNS = ("id", "domain", "image", "problem", "solution", "meta")


def metric_of(domain, entry, exact_match, reward_mode="ours", lmms_eval=False):
    """The metric of a domain: the manifest's "reward" field names a BENCHMARK_METRICS entry or a rewards.py domain."""
    name = entry.get("reward", domain)
    if name in BENCHMARK_METRICS:
        return "exact_match" if exact_match else LMMS_EVAL_METRICS.get(name, name) if lmms_eval else name
    if name in rewards.DOMAIN_REWARDS:
        return accuracy_reward(name) + (OFFICIAL if reward_mode == "official" else "")
    known = sorted(BENCHMARK_METRICS) + sorted(rewards.DOMAIN_REWARDS)
    raise SystemExit(f"error: manifest domain {domain!r} has reward {name!r}, which is neither an evaluate.py metric "
                     f"nor a rewards.py domain ({', '.join(known)})")


def open_test_sets(data_dir, names=None, exact_match=False, reward_mode="ours", lmms_eval=False):
    """The evaluation sets (all of the manifest's, or `names`), each opened and checked against the manifest."""
    manifest_path = os.path.join(data_dir, "manifest.json")
    manifest = vlm.load_manifest(data_dir)
    evaluation = manifest.get("evaluation", {})
    roles = {name: "in" for name in evaluation.get("in_domain", [])}
    roles.update({name: "out" for name in evaluation.get("out_of_domain", [])})
    if names:
        unknown = [n for n in names if n not in roles]
        if unknown:
            raise SystemExit(f"error: {', '.join(unknown)} not in the evaluation lists of {manifest_path} "
                             f"({', '.join(roles) or 'none'})")
    names = names or list(roles)
    if not names:
        raise SystemExit(f"error: {manifest_path} lists no evaluation sets")
    sets = []
    for name in names:
        domain, _, split = name.partition("/")
        entry = manifest.get("datasets", {}).get(domain)
        if entry is None or split not in entry.get("splits", {}):
            raise SystemExit(f"error: evaluation set {name} is not a dataset split in {manifest_path}")
        info = entry["splits"][split]
        path = os.path.join(data_dir, info["path"])
        dataset = vlm.open_split(data_dir, manifest, domain, split)
        missing = [c for c in RECORD_COLUMNS if c not in dataset.column_names]
        if missing:
            raise SystemExit(f"error: {path} lacks the record field(s) {', '.join(missing)}")
        if len(dataset) != info["rows"]:
            raise SystemExit(f"error: {path} has {len(dataset)} rows but {manifest_path} says {info['rows']}: the "
                             "folder does not match the manifest; run prepare_data.py again")
        columns = dataset.select_columns(["id", "domain"])
        for row, (record_id, record_domain) in enumerate(zip(columns["id"], columns["domain"])):
            if record_domain != domain:
                raise SystemExit(f"error: {path} row {row} (id {record_id}) has domain {record_domain!r}, not "
                                 f"{domain!r} as {manifest_path} says")
        if len(set(columns["id"])) != len(dataset):
            raise SystemExit(f"error: {path} has repeated ids; every record needs its own")
        sets.append(TestSet(name, domain, split, path, info["rows"], info.get("fingerprint"),
                            metric_of(domain, entry, exact_match, reward_mode, lmms_eval), roles[name], dataset))
    return sets


def scoring_columns(test_set, limit):
    """(id, solution, meta dict) of the first `limit` rows (all when 0), without decoding any image."""
    n = min(limit, test_set.rows) if limit else test_set.rows
    columns = test_set.dataset.select_columns(["id", "solution", "meta"])[:n]
    rows = []
    for record_id, solution, meta in zip(columns["id"], columns["solution"], columns["meta"]):
        try:
            rows.append((record_id, solution, json.loads(meta) if meta else {}))
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {test_set.path} record {record_id}: meta is not JSON ({e})")
    return rows


def check_solutions(test_set, rows):
    """Scores an empty answer against every solution, so a solution the metric cannot read stops the evaluation
    before any generation, naming the record."""
    for record_id, solution, meta in rows:
        try:
            score_answer(test_set.metric, "", solution, test_set.domain, meta)
        except ValueError as e:  # rewards.SolutionError is a ValueError
            raise SystemExit(f"error: {test_set.path} record {record_id}: {e}")


# ----------------------------------------------------------------------------------------------------------------
# Models: run folders, checkpoints, base models

Model = namedtuple("Model", "source run run_dir step mixture train_config folder")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def existing_results(path, replace_unreadable):
    """The results.json at `path`, or None when there is none. We write it atomically, so one that is not a JSON
    object was cut or edited by something else: an error naming it, or None (to be replaced) under
    `replace_unreadable`."""
    if not os.path.isfile(path):
        return None
    try:
        results = read_json(path)
        problem = None if isinstance(results, dict) else "not a JSON object"
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = str(e)
    if problem is None:
        return results
    if replace_unreadable:
        return None
    raise SystemExit(f"error: {path} is not a readable results file ({problem}): evaluate its model again with "
                     "--force to replace it (cached completions are reused)")


def is_run_folder(path):
    config = os.path.join(path, "config.json")
    has_checkpoints = any(re.fullmatch(r"ckpt-\d+", name) for name in os.listdir(path))
    return has_checkpoints or (os.path.isfile(config) and "mixture_weights" in read_json(config))


def run_checkpoints(run_dir):
    """Every ckpt-NNNNNN folder of a run, oldest first (ckpt-NNNNNN.partial folders are saves still in progress)."""
    found = sorted((int(name[5:]), os.path.join(run_dir, name)) for name in os.listdir(run_dir)
                   if re.fullmatch(r"ckpt-\d+", name))
    if not found:
        raise SystemExit(f"error: {run_dir} is a run folder without checkpoints (ckpt-NNNNNN)")
    return [folder for _, folder in found]


def checkpoint_model(folder):
    problem = vlm.checkpoint_problem(folder)
    if problem is not None:
        raise SystemExit(f"error: checkpoint {folder} is {problem}; it cannot be evaluated (evaluate a complete "
                         "checkpoint, or let training finish writing this one)")
    state = read_json(os.path.join(folder, "trainer_state.json"))
    run_dir = os.path.dirname(os.path.normpath(folder)) or "."
    # trainer_state.json carries the run's config.json (mixture_weights, config) and travels with the checkpoint.
    return Model(folder, os.path.basename(os.path.abspath(run_dir)), run_dir, state["step"], state["mixture_weights"],
                 state["config"], os.path.join(run_dir, "eval", os.path.basename(os.path.normpath(folder))))


def base_model(source, out_dir):
    """A model not trained here: "tiny", a hub name, or a save_pretrained folder (e.g. the cold start)."""
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, vlm.CHECKSUMS)):
        problem = vlm.checkpoint_problem(source)
        if problem is not None:
            raise SystemExit(f"error: model folder {source} is {problem}")
    if os.path.isdir(source):  # found now, not after the test sets are read and the model fails to load
        try:
            config = read_json(os.path.join(source, "config.json"))
        except (OSError, ValueError):
            config = None
        if not isinstance(config, dict) or "model_type" not in config:
            raise SystemExit(f"error: {source} is not a checkpoint (trainer_state.json), a run folder (ckpt-NNNNNN) "
                             "nor a model folder (config.json with a model_type): give one of those")
    name = os.path.basename(os.path.normpath(source)) if os.path.isdir(source) else source
    folder = out_dir or os.path.join("out", "base-" + re.sub(r"[^A-Za-z0-9._-]+", "--", name))
    return Model(source, name, None, 0, {}, {}, folder)


def resolve_models(targets, out_dir, last=False):
    models = []
    for target in targets:
        if os.path.isdir(target) and is_run_folder(target):
            folders = run_checkpoints(target)
            models += [checkpoint_model(folder) for folder in (folders[-1:] if last else folders)]
        elif os.path.isdir(target) and (os.path.isfile(os.path.join(target, "trainer_state.json")) or
                                        re.fullmatch(r"ckpt-\d+(\.partial)?", os.path.basename(os.path.normpath(target)))):
            models.append(checkpoint_model(target))
        else:
            models.append(base_model(target, out_dir))
    if out_dir and (len(models) > 1 or models[0].run_dir):
        raise SystemExit("error: --out_dir is the folder of one base model's results (a checkpoint's go to "
                         "<run>/eval/); give one base model")
    return models


def model_digest(model):
    """Identifies the weights: the checksums of a checkpoint folder (a re-saved step is a new model), else the name."""
    path = os.path.join(model.source, vlm.CHECKSUMS)
    return vlm.file_sha256(path) if os.path.isfile(path) else model.source


# ----------------------------------------------------------------------------------------------------------------
# Generation: an engine is a function (problems, images) -> completions. HF generate is the one here; the vLLM
# server engine is a function of the same shape.

def hf_engine(source, max_new_tokens, temperature, max_pixels, system_prompt, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model, tokenizer, image_processor = vlm.load_policy(source, dtype=dtype, max_pixels=max_pixels)
    except OSError as e:
        raise SystemExit(f"error: cannot load model {source!r}: not a model folder, 'tiny', nor a hub model ({e})")
    model.to(device).eval()

    def complete(problems, images):
        batch = vlm.encode_prompts(tokenizer, image_processor, problems, images, system_prompt=system_prompt)
        ids = vlm.generate(model, tokenizer, batch, n=1, max_new_tokens=max_new_tokens,
                           temperature=temperature or 1.0, greedy=temperature == 0)
        return [vlm.decode(tokenizer, c) for c in ids]
    return complete


def vllm_engine(source, max_new_tokens, temperature, max_pixels, system_prompt, url, timeout, sync_dir):
    """The same function, answered by a running vLLM server (README: Rollouts from a vLLM server) into which
    the model's weights are loaded first; the server must have been started on a folder of the same architecture
    and tokenizer (a mismatch in tokenization is an error naming the prompt)."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model, tokenizer, image_processor = vlm.load_policy(source, dtype=dtype, max_pixels=max_pixels)
    client = vlm.VLLMClient(url, image_processor, timeout=timeout)
    try:
        client.check_health(weight_sync=True)
        vlm.write_weights(model.state_dict(), sync_dir)  # state_dict carries a tied lm_head explicitly
        client.reload_weights(sync_dir)
    except vlm.VLLMServerError as e:
        raise SystemExit(f"error: {e}")
    del model

    def complete(problems, images):
        try:
            ids = client.generate_for(tokenizer, problems, images, n=1, max_new_tokens=max_new_tokens,
                                      temperature=temperature or 1.0, greedy=temperature == 0,
                                      system_prompt=system_prompt)
        except vlm.VLLMServerError as e:
            raise SystemExit(f"error: {e} (the completions generated so far are cached; run again to resume)")
        return [vlm.decode(tokenizer, c) for c in ids]
    return complete


# ----------------------------------------------------------------------------------------------------------------
# Data parallel under torchrun: every process generates a slice of the items into its own cache file (a shared file
# system, as training's checkpoints need); rank 0 merges the files once, scores, and writes the results.

def init_distributed():
    """(rank, world size, device). gloo carries only barriers, so no GPU collective can time out during a long
    generation on a process with more work."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def barrier(world):
    if world > 1:
        torch.distributed.barrier()


def read_completions(paths):
    """{(set, id): completion} from jsonl files; a line cut off by a kill is ignored (its item is regenerated)."""
    done = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[(item["set"], item["id"])] = item["completion"]
    return done


def completions_on_disk(folder, generation):
    """Completions already generated with these generation settings: every process's cache file, and the
    predictions of a finished evaluation that differed only in scoring (--exact_match, --limit)."""
    paths = sorted(glob.glob(os.path.join(folder, ".partial", "*.jsonl")))
    finished = existing_results(os.path.join(folder, "results.json"), replace_unreadable=True)
    predictions_path = os.path.join(folder, "predictions.jsonl")
    if finished and os.path.isfile(predictions_path) and finished.get("settings", {}).get("generation") == generation:
        paths.insert(0, predictions_path)
    return read_completions(paths)


def prepare_cache(folder, generation, rank, world):
    """The completions that need no generating; the cache is kept when it was made with the same settings."""
    cache_dir = os.path.join(folder, ".partial")
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        settings_path = os.path.join(cache_dir, "settings.json")
        if not os.path.isfile(settings_path) or read_json(settings_path) != generation:
            shutil.rmtree(cache_dir, ignore_errors=True)
            os.makedirs(cache_dir)
            vlm.write_json_atomic(settings_path, generation)
    barrier(world)
    done = completions_on_disk(folder, generation)
    barrier(world)  # every process has read before any adds to the cache, so all slice the same remainder
    return done


def generate_missing(model, sets, rows_of, done, generation, args, rank, world, device):
    """Generates this process's slice of the items without a completion, appending to its own cache file."""
    mine = {}
    for s in sets:
        missing = [i for i, (record_id, _, _) in enumerate(rows_of[s.name]) if (s.name, record_id) not in done]
        mine[s.name] = missing[rank::world]  # interleaved, so every process gets a share of every set
    total = sum(len(v) for v in mine.values())
    if total == 0:
        return
    if args.engine == "vllm":
        engine = vllm_engine(model.source, generation["max_new_tokens"], generation["temperature"],
                             generation["max_pixels"], vlm.system_prompt_text(generation["system_prompt"]),
                             args.vllm_url, args.vllm_timeout,
                             os.path.join(model.folder, ".partial", "vllm_weights"))
    else:
        engine = hf_engine(model.source, generation["max_new_tokens"], generation["temperature"],
                           generation["max_pixels"], vlm.system_prompt_text(generation["system_prompt"]), device)
    torch.manual_seed(generation["seed"] + rank)
    cache_file = os.path.join(model.folder, ".partial", f"{socket.gethostname()}-{os.getpid()}.jsonl")
    bar = tqdm(total=total, desc=f"{model.run} step {model.step}" + (f" (rank 0 of {world})" if world > 1 else ""),
               unit="item", disable=rank != 0, dynamic_ncols=True)
    with open(cache_file, "a") as f:
        for s in sets:
            for start in range(0, len(mine[s.name]), args.batch_size):
                records = [s.dataset[i] for i in mine[s.name][start:start + args.batch_size]]
                try:
                    completions = engine([r["problem"] for r in records], [r["image"] for r in records])
                except ValueError as e:
                    raise SystemExit(f"error: {s.path} records {[r['id'] for r in records]}: {e}")
                for record, completion in zip(records, completions):
                    f.write(json.dumps({"set": s.name, "id": record["id"], "completion": completion}) + "\n")
                f.flush()
                bar.update(len(records))
    bar.close()


# ----------------------------------------------------------------------------------------------------------------
# Results

def weighted_score(benchmarks, role):
    """The paper's In / Out score: the mean of the sets' scores weighted by their sizes; None without such sets."""
    chosen = [b for b in benchmarks.values() if b["role"] == role]
    total = sum(b["n"] for b in chosen)
    return sum(b["score"] * b["n"] for b in chosen) / total if total else None


def chance_score(rows):
    """The expected score of a uniform guess among each item's options (a 2-option set's 0.5 is no skill); None
    when an item has no options to guess among."""
    sizes = [len(meta.get("options") or ()) for _, _, meta in rows]
    return sum(1 / n for n in sizes) / len(sizes) if sizes and all(sizes) else None


def score_sets(sets, rows_of, completions):
    """(benchmarks, predictions): every item's completion scored under its set's metric."""
    benchmarks, predictions = {}, []
    for s in sets:
        scores = []
        for record_id, solution, meta in rows_of[s.name]:
            completion = completions.get((s.name, record_id))
            if completion is None:
                raise RuntimeError(f"no completion for {s.name} record {record_id} after generation")
            parsed, score = score_answer(s.metric, text_to_score(s.metric, completion), solution, s.domain, meta)
            scores.append(score)
            predictions.append({"set": s.name, "id": record_id, "completion": completion, "answer": parsed,
                                "solution": solution, "score": score})
        benchmarks[s.name] = {"score": sum(scores) / len(scores) if scores else 0.0, "n": len(scores),
                              "metric": s.metric, "role": s.role, "chance": chance_score(rows_of[s.name])}
    return benchmarks, predictions


def evaluate_model(model, sets, rows_of, args, rank, world, device, log):
    """results.json and predictions.jsonl of one model in model.folder (written by rank 0), or the existing ones
    when they were made with the same settings. Returns the results (None on the other ranks)."""
    generation = {"model": model_digest(model), "engine": args.engine, "temperature": args.temperature, "seed": args.seed,
                  "max_new_tokens": args.max_new_tokens or model.train_config.get("max_completion_length", 1024),
                  "max_pixels": args.max_pixels or model.train_config.get("max_pixels", 0),
                  "system_prompt": args.system_prompt or model.train_config.get("system_prompt", "default"),
                  "sets": {s.name: s.fingerprint for s in sets}}
    settings = {"generation": generation, "limit": args.limit, "metrics": {s.name: s.metric for s in sets}}
    # A quick look (--limit N) has its own folder, so it never replaces a full evaluation's files; the completion
    # cache is shared, so a full evaluation later reuses what a quick look generated and the reverse.
    results_dir = os.path.join(model.folder, f"limit-{args.limit}") if args.limit else model.folder
    results_path = os.path.join(results_dir, "results.json")
    previous = existing_results(results_path, replace_unreadable=args.force)
    if not args.force and previous and previous.get("settings") == settings:
        log(f"{results_path}: up to date")
        return previous if rank == 0 else None
    started = time.time()
    done = prepare_cache(model.folder, generation, rank, world)
    generate_missing(model, sets, rows_of, done, generation, args, rank, world, device)
    barrier(world)
    if rank != 0:
        return None
    benchmarks, predictions = score_sets(sets, rows_of, completions_on_disk(model.folder, generation))
    results = {"model": model.source, "run": model.run, "run_dir": model.run_dir, "step": model.step,
               "mixture": model.mixture, "benchmarks": benchmarks,
               "in_score": weighted_score(benchmarks, "in"), "out_score": weighted_score(benchmarks, "out"),
               "limit": args.limit or None, "processes": world, "seconds": round(time.time() - started, 1),
               "settings": settings}
    os.makedirs(results_dir, exist_ok=True)
    vlm.write_json_atomic(os.path.join(results_dir, "predictions.jsonl"), predictions, jsonl=True)
    vlm.write_json_atomic(results_path, results)  # last: its presence means the evaluation finished
    if not args.limit:  # the full predictions.jsonl now holds every completion the cache did
        shutil.rmtree(os.path.join(model.folder, ".partial"), ignore_errors=True)
    log(f"{results_path}: in {format_score(results['in_score'])}, out {format_score(results['out_score'])}")
    return results


def write_stepavg(run_dir, steps, log, limit=0):
    """<run>/eval/stepavg/results.json: every benchmark's score averaged over the run's evaluated checkpoints (or
    over `steps`), the paper's StepAvg; with `limit`, over their --limit evaluations, into stepavg/limit-N/. Only
    checkpoints evaluated like the newest one (same sets, sizes, metrics) are averaged. Returns the path, or None
    with fewer than two such checkpoints."""
    subfolder = f"limit-{limit}" if limit else ""
    found = [existing_results(p, replace_unreadable=False)
             for p in glob.glob(os.path.join(run_dir, "eval", "ckpt-*", subfolder, "results.json"))]
    found.sort(key=lambda r: r["step"])
    if steps:
        missing = sorted(set(steps) - {r["step"] for r in found})
        if missing:
            raise SystemExit(f"error: --stepavg_steps {missing} of {run_dir} have no results; evaluate them first")
        found = [r for r in found if r["step"] in steps]
    if not found:
        return None

    def shape(r):
        return {name: (b["n"], b["metric"], b["role"]) for name, b in r["benchmarks"].items()}
    chosen = [r for r in found if shape(r) == shape(found[-1])]
    if len(chosen) < len(found):
        log(f"stepavg of {run_dir}: leaving out steps {[r['step'] for r in found if r not in chosen]}, evaluated on "
            f"other sets or sizes than step {found[-1]['step']}")
    if len(chosen) < 2:
        return None
    benchmarks = {name: dict(b, score=sum(r["benchmarks"][name]["score"] for r in chosen) / len(chosen))
                  for name, b in found[-1]["benchmarks"].items()}
    results = {"model": run_dir, "run": found[-1]["run"], "run_dir": run_dir, "step": None,
               "averaged_steps": [r["step"] for r in chosen], "mixture": found[-1]["mixture"],
               "benchmarks": benchmarks, "in_score": weighted_score(benchmarks, "in"),
               "out_score": weighted_score(benchmarks, "out"), "limit": found[-1].get("limit")}
    folder = os.path.join(run_dir, "eval", "stepavg", subfolder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "results.json")
    vlm.write_json_atomic(path, results)
    log(f"{path}: StepAvg over steps {results['averaged_steps']}: in {format_score(results['in_score'])}, "
        f"out {format_score(results['out_score'])}")
    return path


# ----------------------------------------------------------------------------------------------------------------
# The paper's Table 2

PAPER_NAMES = {"lisa": "LISA", "sat": "SAT", "scienceqa": "ScienceQA", "chartqa": "ChartQA", "infovqa": "InfoVQA",
               "mathvista": "MathVista", "mmmu": "MMMU"}


def format_score(value):
    return "-" if value is None else f"{value:.4f}"


def format_mixture(mixture):
    return ", ".join(f"{d} {w:.2f}" for d, w in sorted(mixture.items())) if mixture else "none"


def find_results(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "**", "results.json"), recursive=True))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise SystemExit(f"error: {path}: no such results file or folder")
    if not files:
        raise SystemExit(f"error: no results.json under {', '.join(paths)}")
    return files


def load_results(path):
    try:
        results = read_json(path)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}")
    missing = [k for k in ("run", "step", "mixture", "benchmarks", "in_score", "out_score") if k not in results]
    if missing:
        raise SystemExit(f"error: {path} is not an evaluate.py results file (no {', '.join(missing)})")
    return results


def results_table(all_results):
    """Markdown: one row per results file (run, step, mixture), the benchmarks (in-domain first), In, Out."""
    rows = sorted(all_results, key=lambda r: (r["run"], r["step"] is None, r["step"] or 0))
    names = {}
    for role in ("in", "out"):
        for r in rows:
            for name, b in r["benchmarks"].items():
                if b["role"] == role:
                    names.setdefault(name, b)
    domains = [name.split("/")[0] for name in names]

    def header(name):
        domain, _, split = name.partition("/")
        label = PAPER_NAMES.get(domain, domain)
        return label if domains.count(domain) == 1 else f"{label} ({split})"

    def step_label(r):
        step = "StepAvg " + "/".join(map(str, r["averaged_steps"])) if r["step"] is None else str(r["step"])
        return step + (f" (limit {r['limit']})" if r.get("limit") else "")

    lines = ["| run | step | mixture | " + " | ".join(header(n) for n in names) + " | In | Out |",
             "|---|---|---|" + "---:|" * (len(names) + 2)]
    for r in rows:
        cells = [format_score(r["benchmarks"][n]["score"]) if n in r["benchmarks"] else "-" for n in names]
        lines.append(f"| {r['run']} | {step_label(r)} | {format_mixture(r['mixture'])} | " + " | ".join(cells) +
                     f" | {format_score(r['in_score'])} | {format_score(r['out_score'])} |")
    lines.append("")
    lines.append("In / Out: means over the in-domain / out-of-domain sets weighted by their sizes. Sets: " +
                 "; ".join(f"{header(n)} {b['metric']}, n={b['n']}, {b['role']}" +
                           (f", chance {b['chance']:.2f}" if b.get("chance") is not None else "")
                           for n, b in names.items()) + ".")
    differing = differing_generation_settings(rows)
    if differing:
        lines.append("")
        lines.append("Not comparable as they stand: the rows were generated with different settings: " + "; ".join(
            f"{key} " + ", ".join(f"{value} ({', '.join(runs)})" for value, runs in by_value.items())
            for key, by_value in differing.items()) + ". Score them again with the same " +
            ", ".join(f"--{key}" for key in differing) + ".")
    return "\n".join(lines)


def differing_generation_settings(rows):
    """{setting: {value: [runs]}} for each generation setting on which the rows differ. Why it matters: a
    checkpoint is scored at its training completion length and a base model at 1,024 tokens by default, so a table
    can set a cold start's long answers against a checkpoint's cut ones (docs/testbed_log.md, item 16)."""
    differing = {}
    for key in ("max_new_tokens", "temperature", "max_pixels", "system_prompt"):
        by_value = {}
        for r in rows:
            value = r.get("settings", {}).get("generation", {}).get(key)
            if value is not None and r["run"] not in by_value.setdefault(value, []):
                by_value[value].append(r["run"])
        if len(by_value) > 1:
            differing[key] = by_value
    return differing


# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="a run folder (every ckpt-NNNNNN in it), a checkpoint folder, or a base model: 'tiny', a hub "
                        "name or a save_pretrained folder")
    p.add_argument("--last", action="store_true",
                   help="a run folder: only its newest checkpoint (the end of a finished run), not every one")
    p.add_argument("--table", nargs="+", metavar="PATH",
                   help="print the markdown table of these results.json files (folders: every results.json under "
                        "them) and exit")
    p.add_argument("--data_dir", default="data", help="prepare_data.py's output (default: data)")
    p.add_argument("--sets", default="", help="comma-separated evaluation sets, e.g. lisa/test,chartqa/test "
                                              "(default: every set of the manifest's evaluation lists)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generate call and process (default: 8)")
    p.add_argument("--max_new_tokens", type=int, default=0,
                   help="completion length (default 0: a checkpoint's max_completion_length, 1024 for a base model)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding (default); > 0: sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (process k uses seed + k)")
    p.add_argument("--max_pixels", type=int, default=0,
                   help="image processor's max pixels per image (default 0: a checkpoint's training setting, else "
                        "the model's own)")
    p.add_argument("--system_prompt", default="", choices=["", *vlm.SYSTEM_PROMPTS],
                   help="the named system prompt (vlm.SYSTEM_PROMPTS; r1: the official README's R1 prompt); default: "
                        "a checkpoint's training setting, else 'default' (the chat template's own)")
    p.add_argument("--limit", type=int, default=0,
                   help="only the first N items of each set, for a quick look: results go to <folder>/limit-N/, "
                        "never over a full evaluation's; completions are shared with it (default 0: every item)")
    p.add_argument("--exact_match", action="store_true",
                   help="score the benchmarks by plain exact match with a reference answer (the paper's reporting) "
                        "instead of relaxed accuracy / ANLS / MathVista and MMMU matching")
    p.add_argument("--lmms_eval", action="store_true",
                   help="score InfoVQA and MMMU exactly as lmms-eval does (ANLS over raw lengths, kept at >= 0.5; "
                        "MMMU's substring letter search and seeded random guess); default: our readers")
    p.add_argument("--reward_mode", choices=rewards.REWARD_MODES, default="ours",
                   help="official: score LISA, SAT, ScienceQA (and the synthetic sets) with the official code's "
                        "reward functions on the whole completion, as training with reward_mode=official does "
                        "(default ours: rewards.py's readers on the answer)")
    p.add_argument("--stepavg_steps", default="",
                   help="comma-separated steps the StepAvg averages, e.g. 500,1500,2000 (default: every evaluated "
                        "checkpoint of the run)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: HF generate in this process (default); vllm: a running vLLM server, into which each "
                        "model's weights are loaded first (one process: the server batches)")
    p.add_argument("--vllm_url", default="http://127.0.0.1:8000", help="the vLLM server (default: %(default)s)")
    p.add_argument("--vllm_timeout", type=float, default=300.0,
                   help="seconds one server call may take before the evaluation stops with an error (default 300)")
    p.add_argument("--out_dir", default="", help="folder for a base model's results (default: out/base-<name>)")
    p.add_argument("--force", action="store_true", help="evaluate again even when results with the same settings "
                                                        "exist (cached completions are still reused)")
    args = p.parse_args(argv)
    if not args.table and not args.models:
        p.error("give a model (run folder, checkpoint, base model) or --table")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    for name in ("max_new_tokens", "limit", "max_pixels"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    try:
        args.stepavg_steps = [int(s) for s in args.stepavg_steps.split(",") if s.strip()]
    except ValueError:
        p.error(f"--stepavg_steps must be comma-separated step numbers, got {args.stepavg_steps!r}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.table:
        print(results_table([load_results(p) for p in find_results(args.table)]))
        return
    rank, world, device = init_distributed()
    if args.engine == "vllm" and world > 1:
        raise SystemExit("error: --engine vllm runs in one process (the server batches); drop torchrun")

    def log(message):
        if rank == 0:
            print(message, flush=True)

    models = resolve_models(args.models, args.out_dir, args.last)
    sets = open_test_sets(args.data_dir, [s for s in args.sets.split(",") if s.strip()], args.exact_match,
                          args.reward_mode, args.lmms_eval)
    log(f"{len(models)} model(s) x {len(sets)} set(s) ({', '.join(f'{s.name} {s.role} {s.metric}' for s in sets)}), "
        f"{world} process(es) on {device}")
    rows_of = {s.name: scoring_columns(s, args.limit) for s in sets}
    for s in sets:
        check_solutions(s, rows_of[s.name])
    written = [evaluate_model(model, sets, rows_of, args, rank, world, device, log) for model in models]
    if rank == 0:
        for run_dir in dict.fromkeys(m.run_dir for m in models if m.run_dir):
            path = write_stepavg(run_dir, args.stepavg_steps, log, args.limit)
            if path:
                written.append(read_json(path))
        print()
        print(results_table(written))
    barrier(world)


if __name__ == "__main__":
    main()
