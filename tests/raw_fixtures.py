"""Tiny datasets in the exact raw schemas of the hub sources prepare_data.py reads (same column names and types,
images as datasets Image columns), with the bad rows each converter must skip. The column lists come from the
datasets' cards and the loaders that read them (lmms-eval's task utils, MoDoMoDo's converters)."""
import io
import os

import datasets
from PIL import Image

COCO_PROBLEM = (
    "Detect all objects belonging to the category 'umbrella' in the image, and provide the bounding boxes (between 0 "
    "and 1000, integer) and confidence (between 0 and 1, with two decimal places).\nIf no object belonging to the "
    "category 'umbrella' in the image, return 'No Objects'.\nOutput the thinking process in <think> </think> and final "
    "answer in <answer> </answer> tags.The output answer format should be as follows:\n<think> ... </think> "
    "<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...]</answer>\nPlease strictly follow the format.")
LISA_PROBLEM = ("What part of the kitchen is used for washing dishes? Output the final answer in <answer> </answer> "
                "tags. The output answer format should be as follows:\n<answer>[x1, y1, x2, y2]</answer>")
UNDECODABLE = {"bytes": b"\x89PNG this is not an image", "path": None}


def image(w, h, color="gray", fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format=fmt)
    return {"bytes": buf.getvalue(), "path": None}


def problem_schema(rows):
    """The schema of laolao77/ViRFT_COCO and every yiqingliang/*-problems-dataset: image, problem, solution."""
    features = datasets.Features(image=datasets.Image(), problem=datasets.Value("string"),
                                 solution=datasets.Value("string"))
    return datasets.Dataset.from_list(rows, features=features)


def coco():
    return problem_schema([
        # 0: two boxes on Qwen2-VL's 0-1000 grid of a 200x100 image
        dict(image=image(200, 100), problem=COCO_PROBLEM, solution="<answer>[{'Position': [100, 0, 950, 411], "
             "'Confidence': 1}, {'Position': [0, 500, 500, 1000], 'Confidence': 0.9}]</answer>"),
        dict(image=image(200, 100), problem=COCO_PROBLEM, solution=None),  # 1: missing field
        dict(image=UNDECODABLE, problem=COCO_PROBLEM, solution="<answer>[{'Position': [1, 1, 9, 9], "
             "'Confidence': 1}]</answer>"),  # 2: undecodable image
        dict(image=image(200, 100), problem=COCO_PROBLEM, solution="<answer>[{'Position': [0, 0, 1200, 500], "
             "'Confidence': 1}]</answer>"),  # 3: box outside the 0-1000 grid
        dict(image=image(200, 100), problem=COCO_PROBLEM, solution="<answer>an umbrella</answer>"),  # 4: unparsable
        dict(image=image(200, 100), problem=COCO_PROBLEM, solution="<answer>No Objects</answer>"),  # 5: no object
    ])


def lisa_train():
    """yiqingliang/lisa-problems-dataset: boxes on the 0-1000 grid of the image ("normalized to range from 0 to 1000,
    adaptive to image height and width", the official README), in Visual-RFT's Position list or plain."""
    return problem_schema([
        # 0: a 1280x320 JPEG photo -> shrunk to 640x160, its grid box unchanged
        dict(image=image(1280, 320, "white", "JPEG"), problem=LISA_PROBLEM,
             solution="<answer>[{'Position': [100, 40, 300, 200], 'Confidence': 1}]</answer>"),
        dict(image=image(600, 300), problem=LISA_PROBLEM, solution="<answer>[0, 0, 1200, 100]</answer>"),  # 1: outside
        dict(image=image(600, 300), problem=LISA_PROBLEM,
             solution="<answer>[[0, 0, 10, 10], [20, 20, 30, 30]]</answer>"),  # 2: two boxes for one referent
        dict(image=image(600, 300), problem=None, solution="<answer>[0, 0, 10, 10]</answer>"),  # 3: missing field
        # 4: an image smaller than 1000 px whose grid box reaches past its pixel size (read as pixels, it would lie
        # outside the 400x300 image)
        dict(image=image(400, 300), problem=LISA_PROBLEM,
             solution="<answer>[{'Position': [250, 100, 900, 950], 'Confidence': 1}]</answer>"),
    ])


