"""
Every verifiable reward of MoDoMoDo (arXiv 2505.24871), and the router that train_grpo.py and evaluate.py call
for every rollout:

    score(completion, solution, domain, meta=None) -> {"iou": 0.73, "format": 1.0, "total": 2.46}

reward     value    what it checks (the answer is the text inside the completion's last <answer> tag)
format     {0, 1}   <think>...</think> then <answer>...</answer>, each tag exactly once
choice     {0, 1}   the option letter A-H: "B", "(B)", "B.", "B) text", "The answer is B", or the option's text
math       {0, 1}   numeric equivalence: 12, 0.5, 1/2, \\frac{1}{2}, 2\\sqrt{3}, 2√{3}, 30°, 5 cm, 50%, x = 5;
                    3.46 for 2√3 (rounding to the 2+ decimals written); math_verify reads what we cannot
iou        [0, 1]   IoU of the answered box [x1, y1, x2, y2] with the ground-truth box
detection  [0, 1]   boxes matched greedily by confidence (IoU > 0.5): sum of matched IoU / max(#truth, #predicted)

Each domain has one accuracy reward (weight 2.0) and the format reward (weight 1.0), the paper's weights, so a
total lies in [0, 3]. Solutions are the records' `solution` strings; malformed ones raise SolutionError.
The record's meta carries `box_convention` ("pixel", default, or "qwen1000": Qwen2-VL's 0-1000 grid, scaled by
`image_size` / 1000 before IoU), `image_size` [w, h], and `options` {"A": "text", ...} for multiple choice.

Options of score() (also keywords of the reward functions that use them):
- format_mode: "strict" (default; the official code's form, a newline after/before every tag) or "lenient"
  (any whitespace around and between the two blocks).
- gate_on_format: True (default, the paper: a failed format zeroes every reward) or False (the official code:
  accuracy is scored whatever the format).
- iou_threshold: None (default: the IoU itself) or e.g. 0.5 (the official code: 1.0 when IoU > 0.5, else 0.0).

Where this differs from the official MoDoMoDo code (built on open-r1 / VLM-R1 / Visual-RFT), on purpose:
- accuracy is gated on format by default (the paper's rule; the code does not gate);
- math_verify never runs on box or choice answers (the code tries it first on every answer, and a number in a
  box answer could match the solution); for `math` only its parser runs, after our own number reader fails, on
  the answer text only, bounded in length and never on a list or box; the comparison (tolerance) stays ours;
- the <answer> tag is found across newlines (the code's r'<answer>(.*?)</answer>' lacks DOTALL, so a multi-line
  answer fell back to the whole completion);
- no exception is swallowed: malformed solutions raise SolutionError, bugs surface; every completion, however
  broken, gets a finite reward because the parsers reject it, not because a try/except hides it;
- one of each tag is required and nothing but whitespace may follow </answer> (the code's MULTILINE `$` let any
  text follow a newline after </answer>);
- choice letters are read from the forms above, not "any standalone capital A-H anywhere" (which rewarded the
  article in "A cat"); the option text is accepted; no answer tag means no answer (the code graded the whole
  completion instead);
- detection accepts plain boxes and Qwen2.5-VL's "bbox_2d" key as well as "Position", and rewards an empty
  prediction when the truth is "No Objects"; iou takes the highest-confidence box of a list (the code took the
  first [x1, y1, x2, y2] of non-negative integers only);
- boxes whose corners are inverted (x2 < x1) or not finite score IoU 0 (the code's arithmetic could give NaN).

CLI: python rewards.py --domain lisa --solution '<answer>[10, 10, 50, 50]</answer>' \\
         --completion $'<think>\\nthe dog\\n</think>\\n<answer>\\n[12, 10, 50, 48]\\n</answer>' [--meta '{json}']
"""
import argparse
import ast
import json
import math
import re
import sys
import threading
from typing import NamedTuple

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# The router: domain -> [(reward name, weight)], the paper's weights.

