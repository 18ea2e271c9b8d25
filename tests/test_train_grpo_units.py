"""train_grpo.py's pure parts: the objective against hand-computed values, the sampler, the group layout, config
and mixtures."""
import json
import math
import os

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import train_grpo as tg
import vlm

LN2 = math.log(2.0)


def loss_of(logp, old, ref, adv, mask, loss_type="token", beta=0.04, max_len=4):
    return tg.grpo_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(ref), torch.tensor(adv),
                        torch.tensor(mask), 0.2, 0.2, beta, loss_type, max_len)


# Two completions of two tokens; ratio 1 everywhere (mu = 1); advantages +1 / -1; the second completion has one
# real token. Token (0, 1) has ref - logp = ln 2, so k3 = 2 - ln 2 - 1 = 0.306853; elsewhere k3 = 0.
# per-token loss: row 0 = [-1, -1 + 0.04 * 0.306853] = [-1, -0.987726]; row 1 = [+1, masked].
CASE = dict(logp=[[-1.0, -2.0], [-1.5, -0.5]], old=[[-1.0, -2.0], [-1.5, -0.5]],
            ref=[[-1.0, -2.0 + LN2], [-1.5, -0.5]], adv=[1.0, -1.0], mask=[[1, 1], [1, 0]])
K3 = 2 - LN2 - 1


def test_token_mean_loss_hand_computed():
    loss, stats = loss_of(**CASE, loss_type="token")
    assert loss.item() == pytest.approx((-1 + (-1 + 0.04 * K3) + 1) / 3, abs=1e-6)  # -0.329242
    assert stats["kl"] == pytest.approx(K3 / 3, abs=1e-6)
    assert stats["clip_fraction"] == 0.0


def test_sequence_mean_loss_hand_computed():
    loss, _ = loss_of(**CASE, loss_type="sequence")
    assert loss.item() == pytest.approx(((-1 + (-1 + 0.04 * K3)) / 2 + 1) / 2, abs=1e-6)  # 0.0030685


def test_dr_grpo_loss_hand_computed():
    loss, _ = loss_of(**CASE, loss_type="dr_grpo", max_len=4)
    assert loss.item() == pytest.approx((-1 + (-1 + 0.04 * K3) + 1) / (2 * 4), abs=1e-6)


def test_beta_zero_ignores_reference():
    loss, stats = loss_of(**CASE, beta=0.0)
    assert loss.item() == pytest.approx(-1 / 3, abs=1e-6)
    assert stats["kl"] == 0.0


def test_clipping_hand_computed():
    # ratio 1.5 with A = +1 is clipped to 1.2 -> -1.2; ratio 0.5 with A = -1 is clipped to 0.8 -> +0.8;
    # ratio 1.1 with A = +1 stays -> -1.1; ratio 0.9 with A = -1 stays -> +0.9.
    logp = [[math.log(1.5), math.log(1.1)], [math.log(0.5), math.log(0.9)]]
    old = [[0.0, 0.0], [0.0, 0.0]]
    loss, stats = loss_of(logp, old, logp, [1.0, -1.0], [[1, 1], [1, 1]], beta=0.0)
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 0.8 + 0.9) / 4, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.5)
    # the pessimistic side is never clipped: ratio 1.5 with A = -1 gives +1.5, ratio 0.5 with A = +1 gives -0.5
    loss, stats = loss_of([[math.log(1.5)], [math.log(0.5)]], [[0.0], [0.0]], [[0.0], [0.0]], [-1.0, 1.0],
                          [[1], [1]], beta=0.0)
    assert loss.item() == pytest.approx((1.5 - 0.5) / 2, abs=1e-6)
    assert stats["clip_fraction"] == 0.0


def test_loss_gradient_is_minus_advantage_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = tg.grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([0.5]), torch.ones(1, 2),
                           0.2, 0.2, 0.04, "token", 2)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-0.25, -0.25])  # d/dlogp of -A * ratio / n_tokens


def test_group_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 3.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    adv = tg.group_advantages(rewards, scale=True)
    std = math.sqrt(2 / 3)  # unbiased std of 1, 3, 2, 2
    assert adv[0].tolist() == pytest.approx([-1 / (std + 1e-4), 1 / (std + 1e-4), 0, 0], abs=1e-5)
    assert adv[1].tolist() == [0, 0, 0, 0]  # a group with one reward carries no signal
    assert tg.group_advantages(rewards, scale=False)[0].tolist() == [-1, 1, 0, 0]


