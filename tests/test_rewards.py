"""Hand-computed expected values for every reward of rewards.py, the router's totals, bad solutions, and the CLI."""
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import rewards
from rewards import (DOMAIN_REWARDS, SolutionError, choice_reward, detection_reward, format_reward, iou_reward,
                     math_reward, max_total, parse_solution, score)

REPO = Path(__file__).resolve().parents[1]


def formatted(answer, think="I look at the image."):
    """A completion in the official strict layout."""
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


# --------------------------------------------------------------------------------------------------------------
# format

@pytest.mark.parametrize("completion, strict, lenient", [
    (formatted("B"), 1.0, 1.0),
    (formatted("B") + "\n", 1.0, 1.0),  # trailing whitespace after </answer> is fine
    (formatted("B", think="line one\nline two\n\nline four"), 1.0, 1.0),  # multi-line reasoning
    ("<think>x</think><answer>B</answer>", 0.0, 1.0),  # no newlines: only the lenient form
    ("  <think> x </think>\n\n <answer> B </answer>  ", 0.0, 1.0),
    (formatted("B") + "\nP.S. more text", 0.0, 0.0),  # the official MULTILINE `$` accepted this
    ("Sure! " + formatted("B"), 0.0, 0.0),
    (formatted("B") + "\n<answer>\nC\n</answer>", 0.0, 0.0),  # two answers: a hedge
    ("<think>\n<answer>\nA\n</answer>\n</think>\n<answer>\nB\n</answer>", 0.0, 0.0),  # an answer inside think
    ("<answer>\nB\n</answer>", 0.0, 0.0),  # no think
    ("<think>\nx\n</think>\n<answer>\nB", 0.0, 0.0),  # cut off mid-answer
    ("<answer>\nB\n</answer>\n<think>\nx\n</think>", 0.0, 0.0),  # wrong order
    ("<think>\n</think>\n<answer>\nB\n</answer>", 0.0, 1.0),  # strict wants a line inside think (as the official)
    ("", 0.0, 0.0),
])
def test_format_reward(completion, strict, lenient):
    assert format_reward(completion) == strict  # strict is the default
    assert format_reward(completion, mode="strict") == strict
    assert format_reward(completion, mode="lenient") == lenient


def test_format_mode_is_checked():
    with pytest.raises(ValueError, match="format mode"):
        format_reward(formatted("B"), mode="loose")


# --------------------------------------------------------------------------------------------------------------
# choice

OPTIONS = {"options": {"A": "blue", "B": "Red", "C": "green"}}


@pytest.mark.parametrize("answer, solution, meta, expected", [
    ("B", "<answer>B</answer>", None, 1.0),
    ("(B)", "<answer>B</answer>", None, 1.0),
    ("B.", "<answer>B</answer>", None, 1.0),
    ("b", "<answer>B</answer>", None, 1.0),
    ("B) red", "<answer>B</answer>", None, 1.0),
    ("(B) The red one, on the left.", "<answer>B</answer>", None, 1.0),
    ("The answer is B.", "<answer>B</answer>", None, 1.0),
    ("Answer: (C)", "<answer>B</answer>", None, 0.0),
    ("the answer is A, no wait, the answer is B", "<answer>B</answer>", None, 1.0),  # the last one said
    ("\\boxed{B}", "<answer>B</answer>", None, 1.0),
    ("**B**", "<answer>B</answer>", None, 1.0),
    ("red", "<answer>B</answer>", OPTIONS, 1.0),  # the option's text, case and spacing aside
    ("blue", "<answer>B</answer>", OPTIONS, 0.0),
    ("red", "<answer>B</answer>", None, 0.0),  # no text known: only letters count
    ("red.", "<answer>B. red</answer>", None, 1.0),  # the solution carries the text
    ("A cat sits on the left", "<answer>A</answer>", None, 0.0),  # an article, not an option (the code read A)
    ("A, B", "<answer>A</answer>", None, 0.0),  # a hedge names nothing
    ("", "<answer>B</answer>", None, 0.0),
])
def test_choice_reward(answer, solution, meta, expected):
    assert choice_reward(formatted(answer), solution, meta) == expected


