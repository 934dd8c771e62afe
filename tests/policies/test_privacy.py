"""Privacy gate: what counts as sensitive, what does not, and that it is said without leaking."""

import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.policies import Always, Chain, Privacy, RequestContext, Threshold, policy_from_config
from edge_runtime.tasks import load_suite


def ctx(text, **kw):
    return RequestContext.from_prompt(text, **kw)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("Write to jane.doe+work@mail.example.co.uk about it", "email"),
        ("Email: bob@example.com", "email"),
        ("Call me on +44 20 7946 0958 tomorrow", "phone"),
        ("my number is +1-555-123-4567", "phone"),
        ("+33612345678", "phone"),
        ("Reach (555) 123-4567 after six", "phone"),
        ("555-123-4567", "phone"),
        ("555.123.4567", "phone"),
        ("office: 020 7946 0958", "phone"),
        ("portable 06 12 34 56 78", "phone"),
        ("call 555 123 4567", "phone"),  # spaced North American
        ("mobile 07911 123456", "phone"),  # UK, groups longer than 4 digits
        ("Festnetz 030 12345678", "phone"),
        ("mail jörg@müller.de", "email"),  # internationalised
        ("ｂｏｂ＠ｅｘａｍｐｌｅ．ｃｏｍ", "email"),  # full-width forms
        ("card 4111 1111 1111 1111 exp 12/29", "credit_card"),
        ("4111-1111-1111-1111", "credit_card"),
        # next to other numbers: the whole run is too long or fails Luhn, the card inside it does not
        ("card 4111 1111 1111 1111 12/26", "credit_card"),
        ("card 4111 1111 1111 1111 123", "credit_card"),
        ("qty 3 4111-1111-1111-1111", "credit_card"),
        ("amex 3782 822463 10005 exp 1/27", "credit_card"),
        # hidden: no-break spaces, full-width digits, invisible format characters inside the match
        ("card 4111\u00a01111\u00a01111\u00a01111", "credit_card"),
        ("ｃａｒｄ ４１１１ １１１１ １１１１ １１１１", "credit_card"),
        ("4111\u200b1111\u200b1111\u200b1111", "credit_card"),
        ("bob\u200b@exam\u00adple.com", "email"),
        ("+44\u200b20 7946 0958", "phone"),
        # written against text without spaces (CJK, Thai, Arabic): their letters are word characters
        ("電話03-1234-5678です", "phone"),
        ("请拨打+86 138 0013 8000联系我", "phone"),
        ("Tel+44 20 7946 0958", "phone"),
        ("شماره ۰۹۱۲ ۳۴۵ ۶۷۸۹", "phone"),  # Persian digits, which NFKC leaves as they are
        ("नंबर ०६ १२ ३४ ५६ ७८", "phone"),  # Devanagari
        ("Rufnummer 0049 30 1234567", "phone"),  # the international prefix written out
        ("0033 6 12 34 56 78", "phone"),
        ("手机 138-0013-8000", "phone"),
        ("Festnetz 030/1234567", "phone"),
        ("Festnetz (030) 1234567", "phone"),
        ("celular (11) 91234-5678", "phone"),
        ("Etage 3 06 12 34 56 78", "phone"),  # a small number before it is not a thousands group
        ("call 123-456-7890", "phone"),  # the shape that matched decides, not the first digit
        # dashes other than "-", which NFKC keeps (QA OO): the non-breaking hyphen word processors put in phone
        # numbers, the hyphen, the en dash, the minus sign, and the long-vowel mark a Japanese keyboard types for "-"
        ("Ring 555\u2011123\u20114567", "phone"),
        ("020\u20137946\u20130958", "phone"),
        ("電話は03−1234−5678です", "phone"),
        ("電話は03ー1234ー5678です", "phone"),
        ("電話は03ｰ1234ｰ5678です", "phone"),
        ("4111\u20101111\u20101111\u20101111", "credit_card"),
        ("電話 03\u20141234\u20145678", "phone"),  # an em dash
        ("カードナンバー4111111111111111", "credit_card"),  # ー inside a word stays a letter, not a dash before the card
        # a card written whole next to a dash, ASCII or folded onto one (review 23): not part of a longer number
        ("4111111111111111\u201312/27", "credit_card"),
        ("4111111111111111ー12/27", "credit_card"),
        ("No.12ー4111111111111111", "credit_card"),
        ("card-4111111111111111", "credit_card"),
        ("4111111111111111-12/27", "credit_card"),
        # national schemes written as before: RuPay (8), Troy (9), UATP (1) (review 25: a prefix rule missed them)
        ("RuPay 8111 1111 1111 1112", "credit_card"),
        ("1.4111111111111111", "credit_card"),  # a list numbered without a space (CJK), a card after it
        # QA VV: a country code in parentheses, the "。" a Chinese input method types for ".", an "@" written %40
        ("Call (+44) 20 7946 0958", "phone"),
        ("tel (+33) 6 12 34 56 78", "phone"),
        ("邮箱 zhang@example。com", "email"),
        ("https://example.com/reset?email=john%40example.com", "email"),
        ("am 05.03.2024 unter 030 12345678", "phone"),  # a date before it does not hide it
        ("01.23.45.67.89", "phone"),  # five groups: a number, not a date
        ("Tel. 06.35.91 1234", "phone"),  # three groups, but no day and month: not a date
        # a country or area code before what reads as a date: a local number (review 26)
        ("+7 3452 12-10-56", "phone"),
        ("+49 89 12.10.56", "phone"),
        ("+0049 30 1234567", "phone"),  # a "+" before the international prefix
        ("+49 (0)89 12.10.56", "phone"),  # the trunk prefix in parentheses
        ("+0049 89 12.10.56", "phone"),
        ("+7 (3452) 12-10-56", "phone"),
        ("+7.3452.12.10.56", "phone"),
        # ... after 00, a country and area code run together, or a national area code starting with 0 (review 29:
        # 7155baf kept these local)
        ("0049 89 12.10.56", "phone"),
        ("0049 (0)89 12.10.56", "phone"),
        ("+4989 12.10.56", "phone"),
        ("089 12.10.56", "phone"),
        ("Tel. 030 12-10-56", "phone"),
        ("邮箱 wang@mail。21cn。com", "email"),  # the 。 before a digit too (review 27)
        ("Мой телефон 8 (912) 345-67-89, перезвоните.", "phone"),  # Russia's and Kazakhstan's domestic format
        ("8-912-345-67-89", "phone"),
        ("電話は03(3581)0101です", "phone"),  # Japan's parenthesised exchange
        ("Meu celular é (11) 9 1234-5678", "phone"),  # Brazil's mobile 9 spaced off
        # combining marks, which \w does not match: Devanagari and Thai words have no precomposed forms
        ("mail ram@example.भारत", "email"),
        ("मेरा ईमेल राम@उदाहरण.भारत है", "email"),
        ("नमस्ते@example.com", "email"),
        ("อีเมล สมชาย@ตัวอย่าง.ไทย", "email"),
    ],
)
def test_sensitive_prompts_stay_local_and_say_why(text, pattern):
    d = Privacy().before(ctx(text))
    assert (d.action, d.reason, d.policy) == ("local_forced", f"privacy_pattern:{pattern}", "privacy")
    assert "message 0" in d.detail
    # the detail names the pattern, never the data
    for token in ("jane", "bob@", "7946", "555", "4111", "0612", "06 12"):
        assert token not in d.detail


