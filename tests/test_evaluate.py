"""evaluate.py: every metric against hand-computed values, the answer parsers, the table from the paper's own rows,
end-to-end evaluations of the tiny Qwen2-VL (one process and two under torchrun), resume, and bad input."""
import io
import json
import os
import random
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from PIL import Image

import evaluate
import vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------------
# metrics

@pytest.mark.parametrize("prediction, target, expected", [
    ("105", "100", 1.0),      # exactly 5 % off
    ("95", "100", 1.0),
    ("105.5", "100", 0.0),    # 5.5 % off
    ("21", "20", 1.0),        # 1/20 = 5 %
    ("12%", "0.12", 1.0),     # a percent sign divides by 100
    ("12", "12%", 0.0),       # 12 vs 0.12
    ("0", "0", 1.0),          # a zero target is compared as text
    ("0.0", "0", 0.0),
    ("Yes", "yes", 1.0),      # text: case-insensitive exact match
    ("yes.", "yes", 0.0),
    ("1,000", "1000", 0.0),   # float() does not read a thousands separator (as lmms-eval)
    ("nan", "nan", 1.0),      # not a finite number: compared as text
])
def test_relaxed_accuracy(prediction, target, expected):
    assert evaluate.relaxed_accuracy(prediction, target) == expected


@pytest.mark.parametrize("prediction, references, expected", [
    ("hello", ["hello"], 1.0),
    ("hellp", ["hello"], 0.8),                 # 1 edit / 5 characters
    ("Hello  World ", ["hello world"], 1.0),   # case and spacing are normalised
    ("abc", ["xyz"], 0.0),                     # NL = 1
    ("ab", ["abcd"], 0.0),                     # NL = 2/4 = 0.5 is not < 0.5
    ("abc", ["abcd"], 0.75),                   # NL = 1/4
    ("abcd", ["wxyz", "abce"], 0.75),          # the best reference counts
    ("", [""], 1.0),
    ("", ["a"], 0.0),
    ("a long answer that goes on and on", ["x"], 0.0),
])
def test_anls(prediction, references, expected):
    assert evaluate.anls(prediction, references) == pytest.approx(expected)


def test_levenshtein():
    assert evaluate.levenshtein("kitten", "sitting") == 3
    assert evaluate.levenshtein("", "abc") == 3
    assert evaluate.levenshtein("flaw", "lawn") == 2


@pytest.mark.parametrize("completion, answer", [
    ("<think>\nx\n</think>\n<answer>\n 42 \n</answer>", "42"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),      # the last tag
    ("<answer>cut off mid-ans", "cut off mid-ans"),            # generation stopped inside the tag
    ("  no tags at all ", "no tags at all"),                   # the whole completion
])
def test_answer_of(completion, answer):
    assert evaluate.answer_of(completion) == answer


MC = {"question_type": "multi_choice", "answer_type": "text", "options": {"A": "3/11", "B": "8/11", "C": "6/11"}}


@pytest.mark.parametrize("answer, meta, expected", [
    ("8/11", MC, "B"),                      # the option's text
    ("(B) 8/11", MC, "B"),                  # bracketed letter
    ("The correct answer is (c)", MC, "C"),
    ("B", MC, "B"),
    ("B. 8/11", MC, "B"),
    ("6/12", MC, "C"),                      # closest option by edit distance (MathVista's rule)
    ("", MC, None),
    ("The answer is 14.", {"question_type": "free_form", "answer_type": "integer"}, 14),
    ("2.7", {"question_type": "free_form", "answer_type": "integer"}, 2),   # int(float(x)) truncates, as MathVista
    ("about 1,250 people", {"question_type": "free_form", "answer_type": "integer"}, 1250),
    ("x = 1.456", {"question_type": "free_form", "answer_type": "float", "precision": 2}, 1.46),
    ("1.50", {"question_type": "free_form", "answer_type": "float", "precision": 1.0}, 1.5),
    ("from 3 to 5, so 5", {"question_type": "free_form", "answer_type": "integer"}, 5),     # the last number
    ("no number", {"question_type": "free_form", "answer_type": "integer"}, None),
    ("[2007, 2008]", {"question_type": "free_form", "answer_type": "list"}, (2007.0, 2008.0)),
    ("between [2007,2008 ]", {"question_type": "free_form", "answer_type": "list"}, (2007.0, 2008.0)),
])
def test_mathvista_answer(answer, meta, expected):
    assert evaluate.mathvista_answer(answer, meta) == expected


def test_mathvista_scores():
    assert evaluate.score_mathvista("(B) 8/11", "<answer>B</answer>", MC) == ("B", 1.0)
    assert evaluate.score_mathvista("C", "<answer>B</answer>", MC) == ("C", 0.0)
    float_meta = {"question_type": "free_form", "answer_type": "float", "precision": 1}
    assert evaluate.score_mathvista("0.6", "<answer>0.6</answer>", float_meta) == (0.6, 1.0)
    assert evaluate.score_mathvista("0.60", "<answer>0.6</answer>", float_meta) == (0.6, 1.0)
    assert evaluate.score_mathvista("0.64", "<answer>0.6</answer>", float_meta) == (0.6, 1.0)  # at precision 1
    assert evaluate.score_mathvista("0.66", "<answer>0.6</answer>", float_meta) == (0.7, 0.0)
    with pytest.raises(ValueError, match="no answer"):
        evaluate.score_mathvista("1", "<answer>many</answer>", {"question_type": "free_form", "answer_type": "integer"})
    with pytest.raises(ValueError, match="options"):
        evaluate.score_mathvista("A", "<answer>A</answer>", {"question_type": "multi_choice"})


OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.mark.parametrize("answer, expected", [
    ("(C)", "C"),
    ("The answer is (B), not (C).", "C"),   # several: the last in the text
    ("B", "B"),
    ("answer: D.", "D"),
    ("C. blue", "C"),
    ("NASA", None),                         # a letter inside a word is no letter
    ("green", "B"),                         # exactly an option's text
    ("I think that the colour of it is blue", "C"),   # > 5 words: an option's text inside
    ("it is blue", None),                   # <= 5 words and not an option: no answer (MMMU guesses at random)
    ("", None),
])
def test_mmmu_choice(answer, expected):
    assert evaluate.mmmu_choice(answer, OPTIONS) == expected


def test_mmmu_open():
    assert set(evaluate.mmmu_open_candidates("So the answer is 1,000 dollars.")) == {1000.0, "1,000 dollars"}
    assert evaluate.mmmu_open_candidates("x = 3.14159") == [3.14]  # a number is kept as a number
    assert evaluate.mmmu_open_candidates("Paris") == ["paris"]
    assert evaluate.mmmu_open_match(evaluate.mmmu_open_candidates("It is 3.14159"), ["3.14"])
    assert not evaluate.mmmu_open_match(evaluate.mmmu_open_candidates("It is 3.2"), ["3.14"])
    assert evaluate.mmmu_open_match(evaluate.mmmu_open_candidates("The city is Paris, France"), ["paris"])
    assert not evaluate.mmmu_open_match(["lyon"], ["paris"])
    # a one-letter reference must stand as a word ("a" inside "cat" does not count)
    assert not evaluate.mmmu_open_match(["cat"], ["a"])
    meta = {"question_type": "open", "answers": ["6", "six"]}
    assert evaluate.score_mmmu("so the result is six", "<answer>6</answer>", meta)[1] == 1.0
    mc = {"question_type": "multiple-choice", "options": OPTIONS}
    assert evaluate.score_mmmu("(D)", "<answer>D</answer>", mc) == ("D", 1.0)


@pytest.mark.parametrize("prediction, references, ours, lmms_eval", [
    ("hello", ["hello"], 1.0, 1.0),
    ("ab", ["abcd"], 0.0, 0.5),                      # NL = 2/4 = 0.5: lmms-eval keeps it (>= 0.5)
    ("hellp", ["hello  "], 0.8, 1 - 1 / 7),          # 1 edit over the raw length 7 of "hello  "
    ("Hello  World ", ["hello world"], 1.0, 1.0),    # no edit: the length does not matter
    ("abcd", ["wxyz", "abce"], 0.75, 0.75),          # the best reference counts
    ("", [""], 1.0, 1.0),
    ("", ["a"], 0.0, 0.0),
    ("a long answer that goes on and on", ["x"], 0.0, 0.0),
])
def test_anls_ours_and_lmms_eval(prediction, references, ours, lmms_eval):
    assert evaluate.anls(prediction, references) == pytest.approx(ours)
    assert evaluate.anls_lmms_eval(prediction, references) == pytest.approx(lmms_eval)


@pytest.mark.parametrize("answer, ours, lmms_eval", [
    ("NASA", None, "A"),                               # lmms-eval's "A " substring test finds the end of NASA
    ("The answer is A.", "A", "A"),
    ("(B) or (D)", "D", "D"),                          # several in brackets: the last
    ("B. red", "B", "B"),
    ("I think that the colour of it is blue", "C", "C"),
    ("green", "B", None),                              # an option's text alone: ours only (lmms-eval guesses)
    ("it is blue", None, None),                        # no letter, <= 5 words: lmms-eval guesses
])
def test_mmmu_choice_ours_and_lmms_eval(answer, ours, lmms_eval):
    assert evaluate.mmmu_choice(answer, OPTIONS) == ours
    guess = random.Random(0).choice(list(OPTIONS))  # "D"
    assert evaluate.mmmu_choice_lmms_eval(answer, OPTIONS, random.Random(0)) == (lmms_eval or guess)


def test_mmmu_lmms_eval_guess_is_seeded_per_record_and_open_answers_split_only_at_line_breaks():
    mc = {"question_type": "multiple-choice", "options": OPTIONS}
    guesses = {evaluate.score_mmmu_lmms_eval("no idea", "<answer>A</answer>", {**mc, "source": {"row": row}})[0]
               for row in range(40)}
    assert guesses == set(OPTIONS)  # a guess per record, not one letter for all
    again = evaluate.score_mmmu_lmms_eval("no idea", "<answer>A</answer>", {**mc, "source": {"row": 7}})
    assert again == evaluate.score_mmmu_lmms_eval("no idea", "<answer>A</answer>", {**mc, "source": {"row": 7}})
    # lmms-eval lower-cases before splitting sentences, so "It is 5. The rest is 7" stays one sentence whose
    # shortest tail after "is " is "7"; ours splits it and keeps "5" too
    assert 5.0 in evaluate.mmmu_open_candidates("It is 5. The rest is 7")
    assert evaluate.mmmu_open_candidates_lmms_eval("It is 5. The rest is 7") == [7.0]
    # three number patterns: "1,000" is read with its comma, and "000" after it as a plain number
    assert set(evaluate.mmmu_open_candidates_lmms_eval("so 1,000")) == {0.0, 1000.0}
    assert evaluate.metric_of("infovqa", {"reward": "anls"}, False, lmms_eval=True) == "anls_lmms_eval"
    assert evaluate.metric_of("mmmu", {"reward": "mmmu_accuracy"}, False, lmms_eval=True) == "mmmu_accuracy_lmms_eval"
    assert evaluate.metric_of("chartqa", {"reward": "relaxed_accuracy"}, False, lmms_eval=True) == "relaxed_accuracy"


