"""Reward sources and the on-policy pair builder: the built-in checker, a user's function by
import path (its arguments, its mistakes), reward-spec and chain errors at plan time."""

from __future__ import annotations

import json
import math
import random

import pytest

from posttrain.config import ConfigError
from posttrain.data import formats
from posttrain.data.builtin import TASKS, TaskSpec, generate, solve, task_of
from posttrain.data.formats import DataError
from posttrain.plan import load_config
from posttrain.rewards import RewardError, builtin_partial_reward, builtin_reward, load_reward, load_rewards
from posttrain.stages.band import BandConfig, PassBand, band_sampler, in_band, pass_rates
from posttrain.stages.pairs import _write_pairs, best_and_worst, pair_row
from tests.conftest import compose_tree, user_module

ONLINE = ["+pairs@pairs=onpolicy", "run.stages=[sft,pairs,align]", "align.data={path:'stage:pairs'}"]


def test_the_builtin_checker_solves_every_task_from_its_prompt():
    problems = generate(TaskSpec(), 2000, random.Random(3), exclude=set())
    assert {p.task for p in problems} == set(TASKS)
    for p in problems:
        assert solve(p.prompt) == p.answer, p
    scores = builtin_reward([p.prompt for p in problems], [f" {p.answer}\n" for p in problems])
    assert scores == [1.0] * len(problems)
    assert builtin_reward([p.prompt for p in problems], [p.wrong for p in problems]) == [0.0] * len(problems)


def test_the_builtin_checker_refuses_prompts_it_cannot_check():
    with pytest.raises(RewardError, match="'Write a poem' is not a built-in task prompt"):
        builtin_reward(["Write a poem"], ["roses"])


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """A module `my_rewards` on sys.path whose functions record what they were called with."""
    user_module(
        tmp_path,
        monkeypatch,
        "my_rewards",
        """
            import json, pathlib
            CALLS = pathlib.Path(__file__).with_name("calls.jsonl")

            def by_length(prompts, completions):
                with CALLS.open("a") as f:
                    f.write(json.dumps({"prompts": prompts, "completions": completions}) + "\\n")
                return [float(len(c)) for c in completions]

            def raises(prompts, completions):
                raise KeyError("no score for this")

            def too_few(prompts, completions):
                return [1.0]

            def not_a_list(prompts, completions):
                return 3.0

            def a_nan(prompts, completions):
                return [float("nan")] * len(completions)

            NOT_CALLABLE = 3
            """,
    )
    return tmp_path


def test_a_user_reward_function_is_called_with_prompt_texts_and_completions(user_rewards):
    reward = load_reward("my_rewards:by_length", "pairs.reward", {})
    assert reward(["What is 2 + 3?", "Hi"], ["5", "hello"]) == [1.0, 5.0]
    calls = [json.loads(line) for line in (user_rewards / "calls.jsonl").read_text().splitlines()]
    assert calls == [{"prompts": ["What is 2 + 3?", "Hi"], "completions": ["5", "hello"]}]


@pytest.mark.parametrize(
    "function, message",
    [
        ("raises", "reward my_rewards:raises raised KeyError: 'no score for this'"),
        ("too_few", "reward my_rewards:too_few returned 1 scores for 2 completions"),
        ("not_a_list", "reward my_rewards:not_a_list returned float; expected a list of 2 floats"),
        ("a_nan", "reward my_rewards:a_nan: score 0 is nan; expected a finite number"),
    ],
)
def test_a_failing_reward_function_is_named(user_rewards, function, message):
    reward = load_reward(f"my_rewards:{function}", "pairs.reward", {})
    with pytest.raises(RewardError) as e:
        reward(["a", "b"], ["x", "y"])
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("prompt", "reply", "score"),
    [
        ("What is 23 + 19?", "42", 1.0),
        ("What is 23 + 19?", " 42\n", 1.0),  # whitespace around the answer is not a mistake
        ("What is 23 + 19?", "41", 0.5),  # one digit of two right, in place
        ("What is 23 + 19?", "24", 0.0),  # the right digits in the wrong places
        ("What is 23 + 19?", "4", 0.5),  # a digit missing
        ("What is 23 + 19?", "421", 2 / 3),  # a digit too many
        ("What is 23 + 19?", "", 0.0),
        ("Reverse the letters: a b c d", "d c b a", 1.0),
        ("Reverse the letters: a b c d", "d c a b", 0.5),
        ("Reverse the letters: a b c d", "d c b", 0.75),
        ("Sort the letters: q e x", "e q x y z", 0.6),
        ("Sort the letters: q e x", "eqx", 0.0),  # letters run together: one unit, not the first letter
        ("How many items: fig fig plum", "3", 1.0),
        ("How many items: fig fig plum", "3 items", 1 / 7),
    ],
)
def test_partial_credit_is_the_share_of_digits_or_letters_right_and_in_place(prompt, reply, score):
    assert builtin_partial_reward([prompt], [reply]) == [pytest.approx(score)]
    assert builtin_reward([prompt], [reply]) == [float(score == 1.0)]


