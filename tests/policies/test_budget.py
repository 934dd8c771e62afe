"""Budget gate: cap, reservation and settlement, period roll-over, concurrency."""

import gc
import json
import logging
import threading
import time

import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.policies import Always, Budget, Chain, Privacy, Reason, RequestContext, Threshold, policy_from_config


class Clock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def req(usd=0.25, text="What is 2+2?"):
    return RequestContext.from_prompt(text, estimated_cloud_usd=usd)


def test_escalations_stop_once_the_money_is_spent():
    budget = Budget(1.0, clock=Clock())
    policy = Chain([budget, Always()])
    for _ in range(4):  # 4 x 0.25 fits exactly
        c = req()
        assert policy.before(c).action == "cloud"
        policy.settle(c, 0.25)
    assert budget.spent_usd() == pytest.approx(1.0) and budget.remaining_usd() == 0.0
    d = policy.before(req())
    assert (d.action, d.reason, d.policy) == ("local_forced", Reason.BUDGET_EXHAUSTED, "budget")
    assert "$1.00 of $1.00 per day" in d.detail and "until" in d.detail


def test_a_request_that_would_overshoot_is_kept_local():
    budget = Budget(1.0, clock=Clock())
    policy = Chain([Threshold(0.5), budget])
    c = req(0.9)
    assert policy.after(c, 0.1).action == "cloud"
    policy.settle(c, 0.9)
    assert policy.before(req(0.05)).action == "continue"  # 0.05 still fits
    d = policy.after(req(0.2), 0.1)  # 0.9 + 0.2 > 1.0
    assert d.action == "local_forced" and "would cost about $0.20" in d.detail
    assert policy.after(req(0.2), 0.9).action == "local"  # not wanted anyway: plain local


def test_settle_replaces_the_reservation_with_the_real_cost():
    budget = Budget(1.0, clock=Clock())
    policy = Chain([Always(), budget])
    c = req(0.5)
    policy.before(c)
    assert budget.spent_usd() == pytest.approx(0.5)  # reserved
    policy.settle(c, 0.1)
    assert budget.spent_usd() == pytest.approx(0.1)
    failed = req(0.5)
    policy.before(failed)
    policy.settle(failed, 0.0)  # the cloud call failed: nothing spent
    assert budget.spent_usd() == pytest.approx(0.1)


def test_a_later_gate_veto_releases_the_reservation():
    budget = Budget(1.0, clock=Clock())
    policy = Chain([Always(), budget, Privacy()])
    d = policy.before(req(0.5, text="write to a@b.io"))
    assert d.reason == "privacy_pattern:email"
    assert budget.spent_usd() == 0.0


def test_period_rolls_over():
    clock = Clock(86400.0 * 10 + 5)
    budget = Budget(0.5, period_s=3600, clock=clock)
    policy = Chain([budget, Always()])
    c = req(0.5)
    assert policy.before(c).action == "cloud"
    policy.settle(c, 0.5)
    assert policy.before(req(0.5)).action == "local_forced"
    clock.t += 3600  # next hour
    assert budget.spent_usd() == 0.0
    assert policy.before(req(0.5)).action == "cloud"


def test_zero_budget_never_escalates():
    policy = Chain([Budget(0.0, clock=Clock()), Always()])
    assert policy.before(req(0.0)).action == "local_forced"


def test_concurrent_requests_cannot_overshoot():
    budget = Budget(1.0, clock=Clock())
    policy = Chain([Always(), budget])
    results = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker():
        barrier.wait()
        for _ in range(10):
            d = policy.before(req(0.01))
            with lock:
                results.append(d.action)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("cloud") == 100 and results.count("local_forced") == 60
    assert budget.spent_usd() == pytest.approx(1.0)


