"""The built-in suites: size, determinism, a clean dev/test split, and answers recomputed independently."""

import json
import math
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest

from edge_runtime.errors import TaskSuiteError
from edge_runtime.tasks import ANSWER_TYPES, FAMILIES, list_suites, load_suite, score, summarize

ALL = load_suite("default", split="all")
NUM = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")


def numbers(text):
    return [Fraction(n.replace(",", "")) for n in NUM.findall(text)]


def quoted(text):
    return re.findall(r'"([^"]+)"', text)


def by_family(family):
    return [i for i in ALL if i.family == family]


# --- size and shape ----------------------------------------------------------------------

def test_size_families_and_splits():
    assert len(ALL) >= 1000
    assert len(FAMILIES) >= 6 and set(FAMILIES) == {i.family for i in ALL}
    stats = summarize(ALL)
    for family, row in stats.items():
        assert row["dev"] >= 50 and row["test"] >= 50, family
        assert abs(row["dev"] - row["test"]) <= 2, (family, row)
    assert len(load_suite("default", "dev")) + len(load_suite("default", "test")) == len(ALL)


def test_ids_and_prompts_are_unique():
    assert len({i.id for i in ALL}) == len(ALL)
    assert len({i.prompt for i in ALL}) == len(ALL)


def test_difficulty_is_spread_the_same_way_in_both_splits():
    for family in FAMILIES:
        items = by_family(family)
        dev = Counter(i.features["difficulty"] for i in items if i.split == "dev")
        test = Counter(i.features["difficulty"] for i in items if i.split == "test")
        assert set(dev) == set(test) == {1, 2, 3, 4, 5}, family
        assert all(abs(dev[k] - test[k]) <= 1 for k in dev), family


def _signature(item):
    """The question without its wording: template plus the values in the prompt."""
    if item.family == "factual_qa":  # one wording per question type: the prompt is the question
        return item.prompt
    return (item.family, item.features["template"], tuple(numbers(item.prompt)), tuple(quoted(item.prompt)))


def test_no_template_plus_values_in_both_splits():
    dev = {_signature(i) for i in ALL if i.split == "dev"}
    test = {_signature(i) for i in ALL if i.split == "test"}
    assert not dev & test


def test_signature_would_catch_a_rephrased_duplicate():
    # guard for the test above: two wordings of the same sum share a signature
    a, b = [i for i in by_family("arithmetic") if i.features["template"] == "add"][:2]
    rephrased = f"Calculate {' + '.join(str(n) for n in numbers(a.prompt))}."
    fake = type(a)(id="x", family=a.family, messages=({"role": "user", "content": rephrased},),
                   answers=a.answers, scorer=a.scorer, features=a.features)
    assert _signature(fake) == _signature(a) != _signature(b)


def test_features_are_small_scalar_dicts():
    for i in ALL:
        f = i.features
        assert isinstance(f["difficulty"], int) and 1 <= f["difficulty"] <= 5
        assert f["answer_type"] in ANSWER_TYPES
        assert f["answer_type"] == {"number": "number", "yesno": "yesno"}.get(i.scorer, "text")
        assert isinstance(f["subtype"], str) and isinstance(f["template"], str)
        assert all(isinstance(v, (int, float, str)) for v in f.values())
        json.dumps(f)


def test_prompts_ask_for_a_short_answer():
    for i in ALL:
        assert re.search(r"\b(Answer|Reply|Give|Respond)\b", i.prompt), i.prompt
        assert i.messages == ({"role": "user", "content": i.prompt},)


def test_a_prefix_of_a_family_is_a_fair_sample():
    # the explorer's --limit takes the first items: they must not all be easy, or all "no"
    for family in FAMILIES:
        head = [i for i in ALL if i.family == family and i.split == "test"][:40]
        assert len({i.features["difficulty"] for i in head}) == 5, family
    head = [i.answers[0] for i in ALL if i.family == "yes_no" and i.split == "test"][:40]
    assert 12 <= head.count("yes") <= 28


def test_yes_and_no_are_balanced():
    for split in ("dev", "test"):
        answers = [i.answers[0] for i in by_family("yes_no") if i.split == split]
        assert 0.45 <= answers.count("yes") / len(answers) <= 0.55


# --- determinism -----------------------------------------------------------------------------

def test_generation_is_deterministic_across_processes():
    code = ("import json; from edge_runtime.tasks import load_suite; "
            "print(json.dumps([[i.id, i.split, i.prompt, list(i.answers)] for i in load_suite('default', 'all')]))")
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1]
    assert json.loads(runs[0]) == [[i.id, i.split, i.prompt, list(i.answers)] for i in ALL]


def test_returned_items_are_copies():
    items = load_suite("arithmetic", "dev")
    items[0].features["difficulty"] = 99
    items[0].messages[0]["content"] = "changed"
    again = load_suite("arithmetic", "dev")
    assert again[0].features["difficulty"] != 99 and again[0].messages[0]["content"] != "changed"


# --- answers recomputed independently ---------------------------------------------------------