def test_lr_schedule_warmup_then_linear_decay():
    f = tg.lr_lambda(warmup=2, total=6)
    assert [f(u) for u in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


# --- sampler ---

def test_schedule_proportions_match_weights():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    schedule = tg.build_schedule(weights, {"a": 10, "b": 10, "c": 10}, 4, 2500, "with_replacement", seed=1)
    counts = {d: 0 for d in weights}
    for step in schedule:
        for d, _ in step:
            counts[d] += 1
    n = sum(counts.values())
    assert n == 10_000
    observed = [counts[d] for d in sorted(weights)]
    expected = [weights[d] * n for d in sorted(weights)]
    assert chisquare(observed, expected).pvalue > 0.001


def test_schedule_visits_every_row_before_repeating():
    schedule = tg.build_schedule({"a": 1.0}, {"a": 7}, 1, 14, "with_replacement", seed=0)
    rows = [row for step in schedule for _, row in step]
    assert sorted(rows[:7]) == list(range(7)) and sorted(rows[7:]) == list(range(7))


def test_interleave_under_pool_is_interleave_datasets_first_exhausted():
    # replay interleave_datasets' documented draws by hand: default_rng(seed).choice over the sources in blocks of
    # 1000; each draw takes its source's next row in stored order; the pool ends with the draw that takes the
    # last row of a source (here "a", 5 rows, against 100 of "b")
    pool = tg.interleave_under_pool({"a": 0.5, "b": 0.5}, {"a": 5, "b": 100}, seed=3)
    draws = np.random.default_rng(3).choice(2, size=1000, p=[0.5, 0.5])
    end = int(np.flatnonzero(draws == 0)[4]) + 1
    assert [d for d, _ in pool] == ["a" if k == 0 else "b" for k in draws[:end]]
    assert [row for d, row in pool if d == "a"] == [0, 1, 2, 3, 4]
    assert [row for d, row in pool if d == "b"] == list(range(end - 5))


def test_interleave_under_pool_proportions_are_the_mixtures():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    pool = tg.interleave_under_pool(weights, {"a": 4000, "b": 4000, "c": 4000}, seed=0)
    # "a" runs out first: about 4000 / 0.5 = 8000 picks
    assert sum(d == "a" for d, _ in pool) == 4000 and 7500 < len(pool) < 8500
    observed = [sum(d == k for d, _ in pool) for k in sorted(weights)]
    assert chisquare(observed, [weights[k] * len(pool) for k in sorted(weights)]).pvalue > 0.001


def test_interleave_under_runs_epochs_over_the_pool_until_max_steps():
    weights, sizes = {"a": 0.5, "b": 0.5}, {"a": 5, "b": 100}
    pool = tg.interleave_under_pool(weights, sizes, seed=3)
    schedule = tg.build_schedule(weights, sizes, 2, 40, "interleave_under", seed=3)
    assert len(schedule) == 40 and all(len(step) == 2 for step in schedule)
    prompts = [pick for step in schedule for pick in step]
    n = len(pool)
    epochs = [prompts[k:k + n] for k in range(0, len(prompts), n)]
    assert all(sorted(e) == sorted(pool) for e in epochs[:-1])
    assert len(epochs) >= 3 and epochs[0] != epochs[1]  # reshuffled each epoch
    assert set(epochs[-1]) <= set(pool)


def test_interleave_under_without_max_steps_is_one_pass_over_the_pool():
    weights, sizes = {"a": 0.5, "b": 0.5}, {"a": 5, "b": 100}
    pool = tg.interleave_under_pool(weights, sizes, seed=3)
    schedule = tg.build_schedule(weights, sizes, 2, 0, "interleave_under", seed=3)
    assert len(schedule) == len(pool) // 2  # an incomplete last step is dropped
    prompts = [pick for step in schedule for pick in step]
    assert len(set(prompts)) == len(prompts) and set(prompts) <= set(pool)


# The paper's 11 seed runs (reference/modomodo/table2.csv: 1 COCO, 2 LISA, 3 GeoQAV, 4 SAT, 5 ScienceQA) on the
# official training-set sizes, 2 prompts per step: before the pool was iterated in epochs, single LISA ended at
# step 663 and single GeoQAV at 984, so they had no step-1500 or step-2000 checkpoint for StepAvg.
PAPER_SIZES = {"coco": 5997, "lisa": 1326, "geoqav": 1969, "sat": 15000, "scienceqa": 6218}
SEED_RUNS = ["1", "2", "3", "4", "5", "2345", "1345", "1245", "1235", "1234", "12345"]


@pytest.mark.parametrize("run", SEED_RUNS)
def test_every_table2_seed_run_reaches_2000_steps(run):
    names = sorted(PAPER_SIZES, key=["coco", "lisa", "geoqav", "sat", "scienceqa"].index)
    weights = {names[int(k) - 1]: 1 / len(run) for k in run}
    sizes = {d: PAPER_SIZES[d] for d in weights}
    schedule = tg.build_schedule(weights, sizes, 2, 2000, "interleave_under", seed=42)
    assert len(schedule) == 2000 and all(len(step) == 2 for step in schedule)
    assert all(0 <= row < sizes[d] for step in schedule for d, row in step)


def test_single_lisa_sees_every_row_once_per_epoch():
    schedule = tg.build_schedule({"lisa": 1.0}, {"lisa": 1326}, 2, 2000, "interleave_under", seed=42)
    rows = [row for step in schedule for _, row in step]
    assert sorted(rows[:1326]) == sorted(rows[1326:2652]) == list(range(1326))
    assert rows[:1326] != rows[1326:2652]


@pytest.mark.parametrize("sampling", ["with_replacement", "interleave_under"])
def test_schedule_is_a_function_of_the_seed(sampling):
    # what makes a resume replay the data an uninterrupted run sees
    args = ({"a": 0.3, "b": 0.7}, {"a": 50, "b": 50}, 2, 100, sampling)
    assert tg.build_schedule(*args, seed=5) == tg.build_schedule(*args, seed=5)
    assert tg.build_schedule(*args, seed=5) != tg.build_schedule(*args, seed=6)


# --- mixture and config ---

def test_resolve_mixture_forms(tmp_path):
    domains = ["a", "b", "c"]
    assert tg.resolve_mixture("uniform", "", domains) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert tg.resolve_mixture('{"a": 3, "b": 1}', "", domains) == {"a": 0.75, "b": 0.25}
    assert tg.resolve_mixture('{"a": 1, "b": 0}', "", domains) == {"a": 1.0}  # zero weight: domain not loaded
    path = tmp_path / "mixtures.json"
    path.write_text(json.dumps({"proposals": [{"name": "p1", "mixture": {"a": 1, "c": 1}},
                                              {"name": "p2", "mixture": {"b": 2, "c": 2}}]}))
    assert tg.resolve_mixture(str(path), "", domains) == {"a": 0.5, "c": 0.5}
    assert tg.resolve_mixture(str(path), "p2", domains) == {"b": 0.5, "c": 0.5}


@pytest.mark.parametrize("spec, message", [
    ('{"a": 1, "zzz": 1}', "unknown domain"),
    ('{"a": -1, "b": 2}', "finite number >= 0"),
    ('{"a": 0, "b": 0}', "all zero"),
    ('{"a": "x"}', "finite number >= 0"),
    ("/no/such/mixture.json", "cannot read mixture file"),
    ('{"a": 1,', r"--mixture is not valid JSON \(.*\); write it as '\{"),
])
def test_resolve_mixture_bad_input(spec, message):
    with pytest.raises(SystemExit, match=message):
        tg.resolve_mixture(spec, "", ["a", "b"])


def test_the_domains_trained_on_are_said():
    # a data dir left by a killed prepare_data.py lists one domain: uniform trains on it alone, and says so
    assert tg.describe_mixture(tg.resolve_mixture("uniform", "", ["syn_count"]), ["syn_count"], "data") == \
        "training on 1 of the 1 training domain(s) in data: syn_count 1"
    assert tg.describe_mixture({"a": 0.75, "b": 0.25}, ["a", "b", "c"], "d") == \
        "training on 2 of the 3 training domain(s) in d: a 0.75, b 0.25"


@pytest.mark.parametrize("content, message", [
    ("3", r"must be a JSON object \{domain: weight\}, got int 3"),
    ('["a", "b"]', r"must be a JSON object \{domain: weight\}, got list"),
    ('{"proposals": [{"name": "p1"}]}', "proposal 'p1' in .*mixtures.json has no \"mixture\" object"),
    ('{"proposals": 5}', "no proposal named '' in"),
])
def test_mixture_files_of_the_wrong_shape_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "mixtures.json"
    path.write_text(content)
    with pytest.raises(SystemExit, match=message):
        tg.resolve_mixture(str(path), "", ["a", "b"])


def test_out_dir_that_is_a_file_or_not_writable_is_an_error(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(SystemExit, match="out_dir=.*taken is a file, not a folder"):
        tg.check_out_dir(str(tmp_path / "taken"))
    with pytest.raises(SystemExit, match=r"out_dir=/proc/modomodo_run is not writable \(.+\)"):
        tg.check_out_dir("/proc/modomodo_run")  # a place no one can write, even root
    tg.check_out_dir(str(tmp_path / "new" / "run"))
    assert os.listdir(tmp_path / "new" / "run") == []  # made, and the probe file removed


def test_parse_config_overrides_in_order(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"learning_rate": 1e-6, "max_steps": 7, "mixture": {"a": 1}}))
    config = tg.parse_config([str(path), "--max_steps=9", "--resume", "--learning_rate=3"])
    assert config["max_steps"] == 9 and config["resume"] is True
    assert config["learning_rate"] == 3.0 and isinstance(config["learning_rate"], float)
    assert json.loads(config["mixture"]) == {"a": 1}


