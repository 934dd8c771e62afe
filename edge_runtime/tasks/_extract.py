"""Read a short answer out of a model reply, however chatty.

Small models rarely answer with the bare number or word they were asked for:
"The answer is 42.", "37 + 48 = 85", "Paris is the capital of France." These
functions find the answer a reader would take from such replies. Each returns
``(value, None)`` or ``(None, reason)``; none of them raises on any string.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

__all__ = ["extract_number", "parse_number", "extract_yes_no", "text_candidates", "normalize_text"]

# thousands separators only in groups of exactly three ("1,234" yes, "11,15" no)
# nor either side of a fraction: "1/2" is not the answer 2 (nor 1)
# (an atomic group and a possessive ?: backtracking out of "1.5/3" would otherwise read it as 1)
_NUMBER = re.compile(r"(?<![\w./])-?(?>\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?+(?![\d]|/\d)")
# a sign written as a word: "negative 51" is -51; "minus 5" too, unless it follows a number ("63 minus 12")
_SIGN_WORD = re.compile(r"(?<![\d)]\s)(?<![\d)])\b(?:negative|minus)\s+(?=\d)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"\banswer\s*(?:is|:|=|would be)\s*:?\s*", re.IGNORECASE)
# a sentence ends after . ! ? and a space, or at a line break; not after "Mt." or "St." ("Mt. Everest")
_ABBREVIATIONS = ("Mt", "St", "Dr", "Mr", "Ms", "Jr", "Sr", "Mrs", "Ft", "vs")
_NOT_ABBREVIATED = "".join(rf"(?<!\b{a})" for a in _ABBREVIATIONS)  # written just before a "\."
_NOT_AN_ABBREVIATION = "".join(rf"(?<!\b{a}\.)" for a in _ABBREVIATIONS)  # written just after one
# (after a capital only where it ends a unit, not an initial: "15°C. To convert ..." ends; "J. K. Rowling" does not)
_SENTENCE_END = re.compile(rf"(?:(?<=[a-z0-9)\]'\"][.!?])|(?<=[0-9\u00b0][A-Z][.!?])){_NOT_AN_ABBREVIATION}\s+|\n")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\uff0d": "-"})

_SMALL = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
# "Mars is the fourth planet": ordinals answer position questions
_SMALL.update(
    {w: i + 1 for i, w in enumerate(
        "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split())}
)
_WORDS_1_TO_99 = (r"(?:(" + "|".join(_TENS) + r")(?:[-\s](" + "|".join(list(_SMALL)[1:10]) + r"))?|("
                  + "|".join(sorted(_SMALL, key=len, reverse=True)) + r"))")
_NUMBER_WORD = re.compile(r"\b" + _WORDS_1_TO_99 + r"\b", re.IGNORECASE)


def parse_number(text: str) -> Decimal | None:
    """Parse one number as written in an answer key or a reply ("1,234", "-3.5", "85")."""
    t = text.strip().translate(_MINUS_SIGNS).replace(",", "")
    try:
        value = Decimal(t)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


_PARENTHESES = re.compile(r"\([^()]*\)")
# arithmetic and nothing else up to an "=": "37 + 48 = ", "(6 × 7) ="
# (operations written as words too: "5 minus 2 = 3")
_OPERATION = r"(?:[\s\d.,+\-*/×÷xX^()\u2212]|\b(?:plus|minus|times|divided\s+by|multiplied\s+by)\b)"
_LEADING_EQUATION = re.compile(rf"^{_OPERATION}*\d{_OPERATION}*=", re.IGNORECASE)
_LIST_MARKER = re.compile(r"^[ \t]*\d{1,2}[.)][ \t]+", re.MULTILINE)
_FIRST_STEP = re.compile(r"\s*1[.)][ \t]+(?=[^\n=]*=[ \t]*-?\d)")


def _numbers(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER.finditer(text)]


# "one hundred", "three hundred sixty-six", "a hundred and five": read whole ("hundred" alone read 1 and 66)
_HUNDREDS = re.compile(
    r"\b(?:(" + "|".join(list(_SMALL)[1:10]) + r")|a)\s+hundred\b(?:(?:\s+and)?\s+(" + _WORDS_1_TO_99 + r"))?\b",
    re.IGNORECASE,
)


def _word_value(m: re.Match[str]) -> int:
    tens, unit, small = m.group(1), m.group(2), m.group(3)
    if tens:
        return _TENS[tens.lower()] + (_SMALL[unit.lower()] if unit else 0)
    return _SMALL[small.lower()]


# a sign word just before a number word ("minus seven"); a number before it makes "minus" the operation ("seven minus
# three", "63 minus three"), as _SIGN_WORD reads digits
_SIGN_WORD_BEFORE = re.compile(r"\b(negative|minus)\s+$", re.IGNORECASE)
_ENDS_WITH_NUMBER = re.compile(r"(?:[\d)]|\b" + _WORDS_1_TO_99 + r"|\bhundred)\s*$", re.IGNORECASE)


def _signed(text: str, start: int, value: int) -> int:
    """``value``, negated when a sign word is written before it ("minus seven", "negative twelve")."""
    window = text[max(0, start - 40):start]
    m = _SIGN_WORD_BEFORE.search(window)
    if m is None or (m.group(1).lower() == "minus" and _ENDS_WITH_NUMBER.search(window[:m.start()])):
        return value
    return -value


def _number_words(text: str) -> list[int]:
    found: list[tuple[int, int]] = []  # (where, value)
    spans = []
    for m in _HUNDREDS.finditer(text):
        rest = _NUMBER_WORD.fullmatch(m.group(2)) if m.group(2) else None
        value = 100 * (_SMALL[m.group(1).lower()] if m.group(1) else 1) + (_word_value(rest) if rest else 0)
        found.append((m.start(), _signed(text, m.start(), value)))
        spans.append((m.start(), m.end()))
    for m in _NUMBER_WORD.finditer(text):
        if not any(start <= m.start() < end for start, end in spans):
            found.append((m.start(), _signed(text, m.start(), _word_value(m))))
    return [value for _, value in sorted(found)]


# four or more comma-separated integers: the terms of a sequence question
_SEQUENCE = re.compile(r"(?<![\d.])-?\d+(?:[ \t]*,[ \t]*-?\d+){3,}")


def _next_term(question: str, text: str) -> str | None:
    """The term a reply writes right after repeating the question's sequence ("4, 7, 10, 13, 16, 19")."""
    m = _SEQUENCE.search(question)
    if not m:
        return None
    terms = [t.strip() for t in m.group(0).split(",")]
    run = re.compile(r"(?<![\d.])" + r"[ \t]*,[ \t]*".join(re.escape(t) for t in terms) + r"[ \t]*,[ \t]*(-?\d+)(?![\d.])")
    found = run.search(text)
    return found.group(1) if found else None


