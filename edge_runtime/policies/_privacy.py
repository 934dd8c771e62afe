"""Privacy gate: a prompt that contains an email address, a phone number or a user pattern never leaves the device.

The built-in patterns favour precision over recall where arithmetic would
otherwise trip them: a bare run of digits ("5551234567", "Is 1234567 prime?")
is not treated as a phone number; a phone number needs a ``+`` or ``00``
country code (also "(+44)"), the (555) 123-4567 / 555-123-4567 shapes, a national number
starting with 0 written in groups ("020 7946 0958", "030/1234567",
"(030) 1234567", "03(3581)0101"), a Brazilian mobile ((11) 91234-5678, (11) 9 1234-5678),
Russia's 8 (912) 345-67-89 or a Chinese mobile written with dashes (138-0013-8000); digits
of any script and any dash between groups count, and so does a number written against text in
a script without spaces (CJK, Thai), though not one run into ASCII letters ("5678thanks"), nor
a date followed by a time or an amount ("05.03.2024 1500 EUR"; right after a country and an
area code, a "date" with a two-digit year is a local number: "+7 3452 12-10-56"). National formats without a
leading 0 (Spain's 612 34 56 78, India's 98765 43210) are grouped as ordinary
numbers are, and are left to a user regex. Card numbers must pass the Luhn check (next to a
dash, only the international schemes' prefixes count). Emails are found in any script, with
the "。" of CJK input methods or a link's "%40" for "@".
Add a user regex for anything else. A decision never quotes the matched text
(it would end up in logs); it names the pattern and the message.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from ._base import Decision, Policy, Reason, RequestContext, check_keys
from ._registry import register_policy

__all__ = ["Privacy", "BUILTIN_PATTERNS"]

# \w: internationalised addresses (jörg@müller.de) are addresses too
# (% in the look-behind too: a URL-encoded text full of % made the search quadratic, 3 s for 48 KB)
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}(?!\w)")
# Boundaries are digits and ASCII letters, not word characters: Chinese, Japanese, Korean, Thai and Arabic put no
# space between a word and a number ("電話03-1234-5678です"), and their letters are word characters, so \w
# boundaries let those numbers through. A "+" number may follow a word ("Tel+44 20 7946 0958": see _find_phone).
# Each shape is a named group: which one matched decides the digit count it needs.
_PHONE = re.compile(
    r"""(?<![\d+])(?P<plus>\(?\+(?:00)?[1-9]\d{0,2}\)?[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4})(?![0-9A-Za-z])
      | (?<![0-9A-Za-z+])(?:
        (?P<intl>00[1-9]\d{0,2}[\s.-](?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4})  # 0049 30 1234567
      | (?P<na>\(\d{3}\)\s?\d{3}[\s.-]\d{4}                                  # (555) 123-4567
          | \d{3}[.-]\d{3}[.-]\d{4}                                           # 555-123-4567, 555.123.4567
          | [2-9]\d{2}\s\d{3}\s\d{4})                                         # 555 123 4567 (no area code starts with 0 or 1)
      | (?P<national>0\d{1,4}(?:[\s.-]\d{2,4}){2,4}                          # 020 7946 0958, 06 12 34 56 78
          | 0\d{1,4}[\s./-]\d{5,8}                                            # 07911 123456, 030 12345678, 030/1234567
          | \(0\d{1,4}\)\s?\d{3,8}(?:[\s.-]\d{2,4})?                            # (030) 1234567
          | 0\d{1,4}\(\d{1,4}\)\d{4})                                           # 03(3581)0101, Japan
      | (?P<brazil>\(\d{2}\)\s?9\s?\d{4}-\d{4})                                 # (11) 91234-5678, (11) 9 1234-5678
      | (?P<russia>8[\s-]?(?:\(\d{3}\)|\d{3})[\s-]?\d{3}-\d{2}-\d{2})             # 8 (912) 345-67-89, Russia, Kazakhstan
      | (?P<china>1[3-9]\d-\d{4}-\d{4})                                        # 138-0013-8000, a Chinese mobile
    )(?![0-9A-Za-z])""",
    re.VERBOSE,
)
# (plus: no country code starts with 0, so "+0000 2018", a UTC offset and a year, is none; "(+44) 20 ..." and
# "+0049 30 ..." are numbers)
# digits each shape needs: national numbers 9+ so that dates such as 01-02-2024 do not count
_PHONE_DIGITS = {"plus": (8, 15), "intl": (10, 17), "na": (10, 10), "national": (9, 15), "brazil": (11, 11),
                 "russia": (11, 11), "china": (11, 11)}
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def _luhn(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Dashes NFKC leaves as they are, written between a number's groups: word processors' non-breaking hyphen (it keeps
# a phone number on one line), the hyphen, figure, en and em dashes, the horizontal bar, the minus sign, and the
# Japanese long-vowel mark that a Japanese keyboard in kana mode types for "-" (ｰ, its half-width form, is folded onto
# it by NFKC). The mark only between two digits: elsewhere it is part of a word (カードナンバー4111...), and a "-"
# before a card number reads as part of a longer one. The others, never letters, next to any digit, as "-" is read
# there (QA WW: an en dash before a card-length id skipped the card patterns' dash rules).
_DASH_NEAR_DIGITS = re.compile("(?<=[0-9])\u30fc(?=[0-9])"
                               "|(?<=[0-9])[\u2010-\u2015\u2212]|[\u2010-\u2015\u2212](?=[0-9])")
# (a letter on one side at least: between digits it ends a sentence as often, "数据：185。0652。270372。", review 28)
_IDEOGRAPHIC_STOP = re.compile("(?<=[A-Za-z])\u3002(?=[0-9A-Za-z])|(?<=[0-9])\u3002(?=[A-Za-z])")
# Combining marks: Python's \w does not match them, and Devanagari, Thai and other scripts' words have no precomposed
# form (सीता@डाक.भारत); dropped, such a word is still a run of letters to the patterns.
_DROPPED = frozenset({"Cf", "Mn", "Mc", "Me"})


def _canonical(text: str) -> str:
    """What the detectors read: NFKC folds full-width forms (ｂｏｂ＠ｅｘａｍｐｌｅ．ｃｏｍ) and no-break spaces onto
    the ASCII the patterns know, the other dashes next to digits become "-", and invisible format characters (a
    zero-width space, a soft hyphen) and combining marks are dropped, so that none of them can hide a match."""
    text = unicodedata.normalize("NFKC", text)
    if text.isascii():
        return text
    # and digits of other scripts (Arabic-Indic ۰۹۱۲, Devanagari ०९) onto ASCII ones, which NFKC leaves as they are
    text = "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in text
                   if unicodedata.category(c) not in _DROPPED)
    # the "。" a Chinese or Japanese input method types for "." in an address (zhang@example。com): only between ASCII
    # letters or digits, as everywhere else it ends a sentence (聚餐@海底捞。大家准时到 is no address; so an address
    # with a domain in Chinese characters, zhang@例子。com, is missed)
    return _IDEOGRAPHIC_STOP.sub(".", _DASH_NEAR_DIGITS.sub("-", text))


def _find_email(text: str) -> bool:
    # and an "@" written "%40", as in a pasted link (…/reset?email=john%40example.com)
    return _EMAIL.search(text.replace("%40", "@") if "%40" in text else text) is not None


# the end of a number written with thousands separators: "8 000 000 000", "1.000.000.000", "8 045 311 447"
_GROUPED_BEFORE = re.compile(r"\d{1,3}[ .]$")
_THOUSANDS = re.compile(r"\d{3}(?:[ .]\d{3})+")


# A date: day, month and a year of 19xx or 20xx (or two digits), either order, "." "/" or "-" between them, and no
# further group after it (01.23.45.67.89 is a French number). A date with a time or an amount after it
# ("05.03.2024 1500 EUR", "06.09.2023 08:45") read as a national number of 10 digits (QA VV: 27-81% of date-times).
_DATE = re.compile(r"(?<![\d./-])(\d{1,2})([./-])(\d{1,2})\2((?:19|20)\d\d|\d\d)(?![\d]|[./-]\d)")


# What before a "date" with a two-digit year makes it the local number it looks like: a country code ("+" or "00")
# and an area code ("+7 3452 12-10-56", "+49 (0)89 12.10.56", "0049 89 ...", "+4989 ..."), or a national area code
# starting with 0 ("089 12.10.56"): regional numbers in Russia and nearby, and German ones, which 7155baf kept local.
# A four-digit year stays a date ("Tel +49 89 05.03.2024 10:30" names a time), and a "." after a country code counts
# only with one after the area code too ("+1.2 05.03.24" is a signed decimal). (Reviews 26 to 29.)
_CODE_BEFORE = re.compile(r"(?:(?:\+(?:00)?|(?<!\d)00)\d{1,3}(?:[\s.-]?\(\d{1,5}\)[\s.-]|[\s.-]?\(0\)[\s.-]?\d{1,5}[\s.-]"
                          r"|[\s-]\d{1,5}[\s.-]|\.\d{1,5}\.)"
                          r"|(?:\+|(?<!\d)00)\d{4,8}[\s.-]|(?<![\d.])0\d{1,4}[\s.-])$")


def _without_dates(text: str) -> str:
    def mask(m: re.Match[str]) -> str:
        a, b = int(m.group(1)), int(m.group(3))
        if len(m.group(4)) == 2 and _CODE_BEFORE.search(text, max(0, m.start() - 16), m.start()):
            return m.group(0)
        if (1 <= a <= 31 and 1 <= b <= 12) or (1 <= a <= 12 and 1 <= b <= 31):
            return "#" * len(m.group(0))
        return m.group(0)

    return _DATE.sub(mask, text) if any(c in text for c in "./-") else text


def _find_phone(text: str) -> bool:
    text = _without_dates(text)
    for m in _PHONE.finditer(text):
        shape, s = m.lastgroup, m.group(0)
        # looked at no further back than a group: the search from the start made a long text quadratic
        if _THOUSANDS.fullmatch(s) and _GROUPED_BEFORE.search(text, max(0, m.start() - 4), m.start()):
            continue  # the tail of a larger number in groups of three, not a number of its own
        if shape == "plus" and m.start() and text[m.start() - 1].isascii() and text[m.start() - 1].isalpha() \
                and not re.search(r"[\s.()-]", s):
            continue  # "x+10000000": a sum, unless written in groups as numbers are ("Tel+44 20 7946 0958")
        low, high = _PHONE_DIGITS[shape or "plus"]
        if low <= len(_digits(s)) <= high:
            return True
    return False


# a run of digit groups joined by single spaces or hyphens ("4111 1111 1111 1111 12", "qty 3 4111-1111-...")
# (from a run's start only, and without giving digits back: a long run with no separator was quadratic)
_DIGIT_RUN = re.compile(r"(?<!\d)\d++(?:[ -]\d++)+")
# how card numbers are written in groups: 4-4-4-4 (most), 4-4-4-4-3 (19 digits), 4-6-5 (Amex), 4-6-4 (Diners)
_CARD_SHAPES = ((4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4))
# A card number written whole next to a dash ("card-4111...", "4111...-12/27", where _CARD, which keeps clear of
# dash-joined runs, saw one longer number). Only the international schemes' numbers (Mastercard's 22-27 and 5,
# Amex, Diners and JCB's 3, Visa's 4, Discover and UnionPay's 6), and not a decimal fraction's digits: dash-joined
# ids ("backup-20241201093000123", "ORD-...") pass Luhn one time in ten, and these prefixes keep most of them out.
# A national scheme's number (RuPay 8, Troy 9) next to a dash is missed, as all were before.
_WHOLE_CARD = re.compile(r"(?<!\d)(?<!\d\.)(?:2[2-7]|[3-6])\d{12,18}(?!\d)")


def _find_card(text: str) -> bool:
    if any(13 <= len(d := _digits(m.group(0))) <= 19 and _luhn(d) for m in _CARD.finditer(text)):
        return True
    if any(_luhn(m.group(0)) for m in _WHOLE_CARD.finditer(text)):
        return True
    # A card number next to other numbers (its expiry, its CVV, a quantity) makes the run longer than 19 digits or
    # fails the Luhn check as a whole. Only card-shaped windows are tried, at the run's start or after one short
    # leading number: every window of a list of numbers ("years 2016 2017 ...") would pass Luhn one time in ten.
    for m in _DIGIT_RUN.finditer(text):
        groups = re.findall(r"\d+", m.group(0))
        starts = (0, 1) if len(groups[0]) <= 3 else (0,)
        for start in starts:
            for shape in _CARD_SHAPES:
                window = groups[start:start + len(shape)]
                if tuple(map(len, window)) == shape and _luhn("".join(window)):
                    return True
    return False


#: name -> (detector, what it is, for the detail sentence)
BUILTIN_PATTERNS: dict[str, tuple[Callable[[str], bool], str]] = {
    "email": (_find_email, "an email address"),
    "phone": (_find_phone, "a phone number"),
    "credit_card": (_find_card, "a payment card number"),
}
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@register_policy
class Privacy(Policy):
    """Never escalate a request whose messages match a sensitive pattern; say which one.

    ``patterns``: built-in detectors to use (default: all of ``email``, ``phone``,
    ``credit_card``); ``regexes``: extra ``name -> regular expression``; the
    reason code is ``privacy_pattern:<name>``.
    """

    type_name = "privacy"
    is_gate = True

    def __init__(self, patterns: Sequence[str] | None = None, regexes: Mapping[str, str] | None = None) -> None:
        names = list(BUILTIN_PATTERNS) if patterns is None else list(patterns)
        for i, name in enumerate(names):
            if not isinstance(name, str) or name not in BUILTIN_PATTERNS:
                raise ConfigError(f"unknown pattern {name!r} (built-in: {', '.join(BUILTIN_PATTERNS)}; "
                                  "put your own under regexes)", field=f"policy.patterns[{i}]")
        self.patterns = tuple(dict.fromkeys(names))
        self.regexes: dict[str, str] = {}
        if regexes is not None and not isinstance(regexes, Mapping):  # a list of patterns failed as an AttributeError
            raise ConfigError(f"must be a table of name = regular expression, got {type(regexes).__name__}",
                              field="policy.regexes")
        self._detectors: list[tuple[str, Callable[[str], bool], str]] = [
            (n, BUILTIN_PATTERNS[n][0], BUILTIN_PATTERNS[n][1]) for n in self.patterns
        ]
        for name, pattern in (regexes or {}).items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConfigError("regex names may use letters, digits, '_' and '-' only",
                                  field=f"policy.regexes.{name}")
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError("must be a non-empty regular expression string", field=f"policy.regexes.{name}")
            try:
                compiled = re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"invalid regular expression: {err}", field=f"policy.regexes.{name}") from err
            self.regexes[name] = pattern
            self._detectors.append((name, lambda t, c=compiled: c.search(t) is not None, f"text matching '{name}'"))
        if not self._detectors:
            raise ConfigError("no patterns to look for", field="policy.patterns")

    def find(self, texts: Iterable[str]) -> tuple[str, int, str] | None:
        """(pattern name, message index, description) of the first match, or None.

        Every detector reads the canonical text (see ``_canonical``); a user regex reads the text as written too.
        """
        for i, text in enumerate(texts):
            canonical = _canonical(text)
            for name, detect, what in self._detectors:
                if detect(canonical) or (name in self.regexes and canonical != text and detect(text)):
                    return name, i, what
        return None

    def _decision(self, ctx: RequestContext) -> Decision | None:
        hit = self.find(ctx.texts())
        if hit is None:
            return None
        name, index, what = hit
        return Decision("local_forced", Reason.PRIVACY_PREFIX + name,
                        f"message {index} contains {what}; the request is kept on the device", policy=self.type_name)

    def _before(self, ctx: RequestContext) -> Decision | None:
        return self._decision(ctx)

    def _admit(self, ctx: RequestContext) -> Decision | None:
        return self._decision(ctx)

    def _params(self) -> dict[str, Any]:
        return {"patterns": list(self.patterns), "regexes": dict(self.regexes)}

    def _describe(self) -> str:
        return "privacy"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> Privacy:
        check_keys(cfg, ("patterns", "regexes"), where)
        patterns = cfg.get("patterns")
        if patterns is not None and (isinstance(patterns, str) or not isinstance(patterns, Sequence)):
            raise ConfigError("must be a list of pattern names", field=f"{where}.patterns")
        regexes = cfg.get("regexes")
        if regexes is not None and not isinstance(regexes, Mapping):
            raise ConfigError("must be a table of name = regular expression", field=f"{where}.regexes")
        try:
            return cls(patterns, regexes)
        except ConfigError as err:
            raise ConfigError(str(err).split(": ", 1)[-1],
                              field=(err.field or "").replace("policy", where, 1)) from None

    # the scan is the slow part of a replay: done once per records and configuration
    def _replay_veto(self, records: Any) -> tuple[np.ndarray, np.ndarray]:
        def scan() -> tuple[np.ndarray, np.ndarray]:
            texts = records.require("texts", "a privacy policy needs the prompts")
            mask = np.zeros(records.n, dtype=bool)
            reasons = np.full(records.n, "", dtype=object)
            for i, msgs in enumerate(texts):
                hit = self.find(msgs)
                if hit is not None:
                    mask[i] = True
                    reasons[i] = Reason.PRIVACY_PREFIX + hit[0]
            return mask, reasons

        return records.cached(("privacy", repr(self.to_config())), scan)

    def _replay_before(self, records: Any) -> tuple[np.ndarray, np.ndarray]:
        mask, reasons = self._replay_veto(records)
        return np.where(mask, 3, 0).astype(np.int8), reasons