def lisa_test():
    return problem_schema([dict(image=image(300, 200), problem=LISA_PROBLEM, solution="<answer>[10, 20, 110, 120]</answer>")])


def sat():
    return problem_schema([
        dict(image=image(64, 64), problem="Is the chair to the left of the table?\n(A) yes\n(B) no",
             solution="<answer>B</answer>"),  # 0
        dict(image=image(64, 64), problem="Is the lamp above the bed?\nA. yes\nB. no",
             solution="<answer>no</answer>"),  # 1: the option's text -> its letter B
        dict(image=image(64, 64), problem="Which way did the camera turn?",
             solution="<answer>left</answer>"),  # 2: no options, a free-text answer: not a choice solution
        dict(image=image(64, 64), problem="Is the cup on the shelf?\nA. yes\nB. no",
             solution="<answer>C</answer>"),  # 3: not one of the options
    ])


def scienceqa():
    return problem_schema([
        # 0: the paper's Figure 2 example, options folded inline into the question
        dict(image=image(64, 64), problem="In this food chain, the diatom is a producer. Why? A. It eats another "
             "organism. B. It makes its own food. C. It eats a consumer.", solution="<answer>B</answer>"),
        dict(image=image(64, 64), problem="Which of these states is farthest north?",
             solution="<answer>A</answer>"),  # 1: no options in the problem
    ])


def geoqav():
    return problem_schema([
        # 0: Geo170K-style choices, an oversized image -> shrunk to 640x320
        dict(image=image(1000, 500), problem="As shown in the figure, AB is the diameter of circle O, angle C = 30°, "
             "then angle B = ()\nChoices:\nA:30°\nB:40°\nC:50°\nD:60°", solution="<answer>D</answer>"),
        dict(image=image(100, 100), problem="As shown in the figure, angle 1 = ()\nChoices:\nA:30°\nB:40°",
             solution="<answer>60</answer>"),  # 1: corrupted: the answer is no option
    ])


def geoqa():
    return problem_schema([
        dict(image=image(100, 100), problem="As shown in the figure, AB ∥ CD, angle 1 = 35°, then angle 2 = ?",
             solution="<answer>145</answer>"),
        dict(image=image(100, 100), problem="As shown in the figure, find angle 3.",
             solution="<answer>an obtuse angle</answer>"),  # 1: not a number
    ])


def chartqa():
    """lmms-lab/ChartQA: type, question, answer, image."""
    features = datasets.Features(type=datasets.Value("string"), question=datasets.Value("string"),
                                 answer=datasets.Value("string"), image=datasets.Image())
    return datasets.Dataset.from_list([
        dict(type="human_test", question="How many food item is shown in the bar graph?", answer="14",
             image=image(120, 80)),
        dict(type="augmented_test", question="What is the value of Japan?", answer=None, image=image(120, 80)),
    ], features=features)


def infovqa():
    """lmms-lab/DocVQA, config InfographicVQA."""
    features = datasets.Features({
        "questionId": datasets.Value("string"), "question": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
        "answer_type": datasets.Sequence(datasets.Value("string")), "image": datasets.Image(),
        "image_url": datasets.Value("string"), "operation/reasoning": datasets.Sequence(datasets.Value("string")),
        "ocr": datasets.Value("string"), "data_split": datasets.Value("string")})
    common = {"answer_type": ["single span"], "image_url": "https://example.org/1.jpeg", "operation/reasoning": [],
              "ocr": "[]", "data_split": "val"}
    return datasets.Dataset.from_list([
        dict(questionId="98313", question="Which social platform has heavy female audience?",
             answers=["pinterest", "Pinterest"], image=image(90, 160), **common),
        dict(questionId="98314", question="What percentage of users are male?", answers=[], image=image(90, 160),
             **common),
    ], features=features)