_WORDS = re.compile(r"[a-z]+|\d+(?:[.,]\d+)*")
# a "?" standing for the number asked ("64 / 8 = ?", "-40 degrees Celsius is ? degrees Fahrenheit")
_PLACEHOLDER = re.compile(r"(?:^|[\s=])\?(?=\s|$|[.,;:!])")
# a reason for an answer: "48 inches because 1 foot = 12 inches", "13 stamps, since 6 + 10 = 16"
_JUSTIFICATION = re.compile(r"\b(?:because|since|given\s+that)\b", re.IGNORECASE)
# where such a reason ends: its clause ("1,000" is a number, not a clause break), or a consequence ("so", "then";
# "and" only before new working, see :func:`_without_reasons`: "since 3 × 14 = 42 and 4 × 3 = 12" is one reason)
_REASON_END = re.compile(r"[,;:](?!\d)|\)|[.!?](?=\s|$)|\n|\s(?:so|then)\s", re.IGNORECASE)
# ... and where a reason told in words ends: not at "then", which goes on with its events ("since he bought 5
# and then gave 5 away" is one reason), but at "so", which draws the consequence ("..., so he still has 6")
_REASON_CLAUSE_END = re.compile(r"[,;:](?!\d)|\)|[.!?](?=\s|$)|\n|\sso\s", re.IGNORECASE)
_AND = re.compile(r"\sand\s", re.IGNORECASE)
# a sentence whose reason is for the sentence before it
_POINTS_BACK = re.compile(r"\s*(?:this|that|it)(?:'s|\u2019s|\s+is)\s+", re.IGNORECASE)
# a check of an answer, to the end of its line: "Check: 7 - 6 = 1", "To verify: 37 + 99 = 136"
_CHECK = re.compile(r"\b(?:check|verify|verification)\s*:", re.IGNORECASE)
# a correction of an equation written before it ("19 + 12 * 8 = 248. Oops, ...")
# (opening a sentence or clause: "this is actually right", "a common mistake is ..." correct nothing)
_CORRECTION = re.compile(r"(?:^|[.!?]\s+|\n|[,;:]\s*)(?:oops|wait|actually|sorry|correction|no,|"
                         r"let me (?:try again|redo|recalculate|recompute))(?!\w)", re.IGNORECASE)
# arithmetic, as one run: an equation's left side is the run just before its "=" ("37 + 48 =", "(6 × 7) =")
_ARITHMETIC = re.compile(rf"(?:{_OPERATION})+", re.IGNORECASE)
# an equation and the ones it runs on into, on one line: "= 12 × 12 = 160"; a comma or a full stop ends it
# ("2 + 7 = 9, 9 - 7 = 2": the second equation checks the first)
_CHAIN = re.compile(rf"(?:(?![,.]\s)(?!\n){_OPERATION}|=)*", re.IGNORECASE)
_CHAIN_CHARS = 300  # longer than any equation a reply writes out
# an equation's left side starts after the last clause or sentence break in its run ("248. 12 × 8 =" is "12 × 8";
# "1,000" is a number, not a break)
_LEFT_SIDE_BREAK = re.compile(r"[.,;:!?](?=\s)|\n")
_BLANKS = re.compile(r"[ \t]*")
_OPERANDS = 16  # more numbers than the left side of any equation a reply writes out


class _Equation(NamedTuple):
    at: int  # where its "=" is
    operands: tuple[Decimal | None, ...]  # the numbers of its left side, in order (its last _OPERANDS: each reason
    # or check reads those of the equation it holds, and many may hold one long looping equation)
    result: Decimal | None  # the number right after its "="


def _equations(text: str) -> list[_Equation]:
    """Every "=" of ``text``, in order, with its left side's numbers and its result; one pass (each run of
    arithmetic is read once: searching back from every "=" was quadratic)."""
    starts = {m.end(): m.start() for m in _ARITHMETIC.finditer(text)}
    out = []
    for eq in re.finditer("=", text):
        at = eq.start()
        left = text[starts.get(at, at):at]
        breaks = list(_LEFT_SIDE_BREAK.finditer(left))
        if breaks:
            left = left[breaks[-1].end():]
        result = _NUMBER.match(text, _BLANKS.match(text, at + 1).end())
        out.append(_Equation(at, tuple(parse_number(n) for n in _numbers(left)[-_OPERANDS:]),
                             parse_number(result.group(0)) if result else None))
    return out


def _positions(text: str) -> dict[Decimal | None, list[int]]:
    """Where each number of ``text`` is written, by value."""
    where: dict[Decimal | None, list[int]] = {}
    for m in _NUMBER.finditer(text):
        where.setdefault(parse_number(m.group(0)), []).append(m.start())
    return where


def _said(where: dict, value: Decimal | None, lo: int, hi: int) -> bool:
    """Whether ``value`` is written somewhere in ``text[lo:hi]`` (``where`` from :func:`_positions`)."""
    at = where.get(value, ())
    i = bisect.bisect_left(at, lo)
    return i < len(at) and at[i] < hi


def _restates(sentence: str, question: str, number: re.Match[str], *, min_words: int = 5) -> bool:
    """Whether ``sentence`` copies ``min_words`` words or more of the question in a row around ``number``
    (a match in it): "The bakery packs the rest into boxes of 8." A shorter copy answers: "Jack has 6
    cookies." to "Jack has 6 cookies. He buys 5 more and gives 5 away. How many does he have?", where it
    is the answer, and so does "so she has 5 dollars left" after a copied premise."""
    tokens = list(_WORDS.finditer(sentence.lower()))[:200]
    words = [t.group(0) for t in tokens]
    at = next((i for i, t in enumerate(tokens) if number.start() <= t.start() < number.end()), None)
    if at is None:
        return False
    asked = _WORDS.findall(question.lower())[:400]
    longest = 0
    for j in (j for j, a in enumerate(asked) if a == words[at]):
        back = 0
        while back < min(at, j) and words[at - back - 1] == asked[j - back - 1]:
            back += 1
        ahead = 0
        while at + ahead + 1 < len(words) and j + ahead + 1 < len(asked) and words[at + ahead + 1] == asked[j + ahead + 1]:
            ahead += 1
        longest = max(longest, back + 1 + ahead)
    return longest >= min_words