def test_config_forms_and_round_trip():
    assert policy_from_config({"type": "budget", "usd_per_day": 2.0}) == Budget(2.0, 86400)
    assert policy_from_config({"type": "budget", "usd_per_hour": 0.1}).period_s == 3600
    b = policy_from_config({"type": "budget", "usd": 5, "period_s": 604800})
    assert b.to_config() == {"type": "budget", "usd": 5.0, "period_s": 604800.0}
    assert policy_from_config(b.to_config()) == b
    assert b.describe() == "budget($5/week)"


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"type": "budget"}, "policy.usd"),
        ({"type": "budget", "usd": -1}, "policy.usd"),
        ({"type": "budget", "usd": "1"}, "policy.usd"),
        ({"type": "budget", "usd": 1, "usd_per_day": 1}, "policy.usd_per_day"),
        ({"type": "budget", "usd_per_day": 1, "period_s": 60}, "policy.period_s"),
        ({"type": "budget", "usd": 1, "period_s": 0}, "policy.period_s"),
        ({"type": "budget", "usd_per_year": 1}, "policy.usd_per_year"),
        # TOML has inf: named in its place inside a chain, not as a bare policy.usd
        ({"chain": [{"type": "privacy"}, {"type": "budget", "usd_per_day": float("inf")}]}, "policy.chain[1].usd_per_day"),
        ({"chain": [{"type": "privacy"}, {"type": "budget", "usd": 1, "period_s": float("inf")}]},
         "policy.chain[1].period_s"),
        ({"type": "budget", "usd": 1, "period_s": 1e-300}, "policy.period_s"),  # overflowed the period index
        ({"chain": [{"type": "privacy", "patterns": [["email"]]}, {"type": "always"}]}, "policy.chain[0].patterns[0]"),
        ({"type": "target_rate", "rate": 0.2, "calibration": ["a"]}, "policy.calibration"),
    ],
)
def test_config_errors(cfg, field):
    with pytest.raises(ConfigError) as err:
        policy_from_config(cfg)
    assert err.value.field == field


def test_requests_sharing_a_request_id_keep_their_own_reservations():
    # the daemon takes request ids from its clients: the same id twice must not free the other's money
    budget = Budget(1.0, clock=Clock())
    policy = Chain([budget, Always()])
    a, b = (RequestContext.from_prompt("x", request_id="same", estimated_cloud_usd=0.5) for _ in range(2))
    assert policy.before(a).action == "cloud" and policy.before(b).action == "cloud"
    policy.settle(a, 0.5)
    assert budget.spent_usd() == pytest.approx(1.0)  # b's reservation still counts
    assert policy.before(req(0.1)).reason == Reason.BUDGET_EXHAUSTED


def test_an_escalation_in_flight_at_the_period_change_keeps_its_reservation():
    clock = Clock(86400.0 * 100 - 1)  # one second before midnight UTC
    budget = Budget(1.0, clock=clock)
    policy = Chain([budget, Always()])
    a = req(0.9)
    assert policy.before(a).action == "cloud"
    clock.t += 2  # the new day begins while a is still with the bridge
    assert policy.before(req(0.9)).reason == Reason.BUDGET_EXHAUSTED  # a's 0.9 is still committed
    policy.settle(a, 0.9)
    assert budget.spent_usd() == pytest.approx(0.9)  # settled into the new day


def test_a_reservation_never_settled_is_let_go_after_a_whole_period():
    clock = Clock(86400.0 * 100 + 10)
    budget = Budget(1.0, clock=clock)
    policy = Chain([budget, Always()])
    assert policy.before(req(0.9)).action == "cloud"  # admitted, then settled under another context: leaked
    clock.t += 86400  # the next day: it might still be in flight
    assert policy.before(req(0.9)).reason == Reason.BUDGET_EXHAUSTED
    clock.t += 86400  # a day later no call is still running
    assert policy.before(req(0.9)).action == "cloud"


def test_a_small_cap_is_shown_as_it_was_set():
    # a $0.0001 cap read "$0.0001 of $0.00 per day used"
    policy = Chain([Budget(0.0001, clock=Clock()), Always()])
    c = req(0.0001)
    assert policy.before(c).action == "cloud"
    policy.settle(c, 0.0001)
    d = policy.before(req(0.00005388))
    assert "cloud budget $0.00010 of $0.00010 per day used (this request would cost about $0.000054)" in d.detail


def test_dollar_amounts_keep_two_significant_digits():
    from edge_runtime.policies._budget import _usd

    assert [_usd(x) for x in (0.0, 12.345, 0.5, 0.0123, 5.388e-5, 5e-7)] == ["0.00", "12.35", "0.50", "0.012", "0.000054", "0.00000050"]