DOMAIN_REWARDS = {
    # the paper's data
    "coco": [("detection", 2.0), ("format", 1.0)],
    "lisa": [("iou", 2.0), ("format", 1.0)],
    "geoqav": [("choice", 2.0), ("format", 1.0)],
    "geoqa": [("math", 2.0), ("format", 1.0)],
    "sat": [("choice", 2.0), ("format", 1.0)],
    "scienceqa": [("choice", 2.0), ("format", 1.0)],
    # the offline synthetic suite: training domains
    "syn_detect": [("detection", 2.0), ("format", 1.0)],
    "syn_ground": [("iou", 2.0), ("format", 1.0)],
    "syn_count": [("math", 2.0), ("format", 1.0)],
    "syn_spatial": [("choice", 2.0), ("format", 1.0)],
    "syn_science": [("choice", 2.0), ("format", 1.0)],
    # the offline synthetic suite: out-of-domain test domains
    "syn_chart": [("math", 2.0), ("format", 1.0)],
    "syn_colorcount": [("math", 2.0), ("format", 1.0)],
    "syn_compare": [("choice", 2.0), ("format", 1.0)],
}
FORMAT_MODES = ("strict", "lenient")
BOX_CONVENTIONS = ("pixel", "qwen1000")
LETTERS = "ABCDEFGH"
DETECTION_MATCH_IOU = 0.5  # Visual-RFT's matching threshold: a predicted box counts when IoU > 0.5
MATH_ANSWER_MAX_CHARS = 200  # a longer "number" is prose; also bounds what math_verify (sympy) is handed


class SolutionError(ValueError):
    """A record's solution (or its meta) cannot be read: our data's fault, not the model's."""


def max_total(domain):
    """The highest total score() can return for this domain (3.0 with the paper's weights)."""
    return sum(weight for _, weight in _rewards_of(domain))


def _rewards_of(domain):
    if domain not in DOMAIN_REWARDS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(sorted(DOMAIN_REWARDS))}")
    return DOMAIN_REWARDS[domain]


def _accuracy_reward_of(domain):
    return next(name for name, _ in _rewards_of(domain) if name != "format")


# ----------------------------------------------------------------------------------------------------------------
# Reading completions. Every pattern that runs on a whole completion is linear-time (no nested or adjacent
# ambiguous quantifiers), so a 1 MB completion costs milliseconds.

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


def extract_answer(completion):
    """The text inside the last <answer> tag, up to its </answer> or, for a generation cut off mid-answer, up to
    the end; None when the completion has no <answer> tag."""
    start = completion.rfind("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = completion.find("</answer>", start)
    return completion[start:] if end < 0 else completion[start:end]


_STRICT_FORMAT = re.compile(r"<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\s*", re.DOTALL)
_LENIENT_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completion, solution=None, meta=None, *, mode="strict"):
    """1.0 when the completion is <think>...</think> then <answer>...</answer>, each tag exactly once.
    strict: the official layout, "<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>" (trailing whitespace allowed);
    lenient: any whitespace around and between the blocks. solution and meta are unused (uniform signature)."""
    if mode not in FORMAT_MODES:
        raise ValueError(f"format mode {mode!r} is not one of {FORMAT_MODES}")
    # One of each tag: a second <answer> would let a model hedge between answers.
    if any(completion.count(tag) != 1 for tag in _TAGS):
        return 0.0
    pattern = _STRICT_FORMAT if mode == "strict" else _LENIENT_FORMAT
    return 1.0 if pattern.fullmatch(completion) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# choice: an option letter A-H.

class Choice(NamedTuple):
    letter: str
    text: str | None  # the option's text when the solution or meta carries it


_MARKUP = re.compile(r"\\(?:boxed|text|textbf|mathrm|mathbf)\b|[{}$*`]")
_BARE_LETTER = re.compile(r"[(\[]?([A-Ha-h])[)\]]?[.:]?")  # fullmatch: B  (B)  [B]  B.  b
_LEADING_LETTER = re.compile(r"[(\[]?([A-H])(?:[)\]]|[.:])[ \t]*\S")  # match: "B) red"  "B. red"  "(B) red"
_ANSWER_PHRASE = re.compile(r"\b(?i:answer|option|choice)(?:[ \t]+(?i:is))?[ \t]*(?::[ \t]*)?[(\[]?([A-H])\b")


def _normalize_text(text):
    return " ".join(text.split()).strip(" .\"'()").lower()


def _letter_in(answer, options):
    """The option letter an answer names, or None. options: {"A": "text", ...} (may be empty)."""
    text = _MARKUP.sub("", answer).strip()
    for match in (_BARE_LETTER.fullmatch(text), _LEADING_LETTER.match(text)):
        if match:
            return match.group(1).upper()
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        return phrases[-1]  # "the answer is A ... no, the answer is B" -> B
    said = _normalize_text(text)
    named = [letter for letter, option in options.items() if _normalize_text(option) == said]
    return named[0] if len(named) == 1 else None


def _choice_score(answer, truth, options):
    if answer is None:
        return 0.0
    if not options and truth.text:
        options = {truth.letter: truth.text}
    return 1.0 if _letter_in(answer, options) == truth.letter else 0.0


