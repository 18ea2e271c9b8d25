"""The parts of benchmarks/grpo_vs_trl.py that need no TRL (the prompt schedule both sides are fed and our side's
timed run), benchmarks/model_size.py on a toy size, and the GPU check on CPU. TRL's side needs its own venv from PyPI (benchmarks/requirements-trl.txt), which CI does not build;
these keep the benchmark from silently breaking when train_grpo.py or vlm.py change."""
import json
import os
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import grpo_vs_trl  # noqa: E402

import train_grpo  # noqa: E402


def small_settings():
    return grpo_vs_trl.grpo_settings(SimpleNamespace(prompts=2, G=3, length=6, beta=0.04))


def test_schedule_records_are_train_grpos_schedule(data_dir):
    settings = small_settings()
    records = grpo_vs_trl.schedule_records(settings, str(data_dir), steps=4)
    # 2 prompts x 4 steps, from the two training domains (60 and 12 rows), drawn with the run's seed
    assert len(records) == 8
    sizes = {"syn_count": 60, "syn_colorcount": 12}
    assert all(domain in sizes and 0 <= row < sizes[domain] for domain, row in records)
    assert records == grpo_vs_trl.schedule_records(settings, str(data_dir), steps=4)
    schedule = train_grpo.build_schedule(train_grpo.resolve_mixture("uniform", "", list(sizes)), sizes, 2, 4,
                                         "with_replacement", settings["seed"])
    assert records == [pick for step in schedule for pick in step]


def test_our_side_times_full_length_completions(data_dir, cold_start_dir, tmp_path):
    settings = small_settings()
    run = grpo_vs_trl.run_ours(ROOT, settings, str(cold_start_dir), str(data_dir), warmup=1, steps=2,
                               work=str(tmp_path / "ours"))
    assert len(run["step_s"]) == 2 and all(s > 0 for s in run["step_s"])
    # EOS held back: every completion has exactly `length` tokens, which the comparison requires
    assert run["samples"] == [6, 6] and run["tokens"] == [36, 36]
    assert run["peak_mib"] > 0
    assert set(run["split"]) == {"t_generate", "t_reward", "t_ref_old", "t_forward_backward", "t_optimizer", "t_step"}
    speed = grpo_vs_trl.throughput(run)
    assert abs(speed["samples_per_s"] - 12 / sum(run["step_s"])) < 1e-9


def test_gpu_check_runs_every_stage_on_the_tiny_model(tmp_path):
    # the prepared GPU check, end to end on CPU: 2 prompts x G 2 x 4 tokens (EOS held back), one timed step
    import gpu_check
    r = gpu_check.main(["--model", "tiny", "--steps", "2", "--completion_length", "4", "--num_generations", "2",
                        "--eval_limit", "1", "--work_dir", str(tmp_path)])
    step = r["seconds_per_step"]["step"]
    assert r["steps_timed"] == 1 and r["completion_tokens_per_step"] == 16
    assert abs(r["steps_per_s"] - 1 / step) < 1e-9 and abs(r["tokens_per_s"] - 16 / step) < 1e-6
    assert abs(r["samples_per_s"] - 4 / step) < 1e-6
    assert r["eval_items"] == 8 and r["eval_items_per_s"] > 0  # one item of each synthetic test set
    text_params = 823808 - 241024  # the tiny model minus its vision tower
    assert r["model_tflops_per_step"] * 1e12 > 10 * text_params * 16  # completions alone are a lower bound
    assert r["gpu_peak_memory_gib"] is None and r["mfu"] is None  # no GPU here


def test_gpu_check_knows_the_peak_of_the_gpus_it_is_meant_for():
    import gpu_check
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_flops("Tesla T4") is None


def test_model_size_128x2_is_the_tiny_model(tmp_path):
    import model_size
    import vlm
    params = model_size.build_model(128, 2, str(tmp_path / "m"))
    assert params == 823808  # the tiny model's count (as above)
    built = vlm.load_policy(str(tmp_path / "m"))[0].state_dict()
    tiny = vlm.build_tiny_model(vlm.build_tiny_tokenizer()).state_dict()
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in tiny.items()}


