"""
Prepares every dataset the later stages read, in one record format, saved per domain and split.

    python prepare_data.py                          # the offline synthetic suite (the default), into data/
    python prepare_data.py --dataset paper          # the paper's five training sets and their test sets (hub)
    python prepare_data.py --dataset benchmarks     # ChartQA, InfoVQA, MathVista, MMMU: out-of-domain tests (hub)
    python prepare_data.py --dataset lisa --split test --source /mirrors/lisa-problems-dataset-test
    python prepare_data.py --contact_sheet docs/synthetic_contact_sheet.png

Every record: id, domain, image (datasets Image), problem (the user text exactly as the model sees it, instruction
suffix included), solution (what that domain's reward in rewards.py reads, e.g. "<answer>B</answer>"), meta (a JSON
string: image_size, box_convention, options, source, and for the synthetic suite a short rationale).
Each split is a save_to_disk folder <data_dir>/<domain>/<split>; <data_dir>/manifest.json indexes them (rows, content
fingerprint, rows skipped with their reasons, which test sets are in-domain and which out-of-domain). The manifest is
the only index: a split exists when the manifest lists it, and a split is listed only once its folder is complete.
A run that is killed leaves the splits it had yet to finish in the manifest's "pending_splits", and training and
evaluation refuse the manifest until the same command, run again, has finished them.
"""
import argparse
import ast
import contextlib
import fcntl
import hashlib
import io
import json
import os
import random
import re
import shutil
import textwrap
from collections import Counter, namedtuple

# Idle OpenMP threads that spin instead of sleeping make torch 10-20x slower when another program uses a core
# (measured: GRPO 9-17 s/step instead of 0.6 s); set before torch loads, and a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datasets
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import rewards
import vlm

# The paper's reasoning suffixes. MoDoMoDo appends the "(option)" one to SAT, GeoQA, GeoQAV and ScienceQA alike
# (its official code with two spaces before "Output"; we use one, as the issue states). The plain one is R1-V's.
SUFFIX_OPTION = " Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
SUFFIX_PLAIN = " Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
MAX_SIDE = 640  # the paper resizes LISA and GeoQAV images whose longer side exceeds 640 px
FORMAT_VERSION = 1
RECORD_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "domain": datasets.Value("string"),
    "image": datasets.Image(),
    "problem": datasets.Value("string"),
    "solution": datasets.Value("string"),
    "meta": datasets.Value("string"),
})
LETTERS = "ABCDEFGH"


class BadRow(ValueError):
    """One source row that cannot become a record; skipped and counted, or fatal under --strict."""


# ----------------------------------------------------------------------------------------------------------------
# Writing splits and the manifest

