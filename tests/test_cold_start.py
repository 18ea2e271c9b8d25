"""cold_start.py: the reference completions it imitates, and its output reused or protected on a rerun. The run
itself is the session's cold_start_dir fixture (conftest.py), which every training test starts from."""
import json
import shutil

import numpy as np
import torch

import cold_start
import vlm
from tiny_runs import cold_start as run_cold_start


def test_reference_completion_uses_rationale():
    assert cold_start.reference_completion("<answer>B</answer>", {"rationale": "red is left"}) == \
        "<think>\nred is left\n</think>\n<answer>\nB\n</answer>"
    assert cold_start.reference_completion("[1, 2, 3, 4]", {}) == "<think>\n\n</think>\n<answer>\n[1, 2, 3, 4]\n</answer>"


def test_output_is_a_checkpoint_with_its_recipe(cold_start_dir):
    assert vlm.checkpoint_problem(str(cold_start_dir)) is None
    info = json.loads((cold_start_dir / "cold_start.json").read_text())
    assert info["settings"]["steps"] == 120 and info["settings"]["seed"] == 0
    assert set(info["settings"]["data"]) == {"syn_count", "syn_colorcount"}  # every training domain, fingerprinted
    assert "out_dir" not in info["settings"] and "data_dir" not in info["settings"]


def test_random_answers_keep_the_rationale_and_the_format_and_draw_only_valid_answers():
    """answers="random": choice answers become uniformly drawn option letters and counts numbers 0-6; boxes, the
    rationale and the layout stay as they are."""
    rng = np.random.default_rng(0)
    choice = {"rationale": "a circle has 0 sides", "options": {"A": "0", "B": "3", "C": "4"}}
    letters = [cold_start.reference_completion("<answer>A</answer>", choice, rng) for _ in range(300)]
    assert {c.replace("<think>\na circle has 0 sides\n</think>\n<answer>\n", "") for c in letters} == \
        {"A\n</answer>", "B\n</answer>", "C\n</answer>"}
    assert 70 <= sum(c.endswith("A\n</answer>") for c in letters) <= 130  # about a third: 100 expected
    counts = {cold_start.reference_completion("<answer>3</answer>", {"rationale": "3 red circles"}, rng)
              for _ in range(200)}
    assert counts == {f"<think>\n3 red circles\n</think>\n<answer>\n{n}\n</answer>" for n in range(7)}
    box = cold_start.reference_completion("<answer>[1, 2, 3, 4]</answer>", {"rationale": "top left"}, rng)
    assert box == "<think>\ntop left\n</think>\n<answer>\n[1, 2, 3, 4]\n</answer>"


def test_an_unknown_answers_setting_is_a_one_line_error(data_dir, tmp_path):
    proc = run_cold_start(data_dir, tmp_path / "cs", "--answers=shuffled", check=False)
    assert proc.returncode != 0 and "error: answers='shuffled'; use 'reference' or 'random'" in proc.stderr
    assert not (tmp_path / "cs").exists()


def test_rerun_with_the_same_settings_does_nothing(data_dir, cold_start_dir):
    before = (cold_start_dir / "model.safetensors").stat().st_mtime_ns
    proc = run_cold_start(data_dir, cold_start_dir)
    assert "is up to date" in proc.stdout
    assert (cold_start_dir / "model.safetensors").stat().st_mtime_ns == before


def test_a_cold_start_from_before_a_setting_existed_counts_as_made_the_old_way(data_dir, cold_start_dir, tmp_path):
    """train_vision came later: a cold start recorded without it was made with the tower trained (the default then;
    today's default, and the fixture's setting, is False)."""
    old = tmp_path / "old"
    shutil.copytree(cold_start_dir, old)
    info = json.loads((old / "cold_start.json").read_text())
    del info["settings"]["train_vision"]
    (old / "cold_start.json").write_text(json.dumps(info))
    vlm.write_checksums(str(old))
    assert "is up to date" in run_cold_start(data_dir, old, "--train_vision=true").stdout
    refused = run_cold_start(data_dir, old, check=False)
    assert refused.returncode != 0 and "made with other train_vision" in refused.stderr


def test_rerun_with_other_settings_is_refused(data_dir, cold_start_dir):
    proc = run_cold_start(data_dir, cold_start_dir, "--learning_rate=0.1", "--seed=3", check=False)
    assert proc.returncode != 0
    assert "holds a cold start made with other learning_rate, seed" in proc.stderr
    assert vlm.checkpoint_problem(str(cold_start_dir)) is None  # untouched