def test_a_clock_stepped_back_keeps_the_periods_spend():
    # NTP stepping a Pi's clock back across the hour wiped the spend: the hour's cap was spent twice
    clock = Clock(10 * 3600 + 20)  # 20 s into an hour
    budget = Budget(1.0, 3600, clock=clock)
    policy = Chain([budget, Always()])
    c = req(1.0)
    assert policy.before(c).action == "cloud"
    policy.settle(c, 1.0)
    clock.t -= 60  # back into the hour before
    assert budget.spent_usd() == pytest.approx(1.0)
    assert policy.before(req(0.1)).reason == Reason.BUDGET_EXHAUSTED
    clock.t += 60 + 3600  # the next hour does start a new period
    assert policy.before(req(0.1)).action == "cloud"


def test_a_state_file_carries_the_spend_across_a_restart(tmp_path):
    state = tmp_path / "spend.json"
    clock = Clock()
    first = Budget(1.0, clock=clock, state_file=state)
    policy = Chain([first, Always()])
    done, in_flight = req(0.25), req(0.5)
    policy.before(done)
    policy.settle(done, 0.25)
    assert policy.before(in_flight).action == "cloud"  # and the process dies before it settles
    with pytest.raises(ConfigError, match="another budget"):  # while it lives, the file is its own
        Budget(1.0, clock=clock, state_file=state).claim_state()
    assert Budget(1.0, clock=clock, state_file=state).spent_usd() == pytest.approx(0.75)  # reading it takes nothing
    del first, policy  # the process ends
    gc.collect()
    # the next process: the bill and the reservation in flight (it may have been billed) are spent
    second = Budget(1.0, clock=clock, state_file=state)
    assert second.spent_usd() == pytest.approx(0.75)
    assert Chain([second, Always()]).before(req(0.5)).reason == Reason.BUDGET_EXHAUSTED
    clock.t += 86400  # a later day starts at $0
    assert Budget(1.0, clock=clock, state_file=state).spent_usd() == 0.0
    # a file kept for another period length is not taken for this one
    assert Budget(1.0, 3600, clock=Clock(), state_file=state).spent_usd() == 0.0


def test_releasing_the_state_file_writes_the_spend_and_lets_the_next_budget_take_it(tmp_path):
    # a settings reload (close the runtime, build a new one) in one process found the file still locked by the
    # closed runtime's budget until it was garbage-collected
    state = tmp_path / "spend.json"
    clock = Clock()
    first = Budget(1.0, clock=clock, state_file=state)
    first.claim_state()
    policy = Chain([first, Always()])
    done, in_flight = req(0.25), req(0.5)
    policy.before(done)
    policy.settle(done, 0.25)
    policy.before(in_flight)
    first.release_state()
    first.release_state()  # twice is harmless
    second = Budget(1.0, clock=clock, state_file=state)
    second.claim_state()  # while `first` is still referenced
    assert second.spent_usd() == pytest.approx(0.75)  # the reservation in flight counts as spent
    policy.settle(in_flight, 0.1)  # settling after the release writes nothing over the new owner's file
    assert json.loads(state.read_text())["committed_usd"] == pytest.approx(0.75)


def test_a_budget_shared_by_two_runtimes_keeps_its_file_until_the_last_release(tmp_path):
    # one Budget instance in two runtimes (one cap across two models): closing the first stopped the second's saving
    state = tmp_path / "spend.json"
    budget = Budget(1.0, clock=Clock(), state_file=state)
    policy = Chain([budget, Always()])
    budget.claim_state()
    budget.claim_state()
    budget.release_state()  # the first runtime closes
    c = req(0.25)
    policy.before(c)
    policy.settle(c, 0.25)
    assert json.loads(state.read_text())["committed_usd"] == pytest.approx(0.25)  # still saved
    with pytest.raises(ConfigError, match="another budget"):
        Budget(1.0, clock=Clock(), state_file=state).claim_state()  # and still its own
    budget.release_state()  # the last one
    other = Budget(1.0, clock=Clock(), state_file=state)
    other.claim_state()
    other.release_state()
    budget.claim_state()  # a runtime rebuilt with the same instance takes the file again
    c = req(0.5)
    policy.before(c)
    policy.settle(c, 0.5)
    assert json.loads(state.read_text())["committed_usd"] == pytest.approx(0.75)