def test_model_size_times_each_size_and_micro_batch(data_dir, tmp_path, capsys):
    import model_size
    model_size.main(["--sizes=64x1", "--micro_batch_sizes=0,3", "--steps=1", "--warmup=1", "--length=4",
                     f"--data_dir={data_dir}", f"--out={tmp_path}"])
    with open(tmp_path / "model_size.json") as f:
        rows = json.load(f)["rows"]
    assert [(r["width"], r["layers"], r["micro_batch_size"]) for r in rows] == [(64, 1, 0), (64, 1, 3)]
    # 4 prompts x 6 completions x 4 tokens (EOS held back) per step
    assert all(abs(r["tokens_per_s"] - 96 / r["step_s"]) < 1e-6 and r["peak_mib"] > 0 for r in rows)
    assert rows[0]["parameters"] == rows[1]["parameters"] < 823808
    report = (tmp_path / "model_size.md").read_text()
    assert "| 64x1 |" in report and "| all |" in report and "| 3 |" in report
    assert report.strip() in capsys.readouterr().out


def test_model_size_rejects_a_width_the_heads_do_not_divide(capsys):
    import model_size
    with pytest.raises(SystemExit):
        model_size.parse_args(["--sizes=128x2,100x2"])
    assert "size '100x2': the width must be a multiple of 64" in capsys.readouterr().err