def choice_reward(completion, solution, meta=None):
    """1.0 when the answer names the solution's option (by letter, or by the option's text from meta["options"]
    or from a solution like "B. red")."""
    meta = _check_meta(meta, "choice")
    truth = _parse_truth("choice", solution, meta, "choice")
    return _choice_score(extract_answer(completion), truth, meta.get("options") or {})


# ----------------------------------------------------------------------------------------------------------------
# math: our own reader for numbers and simple numeric expressions first (predictable, thread-safe, fast), then
# math_verify on what it cannot read.

class Number(NamedTuple):
    value: float  # as written, a percent sign dropped
    percent: bool
    decimals: int | None  # digits after the point when written as one plain decimal (rounding tolerance)


_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|textrm|mbox|operatorname)\s*\{([^{}]*)\}")
_MATH_REPLACEMENTS = [
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°|度"), ""),  # degrees are the unit, dropped
    (re.compile(r"\\pi(?![A-Za-z])|π"), "π"),
    (re.compile(r"\\times|\\cdot|[×·∙]"), "*"),
    (re.compile(r"\\div|÷"), "/"),
    (re.compile(r"[−–]"), "-"),
    (re.compile(r"\\approx|≈"), "="),
    (re.compile(r"\$|\\[()\[\]]|\\left|\\right|\\displaystyle|\\boxed|\\[,;:! ]|\\quad|~"), " "),
    (re.compile(r"(?<=\d),(?=\d{3}(?!\d))"), ""),  # 1,000 -> 1000
]
_PERCENT = re.compile(r"\s*\\?%\s*$")
# Leading prose up to a space or colon ("The answer is", "Answer:", "\angle ABC is"; not the x of "x^2") and
# trailing units ("cm", "cm^2", "square units", "."). Each letter run is maximal (the lookaheads), so these cannot
# backtrack exponentially.
_LEADING_WORDS = re.compile(r"^(?:(?:[^\d\\√π(\-+.{]|\\(?!frac|sqrt)[A-Za-z]+(?![A-Za-z]))*[\s:])?")
_TRAILING_UNITS = re.compile(r"(?:\s*[A-Za-z]+(?![A-Za-z])(?:\s*\^\s*\{?[23]\}?|[²³])?|\s*\.)+\s*$")
_MATH_TOKEN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+|\\frac|\\sqrt|[-+*/^(){}√π])")


def _tokens(text):
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _MATH_TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"unreadable at {text[pos:pos + 10]!r}")
        tokens.append(match.group(1))
        pos = match.end()
    return tokens


def _evaluate(tokens):
    """Value of a numeric expression: + - * / ^ (exponent at most 64), parentheses, braces, \\frac{a}{b},
    \\sqrt{x}, √x, π, and implicit multiplication before a root, π or bracket (2√3, 2π, 3(1+1)). Raises
    ValueError (or ArithmeticError) on anything else."""
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take(expected=None):
        nonlocal pos
        token = peek()
        if token is None or (expected is not None and token != expected):
            raise ValueError(f"expected {expected or 'more'}, found {token!r}")
        pos += 1
        return token

    def expression():
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term():
        value = unary()
        while True:
            token = peek()
            if token in ("*", "/"):
                take()
                operand = unary()
                value = value * operand if token == "*" else value / operand
            elif token in ("\\frac", "\\sqrt", "√", "π", "(", "{"):  # never between two plain numbers
                value = value * power()
            else:
                return value

    def unary():
        if peek() in ("+", "-"):
            return -unary() if take() == "-" else unary()
        return power()

    def power():
        base = atom()
        if peek() != "^":
            return base
        take()
        sign = -1.0 if peek() == "-" else 1.0
        if peek() in ("+", "-"):
            take()
        exponent = sign * atom()
        if abs(exponent) > 64:
            raise ValueError("exponent too large")
        value = base ** exponent
        if isinstance(value, complex):
            raise ValueError("complex power")
        return value

    def atom():
        token = take()
        if token in ("(", "{"):
            value = expression()
            take(")" if token == "(" else "}")
            return value
        if token == "\\frac":
            numerator = atom()
            return numerator / atom()
        if token in ("\\sqrt", "√"):
            return math.sqrt(atom())
        if token == "π":
            return math.pi
        if token[0].isdigit() or token[0] == ".":
            return float(token)
        raise ValueError(f"unexpected {token!r}")

    value = expression()
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r}")
    return value