@pytest.mark.parametrize("argv, message", [
    (["--no_such_key=1"], "unknown setting 'no_such_key'"),
    (["--max_steps=abc"], "must be int"),
    (["--loss_type=mean"], "loss_type must be one of"),
    (["--sampling=with_replacement", "--max_steps=0"], "never runs out"),
    (["--num_generations=1"], "num_generations must be >= 2"),
    (["--max_steps=-3"], r"max_steps must be >= 0 \(0: until a domain is exhausted\), got -3"),
    (["/no/such/config.json"], "cannot read config file"),
    (["--reward_mode=paper"], "reward_mode must be one of"),
    (['--reward_weights={"iuo": 2}'], "reward_weights names 'iuo', not a reward"),
    (["--reward_iou_threshold=1.5"], r"iou_threshold must lie in \(0, 1\)"),
    (["--system_prompt=R1"], "system_prompt 'R1' is not one of default, r1"),
])
def test_parse_config_bad_input(argv, message):
    with pytest.raises(SystemExit, match=message):
        tg.parse_config(argv)


def test_reward_settings_reach_the_scores(tmp_path):
    """The same completion scored under the training config's reward settings: the default, the official
    scoring with weights from a JSON config file as the official YAML gives them, and VLM-R1's binary IoU."""
    completion = "<think>\nI look.\n</think>\n<answer>[{'Position': [22, 20, 60, 58], 'Confidence': 1}]</answer>"
    # IoU 0.9025, the answer on one line (math_verify reads 20 in the completion, 60 in the solution: no match)
    record = [(None, None, "[20, 20, 60, 60]", "lisa", {})]
    path = tmp_path / "official.json"
    path.write_text(json.dumps({"reward_mode": "official", "reward_weights": {"iou": 2.0, "format": 0.5}}))
    def scored(argv):
        options = tg.scoring_options(**tg.reward_settings(tg.parse_config(argv)))
        return tg.score_completions([completion], record, options)[0]
    default, official = scored([]), scored([str(path)])
    binary = scored(["--reward_gate_on_format=false", "--reward_iou_threshold=0.5"])
    assert default == {"iou": 0.0, "format": 0.0, "total": 0.0}  # gated: the answer is not on its own lines
    assert official == pytest.approx({"iou": 0.9025, "format": 0.0, "total": 1.805})
    assert binary == {"iou": 1.0, "format": 0.0, "total": 2.0}