def test_a_state_file_in_a_config_is_checked_at_start_naming_the_field(tmp_path):
    bad = tmp_path / "spend.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError) as caught:
        policy_from_config({"chain": [{"type": "budget", "usd": 1.0, "state_file": str(bad)}, {"type": "always"}]})
    assert caught.value.field == "policy.chain[0].state_file"
    with pytest.raises(ConfigError) as caught:
        policy_from_config({"type": "budget", "usd": 1.0, "state_file": str(tmp_path / "missing" / "spend.json")})
    assert caught.value.field == "policy.state_file" and "cannot write" in str(caught.value)
    ok = policy_from_config({"type": "budget", "usd": 1.0, "state_file": str(tmp_path / "s.json")})
    assert policy_from_config(ok.to_config()) == ok  # the file is part of the config it round-trips


def test_a_clock_that_was_years_ahead_and_is_corrected_does_not_lock_the_budget(tmp_path, caplog):
    # the window never moving backwards kept a future one: a clock set 20 years ahead then corrected refused every
    # escalation until 2046, and the state file kept that across restarts
    clock = Clock(10 * 86400.0)
    budget = Budget(1.0, clock=clock, state_file=tmp_path / "spend.json")
    policy = Chain([budget, Always()])
    clock.t += 20 * 365 * 86400  # the glitch
    c = req(0.9)
    policy.before(c)
    policy.settle(c, 0.9)
    clock.t -= 20 * 365 * 86400  # corrected
    with caplog.at_level(logging.WARNING, logger="edge_runtime.policies"):
        assert budget.spent_usd() == pytest.approx(0.9)  # what was spent still counts, in this period
        assert "clock went back by more than a day" in caplog.text
    clock.t += 86400  # and the next day starts at $0
    assert policy.before(req(0.5)).action == "cloud"
    # a state file written under such a clock: its spend counts in the current period, not until its own
    del budget, policy
    gc.collect()
    (tmp_path / "spend.json").write_text(json.dumps({"period_s": 86400.0, "period": 50_000, "committed_usd": 1.0}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edge_runtime.policies"):
        Budget(1.0, clock=clock, state_file=tmp_path / "spend.json")  # a config read to check it says nothing
        restarted = Budget(1.0, clock=clock, state_file=tmp_path / "spend.json")
        restarted.claim_state()  # the runtime that uses it says what it found, once
    d = Chain([restarted, Always()]).before(req(0.1))
    assert d.reason == Reason.BUDGET_EXHAUSTED and "until 1970-01-13" in d.detail
    # spent at start is a warning: serve shows only those
    spent = [r for r in caplog.records if "already spent" in r.getMessage()]
    assert len(spent) == 1 and spent[0].levelno == logging.WARNING


def test_a_slow_state_write_holds_no_one_reading_the_budget(tmp_path, monkeypatch):
    # the file was written (two fsyncs) with the budget's lock held: on an SD card every admission and the daemon's
    # /metrics, on its event loop, waited for the disk
    import time

    from edge_runtime.policies import _budget

    real = _budget.write_text_whole
    writing = threading.Event()

    def slow(path, text):
        writing.set()
        time.sleep(0.5)
        real(path, text)

    monkeypatch.setattr(_budget, "write_text_whole", slow)
    budget = Budget(1.0, clock=Clock(), state_file=tmp_path / "spend.json")
    admit = threading.Thread(target=Chain([budget, Always()]).before, args=(req(0.25),))
    admit.start()
    assert writing.wait(5)
    t0 = time.monotonic()
    assert budget.spent_usd() == pytest.approx(0.25)  # the reservation counts at once
    assert time.monotonic() - t0 < 0.25
    admit.join()
    assert json.loads((tmp_path / "spend.json").read_text())["committed_usd"] == pytest.approx(0.25)


def test_a_state_file_that_cannot_be_written_is_warned_about_once_and_the_cap_still_holds(tmp_path, monkeypatch,
                                                                                          caplog):
    from edge_runtime.policies import _budget

    def full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(_budget, "write_text_whole", full)
    budget = Budget(1.0, clock=Clock(), state_file=tmp_path / "spend.json")
    policy = Chain([budget, Always()])
    with caplog.at_level(logging.WARNING, logger="edge_runtime.policies"):
        for _ in range(4):
            c = req(0.25)
            assert policy.before(c).action == "cloud"
            policy.settle(c, 0.25)
    assert policy.before(req(0.25)).reason == Reason.BUDGET_EXHAUSTED  # in memory, the cap holds
    assert sum("cannot save the budget's spend" in r.getMessage() for r in caplog.records) == 1


def test_state_writes_are_coalesced_while_one_is_under_way(tmp_path, monkeypatch):
    # six admissions at once made six slow writes, one after another, each admission waiting for its own
    import time

    from edge_runtime.policies import _budget

    real, writes = _budget.write_text_whole, []

    def slow(path, text):
        writes.append(json.loads(text)["committed_usd"])
        time.sleep(0.3)
        real(path, text)

    monkeypatch.setattr(_budget, "write_text_whole", slow)
    budget = Budget(1.0, clock=Clock(), state_file=tmp_path / "spend.json")
    policy = Chain([budget, Always()])
    threads = [threading.Thread(target=policy.before, args=(req(0.1),)) for _ in range(6)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 < 1.2 and len(writes) < 6
    assert writes[-1] == pytest.approx(0.6)  # the last one written is the newest
    assert json.loads((tmp_path / "spend.json").read_text())["committed_usd"] == pytest.approx(0.6)


@pytest.mark.parametrize("plant", ["symlink", "fifo", "huge", "overflow", "nested", "not_utf8", "Infinity", "NaN",
                                   "-5"])
def test_a_state_file_that_is_not_a_small_regular_file_of_ours_fails_naming_the_field(tmp_path, plant):
    # a link or a FIFO planted in a shared directory made serve read another file's spend, hang at start, or read
    # /dev/zero; a hand-edited period of 1e300 or deep nesting was a traceback, not an error naming the setting
    import os

    state = tmp_path / "spend.json"
    if plant == "symlink":
        (tmp_path / "elsewhere.json").write_text(json.dumps({"period_s": 86400.0, "period": 11, "committed_usd": 0.0}))
        os.symlink(tmp_path / "elsewhere.json", state)
    elif plant == "fifo":
        os.mkfifo(state)
    elif plant == "huge":
        state.write_text(" " * 100_000 + "{}")
    elif plant == "overflow":
        state.write_text('{"period_s": 86400.0, "period": 1e300, "committed_usd": 0.0}')
    elif plant == "nested":
        state.write_text("[" * 100_000 + "]" * 100_000)
    elif plant in ("Infinity", "NaN", "-5"):  # a spend that is no amount was read back as $0: the cap lifted
        state.write_text(f'{{"period_s": 86400.0, "period": {int(time.time() // 86400)}, "committed_usd": {plant}}}')
    else:
        state.write_bytes(b'{"period_s": \xff}')
    with pytest.raises(ConfigError) as caught:
        policy_from_config({"type": "budget", "usd": 1.0, "state_file": str(state)})
    assert caught.value.field == "policy.state_file"


def test_the_state_files_lock_is_not_created_through_a_planted_link(tmp_path):
    import os

    target = tmp_path / "victim"
    os.symlink(target, tmp_path / "spend.json.lock")
    with pytest.raises(ConfigError):
        Budget(1.0, clock=Clock(), state_file=tmp_path / "spend.json").claim_state()
    assert not target.exists()


def test_a_request_that_reserved_nothing_does_not_write_the_state_file(tmp_path, monkeypatch):
    # QA BBB: every request settles, and a local one (nothing reserved, nothing spent) wrote the same file with two
    # fsyncs each time, on an SD card
    from edge_runtime.policies import _budget

    real, writes = _budget.write_text_whole, []

    def counting(path, text):
        writes.append(json.loads(text)["committed_usd"])
        real(path, text)

    monkeypatch.setattr(_budget, "write_text_whole", counting)
    clock = Clock()
    budget = Budget(1.0, clock=clock, state_file=tmp_path / "spend.json")
    local = req(0.25)
    budget.settle(local, 0.0)  # never reserved: nothing changes
    budget.settle(local, 0.0)
    assert writes == []
    policy = Chain([budget, Always()])
    escalated = req(0.25)
    policy.before(escalated)
    policy.settle(escalated, 0.1)
    assert writes[-1] == pytest.approx(0.1) and len(writes) == 2  # the reservation, then the bill
    clock.t += 86400  # a new period starts at the next settle, and is written
    budget.settle(req(0.25), 0.0)
    assert len(writes) == 3 and writes[-1] == 0.0