def mathvista():
    """AI4Math/MathVista: the image path and the decoded image, choices null for free-form questions."""
    metadata = {"category": datasets.Value("string"), "context": datasets.Value("string"),
                "grade": datasets.Value("string"), "img_height": datasets.Value("int64"),
                "img_width": datasets.Value("int64"), "language": datasets.Value("string"),
                "skills": datasets.Sequence(datasets.Value("string")), "source": datasets.Value("string"),
                "split": datasets.Value("string"), "task": datasets.Value("string")}
    features = datasets.Features({
        "pid": datasets.Value("string"), "question": datasets.Value("string"), "image": datasets.Value("string"),
        "decoded_image": datasets.Image(), "choices": datasets.Sequence(datasets.Value("string")),
        "unit": datasets.Value("string"), "precision": datasets.Value("float64"), "answer": datasets.Value("string"),
        "question_type": datasets.Value("string"), "answer_type": datasets.Value("string"),
        "metadata": metadata, "query": datasets.Value("string")})
    meta = {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
            "img_height": 50, "img_width": 50, "language": "english", "skills": ["algebraic reasoning"],
            "source": "Geometry3K", "split": "testmini", "task": "geometry problem solving"}
    rows = [
        dict(pid="1", question="When a spring does work on an object, by what distance is it compressed?",
             choices=None, unit="m", precision=1.0, answer="1.2", question_type="free_form", answer_type="float"),
        dict(pid="2", question="Find x.", choices=["3", "4", "5", "6"], unit=None, precision=None, answer="5",
             question_type="multi_choice", answer_type="text"),
        dict(pid="3", question="How many cubes are there?", choices=None, unit=None, precision=None, answer="7",
             question_type="free_form", answer_type="integer"),
        dict(pid="4", question="Which is larger?", choices=["a", "b"], unit=None, precision=None, answer="c",
             question_type="multi_choice", answer_type="text"),  # 3: the answer is no choice
    ]
    for r in rows:
        r.update(image=f"images/{r['pid']}.jpg", decoded_image=image(50, 50), metadata=meta, query=r["question"])
    return datasets.Dataset.from_list(rows, features=features)


def mmmu():
    """lmms-lab/MMMU (validation): options as a string holding a Python list, up to 7 image columns."""
    features = datasets.Features({
        "id": datasets.Value("string"), "question": datasets.Value("string"), "options": datasets.Value("string"),
        "explanation": datasets.Value("string"),
        **{f"image_{k}": datasets.Image() for k in range(1, 8)},
        "img_type": datasets.Value("string"), "answer": datasets.Value("string"),
        "topic_difficulty": datasets.Value("string"), "question_type": datasets.Value("string"),
        "subfield": datasets.Value("string")})
    common = {"explanation": "", "img_type": "['Diagrams']", "topic_difficulty": "Medium", "subfield": "Optics"}
    no_images = {f"image_{k}": None for k in range(1, 8)}
    return datasets.Dataset.from_list([
        dict(id="validation_Physics_1", question="<image 1> What is the focal length?", options="['1 m', '2 m']",
             answer="B", question_type="multiple-choice", **{**no_images, "image_1": image(80, 40)}, **common),
        dict(id="validation_Art_2", question="Which painting is older?", options="['<image 1>', '<image 2>']",
             answer="A", question_type="multiple-choice",
             **{**no_images, "image_1": image(200, 200, "red"), "image_2": image(100, 200, "blue")}, **common),
        dict(id="validation_Math_3", question="<image 1> Compute the ratio.", options="[]",
             answer="['0.5', '1/2']", question_type="open", **{**no_images, "image_1": image(30, 30)}, **common),
        dict(id="validation_Math_4", question="Compare <image 1> and <image 2>.", options="['same', 'different']",
             answer="A", question_type="multiple-choice", **{**no_images, "image_1": image(30, 30)},
             **common),  # 3: image_2 is referenced but missing
    ], features=features)


def save(dataset, path, split=None):
    """A save_to_disk folder: a Dataset, or a DatasetDict holding it under `split`."""
    (datasets.DatasetDict({split: dataset}) if split else dataset).save_to_disk(str(path))
    return str(path)


def save_hub_snapshot(dataset, path, split):
    """A folder laid out like a hub dataset repository (data/<split>-00000-of-00001.parquet), which
    datasets.load_dataset reads through the same code path as a hub name."""
    os.makedirs(os.path.join(path, "data"), exist_ok=True)
    dataset.to_parquet(os.path.join(path, "data", f"{split}-00000-of-00001.parquet"))
    return str(path)