def test_system_prompt_setting_reaches_the_prompts():
    _, tokenizer, image_processor = vlm.load_policy("tiny")
    records = [("How many circles?", None, "<answer>2</answer>", "syn_count", {})]
    for name in ("default", "r1"):
        batch, _ = tg.distinct_prompts(tokenizer, image_processor, records, [0, 0], vlm.system_prompt_text(name))
        expected = vlm.prompt_text(tokenizer, "How many circles?", n_images=0,
                                   system_prompt=vlm.system_prompt_text(name))
        assert tokenizer.decode(batch["input_ids"][0]) == expected


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        tg.parse_config(["--help"])
    text = capsys.readouterr().out
    for key in tg.CONFIG_KEYS:
        assert f"\n{key} = " in text, key


# --- checkpoint integrity ---

def test_checkpoint_problems_are_detected(tmp_path):
    folder = tmp_path / "ckpt-000010"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "trainer").mkdir()
    (folder / "trainer" / "optimizer.bin").write_bytes(b"adam")
    assert "incomplete" in vlm.checkpoint_problem(str(folder))
    vlm.write_checksums(str(folder))
    assert vlm.checkpoint_problem(str(folder)) is None
    (folder / "trainer" / "optimizer.bin").write_bytes(b"adaM")
    assert "corrupt file trainer/optimizer.bin" in vlm.checkpoint_problem(str(folder))
    os.remove(folder / "trainer" / "optimizer.bin")
    assert "missing file trainer/optimizer.bin" in vlm.checkpoint_problem(str(folder))