def read_number(text):
    """The Number an answer states, or None. Reads the part after the last '=' or '≈' ("AB = 2√3 ≈ 3.46" ->
    3.46), drops leading prose and trailing units, then evaluates what is left (see _evaluate)."""
    if len(text) > MATH_ANSWER_MAX_CHARS:
        return None
    text = _LATEX_TEXT.sub(r" \1 ", text)
    for pattern, replacement in _MATH_REPLACEMENTS:
        text = pattern.sub(replacement, text)
    text = text.rsplit("=", 1)[-1]
    percent = bool(_PERCENT.search(text))
    text = _PERCENT.sub("", text)
    text = _TRAILING_UNITS.sub("", _LEADING_WORDS.sub("", text))
    try:
        tokens = _tokens(text)
        value = float(_evaluate(tokens))
    except (ValueError, ArithmeticError, RecursionError):
        return None
    if not math.isfinite(value):
        return None
    plain = [t for t in tokens if t not in ("+", "-")]
    decimals = len(plain[0].split(".")[1]) if len(plain) == 1 and "." in plain[0] else None
    return Number(value, percent, decimals)


def _close(a, b, decimals):
    """Equal up to float noise, or up to the rounding of a side written with 2+ decimals (3.46 for 2√3)."""
    tolerance = 1e-6 * max(1.0, abs(b))
    if decimals is not None:
        tolerance = max(tolerance, 0.5 * 10.0 ** -decimals + 1e-12)
    return abs(a - b) <= tolerance


def _numbers_match(predicted, truth):
    written = [d for d in (predicted.decimals, truth.decimals) if d is not None and d >= 2]
    decimals = min(written) if written else None
    if predicted.percent == truth.percent:
        return _close(predicted.value, truth.value, decimals)
    # one side wrote a percent sign: "50%" matches both "0.5" and "50"
    scaled = predicted.value / 100 if predicted.percent else predicted.value * 100
    return _close(predicted.value, truth.value, decimals) or _close(scaled, truth.value, None)


# math_verify (the field's standard LaTeX/prose answer reader) reads what our reader cannot: \frac12, \sqrt[3]{8},
# "4, so the answer is 5". Only its parser is used; the comparison stays ours (one tolerance everywhere), and an
# expression with variables is simply not a number. sympy can run for minutes on a short answer (\sin nested 30
# deep, 9^9^9^9), and off the main thread math_verify has no timeout (it uses signal.alarm), so it is handed only
# answers without functions, factorials, sums, integrals, or powers other than one single-digit power: the same
# rule in every thread, so a reward does not depend on the thread computing it. In the main thread a 2 s timeout
# stands behind it.
_UNSAFE_FOR_SYMPY = re.compile(
    r"\^(?!\s*(?:[-+]?\d(?![\d.])|\{\s*[-+]?\d\s*\}))"  # a power that is not one digit
    r"|\^[\s\S]*\^"  # two powers (9^9^9 is 9^387420489)
    r"|\*\*|!"  # Python's power, factorials
    r"|\\(?!(?:frac|dfrac|tfrac|sqrt|pi|cdot|times|div|left|right|text|mathrm|boxed|circ|degree|approx|pm)"
    r"(?![A-Za-z]))[A-Za-z]+"  # any other LaTeX command: \sin, \exp, \sum, \int, \begin ...
    r"|(?i:\b(?:a?sinh?|a?cosh?|a?tanh?|arc\w+|cot|sec|csc|exp|log|ln|lg|gamma|zeta|erf)\s*\()"  # sin( written as text
)

# A list or a box is not a number, but math_verify reads its last entry ("[10, 20, 30, 40]" -> 40).
_NUMBER_LIST = re.compile(rf"[\[(]\s*{_NUMBER}(?:\s*,\s*{_NUMBER})+\s*[\])]")


def read_number_with_math_verify(answer):
    """The real number math_verify reads in an answer (the right side of "x = ..."), or None."""
    if len(answer) > MATH_ANSWER_MAX_CHARS or _UNSAFE_FOR_SYMPY.search(answer) or _NUMBER_LIST.search(answer):
        return None
    import sympy
    from math_verify import parse  # imported on first use: sympy takes ~1 s to import

    answer = answer.strip()
    if "\\" in answer and "$" not in answer:
        answer = f"${answer}$"  # math_verify reads LaTeX only between delimiters ("\\frac12" alone reads as nothing)
    # math_verify's timeout is signal.alarm, which works only in the main thread (elsewhere it raises)
    seconds = 2 if threading.current_thread() is threading.main_thread() else None
    expressions = [e for e in parse(answer, parsing_timeout=seconds) if isinstance(e, sympy.Basic)]
    if not expressions:
        return None
    expression = expressions[0]
    if isinstance(expression, sympy.Eq) and isinstance(expression.lhs, sympy.Symbol):
        expression = expression.rhs
    if expression.free_symbols:
        return None
    value = sympy.N(expression, 15)
    if not (isinstance(value, sympy.Number) and value.is_finite):  # a set, a truth value, a complex number, nan
        return None
    value = float(value)
    return value if math.isfinite(value) else None  # sympy's 1e400 is finite, a float's is not


