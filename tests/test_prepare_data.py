"""prepare_data.py: every converter on raw-schema fixtures (bad rows included), the manifest, idempotent and
interrupted runs, and the synthetic suite (gold answers earn the maximal reward, fingerprints follow the seed)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import datasets
import pytest

import prepare_data as P
import raw_fixtures as F
import rewards
import vlm

SUFFIX_OPTION = (" Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> "
                 "tags.")
SUFFIX_PLAIN = " Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."


def build(data_dir, dataset, source, split=None, *flags):
    P.main(["--dataset", dataset, "--source", str(source), "--data_dir", str(data_dir), *flags] +
           (["--split", split] if split else []))


def load(data_dir, domain, split):
    return datasets.load_from_disk(os.path.join(data_dir, domain, split))


def manifest(data_dir):
    with open(os.path.join(data_dir, "manifest.json")) as f:
        return json.load(f)


def lists_nothing(data_dir):
    """A run that stopped with an error before writing a split: no split listed, none pending."""
    m = manifest(data_dir)
    return m["datasets"] == {} and m["pending_splits"] == []


def skipped(data_dir, domain, split):
    return [(s["row"], s["reason"]) for s in manifest(data_dir)["datasets"][domain]["splits"][split]["skipped"]]


def gold_completion(answer, rationale="reasoning"):
    return f"<think>\n{rationale}\n</think>\n<answer>\n{answer}\n</answer>"


# ---------------------------------------------------------------------------------------------------------------
# Paper training sets

def test_coco_boxes_stay_on_the_0_1000_grid_and_bad_rows_are_skipped(tmp_path):
    build(tmp_path / "data", "coco", F.save(F.coco(), tmp_path / "raw", split="train"))
    ds = load(tmp_path / "data", "coco", "train")
    assert len(ds) == 2
    first, no_object = ds[0], ds[1]
    meta = json.loads(first["meta"])
    # the grid boxes as the dataset gives them, though 950 and 1000 exceed the 200x100 image's pixel size
    assert first["solution"] == "<answer>[[100, 0, 950, 411], [0, 500, 500, 1000]]</answer>"
    assert meta["box_convention"] == "qwen1000" and meta["image_size"] == [200, 100]
    assert meta["source"] == {"dataset": str(tmp_path / "raw"), "split": "train", "row": 0}
    assert first["id"] == "coco-train-0" and first["domain"] == "coco"
    assert first["problem"] == F.COCO_PROBLEM  # Visual-RFT's prompt already says where the answer goes
    assert no_object["solution"] == "<answer>[]</answer>" and json.loads(no_object["meta"])["source"]["row"] == 5
    # the image is stored byte for byte
    raw_bytes = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    assert raw_bytes == F.image(200, 100)["bytes"]
    # a model answering on the grid, as the prompt asks, earns the maximum
    answer = "[{'Position': [100, 0, 950, 411], 'Confidence': 1}, {'Position': [0, 500, 500, 1000], 'Confidence': 1}]"
    assert rewards.score(gold_completion(answer), first["solution"], "coco", meta)["total"] == pytest.approx(3.0)
    reasons = skipped(tmp_path / "data", "coco", "train")
    assert [row for row, _ in reasons] == [1, 2, 3, 4]
    assert reasons[0][1] == "missing field 'solution'"
    assert reasons[1][1] == "undecodable image in 'image': UnidentifiedImageError: cannot identify image file"
    assert reasons[2][1] == "box outside the image: [0.0, 0.0, 1200.0, 500.0] is outside the 0-1000 grid"
    assert reasons[3][1].startswith("unparsable solution: no [x1, y1, x2, y2] box in ")
    assert manifest(tmp_path / "data")["datasets"]["coco"]["splits"]["train"]["n_skipped"] == 4


def test_lisa_boxes_are_read_on_the_0_1000_grid_and_long_images_shrink_to_640(tmp_path):
    data = tmp_path / "data"
    build(data, "lisa", F.save(F.lisa_train(), tmp_path / "raw_train"), "train")
    # the -test repository's only split is named "train": it is read whatever its name
    build(data, "lisa", F.save(F.lisa_test(), tmp_path / "raw_test", split="train"), "test")
    ds = load(data, "lisa", "train")
    assert len(ds) == 2
    meta = json.loads(ds[0]["meta"])
    assert meta["image_size"] == [640, 160] and ds[0]["image"].size == (640, 160)
    # a grid box stays valid when its image shrinks
    assert ds[0]["solution"] == "<answer>[100, 40, 300, 200]</answer>" and meta["box_convention"] == "qwen1000"
    assert ds[0]["problem"] == F.LISA_PROBLEM
    stored = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    assert stored[:2] == b"\xff\xd8"  # a shrunk photo stays a JPEG
    assert skipped(data, "lisa", "train") == [
        (1, "box outside the image: [0.0, 0.0, 1200.0, 100.0] is outside the 0-1000 grid"),
        (2, "2 boxes for a one-box grounding question"),
        (3, "missing field 'problem'")]
    test = load(data, "lisa", "test")
    assert test[0]["solution"] == "<answer>[10, 20, 110, 120]</answer>"
    assert rewards.score(gold_completion("[10, 20, 110, 120]"), test[0]["solution"], "lisa",
                         json.loads(test[0]["meta"]))["total"] == pytest.approx(3.0)


def test_lisa_grid_box_of_an_image_smaller_than_1000_px_is_kept_and_scored_as_qwen2vl_answers(tmp_path):
    data = tmp_path / "data"
    build(data, "lisa", F.save(F.lisa_train(), tmp_path / "raw"), "train")
    small = load(data, "lisa", "train")[1]
    meta = json.loads(small["meta"])
    assert meta["source"]["row"] == 4 and meta["image_size"] == [400, 300] and small["image"].size == (400, 300)
    assert small["solution"] == "<answer>[250, 100, 900, 950]</answer>" and meta["box_convention"] == "qwen1000"
    # Qwen2-VL answers on the same grid: the dataset's own box is a perfect answer ...
    grid = rewards.score(gold_completion("[250, 100, 900, 950]"), small["solution"], "lisa", meta)
    assert grid["iou"] == 1.0 and grid["total"] == 3.0
    # ... and the same box in pixels of the 400x300 image, [100, 30, 360, 285], is read on the grid: overlap
    # 110 x 185 over a union of 260 x 255 + 650 x 850 - 110 x 185
    pixels = rewards.score(gold_completion("[100, 30, 360, 285]"), small["solution"], "lisa", meta)
    assert pixels["iou"] == pytest.approx(110 * 185 / (260 * 255 + 650 * 850 - 110 * 185))


def test_sat_answers_become_option_letters(tmp_path):
    build(tmp_path / "data", "sat", F.save(F.sat(), tmp_path / "raw"), "train")
    ds = load(tmp_path / "data", "sat", "train")
    assert [r["solution"] for r in ds] == ["<answer>B</answer>", "<answer>B</answer>"]
    assert ds[0]["problem"] == "Is the chair to the left of the table?\n(A) yes\n(B) no" + SUFFIX_OPTION
    assert json.loads(ds[1]["meta"])["options"] == {"A": "yes", "B": "no"}
    reasons = skipped(tmp_path / "data", "sat", "train")
    assert reasons[0][0] == 2 and reasons[0][1].startswith("unparsable solution: sat: solution '<answer>left</answer>'")
    assert reasons[1] == (3, "answer 'C' is not one of the options A, B")


def test_scienceqa_reads_options_folded_into_the_question(tmp_path):
    build(tmp_path / "data", "scienceqa", F.save(F.scienceqa(), tmp_path / "raw"), "train")
    ds = load(tmp_path / "data", "scienceqa", "train")
    assert len(ds) == 1
    meta = json.loads(ds[0]["meta"])
    assert meta["options"] == {"A": "It eats another organism.", "B": "It makes its own food.",
                               "C": "It eats a consumer."}
    assert ds[0]["solution"] == "<answer>B</answer>" and ds[0]["problem"].endswith("consumer." + SUFFIX_OPTION)
    # the option's text is accepted as well as its letter
    assert rewards.score(gold_completion("It makes its own food."), ds[0]["solution"], "scienceqa",
                         meta)["total"] == pytest.approx(3.0)
    assert skipped(tmp_path / "data", "scienceqa", "train") == [(1, "no lettered options in the problem")]


def test_geoqav_keeps_only_answers_that_are_options_and_shrinks_images(tmp_path):
    build(tmp_path / "data", "geoqav", F.save(F.geoqav(), tmp_path / "raw"))
    ds = load(tmp_path / "data", "geoqav", "train")
    meta = json.loads(ds[0]["meta"])
    assert len(ds) == 1 and meta["image_size"] == [640, 320]
    assert meta["options"] == {"A": "30°", "B": "40°", "C": "50°", "D": "60°"}
    assert ds[0]["solution"] == "<answer>D</answer>"
    assert skipped(tmp_path / "data", "geoqav", "train") == [(1, "answer '60' is not one of the options A, B")]


def test_geoqa_keeps_numeric_answers(tmp_path):
    build(tmp_path / "data", "geoqa", F.save(F.geoqa(), tmp_path / "raw"))
    ds = load(tmp_path / "data", "geoqa", "train")
    assert [r["solution"] for r in ds] == ["<answer>145</answer>"]
    assert ds[0]["problem"] == F.geoqa()[0]["problem"] + SUFFIX_OPTION
    reasons = skipped(tmp_path / "data", "geoqa", "train")
    assert reasons[0][0] == 1 and reasons[0][1].startswith("unparsable solution: geoqa: ")


# ---------------------------------------------------------------------------------------------------------------
# Out-of-domain benchmarks

def test_chartqa_from_a_hub_snapshot_folder(tmp_path):
    # a parquet folder goes through datasets.load_dataset, the code path of a hub name
    build(tmp_path / "data", "chartqa", F.save_hub_snapshot(F.chartqa(), tmp_path / "ChartQA", "test"))
    ds = load(tmp_path / "data", "chartqa", "test")
    assert len(ds) == 1
    assert ds[0]["problem"] == ("How many food item is shown in the bar graph?\nAnswer the question with a single "
                                "word." + SUFFIX_PLAIN)
    assert ds[0]["solution"] == "<answer>14</answer>" and json.loads(ds[0]["meta"])["type"] == "human_test"
    assert skipped(tmp_path / "data", "chartqa", "test") == [(1, "missing field 'answer'")]


def test_infovqa_keeps_every_accepted_answer(tmp_path):
    build(tmp_path / "data", "infovqa", F.save(F.infovqa(), tmp_path / "raw", split="validation"))
    ds = load(tmp_path / "data", "infovqa", "val")
    assert ds[0]["problem"] == ("Which social platform has heavy female audience?\nAnswer the question using a single "
                                "word or phrase." + SUFFIX_PLAIN)
    assert ds[0]["solution"] == "<answer>pinterest</answer>"
    assert json.loads(ds[0]["meta"])["answers"] == ["pinterest", "Pinterest"]
    assert skipped(tmp_path / "data", "infovqa", "val") == [(1, "missing field 'answers'")]


def test_mathvista_prompts_name_the_answer_form(tmp_path):
    build(tmp_path / "data", "mathvista", F.save(F.mathvista(), tmp_path / "raw", split="testmini"))
    ds = load(tmp_path / "data", "mathvista", "testmini")
    assert len(ds) == 3
    assert ds[0]["problem"] == ("When a spring does work on an object, by what distance is it compressed? (Unit: m)\n"
                                "Answer the question using a single floating-point number with one decimal place."
                                + SUFFIX_PLAIN)
    assert ds[0]["solution"] == "<answer>1.2</answer>"
    assert ds[1]["problem"] == ("Find x.\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer with the option's letter from the given "
                                "choices directly." + SUFFIX_OPTION)
    assert ds[1]["solution"] == "<answer>C</answer>"
    assert json.loads(ds[1]["meta"])["options"] == {"A": "3", "B": "4", "C": "5", "D": "6"}
    assert ds[2]["problem"].endswith("How many cubes are there?\nAnswer the question using a single integer number."
                                     + SUFFIX_PLAIN)
    assert skipped(tmp_path / "data", "mathvista", "testmini") == [(3, "answer 'c' is not one of the choices")]


def test_mmmu_tiles_several_images_into_one_labelled_composite(tmp_path):
    build(tmp_path / "data", "mmmu", F.save(F.mmmu(), tmp_path / "raw", split="validation"))
    ds = load(tmp_path / "data", "mmmu", "val")
    assert len(ds) == 3
    single, pair, open_question = ds[0], ds[1], ds[2]
    assert single["image"].size == (80, 40)
    assert single["problem"] == ("<image 1> What is the focal length?\nA. 1 m\nB. 2 m\n\nAnswer with the option's "
                                 "letter from the given choices directly." + SUFFIX_OPTION)
    assert single["solution"] == "<answer>B</answer>"
    # 200x200 and 100x200 side by side (300x200) is squarer than stacked (200x600)
    assert pair["image"].size == (300, 200) and json.loads(pair["meta"])["image_size"] == [300, 200]
    composite = pair["image"].convert("RGB")
    assert composite.getpixel((180, 180)) == (255, 0, 0) and composite.getpixel((280, 180)) == (0, 0, 255)
    assert composite.getpixel((2, 2)) == (255, 255, 255)  # the white label "<image 1>" in the corner
    assert json.loads(pair["meta"])["options"] == {"A": "<image 1>", "B": "<image 2>"}
    assert open_question["problem"] == ("<image 1> Compute the ratio.\n\nAnswer the question using a single word or "
                                        "phrase." + SUFFIX_PLAIN)
    assert json.loads(open_question["meta"])["answers"] == ["0.5", "1/2"]
    assert skipped(tmp_path / "data", "mmmu", "val") == [(3, "missing field 'image_2'")]


# ---------------------------------------------------------------------------------------------------------------
# Bad input, the manifest, re-runs and interruptions

def test_strict_stops_at_the_first_bad_row_naming_dataset_split_and_row(tmp_path):
    source = F.save(F.coco(), tmp_path / "raw", split="train")
    with pytest.raises(SystemExit, match=rf"^error: coco/train from {source} split train: row 1: missing field "
                                         r"'solution'$"):
        build(tmp_path / "data", "coco", source, None, "--strict")
    assert lists_nothing(tmp_path / "data")


def test_a_source_in_another_schema_is_an_error_not_a_split_of_skipped_rows(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: chartqa/test: .* has no column type, answer \(it has questionId"):
        build(tmp_path / "data", "chartqa", F.save(F.infovqa(), tmp_path / "raw"))
    with pytest.raises(SystemExit, match=r"^error: geoqa/train: no row of .* could be converted \(unparsable"):
        build(tmp_path / "data", "geoqa", F.save(F.geoqa().select([1]), tmp_path / "raw_bad"))
    assert lists_nothing(tmp_path / "data")


def test_manifest_merges_invocations_and_names_the_evaluation_sets(tmp_path):
    data = tmp_path / "data"
    build(data, "lisa", F.save(F.lisa_test(), tmp_path / "raw_test"), "test")
    build(data, "chartqa", F.save(F.chartqa(), tmp_path / "raw_chart", split="test"))
    build(data, "lisa", F.save(F.lisa_train(), tmp_path / "raw_train"), "train")
    m = manifest(data)
    assert m["format_version"] == 1
    assert m["evaluation"] == {"in_domain": ["lisa/test"], "out_of_domain": ["chartqa/test"]}
    lisa = m["datasets"]["lisa"]
    assert (lisa["role"], lisa["reward"], sorted(lisa["splits"])) == ("train", "lisa", ["test", "train"])
    assert lisa["source"] == f"{tmp_path / 'raw_test'} split train; {tmp_path / 'raw_train'} split train"
    assert (m["datasets"]["chartqa"]["role"], m["datasets"]["chartqa"]["reward"]) == ("benchmark", "relaxed_accuracy")
    entry = lisa["splits"]["train"]
    assert (entry["path"], entry["rows"], entry["n_skipped"]) == ("lisa/train", 2, 3)
    assert entry["fingerprint"] == P.fingerprint(load(data, "lisa", "train"))


def test_rerun_is_idempotent(tmp_path, capsys):
    data, source = tmp_path / "data", F.save(F.coco(), tmp_path / "raw", split="train")
    build(data, "coco", source)
    before = open(data / "manifest.json").read()
    mtime = os.stat(data / "coco" / "train").st_mtime_ns
    build(data, "coco", source)
    assert "coco/train: up to date" in capsys.readouterr().out
    assert open(data / "manifest.json").read() == before and os.stat(data / "coco" / "train").st_mtime_ns == mtime
    build(data, "coco", source, None, "--force")  # rebuilt: the same content
    assert open(data / "manifest.json").read() == before


def test_an_interrupted_write_leaves_the_old_split_listed_and_the_partial_one_unlisted(tmp_path, monkeypatch):
    data, source = tmp_path / "data", F.save(F.chartqa(), tmp_path / "raw", split="test")
    build(data, "chartqa", source)
    before = manifest(data)
    real_save = datasets.Dataset.save_to_disk

    def save_then_die(self, path, **kwargs):
        real_save(self, path, **kwargs)
        os.remove(os.path.join(path, "state.json"))
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(data, "chartqa", source, None, "--force")
    assert manifest(data) == dict(before, pending_splits=["chartqa/test"])  # the old, complete split; the rebuild pending
    assert P.fingerprint(load(data, "chartqa", "test")) == before["datasets"]["chartqa"]["splits"]["test"]["fingerprint"]
    assert [n for n in os.listdir(data / "chartqa") if n.startswith(".test.partial-")]
    monkeypatch.undo()
    build(data, "chartqa", source, None, "--force")  # the next run clears the leftover
    assert os.listdir(data / "chartqa") == ["test"] and manifest(data)["pending_splits"] == []


def test_a_killed_build_lists_only_complete_splits_and_resumes(tmp_path):
    """SIGKILL the synthetic build once it has listed a split: every listed split loads with its manifest
    fingerprint; a second run skips what is done and ends with the same fingerprints as one uninterrupted run."""
    data = tmp_path / "data"
    argv = [sys.executable, P.__file__, "--data_dir", str(data), "--n_train", "200", "--n_test", "20"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (os.path.exists(data / "manifest.json") and manifest(data)["datasets"]) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = {(d, s): e for d, entry in manifest(data)["datasets"].items() for s, e in entry["splits"].items()}
    assert 1 <= len(listed) < 13
    for (domain, split), entry in listed.items():
        assert P.fingerprint(load(data, domain, split)) == entry["fingerprint"]
    # Every split the run set out to build is pending, and training and evaluation refuse the manifest.
    assert len(manifest(data)["pending_splits"]) == 13
    with pytest.raises(SystemExit, match=r"manifest.json: the prepare_data.py run that builds syn_chart/test, .* has "
                                         "not finished \\(killed, or still running\\): run that command again"):
        vlm.load_manifest(str(data))
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert vlm.load_manifest(str(data))["pending_splits"] == []
    P.main(["--data_dir", str(tmp_path / "clean"), "--n_train", "200", "--n_test", "20"])
    resumed, clean = manifest(data), manifest(tmp_path / "clean")
    assert {d: {s: e["fingerprint"] for s, e in v["splits"].items()} for d, v in resumed["datasets"].items()} == \
           {d: {s: e["fingerprint"] for s, e in v["splits"].items()} for d, v in clean["datasets"].items()}


def replace_split(folder, change):
    """Re-saves a split with `change` applied to every row: same rows, same ids, other content."""
    dataset = datasets.load_from_disk(str(folder)).map(change)
    dataset.save_to_disk(str(folder) + "-new")
    shutil.rmtree(folder)
    os.rename(str(folder) + "-new", folder)


def test_training_refuses_changed_cut_or_deleted_splits_and_a_rerun_rebuilds_them(tmp_path, capsys):
    import train_grpo
    data, argv = tmp_path / "data", ["--data_dir", str(tmp_path / "data"), "--n_train", "3", "--n_test", "2"]
    P.main(argv)
    listed = vlm.load_manifest(str(data))
    assert [r["id"] for r in train_grpo.load_train_split(str(data), listed, "syn_count")] == [
        "syn_count-train-00000", "syn_count-train-00001", "syn_count-train-00002"]
    replace_split(data / "syn_count" / "train", lambda r: {"solution": "<answer>9</answer>"})
    arrow = data / "syn_detect" / "train" / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[:1000])
    shutil.rmtree(data / "syn_ground" / "train")
    for domain, message in [("syn_count", "holds other data than the manifest lists"),
                            ("syn_detect", "holds other data than the manifest lists"), ("syn_ground", "does not exist")]:
        with pytest.raises(SystemExit, match=rf"{domain}/train \({domain}/train in .*manifest.json\) {message}.*"
                                             "run prepare_data.py again"):
            train_grpo.load_train_split(str(data), listed, domain)
    capsys.readouterr()
    P.main(argv)  # what the message says: a plain rerun rebuilds exactly the three
    out = capsys.readouterr().out
    assert sorted(line.split(":")[0] for line in out.splitlines() if "up to date" not in line) == [
        "syn_count/train", "syn_detect/train", "syn_ground/train"]
    assert vlm.load_manifest(str(data)) == listed  # the same content as before the damage
    for domain in ("syn_count", "syn_detect", "syn_ground"):
        assert len(train_grpo.load_train_split(str(data), listed, domain)) == 3


def test_source_replaces_one_split_only(tmp_path, capsys):
    with pytest.raises(SystemExit):
        P.main(["--dataset", "lisa", "--source", str(tmp_path), "--data_dir", str(tmp_path / "data")])
    assert "--source replaces the source of one dataset split" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--n_train=-5"], "--n_train must be at least 1 (got -5)"),
    (["--n_test=0"], "--n_test must be at least 1 (got 0)"),
    (["--split", "nope"], "the synthetic suite has no split 'nope' (it has train, test)"),
    (["--dataset", "lisa", "--split", "test", "--source", "/mirrors/nope"],
     "--source /mirrors/nope: no such folder (and not a hub name owner/name)"),
])
def test_bad_options_are_one_line_errors_that_write_nothing(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        P.main(argv + ["--data_dir", str(tmp_path / "data")])
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "data")


def test_split_builds_only_that_split_of_the_synthetic_suite(tmp_path):
    P.main(["--data_dir", str(tmp_path), "--split", "test", "--n_train", "2", "--n_test", "2"])
    assert {d: sorted(e["splits"]) for d, e in manifest(tmp_path)["datasets"].items()} == {
        d: ["test"] for d in P.SYNTHETIC}


def test_help_documents_every_source_and_option(capsys):
    with pytest.raises(SystemExit):
        P.main(["--help"])
    text = capsys.readouterr().out
    for name in ["laolao77/ViRFT_COCO", "yiqingliang/lisa-problems-dataset-test", "yiqingliang/geoqav-problems-dataset",
                 "yiqingliang/sat-problems-dataset", "yiqingliang/scienceqa-problems-dataset-test",
                 "lmms-lab/ChartQA", "lmms-lab/DocVQA [InfographicVQA] (validation)", "AI4Math/MathVista",
                 "lmms-lab/MMMU", "--source", "--strict", "--seed", "--contact_sheet", "--split", "--force",
                 "lmms-lab-encoder/", "longer than 640 px", "0-1000 grid of the image"]:
        assert name in text


@pytest.mark.parametrize("problem, options", [
    ("Is it red?\nA. yes\nB. no", {"A": "yes", "B": "no"}),
    ("Pick one: (A) 3 (B) 4 (C) 5", {"A": "3", "B": "4", "C": "5"}),
    ("Choices:A:145°;B:155°", {"A": "145°", "B": "155°"}),
    ("In triangle ABC, point A. lies on the line.", {}),  # a point named A is no option list
    ("What is A? Options:\nA) x\nB) y", {"A": "x", "B": "y"}),  # the last run starting at A
])
def test_option_parsing(problem, options):
    assert P.parse_options(problem) == options


def test_answers_map_to_letters():
    options = {"A": "yes", "B": "no."}
    assert [P.to_letter(a, options) for a in ["B", "(B)", "b.", "No", "maybe"]] == ["B", "B", "b.", "B", "maybe"]


# ---------------------------------------------------------------------------------------------------------------
# The synthetic suite

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    data = tmp_path_factory.mktemp("synthetic")
    P.main(["--data_dir", str(data), "--n_train", "60", "--n_test", "30"])
    return data


def all_records(data):
    for domain, entry in manifest(data)["datasets"].items():
        for split in entry["splits"]:
            yield from load(data, domain, split)


def test_every_synthetic_gold_answer_earns_the_maximal_reward(synthetic):
    n = 0
    for r in all_records(synthetic):
        meta = json.loads(r["meta"])
        answer = r["solution"][len("<answer>"):-len("</answer>")]
        result = rewards.score(gold_completion(answer, meta["rationale"]), r["solution"], r["domain"], meta)
        assert result["total"] == rewards.max_total(r["domain"]), (r["id"], result)
        n += 1
    assert n == 5 * 60 + 8 * 30


def test_synthetic_records_follow_the_record_format(synthetic):
    m = manifest(synthetic)
    assert sorted(m["datasets"]) == sorted(P.SYNTHETIC)
    assert m["evaluation"] == {"in_domain": [f"{d}/test" for d in sorted(["syn_detect", "syn_ground", "syn_count",
                                                                          "syn_spatial", "syn_science"])],
                               "out_of_domain": ["syn_chart/test", "syn_colorcount/test", "syn_compare/test"]}
    for r in all_records(synthetic):
        meta = json.loads(r["meta"])
        kind = P.SYNTHETIC[r["domain"]][2]
        assert r["problem"].endswith(SUFFIX_OPTION if kind == "choice" else SUFFIX_PLAIN)
        assert meta["image_size"] == list(r["image"].size) and r["image"].size[0] in (56, 112)
        assert meta["box_convention"] == "pixel" and meta["rationale"]
        assert ("options" in meta) == (kind == "choice")
        if kind == "detection":
            boxes = json.loads(r["solution"][8:-9])
            assert 1 <= len(boxes) <= 3
            assert all(0 <= b[0] < b[2] <= 112 and 0 <= b[1] < b[3] <= 112 for b in boxes)


def test_same_seed_same_fingerprint_other_seed_other_fingerprint(synthetic, tmp_path):
    def fingerprints(data):
        return {(d, s): e["fingerprint"] for d, v in manifest(data)["datasets"].items() for s, e in v["splits"].items()}

    P.main(["--data_dir", str(tmp_path / "same"), "--n_train", "60", "--n_test", "30"])
    P.main(["--data_dir", str(tmp_path / "other"), "--n_train", "60", "--n_test", "30", "--seed", "1"])
    ours, same, other = fingerprints(synthetic), fingerprints(tmp_path / "same"), fingerprints(tmp_path / "other")
    assert ours == same
    assert all(ours[k] != other[k] for k in ours)
    assert P.fingerprint(load(synthetic, "syn_ground", "test")) == ours[("syn_ground", "test")]


def test_fixed_option_order_keeps_each_option_on_its_letter():
    """--option_order=fixed (the default): spatial options are always A left, B right, C above, D below, so the letter
    follows from the relation; --option_order=shuffled shuffles them per record."""
    letters = {}
    for i in range(40):
        _, _, problem, solution, meta = P.synthetic_example("syn_spatial", "train", i, 0, option_order="fixed")
        assert meta["options"] == {"A": "left", "B": "right", "C": "above", "D": "below"}
        assert "\nA. left\nB. right\nC. above\nD. below " in problem
        relation = next(r for r, words in P.RELATIONS.items() if f" is {words} the " in meta["rationale"])
        letters[relation] = solution
    assert letters == {"left": "<answer>A</answer>", "right": "<answer>B</answer>", "above": "<answer>C</answer>",
                       "below": "<answer>D</answer>"}
    _, _, _, _, meta = P.synthetic_example("syn_science", "test", 0, 0, option_order="fixed")
    assert list(meta["options"].values()) in (["0", "3", "4"], ["green", "orange", "purple"])
    assert P.synthetic_example("syn_spatial", "train", 7, 0) == P.synthetic_example("syn_spatial", "train", 7, 0, "fixed")
    shuffled = {json.dumps(P.synthetic_example("syn_spatial", "train", i, 0, "shuffled")[4]["options"]) for i in range(40)}
    assert len(shuffled) > 1


def test_grid_layout_centres_each_object_in_its_own_token_cell(tmp_path, capsys):
    """--layout=grid: every object of a 112 px scene sits centred in its own 28 px cell (one image token of the tiny
    model), 16-24 px wide; a spatial relation still holds; science's 56 px pictures and the default layout are
    unchanged; the manifest names the layout, so a rebuild with the other one is not 'up to date'."""
    # cell 6 of a 4 x 4 grid is row 1, column 2: x from 56, y from 28, a 20 px object 4 px inside on each side
    assert P.centred_in_cell("circle", "red", 6, 20, 112)["box"] == [60, 32, 80, 52]
    for generate in (P.gen_detect, P.gen_ground, P.gen_count, P.gen_spatial, P.gen_colorcount, P.gen_compare):
        for k in range(30):
            boxes = [o["box"] for o in generate(P.OptionsInGivenOrder(f"grid/{k}"), grid=True)["objects"]]
            cells = [(b[1] // 28, b[0] // 28) for b in boxes]
            assert len(set(cells)) == len(cells)
            for (row, col), (x1, y1, x2, y2) in zip(cells, boxes):
                assert 16 <= x2 - x1 == y2 - y1 <= 24 and x2 <= 28 * col + 26 and y2 <= 28 * row + 26
                assert abs((x1 + x2) / 2 - (28 * col + 14)) <= 0.5 and abs((y1 + y2) / 2 - (28 * row + 14)) <= 0.5
    for k in range(20):
        _, _, _, solution, meta = P.synthetic_example("syn_spatial", "test", k, 0, layout="grid")
        assert meta["options"][solution[8]] in meta["rationale"]  # "<answer>B" -> "right" in "... is right of ..."
        science = P.synthetic_example("syn_science", "test", k, 0)
        assert P.synthetic_example("syn_science", "test", k, 0, layout="grid") == science
    ground = P.synthetic_example("syn_ground", "test", 0, 0)
    assert P.synthetic_example("syn_ground", "test", 0, 0, layout="free") == ground
    assert P.synthetic_example("syn_ground", "test", 0, 0, layout="grid")[3] != ground[3]  # another box
    P.main(["--data_dir", str(tmp_path), "--n_train", "2", "--n_test", "2"])
    P.main(["--data_dir", str(tmp_path), "--n_train", "2", "--n_test", "2", "--layout", "grid"])
    assert "up to date" not in capsys.readouterr().out
    assert manifest(tmp_path)["datasets"]["syn_ground"]["source"].endswith(", objects on the image-token grid")


def test_uniform_count_answers_cover_0_to_6_and_match_the_scene():
    """--count_answers=uniform: syn_count's answers are spread over 0-6 (the natural ones peak at 1), each still the
    count of the asked shape in the scene's inventory; the other domains are untouched."""
    def count(problem, rationale):
        asked = problem.split("How many ")[1].split(" are")[0]  # "circles" or "shapes"
        items = [item.split(" ") for item in rationale.split(", ")] if rationale != "nothing" else []
        return sum(int(n) for n, _, shape in items if asked in ("shapes", shape.rstrip("s") + "s"))

    answers = {"natural": [], "uniform": []}
    for mode in answers:
        for i in range(70):
            _, _, problem, solution, meta = P.synthetic_example("syn_count", "train", i, 0, count_answers=mode)
            assert solution == f"<answer>{count(problem, meta['rationale'])}</answer>"
            answers[mode].append(solution[8])
    assert sorted(set(answers["uniform"])) == list("0123456") and max(map(answers["uniform"].count, "0123456")) < 20
    assert max("0123456", key=answers["natural"].count) == "1"
    assert P.synthetic_example("syn_ground", "train", 3, 0, count_answers="uniform") == \
        P.synthetic_example("syn_ground", "train", 3, 0)