def test_choice_reads_the_last_answer_tag_across_lines_and_cut_off():
    assert choice_reward("<think>\nmaybe <answer>A</answer>\n</think>\n<answer>\nB\n</answer>", "B") == 1.0
    assert choice_reward("<think>\nx\n</think>\n<answer>\nB", "B") == 1.0  # cut off mid-answer
    assert choice_reward("The answer is B.", "B") == 0.0  # no answer tag: no answer (the code graded all text)


# --------------------------------------------------------------------------------------------------------------
# math

@pytest.mark.parametrize("answer, solution, expected", [
    ("12", "<answer>12</answer>", 1.0),
    ("12.0", "12", 1.0),
    ("13", "12", 0.0),
    ("101", "100", 0.0),  # no relative tolerance: counts must be exact
    ("1/2", "0.5", 1.0),
    ("\\frac{1}{2}", "0.5", 1.0),
    ("$\\dfrac{\\sqrt{3}}{2}$", "0.8660254", 1.0),
    ("2\\sqrt{3}", "2√{3}", 1.0),  # GeoQA writes roots as √{3}
    ("3.46", "2√{3}", 1.0),  # 2√3 = 3.4641, rounded to the 2 decimals written
    ("3.47", "2√{3}", 0.0),
    ("3.5", "2√{3}", 0.0),  # one decimal is too coarse to count as the rounding
    ("2√3", "3.46", 1.0),  # the solution's rounding works both ways
    ("30°", "30", 1.0),
    ("30^{\\circ}", "30°", 1.0),
    ("5 cm", "5", 1.0),
    ("5\\text{ cm}^2", "5", 1.0),
    ("50%", "0.5", 1.0),
    ("50\\%", "50", 1.0),
    ("0.5", "50", 0.0),
    ("x = 5", "5", 1.0),
    ("AB = 2√3 ≈ 3.46", "2√3", 1.0),  # the part after the last = or ≈
    ("The answer is -4.", "-2^2", 1.0),
    ("1,000", "1000", 1.0),
    ("2π", "6.28", 1.0),
    ("\\frac12", "0.5", 1.0),  # our reader does not read it; math_verify does
    ("4, so the answer is 5", "5", 1.0),  # prose: math_verify's answer extraction
    ("[10, 20, 30, 40]", "40", 0.0),  # a box is not a number (math_verify alone would read 40)
    ("9^{9^{9^{9}}}", "3", 0.0),  # never evaluated
    ("five", "5", 0.0),
    ("", "5", 0.0),
])
def test_math_reward(answer, solution, expected):
    assert math_reward(formatted(answer), solution) == expected


def test_math_without_answer_tag_is_zero():
    assert math_reward("the answer is 5", "5") == 0.0


def test_math_verify_fallback_gives_the_same_reward_off_the_main_thread():
    """math_verify's timeout uses signal.alarm, which raises outside the main thread; ours must not."""
    cases = [("\\frac12", "0.5"), ("4, so the answer is 5", "5"), ("\\sin(\\sin(1))", "1"), ("12", "12")]
    in_main = [math_reward(formatted(answer), solution) for answer, solution in cases]
    in_thread = []
    worker = threading.Thread(target=lambda: in_thread.extend(math_reward(formatted(a), s) for a, s in cases))
    worker.start()
    worker.join(60)
    assert in_thread == in_main == [1.0, 1.0, 0.0, 1.0]


def test_read_number_values():
    assert rewards.read_number("2/3*4").value == pytest.approx(8 / 3)  # left to right
    assert rewards.read_number("-2^2").value == -4.0
    assert rewards.read_number("\\frac{\\sqrt{3}}{2}").value == pytest.approx(3 ** 0.5 / 2)
    assert rewards.read_number("3.46") == rewards.Number(3.46, False, 2)
    assert rewards.read_number("50%") == rewards.Number(50.0, True, None)
    for unreadable in ("2 3", "1/0", "\\sqrt{-1}", "2^{100}", "(-8)^{0.5}", "x", "", "(" * 150 + "1" + ")" * 150):
        assert rewards.read_number(unreadable) is None, unreadable


# --------------------------------------------------------------------------------------------------------------
# iou

BOX = "<answer>[10, 10, 50, 50]</answer>"