def test_exact_match_and_benchmark_scores():
    assert evaluate.score_exact_match(" Paris ", "<answer>paris</answer>", {}) == (" Paris ", 1.0)
    assert evaluate.score_exact_match("Paris.", "<answer>paris</answer>", {})[1] == 0.0
    assert evaluate.score_exact_match("two", "<answer>2</answer>", {"answers": ["2", "two"]})[1] == 1.0
    assert evaluate.score_chartqa("52", "<answer>50</answer>", {}) == ("52", 1.0)
    assert evaluate.score_infovqa("abce", "<answer>x</answer>", {"answers": ["abcd", "x"]}) == ("abce", 0.75)


def test_rewards_domains_score_the_answer_not_the_format():
    # No <think> block, so the format reward is 0; the metric still measures the answer.
    assert evaluate.score_answer("iou", "[0, 0, 10, 10]", "<answer>[0, 0, 10, 20]</answer>", "syn_ground", {}) == \
        ("[0, 0, 10, 10]", 0.5)
    assert evaluate.score_answer("choice", "B", "<answer>B</answer>", "sat", {}) == ("B", 1.0)
    assert evaluate.score_answer("math", "3", "<answer>4</answer>", "syn_count", {}) == ("3", 0.0)
    assert evaluate.accuracy_reward("lisa") == "iou"


def test_official_reward_mode_scores_the_whole_completion_as_the_official_code():
    assert evaluate.metric_of("sat", {"reward": "sat"}, False) == "choice"
    assert evaluate.metric_of("sat", {"reward": "sat"}, False, "official") == "choice_official"
    assert evaluate.metric_of("chartqa", {"reward": "relaxed_accuracy"}, False, "official") == "relaxed_accuracy"

    def both(completion, solution, domain, metric):
        return [evaluate.score_answer(m, evaluate.text_to_score(m, completion), solution, domain, {})
                for m in (metric, metric + "_official")]
    # the official letter reader takes the article of "A cat" for the option A
    assert both("<think>\nx\n</think>\n<answer>\nA cat\n</answer>", "<answer>A</answer>", "sat", "choice") == \
        [("A cat", 0.0), ("<think>\nx\n</think>\n<answer>\nA cat\n</answer>", 1.0)]
    # a plain box is no answer to the official detection reward (it needs Position/Confidence objects)
    assert both("<think>\nx\n</think><answer>[20, 20, 60, 52]</answer>", "[20, 20, 60, 60]", "lisa", "iou") == \
        [("[20, 20, 60, 52]", pytest.approx(0.8)), ("[20, 20, 60, 52]", 0.0)]


def test_weighted_score_is_size_weighted():
    benchmarks = {"a/test": {"score": 0.5, "n": 100, "role": "in"}, "b/test": {"score": 1.0, "n": 300, "role": "in"},
                  "c/test": {"score": 0.2, "n": 10, "role": "out"}}
    assert evaluate.weighted_score(benchmarks, "in") == pytest.approx((0.5 * 100 + 1.0 * 300) / 400)
    assert evaluate.weighted_score(benchmarks, "out") == pytest.approx(0.2)
    assert evaluate.weighted_score({}, "in") is None


# ----------------------------------------------------------------------------------------------------------------
# the paper's Table 2 from fixture results: rows re-typed from the paper (arXiv 2505.24871, Table 2)

PAPER_SIZES = {"lisa/test": 3397, "sat/test": 1928, "scienceqa/test": 2017, "chartqa/test": 2500,
               "infovqa/val": 2801, "mathvista/testmini": 1000, "mmmu/val": 900}
PAPER_ROWS = {  # run: (mixture, LISA, SAT, ScienceQA, ChartQA, InfoVQA, MathVista, MMMU, InScore, OutScore)
    "base": ({}, "0.1525 0.2479 0.0486 0.236 0.3144 0.391 0.3789", "0.149 0.3059"),
    "1": ({"coco": 1.0}, "0.4015 0.5047 0.0258 0.41 0.5357 0.436 0.3811", "0.3254 0.4589"),
    "2345": ({"lisa": 0.25, "geoqav": 0.25, "sat": 0.25, "scienceqa": 0.25},
             "0.4393 0.5897 0.7313 0.5644 0.5319 0.443 0.4022", "0.559 0.5146"),
    "12345": ({d: 0.2 for d in ("coco", "lisa", "geoqav", "sat", "scienceqa")},
              "0.4778 0.5737 0.6991 0.4816 0.4681 0.435 0.41", "0.5638 0.4609"),
}


def test_table_reproduces_paper_rows(tmp_path, capsys):
    metrics = ["iou", "choice", "choice", "relaxed_accuracy", "anls", "mathvista_accuracy", "mmmu_accuracy"]
    for run, (mixture, scores, _) in PAPER_ROWS.items():
        benchmarks = {name: {"score": float(s), "n": PAPER_SIZES[name], "metric": metric,
                             "role": "in" if i < 3 else "out"}
                      for i, (name, s, metric) in enumerate(zip(PAPER_SIZES, scores.split(), metrics))}
        results = {"model": run, "run": run, "step": 0 if run == "base" else 2000, "mixture": mixture,
                   "benchmarks": benchmarks, "in_score": evaluate.weighted_score(benchmarks, "in"),
                   "out_score": evaluate.weighted_score(benchmarks, "out")}
        os.makedirs(tmp_path / run)
        (tmp_path / run / "results.json").write_text(json.dumps(results))
    evaluate.main(["--table", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| run | step | mixture | LISA | SAT | ScienceQA | ChartQA | InfoVQA | MathVista | MMMU | In "
                        "| Out |")
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:6])}
    assert list(rows) == ["1", "12345", "2345", "base"]
    for run, (_, scores, in_out) in PAPER_ROWS.items():
        expected = [f"{float(v):.4f}" for v in (scores + " " + in_out).split()]
        assert rows[run][3:] == expected, run  # In and Out recomputed from the columns match the paper's
    assert rows["1"][2] == "coco 1.00"
    assert rows["base"][2] == "none"
    assert "LISA iou, n=3397, in" in lines[-1] and "MMMU mmmu_accuracy, n=900, out" in lines[-1]