def test_scan_and_find_rationales_list_every_object_by_cell_then_name_the_named_ones_cells(tmp_path, capsys):
    """--rationale=scan: grounding's and spatial relations' rationales read the scene row by row, each object with
    the 28 px cell of its centre, then name the asked objects' cells; pictures, problems, answers and the other
    domains are those of the short rationales, and the manifest names the choice."""
    objects = [{"shape": "circle", "color": "red", "box": [60, 32, 80, 52]},  # centre (70, 42): row 2, column 3
               {"shape": "square", "color": "blue", "box": [4, 4, 24, 24]},  # (14, 14): row 1, column 1
               {"shape": "triangle", "color": "green", "box": [88, 4, 108, 24]}]  # (98, 14): row 1, column 4
    listed = "blue square in row 1 column 1, green triangle in row 1 column 4, red circle in row 2 column 3"
    assert P.scan(objects) == listed
    assert P.scan_rationale("syn_ground", {"objects": objects, "rationale": "the red circle is at the top right"}) \
        == listed + "; so the red circle is in row 2 column 3"
    assert P.scan_rationale("syn_spatial", {"objects": objects, "rationale": "the red circle is below the blue "
                                            "square"}) == (listed + "; so the red circle is in row 2 column 3 and "
                                                           "the blue square in row 1 column 1, so the red circle is "
                                                           "below the blue square")
    assert P.scan([]) == ""
    for domain in ("syn_ground", "syn_spatial", "syn_count", "syn_science"):
        for k in range(10):
            short = P.synthetic_example(domain, "test", k, 0, layout="grid")
            scanned = P.synthetic_example(domain, "test", k, 0, layout="grid", rationale="scan")
            assert scanned[:4] == short[:4] and scanned[4].keys() == short[4].keys()  # same picture, problem, answer
            if domain not in P.SCANNED:
                assert scanned == short
                continue
            listing, claim = scanned[4]["rationale"].split("; so ")
            cells = [tuple(int(v) for v in item.split(" in row ")[1].split(" column ")) for item in listing.split(", ")]
            assert cells == sorted(set(cells)) and len(cells) >= 2  # row by row, one object per cell on the grid
            if domain == "syn_ground":  # the claimed cell holds the answer's box
                x1, y1, x2, y2 = json.loads(short[3][len("<answer>"):-len("</answer>")])
                assert claim.endswith("in row {} column {}".format((y1 + y2) // 2 // 28 + 1, (x1 + x2) // 2 // 28 + 1))
                assert short[4]["rationale"].startswith(claim.split(" is in ")[0] + " is at the ")  # the same object
            else:
                assert claim.endswith(", so " + short[4]["rationale"])
    grounding = {"objects": objects, "rationale": "the red circle is at the top right"}
    assert P.find_rationale("syn_ground", grounding) == ("blue square no in row 1 column 1, green triangle no in row "
                                                         "1 column 4, red circle yes in row 2 column 3; so the red "
                                                         "circle is in row 2 column 3")
    grounding["objects"] = [objects[1], objects[0], objects[2]]  # the blue square named: the scan stops at it
    assert P.find_rationale("syn_ground", grounding) == "blue square yes in row 1 column 1; so the blue square is in " \
                                                        "row 1 column 1"
    assert P.find_rationale("syn_spatial", {"objects": objects, "rationale": "the red circle is below the blue "
                                            "square"}) == ("blue square yes in row 1 column 1, green triangle no in "
                                                           "row 1 column 4, red circle yes in row 2 column 3; so the "
                                                           "red circle is in row 2 column 3 and the blue square in "
                                                           "row 1 column 1, so the red circle is below the blue square")
    for domain in ("syn_ground", "syn_spatial", "syn_detect"):
        for k in range(10):
            scanned = P.synthetic_example(domain, "test", k, 0, layout="grid", rationale="scan")
            found = P.synthetic_example(domain, "test", k, 0, layout="grid", rationale="find")
            assert found[:4] == scanned[:4]  # same picture, problem, answer
            if domain not in P.SCANNED:
                assert found == scanned
                continue
            found_list, found_claim = found[4]["rationale"].split("; so ")
            scanned_list, scanned_claim = scanned[4]["rationale"].split("; so ")
            assert found_claim == scanned_claim
            unjudged = found_list.replace(" yes in ", " in ").replace(" no in ", " in ")
            assert found_list.count(" yes in ") == (1 if domain == "syn_ground" else 2)
            if domain == "syn_ground":  # the scan up to the named object, which is the last one read
                assert scanned_list.startswith(unjudged) and found_list.endswith(
                    " yes in " + found_claim.split(" is in ")[1])
            else:
                assert unjudged == scanned_list
    P.main(["--data_dir", str(tmp_path), "--n_train", "2", "--n_test", "2"])
    P.main(["--data_dir", str(tmp_path), "--n_train", "2", "--n_test", "2", "--rationale", "scan"])
    assert "up to date" not in capsys.readouterr().out
    assert manifest(tmp_path)["datasets"]["syn_ground"]["source"].endswith(", rationales that scan the picture")
    P.main(["--data_dir", str(tmp_path), "--n_train", "2", "--n_test", "2", "--rationale", "find"])
    assert manifest(tmp_path)["datasets"]["syn_ground"]["source"].endswith(
        ", rationales that find the named objects while scanning")


def test_contact_sheet(tmp_path):
    from PIL import Image
    P.main(["--contact_sheet", str(tmp_path / "sheet.png"), "--data_dir", str(tmp_path / "data")])
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size[0] == 120 + 4 * 250 and sheet.size[1] > 8 * 224
    assert not os.path.exists(tmp_path / "data")  # the flag draws, it builds nothing