@pytest.mark.parametrize("answer, solution, meta, expected", [
    ("[10, 10, 50, 50]", BOX, None, 1.0),
    ("[12, 10, 50, 48]", BOX, None, 0.9025),  # 38*38 / 40*40
    ("[0, 0, 10, 10]", "[5, 0, 15, 10]", None, 1 / 3),  # 50 / (100 + 100 - 50)
    ("[60, 60, 90, 90]", BOX, None, 0.0),  # disjoint
    ("[50, 50, 10, 10]", BOX, None, 0.0),  # inverted corners
    ("[10, 10, 10, 50]", BOX, None, 0.0),  # zero area
    ("[-10, -10, 50, 50]", "[0, 0, 50, 50]", None, 2500 / 3600),
    ("[1e400, 10, 50, 50]", BOX, None, 0.0),  # inf
    ("[0, 0, 1e300, 1e300]", BOX, None, 0.0),  # its area overflows
    ("[10, 10, 50, 50, 60]", BOX, None, 0.0),  # not a box
    ("[[10, 10, 50, 50]]", BOX, None, 1.0),
    ("[x1, y1, x2, y2]", BOX, None, 0.0),
    ("[{'Position': [0, 0, 5, 5], 'Confidence': 0.2},\n {'Position': [10, 10, 50, 50], 'Confidence': 0.9}]",
     "[{'Position': [10, 10, 50, 50], 'Confidence': 1}]", None, 1.0),  # the most confident box
    ('[{"bbox_2d": [10, 10, 50, 50], "label": "dog"}]', BOX, None, 1.0),  # Qwen2.5-VL's own JSON
    # the 0-1000 grid (LISA): answer and solution on it; the grid box of 1000 past a 200x100 image is in range
    ("[50, 100, 250, 500]", "[50, 100, 250, 500]", {"box_convention": "qwen1000", "image_size": [200, 100]}, 1.0),
    ("[0, 0, 500, 1000]", "[0, 0, 1000, 1000]", {"box_convention": "qwen1000", "image_size": [200, 100]}, 0.5),
])
def test_iou_reward(answer, solution, meta, expected):
    assert iou_reward(formatted(answer), solution, meta) == pytest.approx(expected)


def test_iou_threshold_is_the_official_binary_reward():
    assert iou_reward(formatted("[12, 10, 50, 48]"), BOX, iou_threshold=0.5) == 1.0
    assert iou_reward(formatted("[0, 0, 10, 10]"), "[5, 0, 15, 10]", iou_threshold=0.5) == 0.0
    with pytest.raises(ValueError, match="iou_threshold"):
        iou_reward(formatted("[0, 0, 10, 10]"), BOX, iou_threshold=1.5)


# --------------------------------------------------------------------------------------------------------------
# detection

TWO = "<answer>[{'Position': [10, 10, 50, 50], 'Confidence': 1}, {'Position': [0, 0, 4, 4], 'Confidence': 1}]</answer>"


def objects(*pairs):
    return "[" + ", ".join(f"{{'Position': {list(box)}, 'Confidence': {c}}}" for box, c in pairs) + "]"


@pytest.mark.parametrize("answer, solution, expected", [
    (objects(([10, 10, 50, 50], 1.0), ([0, 0, 4, 4], 0.9)), TWO, 1.0),
    # 0.9025 and 16/25 = 0.64, both > 0.5, over max(2, 2)
    (objects(([12, 10, 50, 48], 0.9), ([0, 0, 5, 5], 0.3)), TWO, (0.9025 + 0.64) / 2),
    (objects(([10, 10, 50, 50], 1.0)), TWO, 0.5),  # one of two found
    (objects(([10, 10, 50, 50], 1.0), ([70, 70, 90, 90], 0.5)), "[[10, 10, 50, 50]]", 0.5),  # a false positive
    (objects(([10, 10, 50, 50], 0.9), ([10, 10, 50, 50], 0.8)), "[[10, 10, 50, 50]]", 1.0),  # duplicates removed
    # confidence order decides: the 0.9 box (IoU 0.8) takes the truth, the exact box is left unmatched
    (objects(([0, 0, 10, 8], 0.9), ([0, 0, 10, 10], 0.5)), "[[0, 0, 10, 10]]", 0.8 / 2),
    (objects(([0, 0, 10, 8], 0.5), ([0, 0, 10, 10], 0.9)), "[[0, 0, 10, 10]]", 1.0 / 2),
    (objects(([0, 0, 10, 5], 1.0)), "[[0, 0, 10, 10]]", 0.0),  # IoU exactly 0.5 does not match
    # each box takes the unmatched truth of highest IoU
    ("[[0, 0, 10, 10]]", "[[0, 0, 10, 9], [0, 0, 10, 10]]", 0.5),
    ("[[10, 10, 50, 50], [0, 0, 4, 4]]", TWO, 1.0),  # plain boxes
    ("[{'Position': [10, 10, 50, 50], 'Confidence': 0.9}, {'Position': [0, 0, 4", TWO, 0.5),  # cut off list
    ('[{"Position": [10, 10, 50, 50], "Confidence": 0.9}]', "[[10, 10, 50, 50]]", 1.0),  # double quotes
    ('{"answer": 1}', TWO, 0.0),  # JSON, but not boxes
    ("No Objects", "<answer>No Objects</answer>", 1.0),
    ("[]", "<answer>No Objects</answer>", 1.0),
    ("[[1, 1, 5, 5]]", "<answer>No Objects</answer>", 0.0),
    ("No Objects", TWO, 0.0),
])
def test_detection_reward(answer, solution, expected):
    assert detection_reward(formatted(answer), solution) == pytest.approx(expected)