def test_chance_is_the_mean_of_one_over_the_options_and_shown_in_the_table(tmp_path, capsys):
    two, four = {"options": {"A": "x", "B": "y"}}, {"options": {k: k for k in "ABCD"}}
    assert evaluate.chance_score([("a", "", two), ("b", "", four)]) == pytest.approx(0.375)  # (1/2 + 1/4) / 2
    assert evaluate.chance_score([("a", "", two), ("b", "", {})]) is None  # an open answer has no chance level
    assert evaluate.chance_score([]) is None
    benchmarks = {"compare/test": {"score": 0.5, "n": 2, "metric": "choice", "role": "out", "chance": 0.375},
                  "count/test": {"score": 0.1, "n": 3, "metric": "math", "role": "in", "chance": None}}
    (tmp_path / "results.json").write_text(json.dumps({"run": "r", "step": 3, "mixture": {}, "benchmarks": benchmarks,
                                                       "in_score": 0.1, "out_score": 0.5}))
    evaluate.main(["--table", str(tmp_path)])
    footer = capsys.readouterr().out.splitlines()[-1]
    assert footer.endswith("Sets: count math, n=3, in; compare choice, n=2, out, chance 0.38.")


def test_table_says_when_its_rows_were_generated_with_different_settings(tmp_path, capsys):
    """A cold start scored at 1,024 tokens next to checkpoints scored at their training length (128) is named under
    the table; rows generated alike get no such line."""
    benchmarks = {"count/test": {"score": 0.5, "n": 2, "metric": "math", "role": "in"}}

    def write(run, step, max_new_tokens):
        generation = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "max_pixels": 0, "system_prompt": "default"}
        os.makedirs(tmp_path / run / str(step))
        (tmp_path / run / str(step) / "results.json").write_text(json.dumps(
            {"run": run, "step": step, "mixture": {}, "benchmarks": benchmarks, "in_score": 0.5, "out_score": None,
             "settings": {"generation": generation}}))

    write("grpo", 50, 128)
    write("grpo", 100, 128)
    evaluate.main(["--table", str(tmp_path)])
    assert "Not comparable" not in capsys.readouterr().out
    write("cold", 0, 1024)
    evaluate.main(["--table", str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[-1] == (
        "Not comparable as they stand: the rows were generated with different settings: max_new_tokens 1024 (cold), "
        "128 (grpo). Score them again with the same --max_new_tokens.")


def test_table_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        evaluate.main(["--table", str(tmp_path)])
    (tmp_path / "results.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(SystemExit, match="not an evaluate.py results file"):
        evaluate.main(["--table", str(tmp_path / "results.json")])


# ----------------------------------------------------------------------------------------------------------------
# end to end: small test sets in the record format, tiny checkpoints in a run folder

def png(size, color):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


SETS = {  # name: (role, manifest reward, [(solution, meta)])
    "syn_count/test": ("in", "syn_count", [("<answer>2</answer>", {}), ("<answer>0</answer>", {}),
                                           ("<answer>5</answer>", {})]),
    "syn_ground/test": ("in", "syn_ground", [("<answer>[4, 4, 30, 30]</answer>", {"image_size": [56, 56]}),
                                             ("<answer>[10, 12, 50, 40]</answer>", {"image_size": [56, 56]})]),
    "chartqa/test": ("out", "relaxed_accuracy", [("<answer>17</answer>", {}), ("<answer>Yes</answer>", {})]),
    "mmmu/val": ("out", "mmmu_accuracy", [("<answer>B</answer>", {"question_type": "multiple-choice",
                                                                 "options": {"A": "red", "B": "blue"}}),
                                          ("<answer>6</answer>", {"question_type": "open", "answers": ["6"]})]),
}


def write_test_sets(data_dir):
    features = datasets.Features({"id": datasets.Value("string"), "domain": datasets.Value("string"),
                                  "image": datasets.Image(), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string"), "meta": datasets.Value("string")})
    manifest = {"format_version": 1, "datasets": {}, "evaluation": {"in_domain": [], "out_of_domain": []}}
    for name, (role, reward, items) in SETS.items():
        domain, split = name.split("/")
        records = [{"id": f"{domain}-{split}-{i}", "domain": domain,
                    "image": {"bytes": png(56, ("red", "blue", "green")[i % 3]), "path": None},
                    "problem": f"Question {i} about {domain}? Output the final answer in <answer> </answer> tags.",
                    "solution": solution, "meta": json.dumps(meta)} for i, (solution, meta) in enumerate(items)]
        datasets.Dataset.from_list(records, features=features).save_to_disk(os.path.join(data_dir, name))
        manifest["datasets"][domain] = {"source": "test", "reward": reward,
                                        "role": "train" if role == "in" else "benchmark",
                                        "splits": {split: {"path": name, "rows": len(records),
                                                           "fingerprint": f"fp-{name}", "n_skipped": 0,
                                                           "files_sha256": vlm.split_files_sha256(
                                                               os.path.join(data_dir, name)),
                                                           "skipped": []}}}
        manifest["evaluation"]["in_domain" if role == "in" else "out_of_domain"].append(name)
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def write_checkpoint(run_dir, step, seed, mixture, system_prompt="default"):
    """A tiny Qwen2-VL checkpoint as train_grpo.py saves one. Its weights are drawn with std 0.1: with the default
    0.02 the untrained model repeats the last prompt token for every item, and the tests need completions that
    differ between items."""
    folder = os.path.join(run_dir, f"ckpt-{step:06d}")
    model, tokenizer, image_processor = vlm.load_policy("tiny", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    vlm.save_policy(model, tokenizer, image_processor, folder)
    config = {"max_completion_length": 8, "max_pixels": 0, "system_prompt": system_prompt}
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"step": step, "mixture_weights": mixture, "planned_steps": 20, "config": config}, f)
    vlm.write_checksums(folder)
    return folder


MIXTURE = {"syn_count": 0.75, "syn_ground": 0.25}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data_dir, run_dir = str(root / "data"), str(root / "run")
    write_test_sets(data_dir)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"config": {}, "mixture_weights": MIXTURE, "planned_steps": 20, "processes": 1,
                   "start_from": "tiny"}, f)
    write_checkpoint(run_dir, 10, seed=0, mixture=MIXTURE)
    write_checkpoint(run_dir, 20, seed=1, mixture=MIXTURE, system_prompt="r1")
    return root, data_dir, run_dir


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_results(results, predictions):
    """Every stored score recomputes from the stored completions; In/Out from the benchmark scores."""
    rows = {name: items for name, (_, _, items) in SETS.items()}
    for name, bench in results["benchmarks"].items():
        mine = [p for p in predictions if p["set"] == name]
        assert bench["n"] == len(mine) == len(rows[name])
        domain = name.split("/")[0]
        for p, (solution, meta) in zip(mine, rows[name]):
            assert p["solution"] == solution
            assert evaluate.score_answer(bench["metric"], evaluate.answer_of(p["completion"]), solution, domain,
                                         meta) == (p["answer"], p["score"])
        assert bench["score"] == pytest.approx(sum(p["score"] for p in mine) / len(mine))
    in_n = sum(len(SETS[n][2]) for n in SETS if SETS[n][0] == "in")
    assert results["in_score"] == pytest.approx(
        sum(b["score"] * b["n"] for b in results["benchmarks"].values() if b["role"] == "in") / in_n)


def test_evaluate_run_end_to_end(workspace, capsys):
    root, data_dir, run_dir = workspace
    evaluate.main([run_dir, "--data_dir", data_dir, "--batch_size", "2"])
    out = capsys.readouterr().out
    steps = {}
    for step in (10, 20):
        folder = os.path.join(run_dir, "eval", f"ckpt-{step:06d}")
        assert sorted(os.listdir(folder)) == ["predictions.jsonl", "results.json"]  # no cache, no temporary file
        results = json.load(open(os.path.join(folder, "results.json")))
        assert results["step"] == step and results["mixture"] == MIXTURE and results["run"] == "run"
        assert {n: (b["metric"], b["role"]) for n, b in results["benchmarks"].items()} == {
            "syn_count/test": ("math", "in"), "syn_ground/test": ("iou", "in"),
            "chartqa/test": ("relaxed_accuracy", "out"), "mmmu/val": ("mmmu_accuracy", "out")}
        assert results["settings"]["generation"]["max_new_tokens"] == 8  # the checkpoint's own settings
        assert results["settings"]["generation"]["system_prompt"] == {10: "default", 20: "r1"}[step]
        check_results(results, read_jsonl(os.path.join(folder, "predictions.jsonl")))
        steps[step] = results
    stepavg = json.load(open(os.path.join(run_dir, "eval", "stepavg", "results.json")))
    assert stepavg["step"] is None and stepavg["averaged_steps"] == [10, 20]
    for name, bench in stepavg["benchmarks"].items():
        assert bench["score"] == pytest.approx((steps[10]["benchmarks"][name]["score"] +
                                                steps[20]["benchmarks"][name]["score"]) / 2)
    assert stepavg["in_score"] == pytest.approx((steps[10]["in_score"] + steps[20]["in_score"]) / 2)
    table = out[out.index("| run |"):]
    assert "| run | 10 | syn_count 0.75, syn_ground 0.25 |" in table and "| run | StepAvg 10/20 |" in table
    assert "syn_count (test)" not in table and "| syn_count | syn_ground | ChartQA | MMMU | In | Out |" in table

    # A second call finds every result up to date and generates nothing.
    mtime = os.path.getmtime(os.path.join(run_dir, "eval", "ckpt-000010", "results.json"))
    evaluate.main([run_dir, "--data_dir", data_dir])
    assert capsys.readouterr().out.count("up to date") == 2
    assert os.path.getmtime(os.path.join(run_dir, "eval", "ckpt-000010", "results.json")) == mtime


def test_resume_from_a_killed_evaluation(workspace):
    root, data_dir, _ = workspace
    out_dir = str(root / "base-tiny")
    evaluate.main(["tiny", "--data_dir", data_dir, "--out_dir", out_dir, "--max_new_tokens", "6", "--limit", "1"])
    first = json.load(open(os.path.join(out_dir, "limit-1", "results.json")))
    assert first["step"] == 0 and first["mixture"] == {} and first["limit"] == 1
    assert {b["n"] for b in first["benchmarks"].values()} == {1}

    # The state a kill leaves: completions cached, no results. One cached completion is replaced by the right
    # answer, so its use is visible; the last line was cut mid-write and must be regenerated.
    predictions = read_jsonl(os.path.join(out_dir, "limit-1", "predictions.jsonl"))
    predictions[0]["completion"] = "<answer>2</answer>"  # syn_count-test-0's solution
    cache = os.path.join(out_dir, ".partial")
    shutil.rmtree(cache)
    os.makedirs(cache)
    json.dump(first["settings"]["generation"], open(os.path.join(cache, "settings.json"), "w"))
    lines = [json.dumps({"set": p["set"], "id": p["id"], "completion": p["completion"]}) for p in predictions]
    with open(os.path.join(cache, "killed-1.jsonl"), "w") as f:
        f.write("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    shutil.rmtree(os.path.join(out_dir, "limit-1"))

    evaluate.main(["tiny", "--data_dir", data_dir, "--out_dir", out_dir, "--max_new_tokens", "6"])
    results = json.load(open(os.path.join(out_dir, "results.json")))
    predictions = read_jsonl(os.path.join(out_dir, "predictions.jsonl"))
    assert sorted(os.listdir(out_dir)) == ["predictions.jsonl", "results.json"]
    assert len(predictions) == sum(len(items) for _, _, items in SETS.values())
    assert predictions[0]["completion"] == "<answer>2</answer>" and predictions[0]["score"] == 1.0
    check_results(results, predictions)

    # Scoring differently (--exact_match) reuses the completions: the replaced one is still there.
    evaluate.main(["tiny", "--data_dir", data_dir, "--out_dir", out_dir, "--max_new_tokens", "6", "--exact_match"])
    rescored = json.load(open(os.path.join(out_dir, "results.json")))
    assert {n: b["metric"] for n, b in rescored["benchmarks"].items()} == {
        "syn_count/test": "math", "syn_ground/test": "iou", "chartqa/test": "exact_match", "mmmu/val": "exact_match"}
    assert read_jsonl(os.path.join(out_dir, "predictions.jsonl"))[0]["completion"] == "<answer>2</answer>"


def test_a_quick_look_never_replaces_a_full_evaluation(workspace, tmp_path, capsys, monkeypatch):
    root, data_dir, run_dir = workspace
    common = ["tiny", "--data_dir", data_dir, "--out_dir", str(tmp_path), "--max_new_tokens", "3"]
    evaluate.main(common)
    full = {name: (tmp_path / name).read_bytes() for name in ("results.json", "predictions.jsonl")}

    def no_generation(*args):
        raise AssertionError("the quick look generated instead of reading the full evaluation's completions")
    monkeypatch.setattr(evaluate, "hf_engine", no_generation)
    evaluate.main(common + ["--limit", "1"])
    assert {name: (tmp_path / name).read_bytes() for name in full} == full
    quick = json.load(open(tmp_path / "limit-1" / "results.json"))
    assert quick["limit"] == 1 and {b["n"] for b in quick["benchmarks"].values()} == {1}
    first_items = {}
    for p in read_jsonl(tmp_path / "predictions.jsonl"):
        first_items.setdefault(p["set"], p)
    assert read_jsonl(tmp_path / "limit-1" / "predictions.jsonl") == list(first_items.values())
    capsys.readouterr()
    evaluate.main(common)  # the full results are still current
    assert "results.json: up to date" in capsys.readouterr().out

    # A run's quick look: each checkpoint's in limit-1/, and their StepAvg in stepavg/limit-1/.
    monkeypatch.undo()
    run = root / "quick-run"
    for step in (10, 20):
        shutil.copytree(os.path.join(run_dir, f"ckpt-{step:06d}"), run / f"ckpt-{step:06d}")
    evaluate.main([str(run), "--data_dir", data_dir, "--limit", "1"])
    assert sorted(os.listdir(run / "eval")) == ["ckpt-000010", "ckpt-000020", "stepavg"]
    assert sorted(os.listdir(run / "eval" / "stepavg")) == ["limit-1"]
    stepavg = json.load(open(run / "eval" / "stepavg" / "limit-1" / "results.json"))
    assert stepavg["averaged_steps"] == [10, 20] and stepavg["limit"] == 1
    assert not os.path.exists(run / "eval" / "ckpt-000010" / "results.json")


def run_cli(args, cwd, **env):
    environment = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **env)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, environment.get("PYTHONPATH")]))
    done = subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_torchrun_two_processes_give_the_same_results(workspace):
    root, data_dir, run_dir = workspace
    for processes in (1, 2):  # the same checkpoint in two run folders, so the results land apart
        shutil.copytree(os.path.join(run_dir, "ckpt-000020"), root / f"dp{processes}" / "ckpt-000020")
    common = ["--data_dir", data_dir, "--batch_size", "1"]
    # One process in this one, single-threaded as each torchrun worker is, so the arithmetic is the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluate.main([str(root / "dp1" / "ckpt-000020")] + common)
    finally:
        torch.set_num_threads(threads)
    run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             os.path.join(ROOT, "evaluate.py"), str(root / "dp2" / "ckpt-000020")] + common, cwd=str(root))
    outputs = {}
    for processes in (1, 2):
        folder = root / f"dp{processes}" / "eval" / "ckpt-000020"
        results = json.load(open(folder / "results.json"))
        assert results["processes"] == processes
        outputs[processes] = (results["benchmarks"], results["in_score"], results["out_score"],
                              (folder / "predictions.jsonl").read_text())
    assert outputs[1] == outputs[2]
    completions = [json.loads(line)["completion"] for line in outputs[2][3].splitlines()]
    assert len(completions) == sum(len(items) for _, _, items in SETS.values())  # every item, merged once
    assert len(set(completions)) > len(completions) // 2  # the items got different completions