def _math_score(answer, truth):
    if answer is None:
        return 0.0
    predicted = read_number(answer)
    if predicted is None:
        value = read_number_with_math_verify(answer)
        predicted = None if value is None else Number(value, False, None)
    return 1.0 if predicted is not None and _numbers_match(predicted, truth) else 0.0


def math_reward(completion, solution, meta=None):
    """1.0 when the answer's number equals the solution's (float noise, a percent sign, and rounding to the
    2+ decimals either side wrote are tolerated). meta is unused (uniform signature)."""
    truth = _parse_truth("math", solution, _check_meta(meta, "math"), "math")
    return _math_score(extract_answer(completion), truth)


# ----------------------------------------------------------------------------------------------------------------
# iou and detection: boxes [x1, y1, x2, y2].

_BOX = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")
_OBJECT = re.compile(r"\{[^{}]*\}")
_CONFIDENCE = re.compile(rf"""["']?confidence["']?\s*:\s*({_NUMBER})""", re.IGNORECASE)


def _predicted_boxes(answer):
    """[(box, confidence)] in answer order. Objects {"Position" | "bbox_2d": [..], "Confidence": c} when there
    are any (single quotes, newlines, [[...]] and a list cut off mid-object all read), else every plain
    [x1, y1, x2, y2] with confidence 1."""
    objects = []
    for match in _OBJECT.finditer(answer):
        box = _BOX.search(match.group())
        if box:
            confidence = _CONFIDENCE.search(match.group())
            objects.append((tuple(map(float, box.groups())), float(confidence.group(1)) if confidence else 1.0))
    return objects or [(tuple(map(float, box.groups())), 1.0) for box in _BOX.finditer(answer)]


def iou(a, b):
    """Intersection over union of two [x1, y1, x2, y2] boxes; 0.0 when either is inverted, empty or not finite."""
    if not all(map(math.isfinite, (*a, *b))) or a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    intersection = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    if intersection <= 0.0:  # disjoint, or so thin the product underflows
        return 0.0
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    if not (math.isfinite(area_a) and math.isfinite(area_b)):  # a box too huge for a float's area
        return 0.0
    union = area_a + area_b - intersection
    if math.isfinite(union):
        value = intersection / union
    else:  # area_a + area_b overflowed: the same ratio in units of the larger area
        scale = max(area_a, area_b)
        value = (intersection / scale) / (area_a / scale + area_b / scale - intersection / scale)
    return min(1.0, value) if math.isfinite(value) else 0.0  # min: rounding can exceed 1 by an ulp


def _to_pixels(box, meta):
    """A predicted box in pixels of the stored image (Qwen2-VL answers on a 0-1000 grid)."""
    if meta.get("box_convention", "pixel") == "pixel":
        return box
    width, height = meta["image_size"]
    return (box[0] * width / 1000, box[1] * height / 1000, box[2] * width / 1000, box[3] * height / 1000)


def _iou_score(answer, truth_box, meta, iou_threshold):
    boxes = _predicted_boxes(answer) if answer is not None else []
    if not boxes:
        return 0.0
    box = max(boxes, key=lambda pair: _rank(pair[1]))[0]  # the most confident; ties: the first
    value = iou(_to_pixels(box, meta), truth_box)
    return value if iou_threshold is None else float(value > iou_threshold)


def _check_iou_threshold(iou_threshold):
    if iou_threshold is not None and not 0.0 < iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must lie in (0, 1), got {iou_threshold!r}")


def _rank(confidence):
    return confidence if math.isfinite(confidence) else 0.0


def iou_reward(completion, solution, meta=None, *, iou_threshold=None):
    """IoU of the answered box (the most confident, when the answer lists several) with the solution's box;
    with iou_threshold, 1.0 when IoU > iou_threshold else 0.0."""
    _check_iou_threshold(iou_threshold)
    meta = _check_meta(meta, "iou")
    truth = _parse_truth("iou", solution, meta, "iou")
    return _iou_score(extract_answer(completion), truth, meta, iou_threshold)