def test_detection_compares_on_the_qwen_grid():
    meta = {"box_convention": "qwen1000", "image_size": [200, 100]}
    assert detection_reward(formatted("[[50, 100, 250, 500]]"), "[[50, 100, 250, 500]]", meta) == 1.0
    assert detection_reward(formatted("[[10, 20, 50, 100]]"), "[[50, 100, 250, 500]]", meta) == 0.0


def test_detection_of_thousands_of_boxes_is_fast_and_exact():
    """3,000 predicted boxes against 3,000 truths: each prediction is its truth shifted 1 px right, IoU 90/110.
    The pure-Python pairwise loop took 14-46 s here; the numpy matching must stay well under that."""
    truth = [[20 * i, 0, 20 * i + 10, 10] for i in range(3000)]
    answer = json.dumps([[x1 + 1, y1, x2 + 1, y2] for x1, y1, x2, y2 in truth])
    started = time.perf_counter()
    assert detection_reward(formatted(answer), json.dumps(truth)) == pytest.approx(90 / 110)
    assert time.perf_counter() - started < 5.0
    # Areas near the float limit: the union overflows, and iou()'s rescaled path gives the exact 1.0.
    huge = [0, 0, 1.5e154, 1e154]
    assert detection_reward(formatted(json.dumps([huge])), json.dumps([huge])) == 1.0


def greedy_detection_by_definition(predicted, truth):
    """Visual-RFT's matching written out with the scalar iou(): the reference the vectorised matching must equal."""
    matched, total = set(), 0.0
    for box, _ in sorted(predicted, key=lambda pair: -rewards._rank(pair[1])):
        best, best_iou = None, rewards.DETECTION_MATCH_IOU
        for index, truth_box in enumerate(truth):
            value = rewards.iou(box, truth_box)
            if index not in matched and value > best_iou:
                best, best_iou = index, value
        if best is not None:
            matched.add(best)
            total += best_iou
    return total / max(len(truth), len(predicted))


def test_vectorised_detection_matching_equals_the_definition_bit_for_bit():
    rng = random.Random(0)
    odd = ["1e400", "-1e400", "1e308", "-1e308", "1e154", "5e-324", "-0.0"]  # 1e400 reads as inf

    def box():
        x, y = rng.randint(0, 50), rng.randint(0, 50)
        return [str(x), str(y), str(x + rng.randint(0, 20)), str(y + rng.randint(0, 20))]

    def near(b):
        if rng.random() < 0.15:  # infinite, huge, tiny, inverted and empty boxes
            return tuple(rng.choice(odd + [str(rng.randint(0, 60))]) for _ in range(4))
        return tuple(str(float(v) + rng.choice([0, 0, 1, -1, 2, 0.5])) for v in b)
    for _ in range(2000):
        truth = [[float(v) for v in box()] for _ in range(rng.randint(1, 6))]
        written = {near([str(v) for v in rng.choice(truth)]) if rng.random() < 0.7 else tuple(box()): rng.random()
                   for _ in range(rng.randint(1, 10))}
        answer = "[" + ", ".join(f"{{'Position': [{', '.join(b)}], 'Confidence': {c!r}}}"
                                 for b, c in written.items()) + "]"
        predicted = list({tuple(map(float, b)): c for b, c in reversed(written.items())}.items())[::-1]
        assert rewards._detection_score(answer, truth) == greedy_detection_by_definition(predicted, truth)