# ----------------------------------------------------------------------------------------------------------------
# the contract with prepare_data.py: its real output (the synthetic suite, and the paper's sets and benchmarks
# converted from raw-schema fixtures) is read, and every gold answer earns full marks under its set's metric

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    import prepare_data
    import raw_fixtures
    root = tmp_path_factory.mktemp("prepared")
    data_dir = str(root / "data")
    prepare_data.main(["--data_dir", data_dir, "--n_train", "2", "--n_test", "4"])
    sources = [("lisa", raw_fixtures.lisa_test(), None, "test"), ("sat", raw_fixtures.sat(), None, "test"),
               ("scienceqa", raw_fixtures.scienceqa(), None, "test"), ("chartqa", raw_fixtures.chartqa(), "test", None),
               ("infovqa", raw_fixtures.infovqa(), "validation", None),
               ("mathvista", raw_fixtures.mathvista(), "testmini", None), ("mmmu", raw_fixtures.mmmu(), "validation", None)]
    for name, raw, raw_split, split in sources:
        source = raw_fixtures.save(raw, root / f"raw-{name}", split=raw_split)
        prepare_data.main(["--dataset", name, "--source", source, "--data_dir", data_dir] +
                          (["--split", split] if split else []))
    return root, data_dir


def test_gold_answers_of_prepared_data_earn_full_marks(prepared):
    _, data_dir = prepared
    sets = evaluate.open_test_sets(data_dir)
    assert {s.name: s.metric for s in sets} == {
        "lisa/test": "iou", "sat/test": "choice", "scienceqa/test": "choice", "chartqa/test": "relaxed_accuracy",
        "infovqa/val": "anls", "mathvista/testmini": "mathvista_accuracy", "mmmu/val": "mmmu_accuracy",
        "syn_detect/test": "detection", "syn_ground/test": "iou", "syn_count/test": "math",
        "syn_spatial/test": "choice", "syn_science/test": "choice", "syn_chart/test": "math",
        "syn_colorcount/test": "math", "syn_compare/test": "choice"}
    for s in sets:
        rows = evaluate.scoring_columns(s, 0)
        assert rows, s.name
        for record_id, solution, meta in rows:
            gold = evaluate.answer_of(solution)
            assert evaluate.score_answer(s.metric, gold, solution, s.domain, meta)[1] == 1.0, (record_id, gold)
            assert evaluate.score_answer(s.metric, "", solution, s.domain, meta)[1] == 0.0, record_id
            options = meta.get("options", {})
            if gold in options:  # the right option's text is as good as its letter
                assert evaluate.score_answer(s.metric, options[gold], solution, s.domain, meta)[1] == 1.0, record_id