def _in_order(values: list, within: list) -> bool:
    """``values`` appear in ``within`` in the same order (not necessarily next to each other)."""
    rest = iter(within)
    return all(any(v == w for w in rest) for v in values)


def _restated_number(text: str, question: str, asked_in_order: list) -> str | None:
    """The last number of a reply all of whose numbers are the question's, or None when the sentence holding
    it just restates the question: two or more of them in the question's order ("What is 6 - 3?", "I can't
    compute 81 / 9."), a "?" where the answer would be ("64 / 8 = ?"), or the question's words copied around
    that number ("The bakery ... into boxes of 8."). "What is 6 - 3? It is 3." answers 3. A reason after the
    number is not its sentence's answer: "Jack has 6 cookies, since he bought 5 and then gave 5 away." answers 6
    (the reason's events run on past "then"; "..., because he bought 5 so he still has 6" answers 6 too)."""
    last = next(s for s in reversed(_SENTENCE_END.split(text.strip())) if _NUMBER.search(s))
    reason = _JUSTIFICATION.search(last)
    if reason and _NUMBER.search(last[:reason.start()]):  # the reason's own clause goes, not what follows it
        stop = _REASON_CLAUSE_END.search(last, reason.end())
        last = last[:reason.start()] + (last[stop.start():] if stop else "")
    numbers = _numbers(last)
    if 2 <= len(numbers) <= len(asked_in_order) and _in_order([parse_number(n) for n in numbers], asked_in_order):
        return None
    if _PLACEHOLDER.search(last) or _restates(last, question, list(_NUMBER.finditer(last))[-1]):
        return None
    return numbers[-1]


def _goes_on_copying(rest: str, question: str, asked_in_order: list, first_sentence: str,
                     first: Decimal | None) -> bool:
    """Whether ``rest``, after a first sentence copied from the question, goes on copying it: it restates it
    (see :func:`_restated_number`), or its numbers are the question's next ones, in order ("Omar has 11
    stamps. He buys 4 more." cut short). A sentence said again is a loop and adds nothing ("Aisha has 10
    dollars. She spends 5. She spends 5." copies as "... She spends 5." does); a rest that only says the first
    sentence again does not go on copying ("Jack has 6 cookies. Jack has 6 cookies." is read as its first). The
    first sentence said again as the last one may be the answer, and is kept: where the answer is the question's
    premise, "Jack has 6 cookies. He buys 5 more and then gives 5 to a friend. Jack has 6 cookies." answers 6."""
    opening = " ".join(_WORDS.findall(first_sentence.lower()))
    sentences = _SENTENCE_END.split(rest.strip())
    seen, said_once = {opening}, []
    for i, sentence in enumerate(sentences):
        key = " ".join(_WORDS.findall(sentence.lower()))
        if key not in seen or (key == opening and i == len(sentences) - 1):
            seen.add(key)
            said_once.append(sentence)
    rest = "\n".join(said_once)  # a line break keeps the sentences apart
    values = [parse_number(n) for n in _numbers(rest)]
    if not values:
        return False
    after = asked_in_order[asked_in_order.index(first) + 1:] if first in asked_in_order else []
    # ... in the question's words too: "She spends 5 dollars." copies, "5 are left." answers
    copied = all(_restates(s, question, list(_NUMBER.finditer(s))[-1], min_words=3)
                 for s in _SENTENCE_END.split(rest.strip()) if _NUMBER.search(s))
    return (values == after[:len(values)] and copied) or _restated_number(rest, question, asked_in_order) is None


def _reworked(later: list[_Equation], found: Decimal | None, asked: set) -> bool:
    """Whether ``later`` equations work a sum of two operations or more out again, step by step, to another answer:
    they work on the question's numbers and what they found only (not an example or another sum: "3 × 8 + 1 = 25.
    Likewise 4 × 8 = 32, and 32 + 1 = 33"), and the last goes on from what an earlier one found ("12 × 8 = 96, then
    19 + 96 = 115") to a number that is neither ``found`` nor the question's (a check worked back to the question
    lands on one of its numbers). A sum of one operation worked out again is the question's arithmetic again,
    whose last result :func:`_operands_result` reads anyway."""
    results: set = set()
    goes_on = False
    for eq in later:
        if any(v not in asked and v not in results for v in eq.operands):
            return False
        goes_on = any(v in results for v in eq.operands)  # of the last one, in the end
        if eq.result is not None:
            results.add(eq.result)
    last = later[-1].result
    return goes_on and last is not None and last != found and last not in asked


def _goes_on_from(value: Decimal | None, equations: list[_Equation], asked: set) -> bool:
    """Whether one of ``equations`` works on ``value`` to a number that is neither it nor one of the question's."""
    return any(value in eq.operands and eq.result is not None and eq.result != value and eq.result not in asked
               for eq in equations)


def _only_checks(text: str, start: int, equations: list[_Equation], found: Decimal | None, asked: set) -> bool:
    """Whether what follows ``start`` (a correction word: "Wait, ...") only checks ``found``: its equations work
    back from it to a number of the question, and it says no other number ("2 + 7 = 9. Wait, 9 - 7 = 2, so it is
    9."); "Wait, 2 + 7 = 8" or "Wait, 9 + 7 = 16" work something out again."""
    after = equations[bisect.bisect_left(equations, start, key=lambda e: e.at):]
    return (bool(after) and all(found in eq.operands and eq.result in asked for eq in after)
            and all(parse_number(n) in asked or parse_number(n) == found for n in _numbers(text[start:])))