def test_iou_is_symmetric_and_guards_degenerate_boxes():
    assert rewards.iou((0, 0, 10, 10), (5, 0, 15, 10)) == rewards.iou((5, 0, 15, 10), (0, 0, 10, 10)) == 1 / 3
    assert rewards.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert rewards.iou((0, 0, float("nan"), 10), (0, 0, 10, 10)) == 0.0


# --------------------------------------------------------------------------------------------------------------
# the router

def test_every_domain_has_one_accuracy_reward_and_format_with_the_papers_weights():
    assert set(DOMAIN_REWARDS) == {"coco", "lisa", "geoqav", "geoqa", "sat", "scienceqa", "syn_detect", "syn_ground",
                                   "syn_count", "syn_spatial", "syn_science", "syn_chart", "syn_colorcount",
                                   "syn_compare"}
    for domain, weighted in DOMAIN_REWARDS.items():
        assert weighted[1] == ("format", 1.0) and weighted[0][1] == 2.0, domain
        assert max_total(domain) == 3.0
    assert DOMAIN_REWARDS["lisa"][0][0] == "iou" and DOMAIN_REWARDS["coco"][0][0] == "detection"
    assert DOMAIN_REWARDS["geoqa"][0][0] == "math" and DOMAIN_REWARDS["sat"][0][0] == "choice"


@pytest.mark.parametrize("completion, solution, domain, meta, options, expected", [
    (formatted("[12, 10, 50, 48]"), BOX, "lisa", None, {}, {"iou": 0.9025, "format": 1.0, "total": 2.805}),
    # gated (the paper): a failed format zeroes the accuracy too
    ("<answer>[12, 10, 50, 48]</answer>", BOX, "lisa", None, {}, {"iou": 0.0, "format": 0.0, "total": 0.0}),
    # not gated (the official code): accuracy counts alone
    ("<answer>[12, 10, 50, 48]</answer>", BOX, "lisa", None, {"gate_on_format": False},
     {"iou": 0.9025, "format": 0.0, "total": 1.805}),
    (formatted("[12, 10, 50, 48]"), BOX, "syn_ground", None, {"iou_threshold": 0.5},
     {"iou": 1.0, "format": 1.0, "total": 3.0}),
    (formatted("B"), "<answer>B</answer>", "sat", None, {}, {"choice": 1.0, "format": 1.0, "total": 3.0}),
    (formatted("C"), "<answer>B</answer>", "scienceqa", None, {}, {"choice": 0.0, "format": 1.0, "total": 1.0}),
    ("<think>ok</think> <answer>red</answer>", "<answer>B</answer>", "geoqav", OPTIONS, {"format_mode": "lenient"},
     {"choice": 1.0, "format": 1.0, "total": 3.0}),
    ("<think>ok</think> <answer>red</answer>", "<answer>B</answer>", "geoqav", OPTIONS, {},
     {"choice": 0.0, "format": 0.0, "total": 0.0}),
    (formatted("2\\sqrt{3}"), "<answer>2√{3}</answer>", "geoqa", None, {},
     {"math": 1.0, "format": 1.0, "total": 3.0}),
    (formatted("7"), "<answer>6</answer>", "syn_count", None, {}, {"math": 0.0, "format": 1.0, "total": 1.0}),
    (formatted(objects(([12, 10, 50, 48], 0.9), ([0, 0, 5, 5], 0.3))), TWO, "coco", None, {},
     {"detection": 0.77125, "format": 1.0, "total": 2.5425}),
    ("", TWO, "syn_detect", None, {"gate_on_format": False}, {"detection": 0.0, "format": 0.0, "total": 0.0}),
])
def test_score_totals(completion, solution, domain, meta, options, expected):
    result = score(completion, solution, domain, meta, **options)
    assert list(result) == list(expected)  # accuracy reward, format, total
    assert result == pytest.approx(expected)


def test_score_rejects_what_is_not_the_models_fault():
    with pytest.raises(ValueError, match="unknown domain 'mnist'"):
        score(formatted("B"), "B", "mnist")
    with pytest.raises(TypeError, match="completion must be a string"):
        score(None, "B", "sat")
    with pytest.raises(SolutionError, match="meta must be a dict"):
        score(formatted("B"), "B", "sat", '{"options": {}}')