def test_last_good_checkpoint_skips_broken_ones(tmp_path):
    for step in (5, 10, 15):
        folder = tmp_path / f"ckpt-{step:06d}"
        folder.mkdir()
        (folder / "w").write_text(str(step))
        if step != 15:
            vlm.write_checksums(str(folder))
    (tmp_path / "ckpt-000020.partial").mkdir()  # an interrupted write is not even a candidate
    messages = []
    step, folder = tg.last_good_checkpoint(str(tmp_path), messages.append)
    assert step == 10 and folder.endswith("ckpt-000010")
    assert any("ckpt-000015" in m and "incomplete" in m for m in messages)


def test_truncate_jsonl_drops_a_torn_last_line(tmp_path):
    # the disk filled while step 5 was written: its line is cut and has no newline (issue 13, case 1)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 5)) + '{"step": 5, "loss": 0.2')
    messages = []
    tg.truncate_jsonl(str(path), 3, messages.append)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert len(messages) == 1 and "dropped its last line" in messages[0] and '{"step": 5' in messages[0]
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')  # a cut line before others: not a write in progress
    with pytest.raises(SystemExit, match="metrics.jsonl line 2 is not JSON"):
        tg.truncate_jsonl(str(path), 3, messages.append)


def test_truncate_jsonl_drops_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    tg.truncate_jsonl(str(path), 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


# --- the group layout ---

def test_group_layout_owns_consecutive_completions_in_rank_order():
    # 2 prompts x G=3 = 6 completions; completion i answers prompt i // 3
    owned, prompt_of = tg.group_layout(2, 3, 0, 1, 0)
    assert list(owned) == [0, 1, 2, 3, 4, 5] and prompt_of == [0, 0, 0, 1, 1, 1]
    owned = [tg.group_layout(2, 3, r, 3, 0) for r in range(3)]
    assert [(list(o), p) for o, p in owned] == [([0, 1], [0, 0]), ([2, 3], [0, 1]), ([4, 5], [1, 1])]  # a group spans
    with pytest.raises(SystemExit, match="split evenly over 4 process"):
        tg.group_layout(2, 3, 0, 4, 0)
    with pytest.raises(SystemExit, match="micro_batch_size=4"):
        tg.group_layout(2, 3, 0, 1, 4)


def test_a_missing_start_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"init_from=out/cold_start is not a folder: run `python cold_start.py`"):
        tg.load_start_model("out/cold_start", 0, 0, True)
    with pytest.raises(SystemExit, match="is not a folder: check --init_from"):
        tg.load_start_model(str(tmp_path / "no_such_model"), 0, 0, True)


# --- starting and resuming ---

def stopped_before_first_checkpoint(out):
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    (out / "samples.jsonl").write_text(json.dumps({"step": 2}) + "\n")
    (out / "metrics.png").write_bytes(b"png")


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_stopped_before_its_first_checkpoint_starts_over(tmp_path, resume):
    from accelerate import Accelerator
    out = tmp_path / "run"
    stopped_before_first_checkpoint(out)
    messages = []
    run_info = {"config": {"seed": 0}, "mixture_weights": {"a": 1.0}, "planned_steps": 10}
    assert tg.resume_point(str(out), resume, run_info, messages.append) == (0, None)
    tg.start_or_resume(Accelerator(cpu=True), None, str(out), 0, None, run_info, messages.append)
    assert sorted(os.listdir(out)) == ["config.json"]  # the old steps are gone, so the new ones are not appended
    assert any("held 3 logged step(s)" in m and "starting over from step 1" in m for m in messages)
    with pytest.raises(SystemExit, match="holds no run"):
        tg.resume_point(str(tmp_path / "empty"), True, run_info, messages.append)