def _operands_result(text: str, asked_in_order: list, equations: list[_Equation]) -> str | None:
    """The result of the last equation whose left side is the question's own arithmetic, worked to the end
    of its chain ("16 + 12 × 12 = 12 × 12 = 160") and not into an aside ("= 115 (12 × 8 = 96)"): "1 + 6 =
    7, and 7 - 1 = 6" answers "What is 1 + 6?" with 7, as later checks and notes do not replace it. It is left
    to the "=" rule when what follows corrects it: a correction opens a sentence or clause after it ("19 + 12 *
    8 = 248. Oops: 12 * 8 = 96, and 19 + 96 = 115."), or, without such a word, the equations after it work the
    sum out again to a new answer, the next one not going on from it (see :func:`_reworked`: "248. Hmm,
    multiplication comes first: 12 × 8 = 96, then 19 + 96 = 115."; "248 - no wait, ..."; "Let me re-evaluate:
    ..."). A note working out a part ("= 115. Note that 12 * 8 = 96 is done first.") is no correction, nor is a
    "wait" whose working only checks the result back to the question (see :func:`_only_checks`)."""
    if len(asked_in_order) < 2:
        return None
    found, found_end = None, 0
    at = 0
    # one pass: each run of arithmetic is matched once (searching back from every "=" was quadratic)
    while (run := _ARITHMETIC.search(text, at)) is not None:
        at = max(run.end(), at + 1)
        if not text.startswith("=", run.end()):
            continue
        if [parse_number(n) for n in _numbers(run.group(0))] != asked_in_order:
            continue
        # bounded: matched to the end of a long line and cut after, every equation rescanned the line
        chain = _CHAIN.match(text, run.end(), run.end() + _CHAIN_CHARS).group(0)
        aside = re.search(r"\d\s*\(", chain)  # "= 115 (12 × 8 = 96, ...)": the aside works it out
        chain = chain[:aside.start() + 1] if aside else chain
        at = run.end() + len(chain)
        result = _numbers(chain[chain.rfind("=") + 1:])
        found, found_end = (result[0] if len(result) == 1 else None), at
    if found is None:
        return None
    later = equations[bisect.bisect_left(equations, found_end, key=lambda e: e.at):]
    value, asked = parse_number(found), set(asked_in_order)
    correction = _CORRECTION.search(text, found_end)
    if correction and not _only_checks(text, correction.end(), equations, value, asked):
        return None  # "Oops", "Actually": what follows corrects it, and the "=" rule reads the correction
    if len(asked_in_order) >= 3 and later and value not in later[0].operands and _reworked(later, value, asked):
        return None  # worked out again without a word of correction ("Hmm, ...", "Let me re-evaluate: ...")
    return found  # a check going on from the result ("1 + 6 = 7, and 7 - 1 = 6") or none after it


def _without_reasons(text: str, asked: set, equations: list[_Equation]) -> str:
    """``text`` without what justifies or checks an answer already given, where that holds an equation the
    "=" rule would read instead: a reason after a number in its own sentence, to the end of its clause
    ("4 feet is 48 inches because 1 foot = 12 inches"; "Omar spends 24 dollars, since 3 × 8 = 24. His
    change is 50 - 24 = 26." still reads 26), and a check after any number, to the end of its line
    ("26 dollars. Check: 26 + 24 = 50, and 3 × 8 = 24"). A reason opening its sentence ("Since 50 - 24 = 26,
    he gets 26 back") is the working and stays.

    A reason goes where its sentence gives a new number (not the question's) before it, or where it works that
    sentence's number back to the question ("9, because 9 × 9 = 81" reads 9). A reason whose equation goes on from a number already said to a new one is working and
    stays ("Omar spends 24 dollars since 3 × 8 = 24, and since 50 - 24 = 26 he gets 26 dollars back"). "And"
    ends a reason where new working follows it: an equation going on from a number already said to a new one
    ("Jack is 42 now since 32 + 10 = 42 and in 3 years he will be 42 + 3 = 45"), or no equation at all ("13
    stamps, since 6 + 10 = 16 and gave away 3"). A check is dropped only when it verifies a new number given
    before it: an equation of it lands on that number, or goes on from it (or from what the check found from it)
    to one of the question's; "3 × 8 = 24. Check: 50 - 24 = 26, so the change is 26." works on to 26."""
    # positions found once, looked up by bisection: scanning from each reason was quadratic on a looping reply
    # a colon starts one too: "Step 2: Since 50 - 24 = 26, ..." is working, not a reason for the 2
    sentence_starts = sorted([0] + [m.end() for m in _SENTENCE_END.finditer(text)]
                             + [m.end() for m in re.finditer(r":(?!\d)", text)])
    stops = [m.start() for m in _REASON_END.finditer(text)]
    equals = [eq.at for eq in equations]
    where = _positions(text)
    fresh = [m.start() for m in _NUMBER.finditer(text) if parse_number(m.group(0)) not in asked]

    def any_in(positions: list[int], lo: int, hi: int) -> bool:
        i = bisect.bisect_left(positions, lo)
        return i < len(positions) and positions[i] < hi

    def first_equation(lo: int, hi: int) -> _Equation | None:
        i = bisect.bisect_left(equals, lo)
        return equations[i] if i < len(equals) and equals[i] < hi else None

    def new_working(eq: _Equation, before: int, *, first_only: bool) -> bool:
        """``eq`` goes on from a number said before ``before`` (its first operand, or any) to a new one."""
        operands = eq.operands[:1] if first_only else eq.operands
        return (eq.result is not None and eq.result not in asked and not _said(where, eq.result, 0, before)
                and any(_said(where, v, 0, before) for v in operands))

    # an "and" ends a reason before new working or where no equation follows in its clause; each "and" is judged
    # once (what follows it up to the next stop does not depend on the reason it is in)
    for m in _AND.finditer(text):
        i = bisect.bisect_left(stops, m.end())
        clause_end = stops[i] if i < len(stops) else len(text)
        follows = first_equation(m.end(), clause_end)
        if follows is None or new_working(follows, m.start(), first_only=True):
            stops.append(m.start())
    stops.sort()

    cuts = []
    for reason in _JUSTIFICATION.finditer(text):
        k = bisect.bisect_right(sentence_starts, reason.start()) - 1
        sentence = sentence_starts[k]
        i = bisect.bisect_left(stops, reason.end())
        end = stops[i] if i < len(stops) else len(text)
        # a sentence that is only a reason is for the sentence before it: "... 48 inches. This is because 1 foot =
        # 12 inches." / "... Because 1 foot = 12 inches."; "Since 50 - 24 = 26, he gets 26 back" goes on: working
        lead = text[sentence:reason.start()]
        alone = not lead.strip() and (end == len(text) or text[end] in ".!?\n")
        if k and (_POINTS_BACK.fullmatch(lead) or alone):
            sentence = sentence_starts[k - 1]
        eq = first_equation(reason.end(), end)
        if eq is None or new_working(eq, reason.start(), first_only=False):
            continue
        verifies = eq.result is not None and (
            _said(where, eq.result, sentence, reason.start())
            or (eq.result in asked and any(_said(where, v, sentence, reason.start()) for v in eq.operands)))
        if verifies or any_in(fresh, sentence, reason.start()):
            cuts.append((reason.start(), end))
    for check in _CHECK.finditer(text):
        line_end = text.find("\n", check.end())
        end = len(text) if line_end < 0 else line_end
        if not any_in(fresh, 0, check.start()):
            continue
        # its equations, within a bounded span (a looping line of checks would otherwise be read once per check)
        i, given, verifies, works_on = bisect.bisect_left(equals, check.end()), set(), False, False
        first = i
        while not verifies and i < len(equals) and equals[i] < min(end, check.end() + _CHAIN_CHARS):
            eq = equations[i]
            i += 1
            if eq.result is None:
                continue
            said = [v for v in eq.operands if v in given or (v not in asked and _said(where, v, 0, check.start()))]
            lands_new = eq.result not in asked and not _said(where, eq.result, 0, check.start())
            verifies = (eq.result not in asked and not lands_new) or (bool(said) and eq.result in asked)
            works_on = works_on or (bool(said) and lands_new)
            if said:
                given.add(eq.result)
        # kept only as working that goes on from the number given before it: a check of other numbers that lands
        # elsewhere says the answer is wrong ("25 dollars back. Check: 50 - 24 = 26." gives 25, not the check's 26)
        if i > first and (verifies or not works_on):
            cuts.append((check.start(), end))
    kept, at = [], 0
    for start, end in sorted(cuts):
        if end > at:
            kept.append(text[at:max(at, start)])
            at = end
    return "".join(kept) + text[at:]