@pytest.mark.parametrize(
    "text",
    [
        "What is 1234 + 5678?",
        "Is 1234567 a prime number?",
        "What is 7,348 - 4,072?",
        "Continue the pattern: 100, 200, 300, 400, ?",
        "In 2024 there were 100 200 3000 of them",  # no area code starts with 1
        "(12 - 34) × 5",
        "The meeting is on 01-02-2024",
        "1 2 3 4 5 6 7 8 9 10 11 12 13",  # single digits in a row: no card, however many windows pass Luhn
        # lists of numbers: every window of one would pass Luhn one time in ten, so only card shapes are tried
        "Years: 1990 1995 2000 2005 2010 2015 2020",
        "years 2016 2017 2018 2019 2020 2021 2022 2023 2024",
        "Mean of 152 348 997 412 665 233 781 904?",
        "Powers of two: 1024 2048 4096 8192 16384 32768 65536",
        "Version 2.10.3 was released",
        "4111 1111 1111 1112 is not a valid card",  # fails the Luhn check
        "5551234567",  # a bare digit run is not taken for a phone number
        "user at example dot com",
        # the boundaries are digits now, not word characters: letters next to these change nothing
        "order id0612345678x",
        "ISBN 978-3-16-148410-0",
        "from 1999-2004-2010",
        "Le train part à 12:30, quai 0",
        "年份2024和2025",
        "١٢٣٤ + ٥٦٧٨ = ?",  # Arabic-Indic digits read as digits, still arithmetic
        # numbers written with thousands separators are not phone numbers
        "La Terre compte 8 000 000 000 habitants",
        "Deutschland hat 1.000.000.000 Einwohner nicht",
        "Population 8 045 311 447",
        # the shapes added for other countries, against what looks like them
        "Sort these numbers: 150 1200 3400",
        "2023年の売上は150 2000 3000万円",
        "0012345678",
        "0010110111010010",
        "solve x+10000000 = 3",
        "Rule (23) 1998-2004",
        "550e8400-e29b-41d4-a716-446655440000",
        "コーヒーを飲みます 2024ー01ー02",  # the long-vowel mark in words, and a date written with it
        # dash-joined long digit runs that start as no international card does (review 24: a timestamped file
        # name, an order number)
        "backup-1111111111111117.tar.gz",
        "ORD-9111111111111110",
        "ORD\u20137111111111111114",  # an en dash is read as "-" next to a digit (QA WW), Luhn-valid, no card prefix
        "backup-2011111111111116",  # 20: a timestamp's century, no card's prefix (Mastercard's 2-series is 22-27)
        "am 05.03.24 1500 EUR",  # a two-digit year
        "聚餐@海底捞。大家准时到",  # an @-mention, then a sentence's 。: no address (review 26)
        # a four-digit year after a code or a number in parentheses stays a date (review 27)
        "Tel +49 89 05.03.2024 10:30",
        "Rechnung (10234) 05.03.2024 10:30",
        "Temperatur +12 05.03.2024 10:30",
        "Temperatur +12 05.03.24 10:30",
        "Ticket (2024) 05.03.24 1500",
        "DAX +1.2 05.03.24 17:30",  # a signed decimal, then a date (review 28)
        "数据：185。0652。270372。",  # numbers ending sentences are not joined by the 。 fold (review 28)
        # a date with a time or an amount after it read as a national number (QA VV: 27-81% of date-times)
        "Termin am 06.09.2023 08:45",
        "logged 07-28-2021 20:08",
        "30.09.2023 22.38 Uhr",
        "Rechnung vom 05.03.2024 1500 EUR",
        "Sat Jul 21 08:12:01 +0000 2018",  # a UTC offset: no country code starts with 0
        "100%40 people",
        "नमस्ते दुनिया, 2024",
    ],
)
def test_ordinary_prompts_pass(text):
    assert Privacy().before(ctx(text)).action == "continue"


