"""Property tests: for any completion (broken tags, unicode, NaN/inf/huge/negative coordinates, inverted and empty
boxes, truncated or non-list JSON, prose, LaTeX), every reward is a finite float in its documented range, and
score()'s total is the weighted sum of its parts. 2,000 generated completions for every reward, derandomized so CI
is reproducible."""
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rewards

PROPERTY = settings(max_examples=2000, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Pieces that steer generation into every parser path: tags, box and object syntax, option letters, LaTeX.
FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "\n", " ", "[", "]", "[[", "]]", "{", "}", "(", ")", ",",
             ":", "'", '"', "'Position': ", '"bbox_2d": ', "'Confidence': ", "No Objects", "The answer is ", "answer: ",
             "A", "B", "(C)", "D.", "H) ", "\\frac{", "\\sqrt{", "\\boxed{", "\\text{cm}", "√", "π", "%", "°", "^",
             "^{", "=", "≈", "-", ".", "/", "*", "NaN", "Infinity", "nan", "inf", "1e400", "-0", "0", "x", "\\sin(",
             "漢字", "🙂", "\u200b", "\x00"]
numbers = st.one_of(
    st.integers(-2000, 2000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),  # nan, inf, 1e+308, -0.0, 5e-324 ...
    st.integers(-10**400, 10**400).map(str),  # overflows float
    st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str),
)
boxes = st.lists(numbers, max_size=6).map(lambda xs: "[" + ", ".join(xs) + "]")
detections = st.lists(st.tuples(boxes, numbers), max_size=5).map(
    lambda pairs: "[" + ", ".join(f"{{'Position': {b}, 'Confidence': {c}}}" for b, c in pairs) + "]")
pieces = st.one_of(st.sampled_from(FRAGMENTS), numbers, boxes, detections, st.text(max_size=6))
texts = st.lists(pieces, max_size=20).map("".join)
# Answers near the solutions below, so rewards above zero are reached too, alone or inside noise.
good_answers = st.sampled_from(["B", "(B)", "B) red", "The answer is B.", "red", "-3", "5", "2\\sqrt{3}", "3.46",
                                "50%", "30°", "\\frac{1}{4}", "[10, 10, 50, 50]", "[[0, 0, 4, 4], [10, 10, 50, 50]]",
                                "No Objects"])
near_boxes = st.lists(st.integers(-5, 60), min_size=4, max_size=4).map(str)
near_detections = st.lists(st.tuples(near_boxes, st.floats(0, 1)), max_size=4).map(
    lambda pairs: "[" + ", ".join(f"{{'Position': {b}, 'Confidence': {c}}}" for b, c in pairs) + "]")
noise = st.lists(pieces, max_size=3).map("".join)
answers = st.one_of(texts, good_answers, near_boxes, near_detections,
                    st.tuples(noise, good_answers | near_boxes, noise).map("".join))