def extract_number(reply: str, question: str | None = None) -> tuple[str | None, str | None]:
    """The number a reply gives as its answer.

    In order: a LaTeX ``\\boxed{}``; the number after "answer is"/"answer:"; a
    short first line holding a single number ("85.", "85 apples"; not a step that the working after it
    goes on from to a new number); the first number after the last "="; the last number in the reply;
    finally a number word ("twelve", "twenty-one"). A sign written as a word counts ("negative 51" is -51; "minus 5" is -5
    unless it follows a number), and a fraction ("1/2") is not read as either of its numbers.

    With the ``question``, the reply is read against what was asked: a
    sequence the reply repeats and continues gives its next term ("4, 7, 10,
    13, 16, 19, 22" -> 19); a short first sentence holding only a number of the
    question ("Jack has 6 cookies.") is a premise when a new number follows;
    and the last-number rule skips the question's numbers, so a reply that
    restates it after answering ("There are 84 inches in 7 feet.") is read as
    84, not 7. A reply holding only the question's numbers gives its last one,
    unless it only restates the question (see :func:`_restated_number`). An equation
    whose left side is the question's arithmetic gives its result ("1 + 6 = 7,
    and 7 - 1 = 6" -> 7), and a reason after a stated answer is not read for it
    ("48 inches, since 1 foot = 12 inches" -> 48).
    """
    text = _SIGN_WORD.sub("-", reply.translate(_MINUS_SIGNS))
    if len(_LIST_MARKER.findall(text)) >= 2:  # "1. 20\n2. 20": list numbers are not answers
        text = _LIST_MARKER.sub("", text)
    else:
        # a list of one step ("1. 6 + 1 = 7."): its "1." is a marker, not a first sentence giving
        # the answer; only "1." before a worked equation is dropped ("85. I added 37 and 48." stays)
        lead = _FIRST_STEP.match(text)
        if lead:
            text = text[lead.end():]
    boxed = _BOXED.findall(text)
    if boxed:
        nums = _numbers(boxed[-1])
        if nums:
            return nums[-1], None
    answer_is = list(_ANSWER_IS.finditer(text))
    if answer_is:
        # the rest of that sentence: "The answer is: 37 + 48 = 85" gives the result, not the first operand
        rest = text[answer_is[-1].end():]
        segment = _SENTENCE_END.split(rest, maxsplit=1)[0][:200]
        # an equation right after it gives its result; one later in the sentence is working ("8 because 8 × 7 = 56")
        worked = _LEADING_EQUATION.match(segment)
        nums = _numbers(segment[worked.end():] if worked else segment)
        if nums:
            return nums[0], None
    question = _SIGN_WORD.sub("-", question.translate(_MINUS_SIGNS)) if question else ""
    asked_in_order = [parse_number(n) for n in _numbers(question)]
    asked = set(asked_in_order)
    following = _next_term(question, text)
    if following is not None:
        return following, None
    stripped = text.strip()
    first = _SENTENCE_END.split(stripped, maxsplit=1)[0]
    copying = False  # the reply copies the question from its start: no question number it holds is an answer
    nums = _numbers(first)
    if len(nums) == 1 and len(first.split()) <= 4:  # "85.", "85 apples", "So, 85."
        # "Jack has 6 cookies. He gives 5 away, so he has 1 left.": a first sentence restating
        # the question's number is a premise when the reply goes on to a number of its own
        rest, number = stripped[len(first):], next(_NUMBER.finditer(first))
        # ... and so is one copied from the question when more numbers follow ("Aisha has 10 dollars. 5 are left.");
        # when what follows goes on copying it, the reply answers nothing
        copied = _restates(first, question, number, min_words=3) and bool(_NUMBER.search(rest))
        copying = copied and _goes_on_copying(rest, question, asked_in_order, first, parse_number(number.group(0)))
        premise = parse_number(nums[0]) in asked and (
            any(parse_number(n) not in asked for n in _numbers(rest)) or _restates(first, question, number) or copied)
        # ... and a number of its own is a step when the working after it goes on from it to another new number
        # ("Omar spends 24 dollars. So 50 - 24 = 26."); a check landing on it or on the question's numbers is not
        if not premise and not _goes_on_from(parse_number(nums[0]), _equations(rest), asked):
            return nums[0], None
    equations = _equations(text)
    result = _operands_result(text, asked_in_order, equations)
    if result is not None:
        return result, None
    text = _without_reasons(text, asked, equations)
    # an aside in parentheses works the answer out or checks it ("85 (since 85 - 37 = 48)"): read the reply
    # without it, unless that leaves no number
    plain = _PARENTHESES.sub(" ", text)
    if "=" in plain or any(parse_number(n) not in asked for n in _numbers(plain)):
        text = plain  # what is left still answers; else the aside holds the answer ("5 and 3 more (total = 8)")
    if "=" in text:
        nums = _numbers(text[text.rfind("=") + 1:])
        if nums:
            return nums[0], None
    nums = _numbers(text)
    if nums:
        fresh = [n for n in nums if parse_number(n) not in asked]
        if fresh:
            return fresh[-1], None
        if not question:
            return nums[-1], None
        restated = None if copying else _restated_number(text, question, asked_in_order)
        return (restated, None) if restated is not None else (None, "the reply only restates the question")
    words = _number_words(text)
    if words:
        return str(words[-1]), None
    return None, "no number in the reply"