def test_every_answer_scores_right_and_a_wrong_one_scores_wrong():
    for i in ALL:
        a = i.answers[0]
        for reply in (a, f"The answer is {a}.", f"**{a}**"):
            s = score(i, reply)
            assert s.correct and s.parse_error is None, (i.id, reply, s)
        if i.scorer == "number":
            wrong = str(Fraction(a) + 1) if "." not in a else str(float(a) + 1)
        elif i.scorer == "yesno":
            wrong = "no" if a == "yes" else "yes"
        else:
            wrong = "zzzz"
        assert not score(i, wrong).correct, (i.id, wrong)


def _eval_arith(prompt):
    expr = re.sub(r"^(What is|Calculate|Compute) |(\?|\.)? (Answer|Reply|Respond|Give).*$|= \?.*$", "", prompt).strip()
    expr = expr.replace("×", "*").replace("÷", "/").replace(",", "")
    m = re.fullmatch(r"(\d+)% of (\d+)", expr)
    if m:
        return Fraction(int(m[1]) * int(m[2]), 100)
    assert re.fullmatch(r"[\d\s+\-*/().]+", expr), expr
    return Fraction(eval(expr.replace("/", "*1.0/")) if "/" in expr else eval(expr)).limit_denominator(1000)


def test_arithmetic_answers():
    for i in by_family("arithmetic"):
        assert _eval_arith(i.prompt) == Fraction(i.answers[0]), i.prompt


WORD_PROBLEMS = {
    "spend": lambda a, b: a - b,
    "speed": lambda v, t: v * t,
    "share": lambda total, k: total / k,
    "buy_give": lambda a, b, c: a + b - c,
    "buy_give_big": lambda a, b, c: a + b - c,
    "age": lambda d, a, y: a + d + y,
    "change": lambda p, q, bill: bill - p * q,
    "garden": lambda rows, per, dead: rows * per - dead,
    "pages": lambda p, r, d: p - r * d,
    "savings": lambda s, w, x: s * w - x,
    "temperature": lambda six, t, up, down: t + up - down,
    "tickets": lambda a, c, na, nc: a * na + c * nc,
    "discount": lambda price, pct: price * (100 - pct) / 100,
    "bakery": lambda a, b, c, k: (a + b - c) / k,
    "workers": lambda per_hour, workers, hours, stock: per_hour * workers * hours + stock,
}


def test_word_problem_answers():
    seen = set()
    for i in by_family("word_problems"):
        t = i.features["template"]
        seen.add(t)
        values = numbers(i.prompt.split(" Answer with")[0])
        assert WORD_PROBLEMS[t](*values) == Fraction(i.answers[0]), i.prompt
    assert seen == set(WORD_PROBLEMS)


FACTORS = {  # written out again by hand, independently of the generator's table
    "kilometers->meters": 1000, "meters->centimeters": 100, "centimeters->millimeters": 10,
    "kilograms->grams": 1000, "liters->milliliters": 1000, "weeks->days": 7, "hours->minutes": 60,
    "minutes->seconds": 60, "years->months": 12, "feet->inches": 12, "yards->feet": 3,
    "meters->kilometers": Fraction(1, 1000), "grams->kilograms": Fraction(1, 1000),
    "centimeters->meters": Fraction(1, 100), "days->hours": 24, "pounds->ounces": 16, "gallons->quarts": 4,
    "minutes->hours": Fraction(1, 60), "hours->seconds": 3600, "square meters->square centimeters": 10000,
    "miles->feet": 5280, "inches->feet": Fraction(1, 12), "milliliters->liters": Fraction(1, 1000),
    "days->minutes": 1440, "weeks->hours": 168, "kilometers per hour->meters per second": Fraction(5, 18),
    "cubic meters->liters": 1000,
}


def test_unit_conversion_answers():
    for i in by_family("unit_conversion"):
        (v,) = numbers(i.prompt)
        sub = i.features["subtype"]
        if sub == "degrees Celsius->degrees Fahrenheit":
            expected = v * Fraction(9, 5) + 32
        elif sub == "degrees Fahrenheit->degrees Celsius":
            expected = (v - 32) * Fraction(5, 9)
        else:
            expected = v * FACTORS[sub]
        assert expected == Fraction(i.answers[0]), i.prompt
    assert score(next(i for i in by_family("unit_conversion") if "Fahrenheit in degrees Celsius" in i.prompt),
                 "It is about 1000 degrees.").correct is False


def _prime(n):
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def test_yes_no_answers():
    for i in by_family("yes_no"):
        sub, v = i.features["subtype"], numbers(i.prompt)
        truth = {
            "prime": lambda: _prime(int(v[0])),
            "compare_int": lambda: v[0] > v[1],
            "compare_decimal": lambda: v[0] > v[1],
            "divisible": lambda: v[0] % v[1] == 0,
            "even": lambda: v[0] % 2 == 0,
            "product_check": lambda: v[0] * v[1] == v[2],
            "sum_compare": lambda: v[0] + v[1] > v[2],
            "perfect_square": lambda: math.isqrt(int(v[0])) ** 2 == v[0],
        }[sub]()
        assert i.answers == ("yes" if truth else "no",), i.prompt