def test_a_folder_that_is_no_cold_start_is_never_replaced(data_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    proc = run_cold_start(data_dir, tmp_path / "run", check=False)
    assert proc.returncode != 0 and "is not a cold start" in proc.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"


def test_train_vision_false_leaves_the_vision_tower_as_loaded(data_dir, monkeypatch):
    for name, value in {"train_vision": False, "steps": 2, "batch_size": 2}.items():
        monkeypatch.setattr(cold_start, name, value)
    manifest = vlm.load_manifest(str(data_dir))
    datasets = {d: cold_start.load_train_split(str(data_dir), manifest, d) for d in cold_start.training_domains(manifest)}
    model, tokenizer, image_processor = vlm.load_policy("tiny", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cold_start.train(datasets, model, tokenizer, image_processor)
    after = model.state_dict()
    vision = [k for k in before if "visual" in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert not torch.equal(before["model.language_model.layers.0.mlp.up_proj.weight"],
                           after["model.language_model.layers.0.mlp.up_proj.weight"])


def test_token_targets_name_each_cells_position_and_the_object_covering_it():
    """A 112 px canvas as a 4 x 4 grid of 28 px cells. A red circle [0, 0, 28, 28] fills cell (0, 0); a blue
    square [40, 52, 70, 80] covers 16 x 24 px of cell (2, 1) and 14 x 24 of (2, 2) (over 15 % of 784 = 117.6),
    16 x 4 = 64 px of (1, 1) and 14 x 4 of (1, 2): none."""
    objects = [{"shape": "circle", "color": "red", "box": [0, 0, 28, 28]},
               {"shape": "square", "color": "blue", "box": [40, 52, 70, 80]}]
    targets = cold_start.token_targets(objects, 112, 4, 4)
    none = (len(cold_start.prepare_data.COLORS), len(cold_start.prepare_data.SHAPES))
    red, circle = list(cold_start.prepare_data.COLORS).index("red"), cold_start.prepare_data.SHAPES.index("circle")
    blue, square = list(cold_start.prepare_data.COLORS).index("blue"), cold_start.prepare_data.SHAPES.index("square")
    assert len(targets) == 16 and [t[:2] for t in targets] == [(r, c) for r in range(4) for c in range(4)]
    assert targets[0] == (0, 0, red, circle)
    assert targets[9] == (2, 1, blue, square) and targets[10] == (2, 2, blue, square)
    assert targets[5] == (1, 1, *none) and targets[6] == (1, 2, *none)
    assert sum(t[2:] != none for t in targets) == 3
    assert cold_start.token_targets([], 112, 2, 2) == [(r, c, *none) for r in range(2) for c in range(2)]


def test_vision_pretraining_trains_the_tower_alone(monkeypatch):
    for name, value in {"vision_steps": 3, "learning_rate": 1e-3}.items():
        monkeypatch.setattr(cold_start, name, value)
    model, _, image_processor = vlm.load_policy("tiny", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy = cold_start.pretrain_vision(model, image_processor, batch=4)
    after = model.state_dict()
    vision = [k for k in before if "visual" in k]
    assert all(not torch.equal(before[k], after[k]) for k in vision if k.endswith("patch_embed.proj.weight"))
    assert all(torch.equal(before[k], after[k]) for k in before if k not in vision)
    assert set(accuracy) == {"row", "column", "colour", "shape"} and all(0 <= a <= 1 for a in accuracy.values())


def test_vision_steps_with_a_pretrained_model_is_a_one_line_error(data_dir, tmp_path):
    proc = run_cold_start(data_dir, tmp_path / "cs", "--init_from=Qwen/Qwen2-VL-2B-Instruct", "--vision_steps=5",
                          check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == ("error: vision_steps=5 pretrains a tiny model's random vision "
                                                    "tower; init_from=Qwen/Qwen2-VL-2B-Instruct has a pretrained one: "
                                                    "use --vision_steps=0")
    assert not (tmp_path / "cs").exists()


class NeverRead:
    """A training split that fails the test when any of its records is read."""
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, row):
        raise AssertionError(f"record {row} of a domain with weight 0 was read")


def test_domain_weights_draw_only_the_weighted_domains(data_dir, monkeypatch):
    """domain_weights='{"syn_count": 1}': every example of the cold start is a counting record; syn_colorcount
    (weight 0) is never read. 3 steps of 4 examples."""
    for name, value in {"steps": 3, "batch_size": 4, "domain_weights": '{"syn_count": 1}'}.items():
        monkeypatch.setattr(cold_start, name, value)
    manifest = vlm.load_manifest(str(data_dir))
    count = cold_start.load_train_split(str(data_dir), manifest, "syn_count")
    read = []
    real_fields = cold_start.record_fields
    monkeypatch.setattr(cold_start, "record_fields", lambda record: read.append(record) or real_fields(record))
    model, tokenizer, image_processor = vlm.load_policy("tiny", seed=0)
    cold_start.train({"syn_count": count, "syn_colorcount": NeverRead(len(count))}, model, tokenizer,
                     image_processor)
    assert [r["domain"] for r in read] == ["syn_count"] * 12


def test_bad_domain_weights_are_a_one_line_error_before_any_work(data_dir, tmp_path):
    proc = run_cold_start(data_dir, tmp_path / "cs", '--domain_weights={"syn_nope": 1}', check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == ("error: mixture (--domain_weights) names unknown domain(s) "
                                                    "['syn_nope']; the manifest's training domains are "
                                                    "['syn_colorcount', 'syn_count']")
    assert not (tmp_path / "cs").exists()