_YES = {"yes", "true", "correct"}
_NO = {"no", "false", "incorrect"}
_FIRST_WORDS = {"yes": "yes", "yeah": "yes", "yep": "yes", "no": "no", "nope": "no", "nah": "no"}
# "yes" anywhere; "no" as an answer, not as a determiner ("it has no divisors", "there is no remainder"):
# followed by punctuation (markdown's and LaTeX's too: "**no**", "\\boxed{no}", "`no`") or the end, by the start of a
# reason or a clause ("no because", "no 15 is not"), or said ("I say no")
_ANSWER_WORD = re.compile(
    r"\b(yes)\b|\b(no)\b(?=\s*(?:[.,;:!?)\]}*_`\"'\u2019\u201d\-\u2014]|$|\d|(?:because|since|as|so|but|it|its|this|that|i|we|they|"
    r"there|he|she)\b))|(?:(?<=\bsay )|(?<=\bsaid ))(no)\b",
    re.IGNORECASE | re.MULTILINE,
)
# the question's own "answer yes or no" echoed, and a hedge that says both
_ECHO = re.compile(r"\byes\s*(?:or|/)\s*no\b", re.IGNORECASE)
_HEDGE = re.compile(r"\byes\s+and\s+no\b(?=\s*(?:[.,;:!?]|$))", re.IGNORECASE)  # not "yes and no other number"
_NEGATIONS = {"not", "never", "isn", "aren", "wasn", "weren", "t"}  # "isn't" reads as "isn", "t"
_YES_NO_IS = re.compile(r"\banswer\s*(?:is|:)\s*:?\s*\W*(yes|no)\b", re.IGNORECASE)


# "Is 151 divisible by 6? ...": the subject and the predicate asked about
_YES_NO_QUESTION = re.compile(r"^\s*(?:is|are)\s+([^?]+?)\s*\?", re.IGNORECASE)
# a negation between the subject and the claim: "is not prime", "is not a prime", "is not evenly divisible by 6"
_NEGATION = re.compile(r"\b(?:not|never)\b|n't\b", re.IGNORECASE)
# "it's", "that's": the pronoun and its verb, as "it is" reads
_PRONOUN_IS = re.compile(r"\b(it|this|that)['\u2019]s\b")


def _restated(reply: str, question: str) -> str | None:
    """``"yes"``/``"no"`` from a first sentence that restates the question's own claim.

    "151 is not divisible by 6." answers "Is 151 divisible by 6?" with no; "737 is
    divisible by 11, not by 7." answers "Is 737 divisible by 11?" with yes. The
    sentence must start with the question's subject and hold its whole predicate
    ("201 is smaller than 332." claims something else and gives no answer).
    """
    m = _YES_NO_QUESTION.match(question)
    if not m:
        return None
    # numbers compare without their thousands commas ("Is 4,552 even?" / "4552 is an even number.")
    words = re.sub(r"(?<=\d),(?=\d{3}\b)", "", m.group(1).lower()).split()
    # the question asked back ("9 * 11 is equal to 99?") claims nothing: the next sentence may
    sentences = [t for t in _SENTENCE_END.split(reply.strip()) if not t.strip().endswith("?")]
    if not sentences:
        return None
    first = " ".join(sentences[0].lower().split())
    first = _PRONOUN_IS.sub(r"\1 is", re.sub(r"(?<=\d),(?=\d{3}\b)", "", first))
    # the subject is the question's first words ("151", "9 * 11"), said again or as a pronoun ("It is not
    # prime."); the rest, two words or more past a one-word subject, is the predicate
    for n in range(1, len(words)):
        subject, predicate = " ".join(words[:n]), " ".join(words[n:])
        if n > 1 and len(words) - n < 2:
            break
        # a pronoun stands for a one-word subject or an expression ("It is equal to 99."), not for
        # "151 divisible" with "by 6" as the claim
        said = _said_again(first, subject, predicate, pronouns=n == 1 or not re.search(r"[a-z]", subject))
        if said is not None:
            return said
    return None


def _said_again(first: str, subject: str, predicate: str, *, pronouns: bool) -> str | None:
    """``"yes"``/``"no"`` when the sentence ``first`` claims ``predicate`` of ``subject``, affirmed or negated."""
    names = (subject, "it", "this", "that", "the number") if pronouns else (subject,)
    start = next((len(s) for s in names if first.startswith(s + " ")), None)
    if start is None:
        return None
    # the predicate as asked or said shorter: "a prime number" is also "prime", "an even number" "even"
    short = re.sub(r"^(?:a|an|the)\s+", "", predicate)
    forms = dict.fromkeys((predicate, short, re.sub(r"\s+numbers?$", "", short)))
    for form in (f for f in forms if f):
        # the whole predicate, not a prefix of another claim ("divisible by 60" is not "divisible by 6")
        found = re.compile(r" " + re.escape(form) + r"(?!\w|\.\d)").search(first, start)
        if found is not None:
            return "no" if _NEGATION.search(first, start, found.start() + 1) else "yes"
    return None