@pytest.mark.parametrize("solution, domain, meta, message", [
    ("<answer>Z</answer>", "sat", None, "sat: solution '<answer>Z</answer>' is not an option letter A-H"),
    ("<answer>E</answer>", "scienceqa", OPTIONS, "scienceqa: solution letter E is not among the options"),
    ("<answer>about five</answer>", "geoqa", None, "geoqa: solution '<answer>about five</answer>' is not a number"),
    ("<answer>[10, 10, 50]</answer>", "lisa", None,
     r"lisa: solution .* has a box \[10, 10, 50\] that is not \[x1, y1, x2, y2\]"),
    ("[[1, 1, 5, 5], [6, 6, 9, 9]]", "lisa", None, "lisa: solution .* must hold exactly one box, has 2"),
    ("[[1, 1, 5, float('nan')]]", "coco", None, "coco: solution .* is not a list of boxes"),
    ("[{'Position': [1, 1, 5, 5]", "coco", None, "coco: solution .* is not a list of boxes"),  # truncated
    ("[{'Box': [1, 1, 5, 5]}]", "syn_detect", None, "syn_detect: solution .* has an object without 'Position'"),
    ("[[5, 5, 1, 1]]", "coco", None, "coco: solution .* has an empty or inverted box"),
    ("[[0, 0, 300, 50]]", "coco", {"image_size": [200, 100]}, "coco: solution .* outside the 200x100 image"),
    ("[[0, 0, 1200, 5]]", "coco", {"box_convention": "qwen1000", "image_size": [2000, 100]},
     r"coco: solution .* outside the 0-1000 grid"),
    ("[[0, 0, 5, 5]]", "coco", {"box_convention": "normalized"}, "coco: meta box_convention 'normalized' is not"),
    ("[[0, 0, 5, 5]]", "coco", {"image_size": [0, 10]}, r"coco: meta image_size must be \[width, height\] > 0"),
    (5, "geoqa", None, "geoqa: solution must be a string, got 5"),
])
def test_malformed_solutions_name_the_domain_and_the_value(solution, domain, meta, message):
    with pytest.raises(SolutionError, match=message):
        parse_solution(solution, domain, meta)
    with pytest.raises(ValueError):  # SolutionError is a ValueError
        score(formatted("B"), solution, domain, meta)


def test_parse_solution_reads_the_official_formats():
    assert parse_solution("<answer>B</answer>", "sat") == rewards.Choice("B", None)
    assert parse_solution("<answer>B</answer>", "sat", OPTIONS) == rewards.Choice("B", "Red")
    assert parse_solution("<answer>2√{3}</answer>", "geoqa").value == pytest.approx(2 * 3 ** 0.5)
    lisa = "<answer>[{'Position': [254, 303, 291, 365], 'Confidence': 1}]</answer>"  # LISA as the official data
    assert parse_solution(lisa, "lisa") == (254.0, 303.0, 291.0, 365.0)
    coco = ('<answer>[{"Position": [1, 2, 3, 4], "Confidence": 1.0}, '
            '{"Position": [5, 6, 7, 8], "Confidence": 1.0}]</answer>')
    assert parse_solution(coco, "coco") == [(1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)]
    assert parse_solution("No Objects", "coco") == []


# --------------------------------------------------------------------------------------------------------------
# bad completions: 1 MB texts of the shapes that make regexes or matching slow

MB = 1_000_000


@pytest.mark.parametrize("body", [
    " " * MB, "[" + "1" * MB, "answer" + " " * MB + "x", "[1, 2, 3, 4]," * (MB // 13),
    "{'Position': [1, 2, 3, 4], 'Confidence': 0.5}," * (MB // 46), "<answer>" * (MB // 8), "√π°漢🙂" * (MB // 5),
])
def test_a_megabyte_completion_is_scored_quickly(body):
    start = time.perf_counter()
    for completion in (body, formatted(body), "<answer>" + body):
        for domain, solution in (("sat", "B"), ("geoqa", "5"), ("lisa", BOX), ("coco", TWO)):
            result = score(completion, solution, domain, gate_on_format=False)
            assert 0.0 <= result["total"] <= 3.0
    assert time.perf_counter() - start < 30  # 12 scores; ~3 s here, most of it the 77,000-box answers


# --------------------------------------------------------------------------------------------------------------
# the CLI

def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, str(REPO / "rewards.py"), *args], capture_output=True, text=True,
                          input=stdin, timeout=60)