def _overlapping_truths(predicted_boxes, truth_boxes):
    """For each predicted box, [(truth index, IoU)] of the truth boxes it overlaps with IoU > DETECTION_MATCH_IOU,
    indices ascending. numpy computes every pair with the operations of iou(), in its order, so the values are
    bit-identical; the few pairs whose union overflows a float take iou()'s own path. A pure-Python loop over the
    pairs took 14 s for a completion of 3,000 boxes; this is linear in the pairs at numpy speed, in row blocks of
    ~1M pairs so memory stays bounded."""
    truth = np.array(truth_boxes, dtype=np.float64).reshape(-1, 4)
    t_valid = np.isfinite(truth).all(1) & (truth[:, 2] > truth[:, 0]) & (truth[:, 3] > truth[:, 1])
    rows = max(1, 2 ** 20 // max(1, len(truth_boxes)))
    candidates = []
    with np.errstate(all="ignore"):  # overflow and inf - inf are masked below, as iou() rejects them
        t_area = (truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1])
        for start in range(0, len(predicted_boxes), rows):
            pred = np.array(predicted_boxes[start:start + rows], dtype=np.float64).reshape(-1, 4)
            p_valid = np.isfinite(pred).all(1) & (pred[:, 2] > pred[:, 0]) & (pred[:, 3] > pred[:, 1])
            p_area = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
            width = np.maximum(0.0, np.minimum(pred[:, None, 2], truth[None, :, 2]) -
                               np.maximum(pred[:, None, 0], truth[None, :, 0]))
            height = np.maximum(0.0, np.minimum(pred[:, None, 3], truth[None, :, 3]) -
                                np.maximum(pred[:, None, 1], truth[None, :, 1]))
            intersection = width * height
            union = p_area[:, None] + t_area[None, :] - intersection
            scored = (p_valid[:, None] & t_valid[None, :] & (intersection > 0.0) &
                      np.isfinite(p_area)[:, None] & np.isfinite(t_area)[None, :])
            ratio = intersection / union
            value = np.where(scored & np.isfinite(union) & np.isfinite(ratio), np.minimum(1.0, ratio), 0.0)
            for i, j in zip(*np.nonzero(scored & ~np.isfinite(union))):  # iou()'s rescaled path
                value[i, j] = iou(predicted_boxes[start + i], truth_boxes[j])
            for row in value:
                hits = np.nonzero(row > DETECTION_MATCH_IOU)[0]
                candidates.append([(int(j), float(row[j])) for j in hits])
    return candidates


def _detection_score(answer, truth_boxes, meta):
    if answer is None:
        return 0.0
    predicted, seen = [], set()
    for box, confidence in _predicted_boxes(answer):  # duplicates removed, the first kept (as Visual-RFT)
        if box not in seen:
            seen.add(box)
            predicted.append((_to_pixels(box, meta), _rank(confidence)))
    if not truth_boxes:  # the truth is "No Objects": right when nothing is detected
        return 1.0 if not predicted else 0.0
    predicted.sort(key=lambda pair: -pair[1])  # stable: equal confidences keep answer order
    matched, total = set(), 0.0
    for candidates in _overlapping_truths([box for box, _ in predicted], truth_boxes):
        best, best_iou = None, DETECTION_MATCH_IOU
        for index, value in candidates:  # the unmatched truth of highest IoU; ties: the first
            if index not in matched and value > best_iou:
                best, best_iou = index, value
        if best is not None:
            matched.add(best)
            total += best_iou
            if len(matched) == len(truth_boxes):
                break  # the rest can match nothing
    return total / max(len(truth_boxes), len(predicted))


def detection_reward(completion, solution, meta=None):
    """Visual-RFT's detection reward: predicted boxes (duplicates removed, by decreasing confidence) each take the
    unmatched truth box of highest IoU when that IoU > 0.5; reward = sum of matched IoU / max(#truth, #predicted).
    A "No Objects" truth scores 1.0 when no box is predicted."""
    meta = _check_meta(meta, "detection")
    truth = _parse_truth("detection", solution, meta, "detection")
    return _detection_score(extract_answer(completion), truth, meta)


# ----------------------------------------------------------------------------------------------------------------
# Reading solutions (and meta) strictly: a malformed one is an error naming the domain and the value.

def _solution_answer(solution):
    """The text inside the solution's <answer> tag, or the whole solution when it has none."""
    answer = extract_answer(solution)
    return (solution if answer is None else answer).strip()