def extract_yes_no(reply: str, question: str | None = None) -> tuple[str | None, str | None]:
    """``"yes"`` or ``"no"``: the first word if it is one (or "yep", "nope"), else "answer is
    yes/no", else the only one of the two the reply says ("no" said, not "no" as a determiner:
    "it has no divisors"). "Yes and no" is no answer, and the question's own "yes or no" is not
    one. "true"/"false" count only when neither word occurs. With the ``question``, a reply with
    none of these words that restates the question's claim, affirmed or negated, answers it
    (see :func:`_restated`)."""
    if not reply.strip():
        return None, "empty reply"
    if _HEDGE.search(reply):
        return None, "reply says both yes and no"
    reply = _ECHO.sub(" ", reply)
    words = re.findall(r"[a-z]+", reply.lower())
    if not words:
        return None, "no yes/no in the reply"
    if words[0] in _FIRST_WORDS:
        return _FIRST_WORDS[words[0]], None
    m = _YES_NO_IS.search(reply)
    if m:
        return m.group(1).lower(), None
    has = {next(g for g in m.groups() if g).lower() for m in _ANSWER_WORD.finditer(reply)}
    if len(has) == 1:
        return has.pop(), None
    if has:
        return None, "reply says both yes and no"
    if words[0] in _YES or words[0] in _NO:
        return ("yes" if words[0] in _YES else "no"), None
    # "It is not true that 201 is larger than 332.": a negated true/false flips it
    has_tf = {("yes" if (w == "true") != (words[i - 1] in _NEGATIONS if i else False) else "no")
              for i, w in enumerate(words) if w in ("true", "false")}
    if len(has_tf) == 1:
        return has_tf.pop(), None
    restated = _restated(reply, question) if question else None
    if restated is not None:
        return restated, None
    return None, "no yes/no in the reply"


_QUOTES = str.maketrans({c: " " for c in "\"'`\u2018\u2019\u201c\u201d\u00ab\u00bb*_#"})
_ARTICLES = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)


def normalize_text(text: str, *, case_sensitive: bool = False) -> str:
    """Fold accents, drop quotes/markdown/punctuation and a leading article, collapse spaces."""
    t = unicodedata.normalize("NFKD", text)
    t = "".join(c for c in t if not unicodedata.combining(c))
    t = t.translate(_QUOTES)
    t = re.sub(r"[^\w\s-]", " ", t)  # keep letters, digits, hyphens; "D.C." -> "D C"
    t = " ".join(t.replace("_", " ").split()).strip(" -")
    t = re.sub(r"(?<=\b\w)[ -](?=\w\b)", "", t)  # re-join initials and spelt letters: "D C", "n-e-d" -> "DC", "ned"
    t = _ARTICLES.sub("", t)
    return t if case_sensitive else t.casefold()


_PREFIX = re.compile(
    r"^\s*(?:(?:the\s+)?(?:final\s+|correct\s+|short\s+)?answer\s*(?:is|:|would be)|a\s*:|answer\s*-)\s*:?\s*",
    re.IGNORECASE,
)
# "X is Y" and "X wrote Y": the answer is on one side of the verb
_COPULA = re.compile(
    r"\s(?:is|are|was|were|would be|will be|wrote|painted|composed|invented|discovered|created)\s"
    + "".join(rf"|(?<=\b{w})['\u2019]s\s" for w in ("it", "he", "she", "that", "this", "here", "what")),  # "It's X"
    re.IGNORECASE,
)
_NEGATED = re.compile(r"(?:not|never|no longer)\b", re.IGNORECASE)
_PREPOSITION = re.compile(r"\s(?:of|in|on|for|as|by|called|named)\s", re.IGNORECASE)
# a period ends a clause unless it closes an initial ("J.K. Rowling", "D.C.")
_CLAUSE_END = re.compile(rf"\s*(?:[,;:()\[\]]|\s-\s|\s\u2014\s|(?<!\b[A-Z]){_NOT_ABBREVIATED}\.(?:\s|$)|[!?])")
# a first sentence that only greets or agrees ("Sure!", "Of course.") before the answer
_FILLER = re.compile(r"^(?:sure|certainly|of course|okay|ok|hello|hi|great question|good question|let me think|"
                     r"let's see|well|alright|absolutely)\W*$", re.IGNORECASE)
# a first sentence that is nothing but alternatives ("Canberra, Sydney or Moscow"): no one answer
_LIST_SEPARATOR = re.compile(r"\s*,\s*(?:or\s+)?|\s+or\s+", re.IGNORECASE)


def _alternatives(sentence: str) -> bool:
    """Two or more short items joined by commas and an "or", and nothing else (no verb, no "not")."""
    if not re.search(r"\bor\b", sentence, re.IGNORECASE) or _COPULA.search(f" {sentence} ") \
            or re.search(r"\bnot\b", sentence, re.IGNORECASE):
        return False
    items = [i for i in _LIST_SEPARATOR.split(sentence) if i.strip()]
    return len(items) >= 2 and all(len(i.split()) <= 3 for i in items)


# a phrase in double quotes, or in single quotes that are not apostrophes ("Earth's")
_QUOTED = re.compile(r"\"([^\"]{1,60})\"|\u201c([^\u201d]{1,60})\u201d|(?<!\w)'([^']{1,60})'(?!\w)")
_WRAPPERS = " \"'`*_\u2018\u2019\u201c\u201d"


def _clause(text: str) -> str:
    """Text up to the first clause break (comma, colon, parenthesis, sentence end)."""
    m = _CLAUSE_END.search(text)
    return (text[: m.start()] if m else text).strip()


_TEXT_BOXED = re.compile(r"\\boxed\{(?:\\text\{)?([^{}]*)\}")
_ASKING = re.compile(r"\W*(?:which|what|how|is|are|join|write)\b", re.IGNORECASE)  # the question copied, "?" or not
_SORTED = re.compile(r"\b(?:alphabetical|alphabetically|sorted)\b", re.IGNORECASE)
_SPELT = re.compile(r"[^\W\d_](?:\s*[,\s-]\s*[^\W\d_])+")  # "N, L, S, I", "n-l-s-i"
_LIST_ITEM_BREAK = re.compile(r"\s*(?:[,;&]|\band\b|\bor\b)\s*", re.IGNORECASE)
# "Saddle comes first.": the word placed first or last (the words ordered are single words); "comes" is no copula,
# as "Castle comes after cloud." names castle second. Linear: it starts at a word's start only, and reads the word
# (an apostrophe only inside it) and the quotes closing it once each, never trying every split of a run of quotes
_COMES = re.compile(r"(?<![\w'\u2019-])([^\W\d_](?:[\w-]|['\u2019](?=\w))*+)[\"'\u2019\u201d*_]*+\s+"
                    r"(?:comes|would\s+come|will\s+come)\s+(first|last)\b", re.IGNORECASE)