# Most completions wear the expected layout, so the answer parsers (not only the format check) get exercised;
# some answers are cut off (no closing tag).
completions = st.one_of(
    texts,
    st.builds(lambda think, answer: f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>", texts, answers),
    st.builds(lambda think, answer: f"<think>{think}</think> <answer>{answer}</answer>", texts, answers),
    st.builds(lambda think, answer: f"<think>{think}</think><answer>{answer}", texts, answers),
)


def in_range(value, low, high):
    return type(value) is float and math.isfinite(value) and low <= value <= high


CHOICE_CASES = [("<answer>B</answer>", None), ("A", {"options": {"A": "blue", "B": "red"}}), ("H. a hat", None)]
MATH_SOLUTIONS = ["<answer>5</answer>", "2√{3}", "0.25", "50%", "-3", "30°"]
QWEN_GRID = {"box_convention": "qwen1000", "image_size": [640, 480]}
BOX_CASES = [("<answer>[10, 10, 50, 50]</answer>", None),
             ("[{'Position': [0, 0, 640, 480], 'Confidence': 1}]", QWEN_GRID)]
DETECTION_CASES = [("<answer>[{'Position': [10, 10, 50, 50], 'Confidence': 1}, "
                    "{'Position': [0, 0, 4, 4], 'Confidence': 1}]</answer>", None),
                   ("[[0, 0, 320, 240], [320, 240, 640, 480]]", QWEN_GRID), ("No Objects", None)]
SCORE_CASES = [("lisa", *BOX_CASES[1]), ("coco", *DETECTION_CASES[0]), ("sat", *CHOICE_CASES[1]),
               ("geoqa", "2√{3}", None), ("syn_colorcount", "4", None), ("syn_detect", "No Objects", None)]


# One generated completion goes through all five rewards and the router: 2,000 inputs per reward for the price
# of generating 2,000 (generation, not scoring, is what costs here).
@PROPERTY
@given(completions, st.sampled_from(rewards.FORMAT_MODES), st.sampled_from(CHOICE_CASES),
       st.sampled_from(MATH_SOLUTIONS), st.sampled_from(BOX_CASES), st.sampled_from([None, 0.5]),
       st.sampled_from(DETECTION_CASES), st.sampled_from(SCORE_CASES), st.booleans())
def test_every_reward_is_a_finite_float_in_its_range(completion, mode, choice_case, math_solution, box_case,
                                                      threshold, detection_case, score_case, gate):
    assert rewards.format_reward(completion, mode=mode) in (0.0, 1.0)
    assert rewards.choice_reward(completion, *choice_case) in (0.0, 1.0)
    assert rewards.math_reward(completion, math_solution) in (0.0, 1.0)
    iou = rewards.iou_reward(completion, *box_case, iou_threshold=threshold)
    assert in_range(iou, 0.0, 1.0) and (threshold is None or iou in (0.0, 1.0))
    assert in_range(rewards.detection_reward(completion, *detection_case), 0.0, 1.0)

    domain, solution, meta = score_case
    result = rewards.score(completion, solution, domain, meta, gate_on_format=gate, format_mode=mode)
    weights = dict(rewards.DOMAIN_REWARDS[domain])
    assert list(result) == [name for name, _ in rewards.DOMAIN_REWARDS[domain]] + ["total"]
    assert all(in_range(result[name], 0.0, 1.0) for name in weights)
    assert in_range(result["total"], 0.0, rewards.max_total(domain))
    assert math.isclose(result["total"], sum(w * result[name] for name, w in weights.items()), abs_tol=1e-9)
    if gate and result["format"] == 0.0:
        assert result["total"] == 0.0


@settings(PROPERTY, max_examples=100)  # math_verify parses every whole completion: ~70 ms each here
@given(completions, st.sampled_from(SCORE_CASES))
def test_official_mode_gives_a_finite_reward_in_range_for_any_completion(completion, score_case):
    domain, solution, meta = score_case
    result = rewards.score(completion, solution, domain, meta, reward_mode="official")
    weights = dict(rewards.DOMAIN_REWARDS[domain])
    assert all(in_range(result[name], 0.0, 1.0) for name in weights)
    assert math.isclose(result["total"], sum(w * result[name] for name, w in weights.items()), abs_tol=1e-9)


finite = st.floats(-1e6, 1e6)
valid_boxes = st.tuples(finite, finite, st.floats(0.01, 1e6), st.floats(0.01, 1e6)).map(
    lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3]))
any_boxes = st.tuples(*[st.floats(allow_nan=True, allow_infinity=True)] * 4)


@PROPERTY
@given(st.one_of(valid_boxes, any_boxes), st.one_of(valid_boxes, any_boxes))
def test_iou_is_symmetric_bounded_and_one_on_itself(a, b):
    value = rewards.iou(a, b)
    assert in_range(value, 0.0, 1.0) and value == rewards.iou(b, a)
    area = (a[2] - a[0]) * (a[3] - a[1])
    if all(map(math.isfinite, a)) and a[2] > a[0] and a[3] > a[1] and 0.0 < area < math.inf:
        assert rewards.iou(a, a) == 1.0


@settings(PROPERTY, max_examples=500)  # a helper of math_reward, which has its 2,000 above
@given(st.text(max_size=rewards.MATH_ANSWER_MAX_CHARS) | st.lists(pieces, max_size=10).map("".join))
def test_read_number_returns_a_finite_number_or_none(text):
    number = rewards.read_number(text)
    assert number is None or (math.isfinite(number.value) and type(number.percent) is bool)