def _short(value):
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "...'"


def _check_meta(meta, where):
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise SolutionError(f"{where}: meta must be a dict (json.loads the record's meta), got {_short(meta)}")
    convention = meta.get("box_convention", "pixel")
    if convention not in BOX_CONVENTIONS:
        raise SolutionError(f"{where}: meta box_convention {convention!r} is not one of {BOX_CONVENTIONS}")
    size = meta.get("image_size")
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2
                                 and all(_is_number(v) and v > 0 for v in size)):
        raise SolutionError(f"{where}: meta image_size must be [width, height] > 0, got {_short(size)}")
    if convention == "qwen1000" and size is None:
        raise SolutionError(f"{where}: meta box_convention 'qwen1000' needs image_size to convert boxes")
    options = meta.get("options")
    if options is not None and not (isinstance(options, dict)
                                    and all(k in LETTERS and isinstance(v, str) for k, v in options.items())):
        raise SolutionError(f"{where}: meta options must map letters A-H to text, got {_short(options)}")
    return meta


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _truth_box(value, meta, where, solution):
    if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(map(_is_number, value))):
        raise SolutionError(f"{where}: solution {_short(solution)} has a box {_short(value)} that is not "
                            "[x1, y1, x2, y2] of finite numbers")
    x1, y1, x2, y2 = map(float, value)
    if x2 <= x1 or y2 <= y1:
        raise SolutionError(f"{where}: solution {_short(solution)} has an empty or inverted box {_short(value)}")
    size = meta.get("image_size")
    if size is not None and (x1 < -1 or y1 < -1 or x2 > size[0] + 1 or y2 > size[1] + 1):  # 1 px for rounding
        raise SolutionError(f"{where}: solution {_short(solution)} has a box {_short(value)} outside the "
                            f"{size[0]}x{size[1]} image (solution boxes are pixels of the stored image)")
    return (x1, y1, x2, y2)


def _truth_boxes(solution, meta, where):
    """Boxes of a detection/grounding solution: [{'Position': [..], 'Confidence': 1}, ...] (Visual-RFT, LISA),
    [[x1, y1, x2, y2], ...], one [x1, y1, x2, y2], or "No Objects"; optionally inside <answer> tags."""
    text = _solution_answer(solution)
    if _normalize_text(text) in ("no objects", "no object"):
        return []
    try:
        value = ast.literal_eval(text)  # Python literals read the official single-quoted data and JSON alike
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise SolutionError(f"{where}: solution {_short(solution)} is not a list of boxes") from None
    if isinstance(value, (list, tuple)) and value and not any(isinstance(v, (list, tuple, dict)) for v in value):
        value = [value]  # one box
    if not isinstance(value, (list, tuple)):
        raise SolutionError(f"{where}: solution {_short(solution)} is not a list of boxes")
    boxes = []
    for item in value:
        if isinstance(item, dict):
            keys = [k for k in ("Position", "bbox_2d", "bbox") if k in item]
            if not keys:
                raise SolutionError(f"{where}: solution {_short(solution)} has an object without 'Position'")
            item = item[keys[0]]
        boxes.append(_truth_box(item, meta, where, solution))
    return boxes


def _parse_truth(reward, solution, meta, where):
    if not isinstance(solution, str):
        raise SolutionError(f"{where}: solution must be a string, got {_short(solution)}")
    if reward == "choice":
        text = _MARKUP.sub("", _solution_answer(solution)).strip()
        match = _BARE_LETTER.fullmatch(text) or _LEADING_LETTER.match(text)
        if match is None:
            raise SolutionError(f"{where}: solution {_short(solution)} is not an option letter A-H")
        letter = match.group(1).upper()
        options = meta.get("options") or {}
        if options and letter not in options:
            raise SolutionError(f"{where}: solution letter {letter} is not among the options {sorted(options)}")
        rest = text[match.end() - 1:].strip() if match.re is _LEADING_LETTER else ""
        return Choice(letter, options.get(letter) or rest or None)
    if reward == "math":
        number = read_number(_solution_answer(solution))
        if number is None:
            raise SolutionError(f"{where}: solution {_short(solution)} is not a number this reward reads")
        return number
    if reward == "iou":
        boxes = _truth_boxes(solution, meta, where)
        if len(boxes) != 1:
            raise SolutionError(f"{where}: solution {_short(solution)} must hold exactly one box, has {len(boxes)}")
        return boxes[0]
    if reward == "detection":
        return _truth_boxes(solution, meta, where)
    raise ValueError(f"no solution to parse for reward {reward!r}")