def test_evaluate_tiny_on_prepared_data(prepared, capsys):
    root, data_dir = prepared
    evaluate.main(["tiny", "--data_dir", data_dir, "--out_dir", str(root / "base-tiny"), "--max_new_tokens", "4"])
    results = json.load(open(root / "base-tiny" / "results.json"))
    assert len(read_jsonl(root / "base-tiny" / "predictions.jsonl")) == sum(b["n"] for b in results["benchmarks"].values())
    assert {n: b["n"] for n, b in results["benchmarks"].items() if not n.startswith("syn_")} == {
        "lisa/test": 1, "sat/test": 2, "scienceqa/test": 1, "chartqa/test": 1, "infovqa/val": 1,
        "mathvista/testmini": 3, "mmmu/val": 3}
    header = capsys.readouterr().out.split("| run |")[1].splitlines()[0]
    assert header.startswith(" step | mixture | LISA | SAT | ScienceQA | syn_count | syn_detect | syn_ground | "
                             "syn_science | syn_spatial | ChartQA | InfoVQA | MathVista | MMMU | syn_chart |")


def test_last_takes_only_the_newest_checkpoint_of_a_run(workspace):
    _, _, run_dir = workspace
    assert [m.step for m in evaluate.resolve_models([run_dir], "")] == [10, 20]
    newest = evaluate.resolve_models([run_dir], "", last=True)
    assert [(m.step, m.folder) for m in newest] == [(20, os.path.join(run_dir, "eval", "ckpt-000020"))]


