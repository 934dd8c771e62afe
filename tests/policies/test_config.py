"""policy_from_config / to_config, the registry, and the composition rules of a chain."""

import tomllib

import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.policies import (
    POLICY_TYPES, Always, Budget, Chain, EarlyExit, Gain, Never, Policy, PreRoute, Privacy, Reason, RequestContext,
    TargetRate, Threshold, policy_from_config, register_policy,
)

CTX = RequestContext.from_prompt("What is 2 + 2?")


def test_every_policy_type_round_trips():
    policies = [
        Never(), Always(), Threshold(0.6), TargetRate(0.3, [0.1, 0.5, 0.7, 0.9]), Budget(2.0, 3600),
        EarlyExit(0.35, 3, "min_margin"), PreRoute(0.25, decide_local=True), Privacy(["email"], {"id": r"ID-\d+"}),
        Chain([Privacy(), Budget(1.0), EarlyExit(0.2), Threshold(0.5)]), Gain(0.05),
    ]
    assert {type(p).type_name for p in policies} == set(POLICY_TYPES)
    for p in policies:
        again = policy_from_config(p.to_config())
        assert again == p and again.to_config() == p.to_config()


def test_the_briefs_chain_example():
    cfg = {"chain": [{"type": "privacy"}, {"type": "budget", "usd_per_day": 1.0}, {"type": "threshold", "p": 0.5}]}
    p = policy_from_config(cfg)
    assert [type(x) for x in p.parts()] == [Privacy, Budget, Threshold]
    assert p.describe() == "privacy+budget($1/day)+threshold(p=0.5)"


def test_a_daemon_toml_table_is_a_valid_config():
    text = """
    [policy]
    [[policy.chain]]
    type = "privacy"
    regexes = { ticket = 'TCK-\\d{4}' }
    [[policy.chain]]
    type = "budget"
    usd_per_day = 0.5
    [[policy.chain]]
    type = "threshold"
    p = 0.55
    """
    p = policy_from_config(tomllib.loads(text)["policy"])
    assert p.before(RequestContext.from_prompt("see TCK-1234")).reason == "privacy_pattern:ticket"
    assert p.after(CTX, 0.5).action == "cloud"


def test_shorthands():
    assert policy_from_config("never") == Never()
    assert policy_from_config({"type": "chain", "policies": ["always"]}).parts() == (Always(),)
    inner = Chain([Privacy(), Threshold(0.5)])
    assert Chain([inner, Budget(1.0)]).parts() == (Privacy(), Threshold(0.5), Budget(1.0))  # flattened
    p = Threshold(0.4)
    assert policy_from_config(p) is p


@pytest.mark.parametrize(
    "cfg, field, message",
    [
        (42, "policy", "must be a policy name or a table"),
        ({}, "policy.type", "missing"),
        ({"type": "magic"}, "policy.type", "unknown policy 'magic' (expected one of always, budget, chain"),
        # a label, as the explorer and describe() write them: not a config, and said so (it was "unknown policy")
        ("threshold(p=0.1)", "policy", 'a policy\'s label, not its config: write it as a table, {type = "threshold", ...}'),
        ({"chain": ["never", "early_exit(min_prob<0.2,k=4)+gain(min=0.3)"]}, "policy.chain[1]",
         '{chain = [{type = "early_exit", ...}, {type = "gain", ...}]}'),
        ({"type": "threshold", "q": 0.5}, "policy.q", "unknown key"),
        ({"type": "threshold", "p": "high"}, "policy.p", "must be a number"),
        ({"type": "never", "p": 1}, "policy.p", "unknown key"),
        ({"chain": "privacy"}, "policy.chain", "non-empty list"),
        ({"chain": []}, "policy.chain", "non-empty list"),
        ({"chain": ["never"], "p": 1}, "policy.p", "only 'chain'"),
        ({"chain": ["privacy", {"type": "budget", "usd_per_day": -1}]}, "policy.chain[1].usd_per_day", ">= 0"),
        ({"chain": [{"chain": [{"type": "threshold"}]}]}, "policy.chain[0].chain[0].p", "missing"),
    ],
)
def test_config_errors_name_the_field(cfg, field, message):
    with pytest.raises(ConfigError) as err:
        policy_from_config(cfg)
    assert err.value.field == field and message in str(err.value)


def test_first_definite_answer_wins_at_each_stage():
    assert Chain([Never(), Always()]).before(CTX).reason == Reason.NEVER
    assert Chain([Always(), Never()]).before(CTX).reason == Reason.ALWAYS
    two = Chain([Threshold(0.5), Threshold(0.9)])
    assert two.after(CTX, 0.7).action == "local"
    assert Chain([Threshold(0.9), Threshold(0.5)]).after(CTX, 0.7).action == "cloud"


def test_with_no_decider_the_answer_stays_local():
    d = Chain([Privacy(), Budget(1.0)]).after(CTX, 0.01)
    assert (d.action, d.reason) == ("local", Reason.DEFAULT_LOCAL)
    assert Privacy().during(CTX, []).action == "continue"


def test_register_a_custom_policy():
    @register_policy
    class LongPromptsToCloud(Policy):
        type_name = "test_long_prompts"

        def __init__(self, max_chars: int = 40):
            self.max_chars = max_chars

        def _before(self, ctx):
            from edge_runtime.policies import Decision

            if len(ctx.prompt_text) > self.max_chars:
                return Decision("cloud", "prompt_too_long", "long prompt", policy=self.type_name)
            return None

        def _params(self):
            return {"max_chars": self.max_chars}

    try:
        p = policy_from_config({"chain": [{"type": "privacy"}, {"type": "test_long_prompts", "max_chars": 5}]})
        assert p.before(CTX).reason == "prompt_too_long"
        assert p.before(RequestContext.from_prompt("write to a@b.io please")).action == "local_forced"
        assert policy_from_config(p.to_config()) == p
        with pytest.raises(ValueError, match="already registered"):
            register_policy(type("Other", (Policy,), {"type_name": "test_long_prompts"}))
    finally:
        POLICY_TYPES.pop("test_long_prompts")


def test_policy_config_gaps_found_by_qa(tmp_path):
    from edge_runtime.settings import load_runtime_settings

    for cfg, field in (({"type": "target_rate", "rate": 0.2, "calibration": [True, False]}, "policy.calibration"),
                       ({"type": "target_rate", "rate": 0.2, "calibration": ["0.2"]}, "policy.calibration"),
                       ({"chain": [{"type": "never"}, {"type": "threshold", "p": 10**400}]}, "policy.chain[1].p")):
        with pytest.raises(ConfigError) as info:
            policy_from_config(cfg)
        assert info.value.field == field
    # a bare name, as policy_from_config takes it, from the config file and from the environment
    path = tmp_path / "c.toml"
    path.write_text('policy = "never"\n')
    assert load_runtime_settings(path, env={}).policy == "never"
    assert load_runtime_settings(data={}, env={"EDGE_RUNTIME_POLICY": "always"}).policy == "always"
    assert load_runtime_settings(data={}, env={"EDGE_RUNTIME_POLICY": '{"type": "never"}'}).policy == {"type": "never"}
    with pytest.raises(ConfigError) as info:
        load_runtime_settings(data={"policy": "nevr"}, env={})
    assert info.value.field == "policy.type"