def test_string_answers():
    ordinals = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh"]
    for i in by_family("string_manipulation"):
        words = quoted(i.prompt)
        w = words[-1]
        sub = i.features["subtype"]
        expected = {
            "length": lambda: str(len(w)),
            "first_letter": lambda: w[0],
            "last_letter": lambda: w[-1],
            "nth_letter": lambda: w[ordinals.index(re.search(r"the (\w+) letter", i.prompt)[1])],
            "uppercase": lambda: w.upper(),
            "reverse": lambda: "".join(reversed(w)),
            "count_letter": lambda: str(w.count(words[0])),
            "count_vowels": lambda: str(sum(w.count(v) for v in "aeiou")),
            "alphabetical_first": lambda: sorted(words)[0],
            "initials": lambda: "".join(x[0] for x in words),
        }[sub]()
        assert i.answers == (expected,), i.prompt


def test_sequence_answers():
    for i in by_family("sequences"):
        *terms, = numbers(i.prompt)
        nxt = Fraction(i.answers[0])
        seq = terms + [nxt]
        d = [b - a for a, b in zip(seq, seq[1:])]
        sub = i.features["subtype"]
        if sub.startswith("arithmetic"):
            assert len(set(d)) == 1
        elif sub.startswith("geometric") or sub == "halving":
            assert len({b / a for a, b in zip(seq, seq[1:])}) == 1
        elif sub == "squares":
            roots = [math.isqrt(int(x)) for x in seq]
            assert all(r * r == x for r, x in zip(roots, seq)) and len({b - a for a, b in zip(roots, roots[1:])}) == 1
        elif sub == "fibonacci_like":
            assert all(seq[k] == seq[k - 1] + seq[k - 2] for k in range(2, len(seq)))
        elif sub == "growing_step":
            assert all(b - a == 1 for a, b in zip(d, d[1:]))
        elif sub == "alternating":
            assert d[0::2] == [d[0]] * len(d[0::2]) and d[1::2] == [d[1]] * len(d[1::2]) and d[0] > 0 > d[1]
        else:
            pytest.fail(f"unchecked subtype {sub}")


@pytest.mark.parametrize(
    "prompt_part, answer",
    [
        ("capital of France?", "Paris"),
        ("capital of Australia?", "Canberra"),
        ("Canberra is the capital of which country?", "Australia"),
        ("chemical symbol for gold?", "Au"),
        ("chemical symbol for potassium?", "K"),
        ("atomic number of carbon?", "6"),
        ('the symbol "Fe"?', "iron"),
        ("atomic number 79?", "gold"),
        ("in which position is Mars?", "4"),
        ("which planet is sixth?", "Saturn"),
        ("Who wrote the play Hamlet?", "William Shakespeare"),
        ("On which continent is Kenya?", "Africa"),
    ],
)
def test_some_facts_by_hand(prompt_part, answer):
    # the pool holds every question the fact file supports; a suite samples from it
    from edge_runtime.tasks._facts import pool

    matches = [d for level in pool().values() for d in level if prompt_part in d.prompt]
    assert len(matches) == 1, prompt_part
    assert matches[0].answers[0] == answer


def test_fact_file_has_no_duplicate_questions():
    from edge_runtime.tasks._facts import load_facts, pool

    drafts = [d for level in pool().values() for d in level]
    assert len({d.key for d in drafts}) == len(drafts)
    facts = load_facts()
    capitals = [c["capital"] for c in facts["countries"]]
    assert len(set(capitals)) == len(capitals)
    assert sorted(e["number"] for e in facts["elements"]) == sorted({e["number"] for e in facts["elements"]})


# --- suites and errors ----------------------------------------------------------------------------

def test_named_suites():
    names = list_suites()
    assert names[:2] == ["default", "demo"] and set(FAMILIES) <= set(names)
    demo = load_suite("demo", "test")
    assert len(demo) == 2 * 5 * len(FAMILIES)
    ids = {i.id for i in ALL if i.split == "test"}
    assert {i.id for i in demo} <= ids
    assert {i.family for i in load_suite("sequences", "all")} == {"sequences"}


def test_bad_names_and_splits():
    with pytest.raises(TaskSuiteError, match="unknown suite 'nope'.*default, demo"):
        load_suite("nope")
    with pytest.raises(TaskSuiteError, match="unknown split 'train'") as err:
        load_suite("default", split="train")
    assert err.value.field == "split"


def test_a_limit_takes_every_family_in_turn():
    from edge_runtime.errors import InvalidRequestError
    from edge_runtime.tasks import first_items

    items = load_suite("default", "test")
    families = list(dict.fromkeys(i.family for i in items))
    picked = first_items(items, 2 * len(families) + 1)
    assert [i.family for i in picked] == families + families + families[:1]
    for fam in families:  # within a family, its first items, in order
        assert [i for i in picked if i.family == fam] == [i for i in items if i.family == fam][: sum(i.family == fam for i in picked)]
    assert first_items(items, None) == items
    assert sorted(i.id for i in first_items(items, 10**6)) == sorted(i.id for i in items)  # more than there are: all
    for bad in (0, -5, True, 2.5):
        with pytest.raises(InvalidRequestError):
            first_items(items, bad)