def test_cli_prints_the_score_as_json():
    done = run_cli("--domain", "lisa", "--solution", BOX, "--completion", formatted("[12, 10, 50, 48]"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"iou": 0.9025, "format": 1.0, "total": 2.805}
    done = run_cli("--domain", "lisa", "--solution", BOX, "--completion", "-", "--no_gate", "--iou_threshold", "0.5",
                   stdin="<answer>[12, 10, 50, 48]</answer>")
    assert json.loads(done.stdout) == {"iou": 1.0, "format": 0.0, "total": 2.0}
    done = run_cli("--domain", "sat", "--solution", "B", "--completion", "<think>x</think><answer>red</answer>",
                   "--format", "lenient", "--meta", json.dumps(OPTIONS))
    assert json.loads(done.stdout) == {"choice": 1.0, "format": 1.0, "total": 3.0}


def test_cli_reports_bad_input_clearly():
    done = run_cli("--domain", "sat", "--solution", "<answer>Z</answer>", "--completion", "B")
    assert done.returncode == 2 and "sat: solution '<answer>Z</answer>' is not an option letter" in done.stderr
    done = run_cli("--domain", "sat", "--solution", "B", "--completion", "B", "--meta", "{options")
    assert done.returncode == 2 and "--meta is not JSON" in done.stderr
    done = run_cli("--help")
    assert done.returncode == 0 and "syn_colorcount  math x2, format x1" in done.stdout


# --------------------------------------------------------------------------------------------------------------
# reward_mode="official": the same completions scored ours and the official code's way, one case per difference
# listed at the top of rewards.py (solutions as prepare_data.py writes them)

OPTIONS_LR = {"options": {"A": "left", "B": "right"}}
ONE_LINE = "<think>\nI look at the image.\n</think>\n<answer>{}</answer>"  # the official answer regex reads this


@pytest.mark.parametrize("why, domain, solution, meta, completion, ours, official", [
    ("the official code does not gate accuracy on format", "sat", "<answer>B</answer>", None,
     "<answer>B</answer>", {"choice": 0.0, "format": 0.0}, {"choice": 1.0, "format": 0.0}),
    ("math_verify first, on every domain: '10' is the solution box's first number", "lisa", BOX, None,
     formatted("10"), {"iou": 0.0, "format": 1.0}, {"iou": 1.0, "format": 1.0}),
    ("no DOTALL: a multi-line box answer is not found, the whole completion is no box list", "lisa", BOX, None,
     formatted("[{'Position': [12, 10, 50, 48], 'Confidence': 1}]"), {"iou": 0.9025, "format": 1.0},
     {"iou": 0.0, "format": 1.0}),
    # (math_verify reads 20 in this completion and 60 in this solution, so its test fails and the JSON is read)
    ("... while on one line it is found (the format fails: no newline after <answer>)", "lisa", "[20, 20, 60, 60]",
     None, ONE_LINE.format("[{'Position': [22, 20, 60, 58], 'Confidence': 1}]"), {"iou": 0.0, "format": 0.0},
     {"iou": 0.9025, "format": 0.0}),
    ("MULTILINE $: text may follow a newline after </answer>", "sat", "<answer>B</answer>", None,
     formatted("B") + "\nand more", {"choice": 0.0, "format": 0.0}, {"choice": 1.0, "format": 1.0}),
    ("tags may repeat: the last standalone letter of the whole completion counts", "sat", "<answer>B</answer>",
     None, formatted("A") + "\n<answer>\nB\n</answer>", {"choice": 0.0, "format": 0.0},
     {"choice": 1.0, "format": 1.0}),
    ("the article in 'A cat' is the letter A", "sat", "<answer>A</answer>", None, formatted("A cat, left"),
     {"choice": 0.0, "format": 1.0}, {"choice": 1.0, "format": 1.0}),
    ("the option's text is no answer to the official code", "sat", "<answer>B</answer>", OPTIONS_LR,
     ONE_LINE.format("right"), {"choice": 0.0, "format": 0.0}, {"choice": 0.0, "format": 0.0}),
    ("no answer tag: the official code grades the whole completion", "sat", "<answer>B</answer>", None,
     "The answer is B", {"choice": 0.0, "format": 0.0}, {"choice": 1.0, "format": 0.0}),
    ("GeoQA with the choice reward: '5 cm' is not the string '5'", "geoqa", "<answer>5</answer>", None,
     formatted("5 cm"), {"math": 1.0, "format": 1.0}, {"math": 0.0, "format": 1.0}),
    ("a 'No Objects' truth cannot be read by the official code", "coco", "<answer>No Objects</answer>", None,
     formatted("No Objects"), {"detection": 1.0, "format": 1.0}, {"detection": 0.0, "format": 1.0}),
    ("official LISA: IoU only above 0.5, over the number of boxes answered", "lisa", "[20, 20, 60, 60]", None,
     ONE_LINE.format("[{'Position': [20, 20, 60, 52], 'Confidence': 1}, {'Position': [70, 70, 90, 90], "
                     "'Confidence': 0.5}]"), {"iou": 0.0, "format": 0.0}, {"iou": 0.4, "format": 0.0}),
])
def test_official_mode_undoes_each_documented_difference(why, domain, solution, meta, completion, ours, official):
    weights = dict(DOMAIN_REWARDS[domain])
    for mode, expected in (("ours", ours), ("official", official)):
        result = score(completion, solution, domain, meta, reward_mode=mode)
        total = sum(weights[name] * value for name, value in expected.items())
        assert result == pytest.approx({**expected, "total": total}), (why, mode)


def test_official_mode_ignores_the_options_that_belong_to_ours():
    completion = ONE_LINE.format("[{'Position': [20, 20, 60, 52], 'Confidence': 1}]")  # IoU 0.8
    for options in ({}, {"gate_on_format": False, "format_mode": "lenient", "iou_threshold": 0.9}):
        assert score(completion, "[20, 20, 60, 60]", "lisa", reward_mode="official", **options)["iou"] == \
            pytest.approx(0.8)
    # ours ungated on the same one-line answer: the most confident box's IoU, or VLM-R1's binary reward
    assert score(completion, "[20, 20, 60, 60]", "lisa", gate_on_format=False)["iou"] == pytest.approx(0.8)
    assert score(completion, "[20, 20, 60, 60]", "lisa", gate_on_format=False, iou_threshold=0.9)["iou"] == 0.0
    # plain boxes: ours reads them, the official reader needs Position/Confidence objects
    plain = ONE_LINE.format("[[22, 20, 60, 58]]")
    assert score(plain, "[[20, 20, 60, 60]]", "coco", gate_on_format=False)["detection"] == pytest.approx(0.9025)
    assert score(plain, "[[20, 20, 60, 60]]", "coco", reward_mode="official")["detection"] == 0.0
    # the one difference kept: an inverted box scores 0 both ways (the official arithmetic could give NaN)
    inverted = ONE_LINE.format("[{'Position': [55, 55, 25, 25], 'Confidence': 1}]")  # math_verify: 55 vs 60
    for mode in rewards.REWARD_MODES:
        assert score(inverted, "[20, 20, 60, 60]", "lisa", reward_mode=mode, gate_on_format=False)["iou"] == 0.0
    with pytest.raises(ValueError, match="reward_mode must be one of"):
        score(completion, "[20, 20, 60, 60]", "lisa", reward_mode="paper")


def test_reward_weights_replace_the_paper_weights_of_the_rewards_they_name():
    completion = formatted("[12, 10, 50, 48]")  # IoU 0.9025, format 1
    assert score(completion, BOX, "lisa", reward_weights={"iou": 1.0})["total"] == pytest.approx(1.9025)
    assert score(completion, BOX, "lisa", reward_weights='{"iou": 3, "format": 0.5}')["total"] == \
        pytest.approx(3 * 0.9025 + 0.5)
    # a weight for a reward the domain does not have changes nothing
    assert score(completion, BOX, "lisa", reward_weights={"choice": 9.0})["total"] == pytest.approx(2.805)


@pytest.mark.parametrize("weights, message", [
    ('{"iuo": 1}', "reward_weights names 'iuo', not a reward"),
    ('{"iou": "2"}', r"reward_weights\['iou'\] must be a finite number"),
    ("[2.0, 1.0]", "reward_weights must map reward names to weights"),
    ("{iou: 2}", "reward_weights is not JSON"),
])
def test_bad_reward_weights_are_an_error_naming_the_entry(weights, message):
    with pytest.raises(ValueError, match=message):
        score(formatted("[12, 10, 50, 48]"), BOX, "lisa", reward_weights=weights)