def test_resume_refuses_settings_that_cannot_apply_and_keeps_config_json(tmp_path):
    out = tmp_path / "run"
    started = tg.parse_config([])
    run_info = {"config": started, "mixture_weights": {"a": 1.0}, "planned_steps": 10}
    folder = out / "ckpt-000002"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 2, **run_info}))
    vlm.write_checksums(str(folder))
    (out / "config.json").write_text(json.dumps(run_info))
    resumed = tg.parse_config(["--learning_rate=0.5", "--seed=7", "--checkpoint_every=5", "--resume"])
    with pytest.raises(SystemExit, match=r"did not start with: learning_rate 0\.0001 -> 0\.5, seed 0 -> 7; "):
        tg.resume_point(str(out), True, dict(run_info, config=resumed), print)
    assert json.loads((out / "config.json").read_text()) == run_info  # still the settings that ran
    # where things are, logging and rollout serving may change; a setting an older version had is ignored
    assert tg.changed_settings(started, tg.parse_config(["--checkpoint_every=5", "--vllm_timeout=9"])) == []
    assert tg.changed_settings({"cold_start_steps": 300, "beta": 0.04}, {"beta": 0.0}) == ["beta 0.04 -> 0.0"]


def test_an_rng_state_that_does_not_load_is_an_error_not_a_silent_divergence(tmp_path):
    import pickle
    import random
    states = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
              "torch_manual_seed": torch.get_rng_state()}  # what accelerate's save_state writes
    torch.save(states, tmp_path / "random_states_0.pkl")
    assert tg.rng_state_problem(str(tmp_path), 0) is None
    data = (tmp_path / "random_states_0.pkl").read_bytes()
    (tmp_path / "random_states_0.pkl").write_bytes(data[:len(data) // 2])  # cut
    problem = tg.rng_state_problem(str(tmp_path), 0)
    assert "random_states_0.pkl cannot be loaded" in problem and "resume from an earlier checkpoint" in problem
    (tmp_path / "random_states_0.pkl").write_bytes(pickle.dumps({"random_state": "not a state"}, protocol=2))
    assert "cannot be loaded" in tg.rng_state_problem(str(tmp_path), 0)
    assert "cannot be loaded (FileNotFoundError" in tg.rng_state_problem(str(tmp_path), 1)


def test_step_metrics_hand_computed_over_two_processes():
    """Means over every process's completions: 3 completions on one process, 1 on the other; one of the four was
    cut off at max_completion_length (clipped_fraction 1/4, the cut that turned correct 3-box answers into 0)."""
    first = ([{"total": 2.0, "format": 1.0}, {"total": 0.0, "format": 0.0}, {"total": 1.0, "format": 1.0}],
             ["syn_count", "syn_detect", "syn_count"], [10, 128, 20], [0.5], [0.01], [0.0], [], [False, True, False])
    second = ([{"total": 3.0, "format": 1.0}], ["syn_detect"], [30], [1.5], [0.03], [0.5], [], [False])
    timings = {"generate": 1.0, "step": 2.0}
    m = tg.step_metrics(7, [first, second], [0.25, 0.75], 1e-4, timings, vllm_logprobs=False)
    assert m["step"] == 7 and m["lr"] == 1e-4
    assert m["reward"] == pytest.approx(1.5) and m["reward/syn_count"] == pytest.approx(1.5)
    assert m["reward/syn_detect"] == pytest.approx(1.5) and m["reward_fn/format"] == pytest.approx(0.75)
    assert m["completion_length"] == pytest.approx(47.0) and m["clipped_fraction"] == pytest.approx(0.25)
    assert m["loss"] == pytest.approx(1.0) and m["kl"] == pytest.approx(0.02) and m["clip_fraction"] == 0.25
    assert m["grad_norm"] == pytest.approx(0.5) and m["samples_per_s"] == 2.0 and m["tokens_per_s"] == 94.0
    assert m["t_generate"] == 1.0 and "vllm_logprob_abs_diff" not in m