def test_no_builtin_task_prompt_is_flagged():
    p = Privacy()
    flagged = [i.id for i in load_suite("default", "all") if p.find([i.prompt])]
    assert flagged == []


def test_every_message_is_checked_and_named():
    c = RequestContext(messages=[{"role": "system", "content": "You help."},
                                 {"role": "user", "content": "my mail is a@b.io"},
                                 {"role": "assistant", "content": "ok"},
                                 {"role": "user", "content": [{"type": "text", "text": "what is 2+2?"}]}])
    d = Privacy().before(c)
    assert d.reason == "privacy_pattern:email" and "message 1" in d.detail


def test_user_regexes_and_pattern_selection():
    p = Privacy(patterns=["email"], regexes={"employee_id": r"\bEMP-\d{6}\b"})
    assert p.before(ctx("ticket for EMP-123456")).reason == "privacy_pattern:employee_id"
    assert p.before(ctx("call +44 20 7946 0958")).action == "continue"  # phone not selected
    assert Privacy(patterns=[], regexes={"x": "secret"}).before(ctx("a secret")).reason == "privacy_pattern:x"
    # full-width or split by invisible characters, still the user's pattern
    falcon = Privacy(patterns=[], regexes={"project": "project-falcon"})
    for hidden in ("ｐｒｏｊｅｃｔ－ｆａｌｃｏｎ", "project-fal\u200bcon", "project-fal\u00adcon"):
        assert falcon.before(ctx(hidden)).reason == "privacy_pattern:project", hidden


def test_gate_vetoes_escalations_wherever_it_is_listed():
    private = ctx("my mail is a@b.io")
    for chain in (Chain([Always(), Privacy()]), Chain([Privacy(), Always()])):
        d = chain.before(private)
        assert (d.action, d.reason) == ("local_forced", "privacy_pattern:email")
    late = Chain([Threshold(0.5), Privacy()])
    assert late.after(private, 0.1).action == "local_forced"
    assert late.after(ctx("what is 2+2"), 0.1).action == "cloud"


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"type": "privacy", "patterns": ["ssn"]}, "policy.patterns[0]"),
        ({"type": "privacy", "patterns": "email"}, "policy.patterns"),
        ({"type": "privacy", "regexes": {"bad": "("}}, "policy.regexes.bad"),
        ({"type": "privacy", "regexes": {"white space": "x"}}, "policy.regexes.white space"),
        ({"type": "privacy", "regexes": ["x"]}, "policy.regexes"),
        ({"type": "privacy", "patterns": []}, "policy.patterns"),
        ({"type": "privacy", "pattern": ["email"]}, "policy.pattern"),
    ],
)
def test_config_errors_name_the_field(cfg, field):
    with pytest.raises(ConfigError) as err:
        policy_from_config(cfg)
    assert err.value.field == field


def test_config_round_trip():
    p = Privacy(patterns=["phone"], regexes={"project": r"Project\s+Falcon"})
    cfg = p.to_config()
    assert cfg == {"type": "privacy", "patterns": ["phone"], "regexes": {"project": r"Project\s+Falcon"}}
    again = policy_from_config(cfg)
    assert again == p and again.before(ctx("about Project  Falcon")).reason == "privacy_pattern:project"


def test_a_long_text_of_grouped_numbers_is_read_in_linear_time():
    # the thousands check searched back from the start of the text for every candidate: 100 KB took 5.8 s, and a
    # request near the daemon's 1 MiB limit would have held a core for many minutes
    import time

    for text in ("Budget 1.000.000.000 Euro. " * 40_000,  # ~1 MB
                 "1" * 1_000_000,  # one run of digits: the card check gave digits back (64,000 took 74 s)
                 "%40" * 50_000,
                 "%" * 100_000):  # the email search started at every % (13.6 s, review 26)
        t0 = time.monotonic()
        assert Privacy().before(ctx(text)).action == "continue"
        assert time.monotonic() - t0 < 10.0  # about 0.2 s here; quadratic, it was hours