# ----------------------------------------------------------------------------------------------------------------
# bad input

def test_incomplete_or_corrupt_checkpoint_is_an_error(workspace, tmp_path):
    _, data_dir, run_dir = workspace
    broken = str(tmp_path / "run" / "ckpt-000010")
    shutil.copytree(os.path.join(run_dir, "ckpt-000010"), broken)
    os.remove(os.path.join(broken, vlm.CHECKSUMS))
    with pytest.raises(SystemExit, match=r"ckpt-000010 is incomplete \(no checksums.json"):
        evaluate.main([broken, "--data_dir", data_dir])
    with pytest.raises(SystemExit, match="is incomplete"):  # a run folder with such a checkpoint
        evaluate.main([str(tmp_path / "run"), "--data_dir", data_dir])
    vlm.write_checksums(broken)
    with open(os.path.join(broken, "config.json"), "a") as f:
        f.write(" ")
    with pytest.raises(SystemExit, match="corrupt file config.json"):
        evaluate.main([broken, "--data_dir", data_dir])
    partial = str(tmp_path / "run" / "ckpt-000030.partial")
    os.makedirs(partial)
    with pytest.raises(SystemExit, match="incomplete"):
        evaluate.main([partial, "--data_dir", data_dir])


def test_a_folder_that_is_no_model_is_an_error_before_any_work(workspace, tmp_path):
    _, data_dir, run_dir = workspace
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a model")
    with pytest.raises(SystemExit, match=r"notes is not a checkpoint \(trainer_state.json\), a run folder"):
        evaluate.main([str(tmp_path / "notes"), "--data_dir", data_dir])
    with pytest.raises(SystemExit, match="nor a model folder"):  # found before the (here missing) data is read
        evaluate.main([str(tmp_path / "notes"), "--data_dir", str(tmp_path / "no-data")])