def test_every_builtin_prompt_has_its_task():
    problems = generate(TaskSpec(), 400, random.Random(5), exclude=set())
    assert all(task_of(p.prompt) == p.task for p in problems)
    assert task_of("Write a poem") is None


def test_weighted_rewards_score_the_weighted_sum_of_their_sources(user_rewards):
    prompts, replies = ["What is 2 + 3?", "Reverse the letters: a b c"], ["5", "c a b"]
    reward = load_rewards(["builtin_partial", "my_rewards:by_length"], [1.0, 0.3], "pairs.reward", {}, None, None)
    partial = builtin_partial_reward(prompts, replies)
    by_length = load_reward("my_rewards:by_length", "pairs.reward", {})(prompts, replies)
    assert reward.name == "builtin_partial+my_rewards:by_length" and reward.weights == [1.0, 0.3]
    assert reward(prompts, replies) == [pytest.approx(p + 0.3 * n) for p, n in zip(partial, by_length, strict=True)]
    assert load_rewards("builtin", None, "pairs.reward", {}, None, None).weights == [1.0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["pairs.reward=[builtin,builtin_partial]", "pairs.reward_weights=[1.0]"],
            "pairs.reward_weights: 1 weights for 2 reward sources (builtin, builtin_partial); give one each",
        ),
        (
            ["pairs.reward_weights=[0.5,1]"],
            "pairs.reward_weights: 2 weights for 1 reward sources (builtin); give one each",
        ),
        (
            ["pairs.reward=[builtin,builtin_partial]", "pairs.reward_weights=[1.0,-0.5]"],
            "pairs.reward_weights: -0.5 is negative; weights must be >= 0",
        ),
        (
            ["pairs.reward=[builtin,builtin_partial]", "pairs.reward_weights=[0,0]"],
            "pairs.reward_weights: all are 0; at least one must be > 0",
        ),
        (["pairs.reward=[]"], "pairs.reward: names no source; give one (builtin) or a list of them"),
        (["pairs.reward=[builtin,nope_source]"], "pairs.reward[1]: 'nope_source' is not builtin, builtin_partial"),
        (["pairs.reward_weights=[abc]"], "pairs.reward_weights[0]: expected float, got 'abc'"),
    ],
)
def test_bad_reward_weights_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        _online_config(*overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_pass_rates_and_the_band():
    band = BandConfig(low=0.1, high=0.9, samples=4)
    rates = pass_rates([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0.5, 1, 0, 0, 0, 1], samples=4, pass_reward=1.0)
    assert rates == [1.0, 0.0, 0.5, 0.25]
    assert in_band(rates, band) == [2, 3]
    assert in_band(rates, BandConfig(low=0.0, high=1.0)) == [0, 1, 2, 3]


def test_the_band_sampler_draws_only_kept_prompts_and_keeps_its_epoch_length():
    from trl.trainer.utils import RepeatSampler

    sampler = band_sampler(RepeatSampler)(range(20), mini_repeat_count=2, batch_size=4, repeat_count=3, seed=0)
    everything = list(sampler)
    assert sorted(set(everything)) == list(range(20)) and len(everything) == len(sampler)
    sampler.kept = {3, 7}  # fewer than a batch: drawn in turns
    drawn = list(sampler)
    assert set(drawn) == {3, 7} and len(drawn) == len(sampler)
    groups = [drawn[i : i + 2] for i in range(0, len(drawn), 2)]
    assert all(a == b for a, b in groups)  # each prompt repeated for its group


def _online_config(*overrides: str):
    return load_config(compose_tree([*ONLINE, *overrides]))


def test_reward_mistakes_are_plan_time_errors(user_rewards):
    with pytest.raises(ConfigError, match=r"^pairs.reward: cannot import 'no_such_module:f' \(No module named"):
        _online_config("pairs.reward=no_such_module:f")
    with pytest.raises(ConfigError, match=r"^pairs.reward: cannot import 'my_rewards:nope'"):
        _online_config("pairs.reward=my_rewards:nope")
    with pytest.raises(ConfigError, match="^pairs.reward: 'my_rewards:NOT_CALLABLE' is not a function"):
        _online_config("pairs.reward=my_rewards:NOT_CALLABLE")
    with pytest.raises(ConfigError) as e:
        _online_config("pairs.reward=sft")
    assert str(e.value) == (
        "pairs.reward: 'sft' is not builtin, builtin_partial, module:function, an earlier rm stage "
        "(none in this chain) or a folder holding a complete rm artifact"
    )
    cfg = _online_config("pairs.reward=my_rewards:by_length")
    assert cfg.stages["pairs"].reward == "my_rewards:by_length"


def test_an_rm_stage_is_a_reward_source_for_later_stages():
    cfg = load_config(
        compose_tree(
            [
                "+align@rm=rm",
                "+pairs@pairs=onpolicy",
                "run.stages=[sft,rm,pairs,align]",
                "pairs.init_from=sft",
                "pairs.reward=rm",
                "align.data={path:'stage:pairs'}",
            ]
        )
    )
    assert cfg.stages["pairs"].reward == "rm"
    with pytest.raises(ConfigError, match=r"^align.reward: 'rm' is not builtin.*\(none in this chain\)"):
        load_config(compose_tree(["align=grpo", "align.reward=rm"]))


def test_stage_sources_name_an_earlier_data_stage():
    with pytest.raises(ConfigError) as e:
        load_config(compose_tree(["align.data={path:'stage:pairs'}"]))
    assert (
        str(e.value)
        == "align.data.path: 'pairs' is not an earlier data stage; allowed: none (add a pairs stage before it)"
    )
    with pytest.raises(ConfigError, match="^sft.data.path: stage:pairs holds preference pairs, which sft"):
        load_config(compose_tree([*ONLINE, "run.stages=[pairs,sft,align]", "sft.data={path:'stage:pairs'}"]))


@pytest.mark.parametrize(
    "scores, expected",
    [
        ([0.0, 1.0, 0.0, 1.0], (1, 0)),  # the first of equals on each side
        ([0.2, 0.9, -0.5, 0.4], (1, 2)),
        ([1.0, 1.0, 1.0], None),  # a tie: no pair
        ([0.0, 0.0], None),
    ],
)
def test_the_pair_builder_takes_the_best_and_the_worst_and_skips_ties(scores, expected):
    assert best_and_worst(scores) == expected


def test_the_pair_builder_skips_near_ties_and_identical_texts():
    assert best_and_worst([0.5, 0.55, 0.52], min_gap=0.1) is None
    assert best_and_worst([0.5, 0.75], min_gap=0.1) == (1, 0)
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    sample = {"prompt": prompt, "task": "add", "replies": ["6", "5", "5", "4"], "scores": [0.0, 1.0, 1.0, 0.0]}
    assert pair_row(sample, 0.0) == {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6"}],
        "chosen_score": 1.0,
        "rejected_score": 0.0,
        "task": "add",
    }
    noisy = {"prompt": prompt, "replies": ["5", "5"], "scores": [0.9, 0.1]}  # a noisy reward model
    assert pair_row(noisy, 0.0) is None
    # a pair row is a valid preference row
    (converted,) = formats.convert({k: [v] for k, v in pair_row(sample, 0.0).items()}, "preference", "preference", str)
    assert converted["chosen"][0]["content"] == "5"
    assert math.isclose(sample["scores"][1] - sample["scores"][0], 1.0)


def test_the_pairs_band_keeps_only_prompts_with_mixed_pass_rates(tmp_path):
    """pairs.band: a prompt gives a pair only when its replies' pass rate lies in [low, high]."""
    band = PassBand(low=0.25, high=0.75)
    by_rate = {  # 4 replies each; the pass rate is the share scoring 1.0
        "all pass": [1.0, 1.0, 1.0, 1.0],
        "three of four": [1.0, 1.0, 1.0, 0.5],
        "half": [1.0, 0.0, 0.5, 1.0],
        "one of four": [0.0, 1.0, 0.25, 0.0],
        "none pass": [0.9, 0.0, 0.5, 0.0],  # graded rewards differ, but none passes
    }
    samples = [
        {"prompt": [{"role": "user", "content": name}], "replies": list("abcd"), "scores": scores}
        for name, scores in by_rate.items()
    ]
    kept = [s["prompt"][0]["content"] for s in samples if band.keeps(s["scores"]) and pair_row(s, 0.0) is not None]
    assert kept == ["three of four", "half", "one of four"]
    assert pair_row(samples[-1], 0.0) is not None  # without a band, graded rewards make a pair
    (tmp_path / "samples-train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    metrics = _write_pairs(tmp_path, 0.0, 4, band)
    assert (metrics["pairs"], metrics["band/kept_share"], metrics["ties_skipped"]) == (3, 0.6, 0)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["prompt"][0]["content"] for r in rows] == kept
    with pytest.raises(DataError, match=r"no prompt's pass rate over its 4 replies lies in band \[0.3, 0.3\]"):
        _write_pairs(tmp_path, 0.0, 4, PassBand(low=0.3, high=0.3))


@pytest.mark.parametrize(
    "columns, fmt",
    [
        ({"messages": [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]]}, "messages"),
        ({"prompt": ["Q"], "completion": ["A"]}, "prompt_completion"),
        ({"prompt": ["Q"], "chosen": ["A"], "rejected": ["B"]}, "preference"),
        ({"prompt": ["Q"]}, "prompt"),
    ],
)
def test_online_stages_take_the_prompt_of_any_format(columns, fmt):
    assert formats.detect(list(columns), "prompt", "auto") == fmt
    (row,) = formats.convert(columns, fmt, "prompt", str)
    assert row == {"prompt": [{"role": "user", "content": "Q"}]}