def image_digest(img):
    """Hash of the decoded pixels, so a fingerprint does not depend on the PNG/JPEG encoder's version."""
    h = hashlib.sha256(f"{img.mode} {img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def record_digest(record, img):
    fields = json.dumps([record["id"], record["domain"], record["problem"], record["solution"], record["meta"]])
    return hashlib.sha256((fields + image_digest(img)).encode()).hexdigest()


def combine(digests):
    h = hashlib.sha256()
    for d in digests:
        h.update(d.encode())
    return h.hexdigest()


def fingerprint(rows):
    """sha256 over the records in order: text fields and decoded pixels. Works on a split loaded from disk."""
    return combine(record_digest(row, row["image"]) for row in rows)


def script_sha256():
    # Part of every split's recipe: a changed converter or generator rebuilds, an unchanged one is skipped.
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def empty_manifest():
    return {"format_version": FORMAT_VERSION, "datasets": {}, "evaluation": {"in_domain": [], "out_of_domain": []}}


def read_manifest(data_dir):
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(path):
        return empty_manifest()
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def manifest_transaction(data_dir):
    """Read-modify-write of manifest.json under a file lock (several invocations may share a data_dir), written
    atomically: a temporary file, fsync, rename."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".manifest.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(data_dir)
        yield manifest
        manifest["evaluation"] = evaluation_sets(manifest)
        path = os.path.join(data_dir, "manifest.json")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def evaluation_sets(manifest):
    """In-domain: the held-out splits of datasets we train on; out-of-domain: every split of a benchmark."""
    in_domain, out_of_domain = [], []
    for domain, entry in sorted(manifest["datasets"].items()):
        for split in sorted(entry["splits"]):
            if entry["role"] == "benchmark":
                out_of_domain.append(f"{domain}/{split}")
            elif split != "train":
                in_domain.append(f"{domain}/{split}")
    return {"in_domain": in_domain, "out_of_domain": out_of_domain}


def is_up_to_date(data_dir, domain, split, recipe):
    """Listed with this recipe, and its files are still the ones written (a deleted, cut or edited split rebuilds)."""
    entry = read_manifest(data_dir)["datasets"].get(domain, {}).get("splits", {}).get(split)
    if entry is None or entry.get("recipe") != recipe:
        return False
    try:
        return vlm.split_files_sha256(os.path.join(data_dir, domain, split)) == entry.get("files_sha256")
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_split(data_dir, domain, split, records, digests, skipped, info, recipe):
    """Saves the records to a hidden temporary folder, then swaps it into place under the manifest lock: the entry is
    removed, the folder renamed, the entry written. A run killed at any point leaves either the old complete split
    listed, or no listing, never a listed half-written folder."""
    domain_dir = os.path.join(data_dir, domain)
    os.makedirs(domain_dir, exist_ok=True)
    for name in os.listdir(domain_dir):  # leftovers of a killed run
        if name.startswith(f".{split}.partial-") or name.startswith(f".{split}.old-"):
            shutil.rmtree(os.path.join(domain_dir, name), ignore_errors=True)
    final = os.path.join(domain_dir, split)
    partial = os.path.join(domain_dir, f".{split}.partial-{os.getpid()}")
    dataset = datasets.Dataset.from_list(records, features=RECORD_FEATURES)
    datasets.disable_progress_bars()  # our own tqdm bar has shown the work; keep the hub's download bars elsewhere
    try:
        dataset.save_to_disk(partial)
    finally:
        datasets.enable_progress_bars()
    split_entry = {"path": f"{domain}/{split}", "rows": len(records), "fingerprint": combine(digests),
                   "files_sha256": vlm.split_files_sha256(partial),  # what training and evaluation check, cheaply
                   "n_skipped": len(skipped), "skipped": skipped, "source": info["split_source"], "recipe": recipe}
    with manifest_transaction(data_dir) as manifest:
        manifest["datasets"].get(domain, {}).get("splits", {}).pop(split, None)
    with manifest_transaction(data_dir) as manifest:
        old = os.path.join(domain_dir, f".{split}.old-{os.getpid()}")
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
        entry = manifest["datasets"].setdefault(domain, {"source": "", "reward": info["reward"], "role": info["role"],
                                                         "splits": {}})
        entry.update(reward=info["reward"], role=info["role"])
        entry["splits"][split] = split_entry
        entry["splits"] = dict(sorted(entry["splits"].items()))
        sources = sorted({s["source"] for s in entry["splits"].values()})
        entry["source"] = "; ".join(sources)
    return split_entry


def make_record(record_id, domain, image_bytes, problem, solution, meta):
    return {"id": record_id, "domain": domain, "image": {"bytes": image_bytes, "path": None}, "problem": problem,
            "solution": solution, "meta": json.dumps(meta, sort_keys=True)}


def encode_png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# The synthetic suite: procedurally drawn scenes, small enough for a 0.8M-parameter Qwen2-VL on a CPU (112 px images
# are 16 image tokens, 56 px are 4). Five training domains mirror the paper's five reward types; three held-out
# test domains combine their skills (colour grounding + counting, counting + choosing, reading bars = counting
# blocks of one colour), so which training mixture helps out-of-domain is a real question.

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (214, 48, 49), "green": (46, 160, 67), "blue": (40, 90, 210), "yellow": (232, 190, 20)}
SIDES = {"circle": "0", "triangle": "3", "square": "4"}
MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("blue", "red"): "purple"}
RELATIONS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


def plural(word, n=2):
    return word if n == 1 else word + "s"


CELL = 28  # px of picture behind one image token of the tiny model (14 px patches, merged 2 x 2)
GRID_SIZES = (16, 24)  # --layout=grid: an object covers a third of its cell or more and stays 2 px inside it


def place(rng, specs, canvas, accept=None, min_size=14, max_size=24, gap=3, grid=False):
    """Non-overlapping objects for (shape, colour) specs, boxes [x1, y1, x2, y2] in pixels (x2, y2 exclusive);
    `accept(objects)` can demand a layout (e.g. a spatial relation). Rejection sampling from the seeded rng.
    grid=True: each object centred in its own CELL x CELL cell, its size clipped to GRID_SIZES, so that one image
    token holds one whole object (prepare_data.py --layout=grid)."""
    for _ in range(2000):
        if grid:
            cells = rng.sample(range((canvas // CELL) ** 2), len(specs))
            sizes = max(min_size, GRID_SIZES[0]), min(max_size, GRID_SIZES[1])
            objects = [centred_in_cell(shape, color, cell, rng.randint(*sizes), canvas)
                       for (shape, color), cell in zip(specs, cells)]
        else:
            objects = scattered(rng, specs, canvas, min_size, max_size, gap)
        if len(objects) == len(specs) and (accept is None or accept(objects)):
            return objects
    raise RuntimeError(f"could not place {specs} on a {canvas} px canvas")


def centred_in_cell(shape, color, cell, size, canvas):
    row, col = divmod(cell, canvas // CELL)
    x, y = CELL * col + (CELL - size) // 2, CELL * row + (CELL - size) // 2
    return {"shape": shape, "color": color, "box": [x, y, x + size, y + size]}


def scattered(rng, specs, canvas, min_size, max_size, gap):
    """Objects anywhere, each at least `gap` px from the others; fewer than asked when one finds no room."""
    objects = []
    for shape, color in specs:
        for _ in range(100):
            s = rng.randint(min_size, max_size)
            x, y = rng.randint(2, canvas - s - 2), rng.randint(2, canvas - s - 2)
            box = [x, y, x + s, y + s]
            if all(box[0] >= o["box"][2] + gap or o["box"][0] >= box[2] + gap or
                   box[1] >= o["box"][3] + gap or o["box"][1] >= box[3] + gap for o in objects):
                objects.append({"shape": shape, "color": color, "box": box})
                break
    return objects


def draw(objects, canvas):
    img = Image.new("RGB", (canvas, canvas), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            d.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif o["shape"] == "square":
            d.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
        else:  # an upright triangle filling its box
            d.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    return img


def inventory(objects):
    """'2 red circles, 1 blue square': the scene as the cold-start rationale describes it."""
    counts = Counter((o["color"], o["shape"]) for o in objects)
    return ", ".join(f"{n} {c} {plural(s, n)}" for (c, s), n in sorted(counts.items())) or "nothing"


def where(box, canvas):
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = ("top", "middle", "bottom")[min(2, int(3 * cy / canvas))]
    col = ("left", "center", "right")[min(2, int(3 * cx / canvas))]
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def cell_of(box):
    """(row, column), from 1, of the CELL x CELL cell that a box's centre is in: the image token that holds it."""
    return (box[1] + box[3]) // 2 // CELL + 1, (box[0] + box[2]) // 2 // CELL + 1


def cell_words(obj):
    return "row {} column {}".format(*cell_of(obj["box"]))


def scan(objects):
    """'red circle in row 1 column 2, blue square in row 3 column 1': every object, row by row, with its cell."""
    in_rows = sorted(objects, key=lambda o: cell_of(o["box"]))
    return ", ".join(f"{o['color']} {o['shape']} in {cell_words(o)}" for o in in_rows)


def named_cells(domain, example):
    """'; so the red circle is in row 2 column 1' (and, for spatial relations, the second object and the relation):
    the claim that ends a scan or find rationale."""
    a = example["objects"][0]  # grounding's target; spatial relations' two named objects are the first two
    if domain == "syn_ground":
        return f"; so the {a['color']} {a['shape']} is in {cell_words(a)}"
    b = example["objects"][1]
    return (f"; so the {a['color']} {a['shape']} is in {cell_words(a)} and the {b['color']} {b['shape']} in "
            f"{cell_words(b)}, so {example['rationale']}")


def scan_rationale(domain, example):
    """--rationale=scan for syn_ground and syn_spatial: the picture read object by object first, then the named
    objects looked up in that list, so that the model need not find a named object among several in one step
    (docs/testbed_log.md, item 20)."""
    return scan(example["objects"]) + named_cells(domain, example)


def find_rationale(domain, example):
    """--rationale=find for syn_ground and syn_spatial: the picture read object by object, each judged right after
    its words against the objects the question names (`blue circle no in row 1 column 3, red circle yes in row 2
    column 1`), so that the named object is found by comparing the object just read with the question, never by
    looking its words up in a list (docs/testbed_log.md, item 22). Grounding's scan stops at the named object;
    spatial relations' lists every object."""
    objects = example["objects"]
    named = objects[:1] if domain == "syn_ground" else objects[:2]
    in_rows = sorted(objects, key=lambda o: cell_of(o["box"]))
    if domain == "syn_ground":
        in_rows = in_rows[:in_rows.index(named[0]) + 1]
    listed = ", ".join(f"{o['color']} {o['shape']} {'yes' if o in named else 'no'} in {cell_words(o)}"
                       for o in in_rows)
    return listed + named_cells(domain, example)


SCANNED = ("syn_ground", "syn_spatial")
RATIONALES = {"scan": scan_rationale, "find": find_rationale}


def random_specs(rng, n, shapes=SHAPES, colors=tuple(COLORS)):
    return [(rng.choice(shapes), rng.choice(colors)) for _ in range(n)]


def lettered(rng, texts, correct):
    """Options in a random order as {"A": text, ...} and the letter of the correct one."""
    texts = list(texts)
    rng.shuffle(texts)
    options = {LETTERS[i]: t for i, t in enumerate(texts)}
    return options, LETTERS[texts.index(correct)]


def options_text(options):
    return "\n".join(f"{k}. {v}" for k, v in options.items())


def reading_order(boxes):
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def gen_detect(rng, grid=False):
    """Detection, the hardest domain: every object of one shape (1-3), among 0-2 others."""
    target = rng.choice(SHAPES)
    others = [s for s in SHAPES if s != target]
    specs = random_specs(rng, rng.randint(1, 3), shapes=[target]) + random_specs(rng, rng.randint(0, 2), others)
    objects = place(rng, specs, 112, grid=grid)
    boxes = reading_order([o["box"] for o in objects if o["shape"] == target])
    return dict(canvas=112, objects=objects, answer=json.dumps(boxes), options=None, rationale=inventory(objects),
                problem=f"Detect every {target} in the image and give its bounding box [x1, y1, x2, y2] in pixels.")


def gen_ground(rng, grid=False):
    """Grounding: the one object with a given colour and shape; distractors share one of the two."""
    color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
    specs = [(shape, color)]
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            specs.append((shape, rng.choice([c for c in COLORS if c != color])))
        else:
            specs.append((rng.choice([s for s in SHAPES if s != shape]), color))
    objects = place(rng, specs, 112, grid=grid)
    box = objects[0]["box"]
    return dict(canvas=112, objects=objects, answer=json.dumps(box), options=None,
                rationale=f"the {color} {shape} is at the {where(box, 112)}",
                problem=f"Locate the {color} {shape} and give its bounding box [x1, y1, x2, y2] in pixels.")


def gen_count(rng, grid=False):
    """Counting by shape (or all shapes): a number, 0-6."""
    objects = place(rng, random_specs(rng, rng.randint(1, 6)), 112, grid=grid)
    if rng.random() < 0.3:
        return dict(canvas=112, objects=objects, answer=str(len(objects)), options=None, rationale=inventory(objects),
                    problem="How many shapes are there in the image?")
    shape = rng.choice(SHAPES)
    n = sum(o["shape"] == shape for o in objects)
    return dict(canvas=112, objects=objects, answer=str(n), options=None, rationale=inventory(objects),
                problem=f"How many {plural(shape)} are there in the image?")


def relation_holds(a, b, relation):
    """a is `relation` of b, unambiguously: at least 24 px apart on one axis, at most 10 px off on the other."""
    dx = (a["box"][0] + a["box"][2] - b["box"][0] - b["box"][2]) / 2
    dy = (a["box"][1] + a["box"][3] - b["box"][1] - b["box"][3]) / 2
    main, off = {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return main >= 24 and abs(off) <= 10


def gen_spatial(rng, grid=False):
    """Spatial relation multiple choice, like SAT: where is one object relative to another (4 options)."""
    (s1, c1), (s2, c2) = rng.sample([(s, c) for s in SHAPES for c in COLORS], 2)
    specs = [(s1, c1), (s2, c2)]
    if rng.random() < 0.5:
        specs.append(rng.choice([(s, c) for s in SHAPES for c in COLORS if (s, c) not in specs]))
    relation = rng.choice(tuple(RELATIONS))
    objects = place(rng, specs, 112, accept=lambda objs: relation_holds(objs[0], objs[1], relation), grid=grid)
    options, letter = lettered(rng, RELATIONS, relation)
    return dict(canvas=112, objects=objects, answer=letter, options=options,
                rationale=f"the {c1} {s1} is {RELATIONS[relation]} the {c2} {s2}",
                problem=f"Where is the {c1} {s1} relative to the {c2} {s2}?\n{options_text(options)}")


def gen_science(rng, grid=False):
    """Knowledge multiple choice, like ScienceQA: a fact the picture points to (sides of a shape, colour mixing).
    Its 56 px pictures (2 x 2 image tokens) hold one or two shapes larger than a cell: `grid` changes nothing."""
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        objects = place(rng, [(shape, rng.choice(tuple(COLORS)))], 56, min_size=24, max_size=36)
        options, letter = lettered(rng, sorted(set(SIDES.values())), SIDES[shape])
        return dict(canvas=56, objects=objects, answer=letter, options=options,
                    rationale=f"a {shape} has {SIDES[shape]} sides",
                    problem=f"How many sides does the shape have?\n{options_text(options)}")
    pair = rng.choice(tuple(MIXES))
    objects = place(rng, [("circle", c) for c in rng.sample(pair, 2)], 56, min_size=16, max_size=22)
    options, letter = lettered(rng, sorted(MIXES.values()), MIXES[pair])
    return dict(canvas=56, objects=objects, answer=letter, options=options,
                rationale=f"{pair[0]} and {pair[1]} make {MIXES[pair]}",
                problem=f"Which color do you get by mixing the two colors?\n{options_text(options)}")


def gen_chart(rng, grid=False):
    """Out-of-domain: read a bar's value. Bars are stacks of unit blocks, so reading one is grounding a colour and
    counting; the picture is drawn here, not by draw(), and `grid` changes nothing."""
    colors = rng.sample(tuple(COLORS), rng.randint(2, 4))
    values = [rng.randint(1, 8) for _ in colors]
    img = Image.new("RGB", (112, 112), (255, 255, 255))
    d = ImageDraw.Draw(img)
    slot = 104 // len(colors)
    for i, (color, value) in enumerate(zip(colors, values)):
        x = 4 + i * slot + (slot - 14) // 2
        for k in range(value):
            d.rectangle([x, 104 - 11 * k - 9, x + 13, 104 - 11 * k], fill=COLORS[color])
    d.line([2, 106, 109, 106], fill=(0, 0, 0), width=1)
    i = rng.randrange(len(colors))
    return dict(image=img, answer=str(values[i]), options=None,
                rationale=f"the {colors[i]} bar has {values[i]} blocks",
                problem=f"What is the value of the {colors[i]} bar?")


def gen_colorcount(rng, grid=False):
    """Out-of-domain: count the objects of one colour (colour grounding + counting)."""
    objects = place(rng, random_specs(rng, rng.randint(2, 6)), 112, grid=grid)
    color = rng.choice(tuple(COLORS))
    same = [o for o in objects if o["color"] == color]
    return dict(canvas=112, objects=objects, answer=str(len(same)), options=None,
                rationale=inventory(same) if same else f"no {color} shapes",
                problem=f"How many {color} shapes are there in the image?")


def gen_compare(rng, grid=False):
    """Out-of-domain: which of two groups is larger, by shape or by colour (counting + choosing)."""
    n1, n2 = rng.sample(range(1, 5), 2)
    if rng.random() < 0.5:
        a, b = rng.sample(SHAPES, 2)
        specs = [(a, rng.choice(tuple(COLORS))) for _ in range(n1)] + [(b, rng.choice(tuple(COLORS))) for _ in range(n2)]
        names = (plural(a), plural(b))
        question = f"Are there more {names[0]} or {names[1]}?"
        rationale = f"{n1} {plural(a, n1)}, {n2} {plural(b, n2)}"
    else:
        a, b = rng.sample(tuple(COLORS), 2)
        specs = [(rng.choice(SHAPES), a) for _ in range(n1)] + [(rng.choice(SHAPES), b) for _ in range(n2)]
        names = (a, b)
        question = f"Are there more {a} or {b} shapes?"
        rationale = f"{n1} {a}, {n2} {b}"
    objects = place(rng, specs, 112, min_size=12, max_size=20, grid=grid)
    options, letter = lettered(rng, names, names[0] if n1 > n2 else names[1])
    return dict(canvas=112, objects=objects, answer=letter, options=options, rationale=rationale,
                problem=f"{question}\n{options_text(options)}")


# domain -> (generator, role, reward type). The reward weights live in rewards.DOMAIN_REWARDS under the same key.
SYNTHETIC = {
    "syn_detect": (gen_detect, "train", "detection"),
    "syn_ground": (gen_ground, "train", "iou"),
    "syn_count": (gen_count, "train", "math"),
    "syn_spatial": (gen_spatial, "train", "choice"),
    "syn_science": (gen_science, "train", "choice"),
    "syn_chart": (gen_chart, "benchmark", "math"),
    "syn_colorcount": (gen_colorcount, "benchmark", "math"),
    "syn_compare": (gen_compare, "benchmark", "choice"),
}


class OptionsInGivenOrder(random.Random):
    """The rng of --option_order=fixed: the choice generators' one shuffle (of the options) does nothing, so each
    option keeps its letter (spatial: A left, B right, C above, D below) and an answer letter is a function of the
    answer's content. A 2-layer model then needs no content -> letter look-up in the prompt (issue 17)."""

    def shuffle(self, x):
        pass


def synthetic_example(domain, split, index, seed, option_order="fixed", layout="free", count_answers="natural",
                      rationale="short"):
    """One example, from its own rng: any record can be regenerated alone, and train and test never share a draw.
    count_answers="uniform": a syn_count answer is drawn uniformly from 0-6 first and scenes are drawn until one has
    it, so that no constant answer scores more than about 1/7 (with "natural" counts answering 1 scores 0.31).
    rationale="scan": grounding's and spatial relations' rationales list every object with its cell first
    (scan_rationale); "find" judges each listed object against the question too (find_rationale); the pictures and
    answers are the same."""
    generate, _, kind = SYNTHETIC[domain]
    rng = (OptionsInGivenOrder if option_order == "fixed" else random.Random)(f"{seed}/{domain}/{split}/{index}")
    wanted = str(rng.randint(0, 6)) if domain == "syn_count" and count_answers == "uniform" else None
    example = generate(rng, grid=layout == "grid")
    while wanted not in (None, example["answer"]):
        example = generate(rng, grid=layout == "grid")
    image = example["image"] if "image" in example else draw(example["objects"], example["canvas"])
    problem = example["problem"] + (SUFFIX_OPTION if kind == "choice" else SUFFIX_PLAIN)
    scanned = rationale in RATIONALES and domain in SCANNED
    why = RATIONALES[rationale](domain, example) if scanned else example["rationale"]
    meta = {"image_size": list(image.size), "box_convention": "pixel", "rationale": why,
            "source": {"dataset": f"synthetic (seed {seed})", "split": split, "row": index}}
    if example["options"]:
        meta["options"] = example["options"]
    return image, f"{domain}-{split}-{index:05d}", problem, f"<answer>{example['answer']}</answer>", meta


def synthetic_splits(n_train, n_test, only=None):
    """(domain, split, rows) of the synthetic suite: train and test of the training domains, test of the others;
    only the `only` split when given."""
    return [(domain, split, n) for domain, (_, role, _) in SYNTHETIC.items()
            for split, n in ({"train": n_train, "test": n_test} if role == "train" else {"test": n_test}).items()
            if only in (None, split)]


def build_synthetic(data_dir, seed, splits, force=False, option_order="fixed", layout="free", count_answers="natural",
                    rationale="short"):
    source = (f"synthetic (seed {seed})" + (", options in a fixed order" if option_order == "fixed" else "")
              + (", objects on the image-token grid" if layout == "grid" else "")
              + (", counts uniform over 0-6" if count_answers == "uniform" else "")
              + {"short": "", "scan": ", rationales that scan the picture",
                 "find": ", rationales that find the named objects while scanning"}[rationale])
    for domain, split, n in splits:
        recipe = {"source": source, "rows": n, "script_sha256": script_sha256()}
        if not force and is_up_to_date(data_dir, domain, split, recipe):
            print(f"{domain}/{split}: up to date")
            continue
        records, digests = [], []
        for i in tqdm(range(n), desc=f"{domain}/{split}", leave=False):
            image, record_id, problem, solution, meta = synthetic_example(domain, split, i, seed, option_order, layout,
                                                                          count_answers, rationale)
            records.append(make_record(record_id, domain, encode_png(image), problem, solution, meta))
            digests.append(record_digest(records[-1], image))
        info = {"reward": domain, "role": SYNTHETIC[domain][1], "split_source": source}
        entry = write_split(data_dir, domain, split, records, digests, [], info, recipe)
        print(f"{domain}/{split}: {entry['rows']} rows")


def contact_sheet(path, seed, layout="free", count_answers="natural", rationale="short", per_domain=4):
    """A PNG with a few test examples of each synthetic domain: image (3x for 56 px, 2x for 112 px, gold boxes drawn
    in black), problem without the constant suffix, answer and rationale written under it."""
    font = ImageFont.load_default(size=11)
    tile_w, text_lines, line_h, label_w = 250, 11, 13, 120
    row_h = 224 + 8 + text_lines * line_h + 12
    sheet = Image.new("RGB", (label_w + per_domain * tile_w, 30 + len(SYNTHETIC) * row_h), "white")
    d = ImageDraw.Draw(sheet)
    d.text((8, 8), f"Synthetic suite (seed {seed}), test split. Every problem ends with the paper's suffix "
                   f"(choice domains: the '(option)' one). Black boxes: the gold answer.", fill="black", font=font)
    for r, (domain, (_, role, kind)) in enumerate(SYNTHETIC.items()):
        y0 = 30 + r * row_h
        d.text((8, y0 + 100), f"{domain}\n{kind}\n({role})", fill="black", font=font)
        for k in range(per_domain):
            image, _, problem, solution, meta = synthetic_example(domain, "test", k, seed, layout=layout,
                                                                  count_answers=count_answers, rationale=rationale)
            scale = 224 // image.size[0]
            big = image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)
            if kind in ("detection", "iou"):
                boxes = json.loads(solution[len("<answer>"):-len("</answer>")])
                for b in boxes if kind == "detection" else [boxes]:
                    ImageDraw.Draw(big).rectangle([v * scale for v in b], outline="black", width=2)
            x0 = label_w + k * tile_w
            sheet.paste(big, (x0, y0))
            question = problem.replace(SUFFIX_OPTION, "").replace(SUFFIX_PLAIN, "")
            lines = [w for part in question.split("\n") for w in textwrap.wrap(part, 38)]
            lines += textwrap.wrap(f"answer: {solution}", 38) + textwrap.wrap(f"think: {meta['rationale']}", 38)
            d.multiline_text((x0, y0 + 228), "\n".join(lines[:text_lines]), fill="black", font=font, spacing=2)
        d.line([0, y0 + row_h - 4, sheet.size[0], y0 + row_h - 4], fill=(200, 200, 200))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sheet.save(path)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------------
# Hub sources: the paper's training sets and the out-of-domain benchmarks, converted from their exact raw schemas.

def answer_content(text):
    """The text inside <answer>...</answer>, or the whole text when there is no tag."""
    m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return (m.group(1) if m else text).strip()


def decode_image(value, field):
    """(decoded image, its original bytes) from a raw Image column read with decode=False."""
    if value is None:
        raise BadRow(f"missing field '{field}'")
    data = value.get("bytes")
    if data is None and value.get("path"):
        with open(value["path"], "rb") as f:
            data = f.read()
    if not data:
        raise BadRow(f"missing field '{field}'")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        # PIL names the buffer by its address; without it, re-runs write the same reason
        message = re.sub(r" ?<[^<>]* at 0x[0-9a-f]+>", "", str(e))
        raise BadRow(f"undecodable image in '{field}': {type(e).__name__}: {message}") from None
    return img, data


def require_text(row, field):
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadRow(f"missing field '{field}'")
    return value


def stored(img, original, max_side=None):
    """Image bytes to store and the image they decode to (for the fingerprint). The original bytes are kept unless
    the longer side exceeds max_side; a shrunk photo is re-encoded as JPEG (quality 95), anything else as PNG."""
    w, h = img.size
    if max_side is None or max(w, h) <= max_side:
        return original, img
    s = max_side / max(w, h)
    rgb = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    small = rgb.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
    buf = io.BytesIO()
    if img.format == "JPEG" and small.mode == "RGB":
        small.save(buf, format="JPEG", quality=95)
    else:
        small.save(buf, format="PNG")
    data = buf.getvalue()
    return data, Image.open(io.BytesIO(data))


NUMBER = r"(-?\d+(?:\.\d+)?)"
BOX = re.compile(r"\[\s*" + r"\s*,\s*".join([NUMBER] * 4) + r"\s*\]")


def boxes_in(solution):
    """Every [x1, y1, x2, y2] in the answer: reads Visual-RFT's [{'Position': [...], 'Confidence': c}, ...] and
    plain [[...], ...] or [...] alike. Visual-RFT's "No Objects" (its prompts ask for it) is no box."""
    answer = answer_content(solution)
    if answer.strip(" .'\"").lower() == "no objects":
        return []
    boxes = [[float(v) for v in m] for m in BOX.findall(answer)]
    if not boxes:
        raise BadRow(f"unparsable solution: no [x1, y1, x2, y2] box in {solution[:200]!r}")
    return boxes


def on_grid(v):
    """A grid coordinate as the dataset wrote it: an integer when it is one."""
    return int(v) if v == int(v) else v


def grid_boxes(boxes):
    """Boxes on the 0-1000 grid, checked: an overshoot of at most 1 unit (rounding upstream) is clipped; more, or
    an empty box, is a bad row."""
    out = []
    for b in boxes:
        x1, y1, x2, y2 = b
        if min(x1, y1) < -1 or max(x2, y2) > 1001:
            raise BadRow(f"box outside the image: {b} is outside the 0-1000 grid")
        if x2 <= x1 or y2 <= y1:
            raise BadRow(f"empty box: {b}")
        out.append([on_grid(v) for v in (max(0, x1), max(0, y1), min(1000, x2), min(1000, y2))])
    return out


# An option mark: "(A)", or "A" followed by . ) or : , after a line start, a space, or ; , : (Geo170K writes
# "Choices:A:145°;B:155°" or one "A:145°" per line).
OPTION = re.compile(r"(?:^|(?<=[\s;,:]))(?:\(([A-H])\)|([A-H])[.):])[ \t]*(?=\S)")


def parse_options(problem):
    """Lettered options in a problem ('A. text', '(A) text', 'A) text', 'A:text'; one per line or inline), as
    {"A": text, ...}; {} when there is no run of at least two options A, B, ..."""
    marks = [(m.start(), m.end(), m.group(1) or m.group(2)) for m in OPTION.finditer(problem)]
    starts = [i for i, mk in enumerate(marks) if mk[2] == "A"]
    if not starts:
        return {}
    run = [marks[starts[-1]]]  # the last run that starts at A: a question may mention "A" before its options
    for mk in marks[starts[-1] + 1:]:
        if mk[2] == LETTERS[len(run)]:
            run.append(mk)
    if len(run) < 2:
        return {}
    options = {}
    for k, (start, end, letter) in enumerate(run):
        stop = run[k + 1][0] if k + 1 < len(run) else len(problem)
        options[letter] = problem[end:stop].split("\n")[0].strip().rstrip(";,").strip()
    return options


def to_letter(answer, options):
    """'B', '(B)', 'B.' or the text of option B -> 'B'; an answer that is neither stays as it is."""
    m = re.fullmatch(r"\(?([A-H])\)?[.:)]?", answer.strip())
    if m:
        return m.group(1)
    for letter, text in options.items():
        if text.strip().rstrip(".").lower() == answer.strip().rstrip(".").lower():
            return letter
    return answer


def with_suffix(problem, suffix):
    # A problem that already says where the answer goes keeps its own instruction (COCO's and LISA's do).
    return problem if "<answer>" in problem else problem + suffix


def convert_boxes(row, one_box, max_side):
    """COCO (detection) and LISA (grounding): the problem carries its instruction already. Both datasets give
    boxes on the 0-1000 grid of the image, whatever the prompt says (the official README: "normalized to range from
    0 to 1000, adaptive to image height and width"), the grid Qwen2-VL answers on. They stay on that grid (a shrunk
    image keeps them valid) and meta box_convention "qwen1000" has the reward compare answers on it, as the official
    code does."""
    problem = require_text(row, "problem")
    solution = require_text(row, "solution")
    img, original = decode_image(row.get("image"), "image")
    boxes = boxes_in(solution)
    if one_box and len(boxes) != 1:
        raise BadRow(f"{len(boxes)} boxes for a one-box grounding question")
    data, out_img = stored(img, original, max_side)
    boxes = grid_boxes(boxes)
    answer = json.dumps(boxes[0] if one_box else boxes)
    return (problem, f"<answer>{answer}</answer>", data, out_img, {"box_convention": "qwen1000"})


def convert_detection(row):
    return convert_boxes(row, one_box=False, max_side=None)


def convert_grounding(row):
    # LISA: the hub copy already holds one question per row (the paper flattens image-box pairs with several
    # questions into one sample per question), so one row is one record.
    return convert_boxes(row, one_box=True, max_side=MAX_SIDE)


def convert_choice(row, max_side=None, need_options=False):
    """SAT, ScienceQA, GeoQAV: options read from the problem (ScienceQA's are folded into it), the answer turned into
    the option letter, the paper's (option) suffix appended."""
    problem = require_text(row, "problem").strip()
    solution = require_text(row, "solution")
    img, original = decode_image(row.get("image"), "image")
    options = parse_options(problem)
    if need_options and not options:
        raise BadRow("no lettered options in the problem")
    letter = to_letter(answer_content(solution), options)
    if options and letter not in options:
        raise BadRow(f"answer {answer_content(solution)[:80]!r} is not one of the options {', '.join(options)}")
    meta = {"options": options} if options else {}
    data, out_img = stored(img, original, max_side)
    return (with_suffix(problem, SUFFIX_OPTION), f"<answer>{letter}</answer>", data, out_img, meta)


def convert_sat(row):
    return convert_choice(row)


def convert_scienceqa(row):
    return convert_choice(row, need_options=True)


def convert_geoqav(row):
    # The paper keeps only GeoQAV items whose answer is a valid option (the rest are corrupted) and shrinks images.
    return convert_choice(row, max_side=MAX_SIDE, need_options=True)


def convert_geoqa(row):
    """GeoQA (R1-V's 8k): a numeric answer; MoDoMoDo gives it the same (option) suffix as SAT."""
    problem = require_text(row, "problem").strip()
    solution = require_text(row, "solution")
    img, original = decode_image(row.get("image"), "image")
    data, out_img = stored(img, original)
    return (with_suffix(problem, SUFFIX_OPTION), f"<answer>{answer_content(solution)}</answer>", data, out_img, {})


# Benchmark prompts: lmms-eval's default prompt for each task (the one its qwen2_vl model uses), then the paper's
# reasoning suffix, because the models we evaluate were trained to answer inside <answer> tags.

def convert_chartqa(row):
    question, answer = require_text(row, "question"), require_text(row, "answer")
    img, original = decode_image(row.get("image"), "image")
    problem = f"{question}\nAnswer the question with a single word." + SUFFIX_PLAIN
    return (problem, f"<answer>{answer}</answer>", original, img, {"type": row.get("type")})


def convert_infovqa(row):
    question, answers = require_text(row, "question"), row.get("answers")
    if not answers:
        raise BadRow("missing field 'answers'")
    img, original = decode_image(row.get("image"), "image")
    problem = f"{question}\nAnswer the question using a single word or phrase." + SUFFIX_PLAIN
    return (problem, f"<answer>{answers[0]}</answer>", original, img, {"answers": list(answers)})


MATHVISTA_HINTS = {
    "integer": "Answer the question using a single integer number.",
    ("float", 1): "Answer the question using a single floating-point number with one decimal place.",
    ("float", 2): "Answer the question using a single floating-point number with two decimal places.",
    "list": "Answer the question using a Python list.",
}


def convert_mathvista(row):
    """lmms-eval's 'format-prompt' query (question, unit, options 'A. ...', the answer-type hint): it names the exact
    answer form, which the rule-based match MoDoMoDo reports needs."""
    question, answer = require_text(row, "question"), require_text(row, "answer")
    qtype, atype = require_text(row, "question_type"), require_text(row, "answer_type")
    img, original = decode_image(row.get("decoded_image"), "decoded_image")
    text = question + (f" (Unit: {row['unit']})" if row.get("unit") else "")
    meta = {"question_type": qtype, "answer_type": atype, "precision": row.get("precision"), "unit": row.get("unit"),
            "pid": row.get("pid")}
    if qtype == "multi_choice":
        choices = row.get("choices")
        if not choices:
            raise BadRow("missing field 'choices'")
        if answer not in choices:
            raise BadRow(f"answer {answer!r} is not one of the choices")
        meta["options"] = {LETTERS[i]: c for i, c in enumerate(choices)}
        problem = "\n".join([text, options_text(meta["options"]),
                             "Answer with the option's letter from the given choices directly."]) + SUFFIX_OPTION
        return (problem, f"<answer>{LETTERS[choices.index(answer)]}</answer>", original, img, meta)
    key = ("float", int(row.get("precision") or 0)) if atype == "float" else atype
    if key not in MATHVISTA_HINTS:
        raise BadRow(f"unsupported answer type {atype!r} with precision {row.get('precision')}")
    problem = f"{text}\n{MATHVISTA_HINTS[key]}" + SUFFIX_PLAIN
    return (problem, f"<answer>{answer}</answer>", original, img, meta)


def mmmu_composite(images):
    """MMMU questions can refer to up to 7 images (<image 1> ... <image 7>) but a record has one: the images are
    scaled to one height (or width) and tiled in a row (or column, whichever is closer to square), each labelled
    with its reference in the top-left corner, so the question's <image k> still points at something visible."""
    if len(images) == 1:
        return images[0][1]
    rgb = [(k, im.convert("RGB")) for k, im in images]

    def tile(along_x):
        side = min(1008, max(im.size[1] if along_x else im.size[0] for _, im in rgb))
        font = ImageFont.load_default(size=max(12, side // 20))
        parts = []
        for k, im in rgb:
            w, h = im.size
            im = im.resize((max(1, round(w * side / h)), side) if along_x else (side, max(1, round(h * side / w))))
            d = ImageDraw.Draw(im)
            label = f"<image {k}>"
            x2, y2 = d.textbbox((6, 6), label, font=font)[2:]
            d.rectangle([0, 0, x2 + 6, y2 + 6], fill="white")
            d.text((6, 6), label, fill="black", font=font)
            parts.append(im)
        size = (sum(p.size[0] for p in parts), side) if along_x else (side, sum(p.size[1] for p in parts))
        out, offset = Image.new("RGB", size, "white"), 0
        for p in parts:
            out.paste(p, (offset, 0) if along_x else (0, offset))
            offset += p.size[0] if along_x else p.size[1]
        return out

    row, column = tile(True), tile(False)
    return row if max(row.size) / min(row.size) <= max(column.size) / min(column.size) else column


def convert_mmmu(row):
    """lmms-eval's default MMMU prompt: options 'A. ...' then 'Answer with the option's letter ...' for multiple
    choice, 'Answer the question using a single word or phrase.' for open questions."""
    question, answer, qtype = require_text(row, "question"), require_text(row, "answer"), require_text(row, "question_type")
    try:
        options = ast.literal_eval(require_text(row, "options"))
    except (ValueError, SyntaxError):
        raise BadRow(f"options is not a list: {row['options'][:80]!r}") from None
    refs = sorted({int(k) for k in re.findall(r"<image (\d+)>", question + " " + " ".join(map(str, options)))})
    decoded = [(k, *decode_image(row.get(f"image_{k}"), f"image_{k}")) for k in refs or [1]]
    img = mmmu_composite([(k, im) for k, im, _ in decoded])
    data = encode_png(img) if len(decoded) > 1 else decoded[0][2]
    meta = {"question_type": qtype, "mmmu_id": row.get("id")}
    if qtype == "multiple-choice":
        meta["options"] = {LETTERS[i]: str(o) for i, o in enumerate(options)}
        if answer not in meta["options"]:
            raise BadRow(f"answer {answer!r} is not one of the options {', '.join(meta['options'])}")
        problem = (f"{question}\n{options_text(meta['options'])}\n\n"
                   f"Answer with the option's letter from the given choices directly." + SUFFIX_OPTION)
        return (problem, f"<answer>{answer}</answer>", data, img, meta)
    # A few open answers are several accepted strings written as a list.
    answers = ast.literal_eval(answer) if answer.startswith("[") else [answer]
    meta["answers"] = [str(a) for a in answers]
    problem = f"{question}\n\nAnswer the question using a single word or phrase." + SUFFIX_PLAIN
    return (problem, f"<answer>{meta['answers'][0]}</answer>", data, img, meta)


Source = namedtuple("Source", "name config split")
Hub = namedtuple("Hub", "role reward convert columns splits paper_rows")
PROBLEM_COLUMNS = ("image", "problem", "solution")  # ViRFT_COCO and every yiqingliang/*-problems-dataset
# The lmms-lab names are the copies lmms-eval used when the paper was written (see HELP_NOTES for their move).
HUB = {
    "coco": Hub("train", "coco", convert_detection, PROBLEM_COLUMNS,
                {"train": Source("laolao77/ViRFT_COCO", None, "train")}, "5,997"),
    "lisa": Hub("train", "lisa", convert_grounding, PROBLEM_COLUMNS, {
        "train": Source("yiqingliang/lisa-problems-dataset", None, "train"),
        "test": Source("yiqingliang/lisa-problems-dataset-test", None, "train")}, "1,326 / 3,397"),
    "geoqav": Hub("train", "geoqav", convert_geoqav, PROBLEM_COLUMNS,
                  {"train": Source("yiqingliang/geoqav-problems-dataset", None, "train")}, "1,969"),
    "sat": Hub("train", "sat", convert_sat, PROBLEM_COLUMNS, {
        "train": Source("yiqingliang/sat-problems-dataset", None, "train"),
        "test": Source("yiqingliang/sat-problems-dataset-test", None, "train")}, "15,000 / 1,928"),
    "scienceqa": Hub("train", "scienceqa", convert_scienceqa, PROBLEM_COLUMNS, {
        "train": Source("yiqingliang/scienceqa-problems-dataset", None, "train"),
        "test": Source("yiqingliang/scienceqa-problems-dataset-test", None, "train")}, "6,218 / 2,017"),
    "geoqa": Hub("train", "geoqa", convert_geoqa, PROBLEM_COLUMNS,
                 {"train": Source("leonardPKU/GEOQA_R1V_Train_8K", None, "train")}, "not one of the paper's five"),
    "chartqa": Hub("benchmark", "relaxed_accuracy", convert_chartqa, ("type", "question", "answer", "image"),
                   {"test": Source("lmms-lab/ChartQA", None, "test")}, "2,500"),
    "infovqa": Hub("benchmark", "anls", convert_infovqa, ("question", "answers", "image"),
                   {"val": Source("lmms-lab/DocVQA", "InfographicVQA", "validation")}, "2,801"),
    "mathvista": Hub("benchmark", "mathvista_accuracy", convert_mathvista,
                     ("pid", "question", "decoded_image", "choices", "unit", "precision", "answer", "question_type",
                      "answer_type"), {"testmini": Source("AI4Math/MathVista", None, "testmini")}, "1,000"),
    "mmmu": Hub("benchmark", "mmmu_accuracy", convert_mmmu,
                ("id", "question", "options", "answer", "question_type", *(f"image_{k}" for k in range(1, 8))),
                {"val": Source("lmms-lab/MMMU", None, "validation")}, "900"),
}
GROUPS = {"paper": ["coco", "lisa", "geoqav", "sat", "scienceqa"],
          "benchmarks": ["chartqa", "infovqa", "mathvista", "mmmu"]}


def load_raw(source):
    """A split from the hub or a local mirror: a save_to_disk folder (Dataset or DatasetDict), or a folder or hub name
    that datasets.load_dataset reads. A repository with a single split is read whatever that split is called."""
    if os.path.isdir(source.name) and (os.path.exists(os.path.join(source.name, "dataset_dict.json")) or
                                       os.path.exists(os.path.join(source.name, "state.json"))):
        raw = datasets.load_from_disk(source.name)
        if isinstance(raw, datasets.DatasetDict):
            if source.split not in raw and len(raw) == 1:
                return next(iter(raw.values()))
            if source.split not in raw:
                raise SystemExit(f"error: {source.name} has no split '{source.split}' (it has {', '.join(raw)})")
            return raw[source.split]
        return raw
    split = source.split
    try:
        names = datasets.get_dataset_split_names(source.name, source.config)
        if split not in names and len(names) == 1:
            split = names[0]
        return datasets.load_dataset(source.name, source.config, split=split)
    except (ConnectionError, FileNotFoundError) as e:  # what datasets raises offline or for an unknown name
        raise SystemExit(f"error: cannot read {source.name}: {e} (give a local copy with --source, or reach the "
                         "hub)") from None


def is_missing_folder(name):
    """A --source that can only be a local path (absolute, ./ or ../, or more than owner/name) and is not there."""
    looks_local = os.path.isabs(name) or name.startswith(".") or name.count("/") != 1
    return looks_local and not os.path.exists(name)


def mark_pending(data_dir, splits, pending):
    """The manifest's "pending_splits": what a prepare_data.py run set out to build and has not finished. A killed
    run leaves its splits there, and training and evaluation refuse such a manifest (vlm.load_manifest) instead of
    using the splits it happened to list; the same command run again finishes them and clears them."""
    with manifest_transaction(data_dir) as manifest:
        listed = set(manifest.get("pending_splits", []))
        manifest["pending_splits"] = sorted(listed | set(splits) if pending else listed - set(splits))


def convert_row(row, index, domain, split, source):
    """The record one source row becomes, and its decoded image; BadRow when it cannot become one."""
    problem, solution, data, img, extra = HUB[domain].convert(row)
    meta = {"image_size": list(img.size), "box_convention": "pixel", **extra,
            "source": {"dataset": source.name, "split": source.split, "row": index}}
    if HUB[domain].role == "train":  # benchmarks are scored by evaluate.py's metrics, not by rewards.py
        try:
            rewards.parse_solution(solution, domain, meta)
        except rewards.SolutionError as e:
            raise BadRow(f"unparsable solution: {e}") from None
    return make_record(f"{domain}-{split}-{index}", domain, data, problem, solution, meta), img


def convert_hub(domain, split, source, data_dir, strict=False, force=False):
    hub = HUB[domain]
    label = f"{source.name}" + (f" ({source.config})" if source.config else "") + f" split {source.split}"
    recipe = {"source": label, "script_sha256": script_sha256()}
    if not force and is_up_to_date(data_dir, domain, split, recipe):
        print(f"{domain}/{split}: up to date")
        return
    raw = load_raw(source)
    missing = [c for c in hub.columns if c not in raw.column_names]
    if missing:  # another dataset's schema, not a few bad rows
        raise SystemExit(f"error: {domain}/{split}: {label} has no column {', '.join(missing)} "
                         f"(it has {', '.join(raw.column_names)})")
    for name, feature in raw.features.items():  # undecodable images must be one bad row, not a crash mid-iteration
        if isinstance(feature, datasets.Image):
            raw = raw.cast_column(name, datasets.Image(decode=False))
    records, digests, skipped = [], [], []
    for index, row in enumerate(tqdm(raw, desc=f"{domain}/{split}")):
        try:
            record, img = convert_row(row, index, domain, split, source)
        except BadRow as e:
            if strict:
                raise SystemExit(f"error: {domain}/{split} from {label}: row {index}: {e}") from None
            skipped.append({"row": index, "reason": str(e)})
            continue
        records.append(record)
        digests.append(record_digest(record, img))
    if not records:
        reasons = "; ".join(sorted({s["reason"] for s in skipped})[:3])
        raise SystemExit(f"error: {domain}/{split}: no row of {label} could be converted ({reasons})")
    entry = write_split(data_dir, domain, split, records, digests, skipped,
                        {"reward": hub.reward, "role": hub.role, "split_source": label}, recipe)
    print(f"{domain}/{split}: {entry['rows']} rows, {entry['n_skipped']} skipped")
    return entry


HELP_NOTES = """\
SAT, ScienceQA, GeoQAV and GeoQA problems get the paper's suffix " Output the thinking process in <think> </think>
and final answer (option) in <answer> </answer> tags."; lettered options are read from the problem (ScienceQA's are
folded into it) and answers become option letters. COCO and LISA problems keep their own instruction; their boxes
are read on the 0-1000 grid of the image (the official README's convention, Qwen2-VL's answer grid) and stay
on it (meta box_convention qwen1000; the synthetic suite's boxes are pixels). LISA and GeoQAV images
longer than 640 px are shrunk (grid boxes need no moving). Benchmarks: lmms-eval's default prompt, then the
reasoning suffix; MMMU's several images are tiled into one composite, each labelled "<image k>".
The -test repositories hold a single split, read whatever it is called. lmms-eval moved its lmms-lab copies to
lmms-lab-encoder/ in July 2026 (same data): --source lmms-lab-encoder/ChartQA etc.
A bad row (missing field, undecodable image, box outside the image, unparsable solution) is skipped and listed in
the manifest with its reason; --strict stops there. A split whose recipe (source, sizes, seed, this script's
sha256) is unchanged is not rebuilt, so an interrupted run resumes; --force rebuilds."""


def sources_help():
    lines = ["sources: domain/split <- hub dataset [config] (its split); reward (training) or metric (benchmark); "
             "rows in the paper"]
    for domain, hub in HUB.items():
        for split, s in hub.splits.items():
            config = f" [{s.config}]" if s.config else ""
            lines.append(f"  {domain + '/' + split:19} <- {s.name}{config} ({s.split}); {hub.reward}")
        lines.append(f"  {'':19}    {hub.paper_rows}")
    lines.append("  synthetic: " + ", ".join(f"{d} ({k}{', test only' if r == 'benchmark' else ''})"
                                             for d, (_, r, k) in SYNTHETIC.items()))
    lines.append("groups: " + "; ".join(f"{g} = {' '.join(ds)}" for g, ds in GROUPS.items()))
    return "\n".join(lines) + "\n\n" + HELP_NOTES


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=sources_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", nargs="+", default=["synthetic"], metavar="NAME",
                   choices=["synthetic", *HUB, *GROUPS],
                   help="what to build: synthetic (default), a domain from the list below, or a group")
    p.add_argument("--split", help="build only this split of the dataset (e.g. test); default: all of its splits")
    p.add_argument("--source", help="hub name or local folder (save_to_disk, DatasetDict, or a hub snapshot) to read "
                                    "instead of the default; needs exactly one dataset and split")
    p.add_argument("--data_dir", default="data", help="output root (default: data)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row, naming dataset, split and row, "
                                                         "instead of skipping it and counting it in the manifest")
    p.add_argument("--force", action="store_true", help="rebuild splits the manifest lists as up to date")
    p.add_argument("--seed", type=int, default=0, help="synthetic suite: seed (default 0)")
    p.add_argument("--n_train", type=int, default=3000, help="synthetic suite: examples per training domain")
    p.add_argument("--n_test", type=int, default=300, help="synthetic suite: test examples per domain")
    p.add_argument("--option_order", choices=["fixed", "shuffled"], default="fixed",
                   help="synthetic suite: multiple-choice options always in the same order (default), so that the "
                        "2-layer tiny model need not look an answer's letter up (with them shuffled per record it "
                        "stays at chance: docs/testbed_log.md, item 8), or shuffled per record")
    p.add_argument("--layout", choices=["free", "grid"], default="free",
                   help="synthetic suite: objects anywhere (default) or each centred in its own 28 px cell, the "
                        "picture behind one image token of the tiny model, so that one token holds one object "
                        "(docs/testbed_log.md, item 14)")
    p.add_argument("--count_answers", choices=["natural", "uniform"], default="natural",
                   help="synthetic suite: syn_count's answers as its scenes give them (default: 1 answers 29-31%% "
                        "of the records) or uniform over 0-6, so that a constant answer scores about 1/7 "
                        "(docs/testbed_log.md, item 14)")
    p.add_argument("--rationale", choices=["short", "scan", "find"], default="short",
                   help="synthetic suite: the rationale the cold start imitates; short (default: 'the red circle is "
                        "at the top left') or, for grounding and spatial relations, a scan of every object with its "
                        "cell first ('blue square in row 1 column 3, red circle in row 2 column 1; so the red circle "
                        "is in row 2 column 1'), which lifts the cold start's grounding (docs/testbed_log.md, item 20), or "
                        "find: the same "
                        "scan with each object judged against the question right after its words ('blue square no "
                        "in row 1 column 3, red circle yes in row 2 column 1; ...'; docs/testbed_log.md, item 22)")
    p.add_argument("--contact_sheet", metavar="PNG", help="draw a few synthetic test examples of every domain with "
                                                          "their problems and answers into PNG, and build nothing")
    args = p.parse_args(argv)
    for option in ("n_train", "n_test"):
        if getattr(args, option) < 1:
            p.error(f"--{option} must be at least 1 (got {getattr(args, option)})")

    if args.contact_sheet:
        contact_sheet(args.contact_sheet, args.seed, args.layout, args.count_answers, args.rationale)
        return
    names = [d for name in args.dataset for d in GROUPS.get(name, [name])]
    if "synthetic" in names and args.split not in (None, "train", "test"):
        p.error(f"the synthetic suite has no split '{args.split}' (it has train, test)")
    jobs = []
    for name in dict.fromkeys(names):
        if name == "synthetic":
            continue
        splits = HUB[name].splits
        if args.split and args.split not in splits:
            p.error(f"{name} has no split '{args.split}' (it has {', '.join(splits)})")
        jobs += [(name, split, s) for split, s in splits.items() if args.split in (None, split)]
    if args.source:
        if len(jobs) != 1 or "synthetic" in names:
            p.error("--source replaces the source of one dataset split: name one dataset (and --split if it has "
                    "several)")
        if is_missing_folder(args.source):
            p.error(f"--source {args.source}: no such folder (and not a hub name owner/name)")
        name, split, s = jobs[0]
        jobs = [(name, split, Source(args.source, s.config, s.split))]
    synthetic = synthetic_splits(args.n_train, args.n_test, args.split) if "synthetic" in names else []
    planned = [f"{domain}/{split}" for domain, split, _ in synthetic] + [f"{name}/{split}" for name, split, _ in jobs]
    mark_pending(args.data_dir, planned, True)
    try:
        build_synthetic(args.data_dir, args.seed, synthetic, force=args.force, option_order=args.option_order,
                        layout=args.layout, count_answers=args.count_answers, rationale=args.rationale)
        for name, split, source in jobs:
            convert_hub(name, split, source, args.data_dir, strict=args.strict, force=args.force)
    except (Exception, SystemExit):  # an error on screen: the manifest lists what was built (a kill or Ctrl-C, which
        # can go unnoticed, leaves the rest pending)
        mark_pending(args.data_dir, planned, False)
        raise
    mark_pending(args.data_dir, planned, False)


if __name__ == "__main__":
    main()