def test_a_cut_results_file_is_an_error_and_force_replaces_it(workspace, tmp_path):
    _, data_dir, _ = workspace
    common = ["tiny", "--data_dir", data_dir, "--out_dir", str(tmp_path), "--max_new_tokens", "2", "--limit", "1"]
    evaluate.main(common)
    path = tmp_path / "limit-1" / "results.json"
    whole = path.read_text()
    path.write_text(whole[:40])
    with pytest.raises(SystemExit, match=r"limit-1/results.json is not a readable results file .*--force"):
        evaluate.main(common)
    evaluate.main(common + ["--force"])
    assert json.loads(path.read_text())["benchmarks"] == json.loads(whole)["benchmarks"]


def edited_data(workspace, tmp_path, edit):
    """A copy of the test data with the manifest edited by `edit`."""
    data_dir = str(tmp_path / "data")
    shutil.copytree(workspace[1], data_dir)
    path = os.path.join(data_dir, "manifest.json")
    manifest = json.load(open(path))
    edit(manifest, data_dir)
    json.dump(manifest, open(path, "w"))
    return data_dir


def wrong_rows(manifest, data_dir):
    manifest["datasets"]["chartqa"]["splits"]["test"]["rows"] = 3


def missing_folder(manifest, data_dir):
    shutil.rmtree(os.path.join(data_dir, "mmmu", "val"))


def unknown_set(manifest, data_dir):
    manifest["evaluation"]["out_of_domain"].append("docvqa/val")


def unknown_metric(manifest, data_dir):
    manifest["datasets"]["chartqa"]["reward"] = "bleu"


def other_domain(manifest, data_dir):
    manifest["datasets"]["syn_other"] = manifest["datasets"].pop("syn_count")
    manifest["evaluation"]["in_domain"][0] = "syn_other/test"


def bad_solution(manifest, data_dir):
    path = os.path.join(data_dir, "syn_count", "test")
    dataset = datasets.load_from_disk(path)
    dataset = dataset.map(lambda r: {"solution": "<answer>many</answer>" if r["id"].endswith("-1") else r["solution"]})
    dataset.save_to_disk(path + "-new")
    shutil.rmtree(path)
    os.rename(path + "-new", path)
    manifest["datasets"]["syn_count"]["splits"]["test"]["files_sha256"] = vlm.split_files_sha256(path)


def other_content(manifest, data_dir):
    """Same rows, same ids, one problem reworded: the manifest no longer describes the data."""
    path = os.path.join(data_dir, "chartqa", "test")
    dataset = datasets.load_from_disk(path).map(lambda r: {"problem": r["problem"].replace("Question", "Query")})
    dataset.save_to_disk(path + "-new")
    shutil.rmtree(path)
    os.rename(path + "-new", path)


def cut_arrow_file(manifest, data_dir):
    path = os.path.join(data_dir, "mmmu", "val", "data-00000-of-00001.arrow")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def no_state_file(manifest, data_dir):
    os.remove(os.path.join(data_dir, "mmmu", "val", "state.json"))


def older_manifest(manifest, data_dir):
    del manifest["datasets"]["mmmu"]["splits"]["val"]["files_sha256"]


@pytest.mark.parametrize("edit, message", [
    (other_content, r"chartqa/test \(chartqa/test in .*manifest.json\) holds other data than the manifest lists"),
    (cut_arrow_file, r"mmmu/val \(mmmu/val in .*\) holds other data .* run prepare_data.py again"),
    (no_state_file, r"mmmu/val \(mmmu/val in .*\) is not a complete dataset folder .*state.json"),
    (older_manifest, r"lists mmmu/val without files_sha256 \(an older prepare_data.py wrote it\)"),
    (wrong_rows, r"chartqa/test has 2 rows but .*manifest.json says 3"),
    (missing_folder, r"mmmu/val \(mmmu/val in .*manifest.json\) does not exist: run prepare_data.py again"),
    (unknown_set, r"evaluation set docvqa/val is not a dataset split"),
    (unknown_metric, r"domain 'chartqa' has reward 'bleu', which is neither"),
    (other_domain, r"row 0 \(id syn_count-test-0\) has domain 'syn_count', not 'syn_other'"),
    (bad_solution, r"syn_count/test record syn_count-test-1: .*many"),
])
def test_test_set_not_matching_the_manifest_is_an_error(workspace, tmp_path, edit, message):
    data_dir = edited_data(workspace, tmp_path, edit)
    with pytest.raises(SystemExit, match=message):
        evaluate.main(["tiny", "--data_dir", data_dir, "--out_dir", str(tmp_path / "out"), "--max_new_tokens", "2"])
    assert not os.path.exists(tmp_path / "out")  # nothing generated, nothing written


def test_results_are_not_up_to_date_against_changed_data(workspace, tmp_path):
    """A finished evaluation, then the test data changes under the same manifest: an error, not "up to date"."""
    data_dir = edited_data(workspace, tmp_path, lambda manifest, data_dir: None)
    common = ["tiny", "--data_dir", data_dir, "--out_dir", str(tmp_path / "out"), "--max_new_tokens", "2"]
    evaluate.main(common + ["--limit", "1"])
    before = (tmp_path / "out" / "limit-1" / "results.json").read_text()
    other_content(None, data_dir)
    with pytest.raises(SystemExit, match="holds other data than the manifest lists"):
        evaluate.main(common + ["--limit", "1"])
    assert (tmp_path / "out" / "limit-1" / "results.json").read_text() == before


def test_bad_arguments(workspace, tmp_path):
    _, data_dir, run_dir = workspace
    with pytest.raises(SystemExit, match="--out_dir is the folder of one base model"):
        evaluate.main([run_dir, "--data_dir", data_dir, "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="not in the evaluation lists"):
        evaluate.main(["tiny", "--data_dir", data_dir, "--sets", "syn_count/train"])
    with pytest.raises(SystemExit, match="manifest.json not found"):
        evaluate.main(["tiny", "--data_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        evaluate.main([])  # neither a model nor --table