def test_a_reward_model_artifact_scores_prompt_and_reply(cache_dir, tmp_path):
    """A folder holding an rm artifact (manifest: complete rm) is a reward source; its scores
    are the model's scalar head on the chat-formatted prompt and reply."""
    import torch

    from posttrain import artifacts, models
    from posttrain.config import ModelConfig
    from posttrain.rewards import check_reward_spec

    cfg = ModelConfig()
    base = models.base_model_source(cfg, cache_dir)
    tokenizer = models.load_tokenizer(base, cfg)
    folder = tmp_path / "rm"
    models.load_model(base, cfg, "reward", pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    with pytest.raises(ConfigError, match="or a folder holding a complete rm artifact"):
        check_reward_spec(str(folder), "pairs.reward", [])  # no manifest yet
    artifacts.write_json_atomic(folder / "manifest.json", {"status": "complete", "method": "rm"})
    check_reward_spec(str(folder), "pairs.reward", [])
    reward = load_reward(str(folder), "pairs.reward", {}, cfg, tokenizer)
    prompts, replies = ["What is 2 + 3?", "Sort the letters: c a b"], ["5", "a b c d e"]
    scores = reward(prompts, replies)
    model = models.load_model(str(folder), cfg, "reward", pad_token_id=tokenizer.pad_token_id).eval()
    for prompt, reply, score in zip(prompts, replies, scores, strict=True):
        conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        ids = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), return_tensors="pt")
        with torch.no_grad():
            alone = model(**ids).logits[0, 0].item()
        assert math.isclose(score, alone, rel_tol=1e-4, abs_tol=1e-5)  # batched with padding = alone
    assert scores[0] != scores[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([*ONLINE, "pairs.num_samples=1"], "pairs.num_samples: 1 must be >= 2 (a best and a worst)"),
        ([*ONLINE, "pairs.temperature=0"], "pairs.temperature: 0.0 must be > 0 (replies must differ)"),
        ([*ONLINE, "pairs.engine=sglang"], "pairs.engine: 'sglang' is not one of auto, transformers, vllm"),
        (
            [*ONLINE, "+pairs.trainer_args={seed: 1}"],
            "pairs.trainer_args: pairs trains nothing and takes no trainer arguments",
        ),
        (
            ["align=grpo", "align.per_device_train_batch_size=12"],
            "align.per_device_train_batch_size: 12 x 1 accumulation = 12 replies per step is not a multiple of "
            "num_generations=8 (whole groups per step)",
        ),
        (
            ["align=grpo", "align.loss_type=ppo"],
            "align.loss_type: 'ppo' is not one of grpo, dapo, dr_grpo, bnpo, cispo, sapo, luspo, vespo",
        ),
        (
            ["align=grpo", "align.loss_type=luspo"],
            "align.loss_type: luspo scales sequence-level ratios; set importance_sampling_level: sequence",
        ),
        (["align=grpo", "align.steps_per_generation=0"], "align.steps_per_generation: 0 must be >= 1 or null"),
        (["align=grpo", "align.epsilon_high=0.1"], "align.epsilon_high: 0.1 must be >= epsilon (0.2)"),
        (
            ["align=grpo", "align.importance_sampling_level=seq"],
            "align.importance_sampling_level: 'seq' is not one of token, sequence",
        ),
        (
            ["align=grpo", "align.mask_truncated_completions=maybe"],
            "align.mask_truncated_completions: expected bool, got 'maybe'",
        ),
        (["align=grpo", "align.scale_rewards=yes"], "align.scale_rewards: 'yes' is not one of group, batch, none"),
        (
            ["align=grpo", "align.band={low: 0.5, high: 0.2}"],
            "align.band.low: need 0 <= low <= high <= 1, got 0.5, 0.2",
        ),
        (["align=grpo", "align.band={samples: 1}"], "align.band.samples: 1 must be >= 2 (a rate between 0 and 1)"),
        (["align=grpo", "align.band={lo: 0.1}"], "align.band.lo: unknown key; did you mean low?"),
        ([*ONLINE, "pairs.band={low: 0.9, high: 0.1}"], "pairs.band.low: need 0 <= low <= high <= 1, got 0.9, 0.1"),
        ([*ONLINE, "pairs.band={samples: 4}"], "pairs.band.samples: unknown key; allowed: high, low, pass_reward"),
    ],
)
def test_online_stage_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(compose_tree(overrides))
    assert str(e.value) == message