def write_predictions(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rationale_probe_splits_scores_by_whether_the_think_is_the_reference(data_dir, tmp_path, capsys):
    import datasets
    import rationale_probe
    meta = {r["id"]: json.loads(r["meta"])["rationale"]
            for r in datasets.load_from_disk(str(data_dir / "syn_count" / "train"))}
    assert meta["syn_count-0"].endswith(" circles")

    def pred(i, think, score, name="syn_count/train"):
        return {"set": name, "id": f"syn_count-{i}", "completion": f"{think}<answer>1</answer>", "score": score}
    rows = [pred(0, f"<think>\n{meta['syn_count-0']}\n</think>\n", 1.0),  # right (whitespace around it aside)
            pred(1, f"<think>{meta['syn_count-1']}</think>", 0.5),       # right
            pred(2, f"<think>{meta['syn_count-2']}.</think>", 1.0),      # a word-for-word match only: wrong
            pred(3, "", 0.0),                                             # no <think>: wrong
            pred(4, "<think>7 circles</think>", 0.5),                     # wrong
            {"set": "syn_count/train", "id": "not-a-record", "completion": "", "score": 1.0}]  # no rationale: skipped
    results, scans = rationale_probe.main([write_predictions(tmp_path / "p.jsonl", rows), f"--data_dir={data_dir}"])
    out = capsys.readouterr().out
    assert scans == {str(tmp_path / "p.jsonl"): {}} and "Scan rationales" not in out  # no scan rationales: one table
    r = results[str(tmp_path / "p.jsonl")]["syn_count/train"]
    assert r["n"] == 5 and r["rationale_right"] == 0.4
    assert r["score_if_right"] == 0.75 and abs(r["score_if_wrong"] - 0.5) < 1e-12  # (1 + 0 + 0.5) / 3
    assert "| syn_count/train | 5 | 0.400 | 0.750 | 0.500 |" in out
    only_wrong, _ = rationale_probe.main([write_predictions(tmp_path / "w.jsonl", rows[3:5]), f"--data_dir={data_dir}"])
    assert only_wrong[str(tmp_path / "w.jsonl")]["syn_count/train"]["score_if_right"] is None
    assert "| 0.000 | — | 0.250 |" in capsys.readouterr().out


def test_rationale_probe_splits_scan_rationales_into_list_and_claim(tmp_path, capsys):
    import datasets
    import prepare_data
    import rationale_probe
    prepare_data.main(["--data_dir", str(tmp_path / "data"), "--n_train", "1", "--n_test", "2", "--layout", "grid",
                       "--rationale", "scan"])
    ground = {r["id"]: json.loads(r["meta"])["rationale"]
              for r in datasets.load_from_disk(str(tmp_path / "data" / "syn_ground" / "test"))}
    (g0, ref0), (g1, ref1) = sorted(ground.items())
    spatial_id, spatial_ref = min((r["id"], json.loads(r["meta"])["rationale"])
                                  for r in datasets.load_from_disk(str(tmp_path / "data" / "syn_spatial" / "test")))
    claim0 = ref0.split("; so ")[1]
    wrong_claim = "the red circle is in row 9 column 9"

    def pred(name, i, think):
        return {"set": name, "id": i, "completion": f"<think>{think}</think><answer>[0, 0, 1, 1]</answer>",
                "score": 0.0}
    rows = [pred("syn_ground/test", g0, ref0),                                 # list and claim right
            pred("syn_ground/test", g1, ref1.split("; so ")[0] + "; so " + wrong_claim),  # list right, claim wrong
            pred("syn_spatial/test", spatial_id, "blue square in row 1 column 1; so " + spatial_ref.split("; so ")[1])]
    _, scans = rationale_probe.main([write_predictions(tmp_path / "p.jsonl", rows),
                                     f"--data_dir={tmp_path / 'data'}"])
    g = scans[str(tmp_path / "p.jsonl")]["syn_ground/test"]
    assert g["n"] == 2 and g["list_right"] == 1.0 and g["claim_right"] == 0.5 and g["claim_right_if_list_right"] == 0.5
    # a random pick among the listed objects: 1 / (objects in the list), averaged over the two pictures
    # (" in row " once per listed object and once in the claim)
    assert g["claim_by_random_pick"] == (1 / (ref0.count(" in row ") - 1) + 1 / (ref1.count(" in row ") - 1)) / 2
    s = scans[str(tmp_path / "p.jsonl")]["syn_spatial/test"]  # the list wrong, the claim (two cells + relation) right
    assert (s["n"], s["list_right"], s["claim_right"]) == (1, 0.0, 1.0)
    assert s["claim_right_if_list_right"] is None and s["claim_by_random_pick"] is None  # two objects named
    out = capsys.readouterr().out
    assert "Scan rationales" in out and "| syn_spatial/test | 1 | 0.000 | 1.000 | — | — |" in out
    assert claim0.startswith("the ") and " is in row " in claim0
    # a find rationale (--rationale=find) is split the same way; its grounding list stops at the named object, so no
    # random pick's rate is given
    prepare_data.main(["--data_dir", str(tmp_path / "find"), "--n_train", "1", "--n_test", "2", "--layout", "grid",
                       "--rationale", "find"])
    found = {r["id"]: json.loads(r["meta"])["rationale"]
             for r in datasets.load_from_disk(str(tmp_path / "find" / "syn_ground" / "test"))}
    assert found[g0].split("; so ")[1] == claim0 and " yes in " in found[g0]
    _, scans = rationale_probe.main([write_predictions(tmp_path / "f.jsonl", [pred("syn_ground/test", g0, found[g0])]),
                                     f"--data_dir={tmp_path / 'find'}"])
    assert scans[str(tmp_path / "f.jsonl")]["syn_ground/test"] == {
        "n": 1, "list_right": 1.0, "claim_right": 1.0, "claim_right_if_list_right": 1.0, "claim_by_random_pick": None}


def test_rationale_probe_bad_input_is_a_one_line_error(data_dir, tmp_path):
    import rationale_probe
    other_set = write_predictions(tmp_path / "o.jsonl", [{"set": "syn_spatial/test", "id": "x", "completion": "",
                                                          "score": 0.0}])
    with pytest.raises(SystemExit, match="syn_spatial/test is not in .*manifest.json; give the --data_dir"):
        rationale_probe.main([other_set, f"--data_dir={data_dir}"])
    (tmp_path / "bad.jsonl").write_text('{"set": "syn_count/train"\n')
    with pytest.raises(SystemExit, match="cannot read .*bad.jsonl .*give evaluate.py's predictions.jsonl"):
        rationale_probe.main([str(tmp_path / "bad.jsonl"), f"--data_dir={data_dir}"])
    no_rationale = write_predictions(tmp_path / "n.jsonl", [{"set": "syn_count/train", "id": "nope", "completion": "",
                                                             "score": 0.0}])
    with pytest.raises(SystemExit, match="no prediction in .*n.jsonl is of a record with a reference rationale"):
        rationale_probe.main([no_rationale, f"--data_dir={data_dir}"])
