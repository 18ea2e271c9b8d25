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


def test_interleave_under_stops_before_the_step_that_finds_a_domain_exhausted():
    weights, sizes = {"a": 0.5, "b": 0.5}, {"a": 5, "b": 100}
    schedule = tg.build_schedule(weights, sizes, 2, 0, "interleave_under", seed=3)
    # replay the same draws by hand: the schedule ends exactly when the 6th pick of "a" would be needed
    rng = np.random.default_rng(3)
    rng.permutation(5), rng.permutation(100)
    picks_of_a, steps = 0, 0
    while True:
        draws = rng.choice(["a", "b"], size=2, p=[0.5, 0.5])
        if picks_of_a + sum(d == "a" for d in draws) > 5:
            break
        picks_of_a += sum(d == "a" for d in draws)
        steps += 1
    assert len(schedule) == steps
    used_a = [row for step in schedule for d, row in step if d == "a"]
    assert len(used_a) == len(set(used_a)) <= 5


def test_schedule_is_a_function_of_the_seed():
    args = ({"a": 0.3, "b": 0.7}, {"a": 50, "b": 50}, 2, 20, "with_replacement")
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
])
def test_resolve_mixture_bad_input(spec, message):
    with pytest.raises(SystemExit, match=message):
        tg.resolve_mixture(spec, "", ["a", "b"])


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
    (["/no/such/config.json"], "cannot read config file"),
])
def test_parse_config_bad_input(argv, message):
    with pytest.raises(SystemExit, match=message):
        tg.parse_config(argv)


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