def parse_solution(solution, domain, meta=None):
    """The domain's ground truth read from a record's solution string: a Choice, a Number, one box, or a list of
    boxes (pixels). Raises SolutionError naming the domain and the value when it cannot be read (prepare_data.py
    validates records with this)."""
    reward = _accuracy_reward_of(domain)
    return _parse_truth(reward, solution, _check_meta(meta, domain), domain)


# ----------------------------------------------------------------------------------------------------------------
# The router.

def score(completion, solution, domain, meta=None, *, format_mode="strict", gate_on_format=True,
          iou_threshold=None):
    """Every reward of the domain and their weighted total: {"<accuracy reward>": a, "format": f, "total": t}.
    With gate_on_format (the paper), a failed format zeroes the accuracy reward as well; the values returned are
    the ones the total is made of. Raises SolutionError for a malformed solution or meta, never for a completion."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a string, got {type(completion).__name__}")
    _check_iou_threshold(iou_threshold)
    rewards = _rewards_of(domain)
    meta = _check_meta(meta, domain)
    truth = parse_solution(solution, domain, meta)
    formatted = format_reward(completion, mode=format_mode)
    result = {}
    for name, _ in rewards:
        if name == "format":
            result[name] = formatted
        elif gate_on_format and formatted < 1.0:
            result[name] = 0.0
        else:
            result[name] = _accuracy(name, extract_answer(completion), truth, meta, iou_threshold)
    # rounded so that 2 * 0.9025 + 1 reads 2.805, not 2.8049999999999997, in logs and JSON
    result["total"] = round(sum(weight * result[name] for name, weight in rewards), 12)
    return result


def _accuracy(name, answer, truth, meta, iou_threshold):
    if name == "choice":
        return _choice_score(answer, truth, meta.get("options") or {})
    if name == "math":
        return _math_score(answer, truth)
    if name == "iou":
        return _iou_score(answer, truth, meta, iou_threshold)
    return _detection_score(answer, truth, meta)


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    domains = "\n".join(f"  {domain:15} " + ", ".join(f"{name} x{weight:g}" for name, weight in rewards)
                        for domain, rewards in DOMAIN_REWARDS.items())
    parser = argparse.ArgumentParser(
        description="Score one completion against a record's solution with the domain's verifiable rewards.\n"
                    "Prints the JSON dict score() returns: each reward and the weighted total.",
        epilog=f"domains and their rewards:\n{domains}\n\nexample:\n  python rewards.py --domain lisa "
               "--solution '<answer>[10, 10, 50, 50]</answer>' \\\n    --completion $'<think>\\nthe dog\\n</think>"
               "\\n<answer>\\n[12, 10, 50, 48]\\n</answer>'\n  -> {\"iou\": 0.9025, \"format\": 1.0, \"total\": 2.805}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", required=True, choices=list(DOMAIN_REWARDS), metavar="DOMAIN",
                        help="the record's domain (listed below)")
    parser.add_argument("--solution", required=True, help="the record's solution string, e.g. '<answer>B</answer>'")
    parser.add_argument("--completion", required=True, help="the model's completion; '-' reads it from stdin")
    parser.add_argument("--meta", default="{}",
                        help="the record's meta as JSON, e.g. '{\"image_size\": [640, 480], "
                             "\"box_convention\": \"qwen1000\"}' or '{\"options\": {\"A\": \"left\"}}'")
    parser.add_argument("--format", dest="format_mode", choices=FORMAT_MODES, default="strict",
                        help="strict: the official newline layout (default); lenient: any whitespace")
    parser.add_argument("--no_gate", dest="gate_on_format", action="store_false",
                        help="score accuracy even when the format fails (the official code); default: the "
                             "paper's rule, a failed format zeroes every reward")
    parser.add_argument("--iou_threshold", type=float, default=None, metavar="T",
                        help="iou gives 1.0 when IoU > T else 0.0 (the official code uses 0.5); default: the IoU")
    args = parser.parse_args(argv)
    completion = sys.stdin.read() if args.completion == "-" else args.completion
    try:
        meta = json.loads(args.meta)
    except json.JSONDecodeError as error:
        parser.error(f"--meta is not JSON ({error}): {args.meta!r}")
    try:
        result = score(completion, args.solution, args.domain, meta, format_mode=args.format_mode,
                       gate_on_format=args.gate_on_format, iou_threshold=args.iou_threshold)
    except ValueError as error:  # SolutionError, or an iou threshold outside (0, 1)
        parser.error(str(error))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