_NOT_PLACED = {"it", "this", "that", "which", "what", "who", "one", "word", "never", "not", "also", "always", "then"}


def _quoted_words(question: str | None) -> list[str]:
    """The phrases the question quotes, normalised, in its order."""
    return [normalize_text(next(g for g in m.groups() if g)) for m in _QUOTED.finditer(question or "")]


def _lists_the_question(phrase: str, quoted: list[str]) -> bool:
    """Whether ``phrase`` is two or more of the question's ``quoted`` words in the question's order and
    nothing else: the words echoed ("saddle, stone, snake" for 'Which comes first: "saddle", "stone",
    "snake"?'). Listed in another order, they are the reply's own ordering, and its first is read."""
    if not quoted:
        return False
    # one piece more than the quoted words: a longer list holds something else, and its tail says so
    items = [normalize_text(i) for i in _LIST_ITEM_BREAK.split(phrase.rstrip(".!?"), maxsplit=len(quoted) + 1)]
    items = [i for i in items if i]
    return len(items) >= 2 and _in_order(items, quoted)


def _names_none(sentence: str, quoted: list[str]) -> bool:
    """A sentence listing alternatives ("Canberra, Sydney or Moscow") or the question's quoted words
    ("saddle, stone, snake"; "The words are ..."; "In alphabetical order: ...") gives no one answer."""
    sentence = _PREFIX.sub("", sentence.strip()).strip()
    if _alternatives(sentence.rstrip(".!?")):
        return True
    if _SORTED.search(sentence) and not _ASKING.match(sentence):
        return False  # "In alphabetical order: knife, pyramid, stone.": the reply's own order, also where the
        # question listed them sorted already (a bare list there is an echo, and reads nothing)
    after_verb = _COPULA.split(" " + sentence + " ")[-1]
    return any(_lists_the_question(p, quoted) for p in (sentence, after_verb, sentence.rpartition(":")[2]))


def text_candidates(reply: str, *, max_words: int = 6, question: str | None = None) -> list[str]:
    """Short phrases a reply could be giving as its answer, most likely first.

    In order: a LaTeX ``\\boxed{}``; what follows "the answer is" anywhere; from
    the first sentence, the one quoted phrase if there is exactly one ('The
    word "cup" comes first'), what follows its last "is/are/was/wrote" ("The
    capital of France is Paris"), the word said to come first or last ("Saddle comes first"; with the
    ``question``, only the place it asks about), its first clause ("Paris, France"), the
    first clause after a colon ("Sorted: saddle, snake, stone"), what
    follows the verb in the whole sentence when it spells letters ("The
    letters are N, L, S, I"),
    what precedes its first "is/wrote" ("Paris is the capital of France"), what
    follows its last "of/in/for/..." ("... the capital of France"), and the
    sentence itself. Phrases longer than ``max_words`` words are dropped. With
    the ``question``, a first sentence that only lists the question's quoted
    words gives no answer, as one listing alternatives ("Paris or Rome") does.
    """
    text = reply.strip()
    out: list[str] = [m.group(1) for m in _TEXT_BOXED.finditer(text)][-1:]
    for m in _ANSWER_IS.finditer(text):
        out.append(_clause(text[m.end():]))
    sentences = _SENTENCE_END.split(text) if text else [""]
    quoted = _quoted_words(question)  # once: every sentence is checked against them
    # a greeting, or a sentence naming no one answer, before the one that does ("Paris or Rome? Rome.")
    while len(sentences) > 1 and (_FILLER.match(sentences[0].strip()) or _names_none(sentences[0], quoted)):
        sentences = sentences[1:]
    first = _PREFIX.sub("", sentences[0].strip()).strip()
    if _names_none(first, quoted):
        return [c for c in out if c]  # only an "answer is" elsewhere can still say which
    verb_parts = _COPULA.split(" " + first + " ")
    quoted = [next(g for g in m.groups() if g) for m in _QUOTED.finditer(first)]
    if len(quoted) == 1:
        out.append(quoted[0])
    # the place the question asks about, or either without one
    places = {w for w in ("first", "last") if re.search(rf"\b{w}\b", question or "", re.IGNORECASE)} or {"first", "last"}
    placed = next((m.group(1) for m in _COMES.finditer(first)
                   if m.group(2).lower() in places and m.group(1).lower() not in _NOT_PLACED), None)
    if placed:
        out.append(placed)
    first_clause = _clause(first) or first
    parts = _COPULA.split(" " + first_clause + " ")
    after = parts[-1].strip() if len(parts) > 1 else first_clause
    # "Paris is not the capital of France" denies: neither side of a negated verb is an answer
    negated = any(_NEGATED.match(p) for p in parts[1:])
    if len(parts) > 1 and not negated:
        out.append(after)
    out.append(first_clause)
    if ":" in first:  # "In alphabetical order: saddle, snake, stone." / "Category: kitchen"
        out.append(_clause(first.partition(":")[2]))
    spelt = verb_parts[-1].strip().rstrip(".!?")
    if len(verb_parts) > 1 and _SPELT.fullmatch(spelt) and not any(_NEGATED.match(p) for p in verb_parts[1:]):
        out.append(spelt)  # letters past the first clause: "The letters are N, L, S, I."
    if len(parts) > 1 and not negated:
        out.append(parts[0].strip())
    preps = _PREPOSITION.split(" " + after + " ")
    if len(preps) > 1:
        out.append(preps[-1].strip())
    out.append(first.rstrip(".!?"))
    seen: set[str] = set()
    result = []
    for c in out:
        c = c.strip().rstrip(".!?").strip(_WRAPPERS).strip()
        key = normalize_text(c, case_sensitive=True)
        if not key or key in seen or len(key.split()) > max_words:
            continue
        seen.add(key)
        result.append(c)
    return result
