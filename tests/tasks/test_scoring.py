"""Scorers: answer extraction from chatty replies, exact comparison, never an exception."""

import time

import pytest

from edge_runtime.tasks import Score, TaskItem, score, score_text


@pytest.mark.parametrize(
    "reply, answers, correct, extracted",
    [
        ("85", ["85"], True, "85"),
        ("The answer is 85.", ["85"], True, "85"),
        ("37 + 48 = 85", ["85"], True, "85"),
        ("85. I added 37 and 48 to get it.", ["85"], True, "85"),
        ("First 12 + 7 = 19. Then 19 - 5 = 14. So Maria has 14 apples.", ["14"], True, "14"),
        ("So Maria has 14 apples left, since she had 12 and got 7 and gave 5", ["14"], False, "5"),
        ("-28", ["-28"], True, "-28"),
        ("26 − 54 = −28", ["-28"], True, "-28"),  # unicode minus
        ("The result is 10,299.", ["10299"], True, "10,299"),
        ("1,234,567", ["1234567"], True, "1,234,567"),
        ("The total is 9.240", ["9.24"], True, "9.240"),
        ("4.5 meters", ["4.5"], True, "4.5"),
        ("\\boxed{77}", ["77"], True, "77"),
        ("Answer: 3", ["3"], True, "3"),
        ("There are twelve of them.", ["12"], True, "12"),
        ("twenty-one", ["21"], True, "21"),
        # "hundred" read whole (it read 1 and 66)
        ("One hundred.", ["100"], True, "100"),
        ("Three hundred sixty-six", ["366"], True, "366"),
        ("a hundred and five", ["105"], True, "105"),
        ("Mars is the fourth planet from the Sun.", ["4"], True, "4"),
        ("Mars is the 4th planet from the Sun.", ["4"], True, "4"),
        ("3, 7, 11, 15, 19", ["19"], True, "19"),
        ("1. 5 * 3 = 15\n2. 5 * 3 = 15\n", ["15"], True, "15"),  # list numbering is not the answer
        ("1. 20\n2. 20\n3. 20", ["20"], True, "20"),
        ("85.\nI added 37 and 48.", ["85"], True, "85"),
        ("1. 6 + 1 = 7.", ["7"], True, "7"),  # a one-step list: "1." is its marker, not a first sentence
        ("1. The answer is 7.", ["7"], True, "7"),
        ("7. That is all.", ["7"], True, "7"),  # echoes the sequence: the last number is the next term
        ("The answer is 86.", ["85"], False, "86"),
        ("85.5", ["85"], False, "85.5"),
        # a sign written as a word is read ("negative 51" scored right against 51)
        ("The answer is negative 51.", ["51"], False, "-51"),
        ("negative 51", ["-51"], True, "-51"),
        ("It is minus 3 degrees.", ["-3"], True, "-3"),
        ("minus 5", ["5"], False, "-5"),
        ("63 minus 12 is 51", ["51"], True, "51"),  # between numbers it is the operation
        ("8/4 = 2", ["2"], True, "2"),
        ("The answer is 5 minus 2 = 3", ["3"], True, "3"),  # an operation in words before the "=" (it read 5)
        ("The answer is 5 times 2 = 10.", ["10"], True, "10"),
        ("60 km/h", ["60"], True, "60"),
    ],
)
def test_number_scorer(reply, answers, correct, extracted):
    s = score_text("number", answers, reply)
    assert (s.correct, s.extracted, s.parse_error) == (correct, extracted, None)


@pytest.mark.parametrize(
    "reply, extracted",
    [
        ("There are 84 inches in 7 feet.", "84"),  # restates the question after answering
        ("7 feet is 84 inches.", "84"),
        ("7 feet, that is 7 feet.", "7"),  # only the question's numbers: the last of them
        ("Multiply 7 by 12 to get 84 inches in 7 feet.", "84"),
    ],
)
def test_the_question_numbers_are_not_taken_for_the_answer(reply, extracted):
    question = "How many inches are in 7 feet? Answer with just the number."
    s = score_text("number", ["84"], reply, question=question)
    assert s.extracted == extracted and s.correct is (extracted == "84")
    # score() passes the item's question
    item = TaskItem(id="u", family="unit_conversion", messages=({"role": "user", "content": question},),
                    answers=("84",), scorer="number")
    assert score(item, reply) == s


@pytest.mark.parametrize(
    "reply, question, extracted",
    [
        # a first sentence restating the question's number is a premise when a new number follows
        ("Jack has 6 cookies. He gives 5 to a friend, so he has 6 - 5 = 1 cookie left.",
         "Jack has 6 cookies. He gives 5 to a friend. How many cookies does he have left?", "1"),
        ("Maria has 30 dollars. After spending 3, she has 27.",
         "Maria has 30 dollars and spends 3. How many dollars does she have left?", "27"),
        ("6 cookies. He buys 5 and gives away 5, so nothing changes.",
         "Jack has 6 cookies. He buys 5 and gives 5 away. How many cookies does he have?", "6"),
        ("85.\nI added 37 and 48.", "What is 37 + 48?", "85"),
        # a repeated and continued sequence gives the term after the question's terms
        ("4, 7, 10, 13, 16, 19, 22, 25", "Continue the pattern: 4, 7, 10, 13, 16, ? Reply with only the next number.", "19"),
        ("The sequence continues: 22, 13, 4, -5, -14, -23, -32.",
         "What number comes next in the sequence 22, 13, 4, -5, -14, ...?", "-23"),
        ("The sequence is 9, 16, 23, 30, 37, which is a Fibonacci sequence.",
         "What number comes next in the sequence 9, 16, 23, 30, 37, ...?", None),  # only the question's terms
        ("The answer is 44. The sequence: 9, 16, 23, 30, 37, 44.",
         "What number comes next in the sequence 9, 16, 23, 30, 37, ...?", "44"),
    ],
)
def test_a_reply_is_read_against_its_question(reply, question, extracted):
    assert score_text("number", ["0"], reply, question=question).extracted == extracted


@pytest.mark.parametrize(
    "reply, question, expected",
    [
        ("151 is not divisible by 6.", "Is 151 divisible by 6? Answer yes or no.", "no"),
        ("15 isn't divisible by 2.", "Is 15 divisible by 2? Answer yes or no.", "no"),
        ("737 is divisible by 11, not by 7.", "Is 737 divisible by 11? Answer yes or no.", "yes"),
        ("46 is an even number.", "Is 46 an even number? Answer yes or no.", "yes"),
        ("-45 is not larger than -41.", "Is -45 larger than -41? Answer yes or no.", "no"),
        ("201 is smaller than 332.", "Is 201 larger than 332? Answer yes or no.", None),  # another claim: no answer
        ("151 is not divisible by 60.", "Is 151 divisible by 6? Answer yes or no.", None),
        ("151 is not divisible by 6.5.", "Is 151 divisible by 6? Answer yes or no.", None),
        ("It is not divisible.", "Is 151 divisible by 6? Answer yes or no.", None),  # not the question's subject
        ("6 × 7 = 42", "Is 6 × 7 equal to 42? Answer yes or no.", None),
        # a word between the negation and the claim kept it affirmed
        ("151 is not evenly divisible by 6.", "Is 151 divisible by 6? Answer yes or no.", "no"),
        ("91 is not a prime.", "Is 91 a prime number? Answer yes or no.", "no"),
        ("It is not a prime.", "Is 91 a prime number? Answer yes or no.", "no"),
        ("14 × 23 is not actually equal to 324.", "Is 14 × 23 equal to 324? Answer yes or no.", "no"),
        # "it's" as "it is"
        ("It's not prime.", "Is 91 a prime number? Answer yes or no.", "no"),
        ("It\u2019s a prime number.", "Is 17 a prime number? Answer yes or no.", "yes"),
    ],
)
def test_a_yes_no_statement_restating_the_question_answers_it(reply, question, expected):
    s = score_text("yesno", ["no"], reply, question=question)
    assert s.extracted == expected
    assert (s.parse_error is None) is (expected is not None)
    # without the question these are not read
    assert score_text("yesno", ["no"], reply).extracted is None


@pytest.mark.parametrize("reply", ["", "   ", "I don't know.", "It depends on the context.",
                                   # a fraction is not its denominator (it scored right against 2), nor its
                                   # numerator's integer part
                                   "1/2", "The answer is 1.5/3", "1,234/2"])
def test_number_without_a_number_is_a_reported_parse_error(reply):
    s = score_text("number", ["42"], reply)
    assert s.correct is False and s.extracted is None
    assert s.parse_error in ("no number in the reply",)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("No, 91 = 7 × 13, so it is not prime.", "no"),
        ("The answer is no.", "no"),
        ("91 is not prime, so the answer is: No", "no"),
        ("I believe yes, it is divisible.", "yes"),
        ("True", "yes"),
        ("That statement is false.", "no"),
        ("**Yes**", "yes"),
        ("It is not true that 201 is larger than 332.", "no"),  # a negated true/false flips
        ("That isn't false.", "yes"),
        ("It is never true.", "no"),
    ],
)
def test_yes_no_extraction(reply, expected):
    s = score_text("yesno", ["yes"], reply)
    assert s.extracted == expected and s.parse_error is None
    assert s.correct is (expected == "yes")


@pytest.mark.parametrize(
    "reply, error",
    [
        ("", "empty reply"),
        ("Maybe, it depends.", "no yes/no in the reply"),
        ("It could be yes or it could be no.", "reply says both yes and no"),
    ],
)
def test_yes_no_unparseable(reply, error):
    assert score_text("yesno", ["no"], reply) == Score(False, None, error)


@pytest.mark.parametrize(
    "reply, answers, correct",
    [
        ("Paris", ["Paris"], True),
        ("paris.", ["Paris"], True),
        ("The capital of France is Paris.", ["Paris"], True),
        ("Paris is the capital of France.", ["Paris"], True),
        ("Paris is the capital of France.", ["France"], True),  # answering "Paris is the capital of which country?"
        ("The capital of France is Lyon.", ["Paris"], False),
        ("Paris is not the capital of France.", ["Paris"], False),  # a negated statement gives no answer
        ("The capital of France is not Paris.", ["Paris"], False),
        ("Canberra is the capital of Australia, not Sydney.", ["Canberra"], True),
        ("**Canberra**\n\nCanberra is the capital of Australia, not Sydney.", ["Canberra"], True),
        ("The capital of Australia is Sydney.", ["Canberra"], False),
        ("Brasilia", ["Brasília"], True),  # accents folded
        ("Washington, D.C.", ["Washington, D.C.", "Washington"], True),
        ("The capital is Washington D.C.", ["Washington, D.C."], True),
        ("It was written by J.K. Rowling.", ["J. K. Rowling", "Rowling"], True),
        ("The answer is: the Pacific Ocean", ["Pacific", "Pacific Ocean"], True),
        ("Answer: Iron", ["iron"], True),
        ("Fe is the symbol for iron.", ["iron"], True),
        ("The first letter of the word 'orange' is 'o'.", ["o"], True),
        ("The reversed word is \"enots\".", ["enots"], True),
        ("e n o t s", ["enots"], True),
        ("Mount Everest", ["Everest", "Mount Everest"], True),
        ("William Shakespeare wrote Hamlet.", ["William Shakespeare", "Shakespeare"], True),
        ("Leonardo da Vinci painted the Mona Lisa.", ["Leonardo da Vinci"], True),
        ("Kenya is located in Africa.", ["Africa"], True),
        ("Jupiter", ["Saturn"], False),
        ('The word "cup" comes first in alphabetical order.', ["cup"], True),
        ('Of "cup" and "apple", "cup" comes first.', ["apple"], False),  # several quoted words: no guessing
    ],
)
def test_text_scorer(reply, answers, correct):
    s = score_text("text", answers, reply)
    assert s.correct is correct and s.parse_error is None and s.extracted


def test_a_wrong_text_answer_reports_what_was_said():
    s = score_text("text", ["krona"], "The currency of Sweden is the Euro.")
    assert (s.correct, s.extracted, s.parse_error) == (False, "the Euro", None)
    assert score_text("text", ["o"], 'The first letter of "owl" is "O".').extracted == "O"


def test_text_case_rules():
    assert score_text("text_cs", ["Au"], "The chemical symbol for gold is Au.").correct
    assert not score_text("text_cs", ["Au"], "AU").correct
    assert not score_text("text_cs", ["Co"], "CO").correct  # carbon monoxide, not cobalt
    assert score_text("text_cs", ["GARDEN"], "GARDEN").correct
    assert not score_text("text_cs", ["GARDEN"], "Garden").correct
    assert score_text("text", ["GARDEN"], "Garden").correct  # case-insensitive scorer


def test_text_without_a_short_answer_is_a_parse_error():
    rambling = "Many different things could all plausibly count here honestly speaking, really"
    s = score_text("text", ["Paris"], rambling)
    assert s == Score(False, None, "no short answer in the reply")
    assert score_text("text", ["Paris"], "  ") == Score(False, None, "empty reply")


def test_exact_scorer():
    assert score_text("exact", ["Hello World"], "  hello world \n").correct
    assert not score_text("exact", ["Hello World"], "hello world!").correct


def test_score_never_raises():
    item = TaskItem(id="x", family="f", messages=({"role": "user", "content": "q"},), answers=("1",), scorer="number")
    assert score(item, None).parse_error == "reply is NoneType, not text"  # type: ignore[arg-type]
    assert score(item, "\x00\udcff weird") .correct is False
    bad = TaskItem(id="y", family="f", messages=item.messages, answers=("1",), scorer="nope")
    assert score(bad, "1") == Score(False, None, "unknown scorer 'nope'")
    huge = "9" * 5000
    assert score(item, huge).correct is False


def test_a_failing_scorer_costs_one_item(monkeypatch):
    from edge_runtime.tasks import _scoring

    def boom(reply, answers, question=None):
        raise RuntimeError("bug")

    monkeypatch.setitem(_scoring.SCORERS, "number", boom)
    s = score_text("number", ["1"], "1")
    assert s.correct is False and "RuntimeError: bug" in s.parse_error


@pytest.mark.parametrize(
    "scorer, reply, answers, question, correct",
    [
        # the working after "answer is", and asides in parentheses, do not hide the result
        ("number", "The answer is: 37 + 48 = 85", ["85"], "What is 37 + 48?", True),
        ("number", "Answer: 37+48=85", ["85"], "What is 37 + 48?", True),
        ("number", "85 (since 85 - 37 = 48)", ["85"], "What is 37 + 48?", True),
        ("number", "The product is 42 (= 6 × 7).", ["42"], "What is 6 × 7?", True),
        ("number", "The answer is (carrying the one from the tens column) 1234.", ["1234"], None, True),
        # whole numbers compare exactly, however large
        ("number", "12345678900", ["12345678901"], None, False),
        # "no" as a determiner is not an answer; a hedge is no answer; "yes or no" is the question's echo
        ("yesno", "1117 is a prime number because it has no divisors other than 1 and itself.", ["yes"],
         "Is 1117 a prime number? Answer yes or no.", True),
        ("yesno", "384 ÷ 3 = 128 with no remainder, so yes.", ["yes"], "Is 384 divisible by 3? Answer yes or no.", True),
        ("yesno", "Yes and no.", ["yes"], "Is 15 a prime number? Answer yes or no.", False),
        ("yesno", "Yes or no: I am not sure.", ["yes"], "Is 15 a prime number? Answer yes or no.", False),
        ("yesno", "10 is not prime.", ["no"], "Is 10 a prime number? Answer yes or no.", True),
        ("yesno", "78,531 is not even.", ["no"], "Is 78,531 an even number? Answer yes or no.", True),
        ("yesno", "It is not a prime number.", ["no"], "Is 10 a prime number? Answer yes or no.", True),
        ("yesno", "Nope.", ["no"], "Is 10 a prime number? Answer yes or no.", True),
        # a greeting first, "it's", abbreviations; a list of alternatives is no answer
        ("text", "Sure! The capital of Australia is Canberra.", ["Canberra"], None, True),
        ("text", "It's Canberra.", ["Canberra"], None, True),
        ("text", "Mt. Everest is the highest mountain.", ["Mount Everest", "Mt. Everest"], None, True),
        ("text", "The city is St. Petersburg.", ["St. Petersburg"], None, True),
        ("text", "Canberra, Sydney or Moscow", ["Canberra"], None, False),
        ("text", "n-e-d-r-a-g", ["n e d r a g"], None, True),
        # ... and what the first version of those fixes got wrong (the review's cases): still read right
        ("number", "The answer is 8 because 8 × 7 = 56.", ["8"], "What is 56 ÷ 7?", True),
        ("number", "He has 5 apples and buys 3 more (total = 8).", ["8"], "Tom has 5 apples and buys 3 more.", True),
        ("number", "Total cost: 4 × 3 (= 12 dollars).", ["12"], "4 pens cost 3 dollars each. Total?", True),
        ("yesno", "Therefore no 15 is not a prime number", ["no"], "Is 15 a prime number? Answer yes or no.", True),
        ("yesno", "I think no because 15 = 3 × 5", ["no"], "Is 15 a prime number? Answer yes or no.", True),
        ("yesno", "1117 is prime because there is no divisor other than 1 and itself.", ["yes"],
         "Is 1117 a prime number? Answer yes or no.", True),
        ("yesno", "Yes and no other number divides it, so it is prime.", ["yes"],
         "Is 1117 a prime number? Answer yes or no.", True),
        ("text", "The capital of Australia is Canberra, not Sydney or Melbourne.", ["Canberra"], None, True),
        ("text", "Mary Shelley wrote Frankenstein, or The Modern Prometheus.", ["Mary Shelley"], None, True),
        ("text", "Everest, also known as Sagarmatha or Chomolungma.", ["Everest"], None, True),
    ],
)
def test_replies_found_by_the_scoring_audit(scorer, reply, answers, question, correct):
    assert score_text(scorer, answers, reply, question=question).correct is correct


JACK = ("Jack has 6 cookies. He buys 5 more and then gives 5 to a friend. How many cookies does Jack have now? "
        "Answer with just the number.")
BAKERY = ("A bakery makes 33 muffins in the morning and 36 in the afternoon. It sells 5 of them and packs the rest "
          "into boxes of 8. How many boxes does it fill? Answer with just the number.")
FEET = "4 feet is how many inches? Give just the number."
SADDLE = 'Which of these words comes first in alphabetical order: "saddle", "stone", "snake"? Answer with just the word.'
KNIFE = 'Which of these words comes first in alphabetical order: "knife", "pyramid", "stone"? Answer with just the word.'
AISHA = "Aisha has 10 dollars. She spends 5 dollars on a snack. How many dollars does she have left?"
INITIALS = ('Join the first letters of these words, in order, into one string: "night", "lemon", "squirrel", "igloo". '
            "Answer with just the letters.")


@pytest.mark.parametrize(
    "scorer, reply, answers, question, extracted",
    [
        # a reply restating the question is no answer, even where the answer is one of its numbers
        ("number", "I don't know how to compute 6 - 3.", ["3"], "What is 6 - 3? Answer with just the number.", None),
        ("number", "What is 6 - 3?", ["3"], "What is 6 - 3? Answer with just the number.", None),
        ("number", "64 / 8 = ?", ["8"], "64 / 8 = ? Give only the number.", None),
        ("number", "Jack has 6 cookies. He buys 5 more and then gives 5 to a friend.", ["6"], JACK, None),
        ("number", "The bakery packs the rest into boxes of 8.", ["8"], BAKERY, None),
        ("number", "-40 degrees Celsius is equal to ? degrees Fahrenheit.", ["-40"],
         "What is -40 degrees Celsius in degrees Fahrenheit? Answer with just the number.", None),
        # ... while an answer that happens to be one of them is still read
        ("number", "3", ["3"], "What is 6 - 3? Answer with just the number.", "3"),
        ("number", "The difference between 6 and 3 is 3.", ["3"], "What is 6 - 3? Answer with just the number.", "3"),
        ("number", "He has 6 cookies.", ["6"], JACK, "6"),
        ("number", "Jack has 6 cookies.", ["6"], JACK, "6"),  # the premise, copied, is also the answer here
        ("number", "Jack has 6 cookies. He buys 5 more and then gives 5 to a friend. So Jack has 6 cookies.", ["6"],
         JACK, "6"),
        ("number", "Jack has 6 cookies, since he bought 5 and gave 5 away.", ["6"], JACK, "6"),  # not its reason's 5
        ("number", "Omar has 11 stamps. He buys 4 more.", ["11"], JACK.replace("Jack", "Omar").replace("6 cookies",
         "11 stamps").replace("5", "4"), None),  # the question copied and cut short (review 34)
        ("number", "Aisha has 10 dollars. She spends 5 dollars.", ["5"], AISHA, None),
        ("number", "Aisha has 10 dollars. 5 are left.", ["5"], AISHA, "5"),
        ("number", "He gives away 5 because he bought 5, so he still has 6.", ["6"], JACK, "6"),
        ("number", "What is 6 - 3? It is 3.", ["3"], "What is 6 - 3? Answer with just the number.", "3"),
        ("number", "Compute 2 - 1.\n1", ["1"], "Compute 2 - 1. Answer with just the number.", "1"),
        ("number", "Aisha has 10 dollars and spends 5 dollars on a snack, so she has 5 dollars left.", ["5"],
         "Aisha has 10 dollars. She spends 5 dollars on a snack. How many dollars does she have left?", "5"),
        ("number", "It sells 5 of them and packs the rest into boxes of 8, so it fills 8 boxes.", ["8"], BAKERY, "8"),
        ("number", "The pattern alternates: 17, 25, 21, 29, 25, 33, so next is 29.", ["29"],
         "What number comes next: 17, 25, 21, 29, 25, 33, ?", "29"),
        ("number", "Jack has 6 cookies now.", ["6"], JACK, "6"),
        ("number", "It fills 8 boxes.", ["8"], BAKERY, "8"),
        ("number", "7 feet, that is 7 feet.", ["84"], "How many inches are in 7 feet?", "7"),
        # a reason after the answer does not replace it with its own equation
        ("number", "4 feet is 48 inches because 1 foot = 12 inches.", ["48"], FEET, "48"),
        ("number", "There are 48 inches in 4 feet, since 1 foot = 12 inches.", ["48"], FEET, "48"),
        ("number", "4 feet is 48 inches. This is because 1 foot = 12 inches.", ["48"], FEET, "48"),
        ("number", "Since 1 foot = 12 inches, 4 feet = 48 inches.", ["48"], FEET, "48"),
        ("number", "To convert 4 feet, since 1 foot = 12 inches, multiply: 4 × 12 = 48", ["48"], FEET, "48"),
        ("number", "Lena now has 13 stamps, since 6 + 10 = 16 and gave away 3.", ["13"],
         "Lena has 6 stamps. She buys 10 more and then gives 3 to a friend. How many stamps does Lena have now?", "13"),
        ("number", "She had 40, since she sold 12 she has 28 left.", ["28"], "She had 40 and sold 12. How many left?",
         "28"),
        # ... only the reason's own clause: the working after it still gives the answer (review 33)
        ("number", "Omar spends 24 dollars, since 3 × 8 = 24. His change is 50 - 24 = 26.", ["26"],
         "A notebook costs 8 dollars. Omar buys 3 notebooks and pays with a 50-dollar bill. How much change?", "26"),
        ("number", "3 notebooks cost 24 dollars (since 3 × 8 = 24), so the change is 50 - 24 = 26.", ["26"],
         "A notebook costs 8 dollars. Omar buys 3 notebooks and pays with a 50-dollar bill. How much change?", "26"),
        ("number", "First subtract 32: 221 - 32 = 189. Then multiply by 5/9, since C = (F - 32) × 5/9: 189 × 5/9 = 105.",
         ["105"], "What is 221 degrees Fahrenheit in degrees Celsius?", "105"),
        ("number", "43 + 93 is 136 because 40 + 90 = 130 and 3 + 3 = 6; then 136 - 99 = 37.", ["37"],
         "What is 43 + 93 - 99?", "37"),
        # a reason opening its sentence is the working; a check after the answer is not read (review 34)
        ("number", "The notebooks cost 3 × 8 = 24 dollars. Since 50 - 24 = 26, Omar gets 26 dollars in change.", ["26"],
         "A notebook costs 8 dollars. Omar buys 3 notebooks and pays with a 50-dollar bill. How much change?", "26"),
        ("number", "Step 1: 3 × 8 = 24 dollars spent.\nStep 2: Since 50 - 24 = 26, that is his change.", ["26"],
         "A notebook costs 8 dollars. Omar buys 3 notebooks and pays with a 50-dollar bill. How much change?", "26"),
        ("number", "Jack is 42 now since 32 + 10 = 42 so in 3 years he will be 42 + 3 = 45.", ["45"],
         "Ben is 32 years old and Jack is 10 years older. How old will Jack be in 3 years?", "45"),
        ("number", "4 feet is 48 inches. Because 1 foot = 12 inches.", ["48"], FEET, "48"),
        ("number", "They pay 54 dollars in total, since 3 adult tickets cost 3 × 14 = 42 dollars and 4 child tickets "
         "cost 4 × 3 = 12 dollars.", ["54"], "Adult tickets cost 14 dollars and child tickets 3. What do 3 adult and 4 "
         "child tickets cost?", "54"),
        ("number", "Omar gets 26 dollars back. Check: 26 + 24 = 50, and 3 × 8 = 24.", ["26"],
         "A notebook costs 8 dollars. Omar buys 3 notebooks and pays with a 50-dollar bill. How much change?", "26"),
        # the question's own arithmetic, worked to the end of its chain; a check after it is not the answer
        ("number", "1 + 6 = 7, and 7 - 1 = 6.", ["7"], "What is 1 + 6?", "7"),
        ("number", "1 + 6 = 7. Check: 7 - 6 = 1.", ["7"], "What is 1 + 6?", "7"),
        ("number", "16 + 12 × 12 = 12 × 12 = 160", ["160"], "What is 16 + 12 × 12?", "160"),
        ("number", "1 + 6 = 7\n7 × 2 = 14", ["7"], "What is 1 + 6?", "7"),
        ("number", "2 + 7 = 9, 9 - 7 = 2", ["9"], "What is 2 + 7?", "9"),
        # ... nor an aside, a verification or a note; a correction is
        ("number", "19 + 12 × 8 = 115 (12 × 8 = 96, then 19 + 96 = 115)", ["115"], "What is 19 + 12 × 8?", "115"),
        ("number", "43 + 93 - 99 = 37. To verify: 37 + 99 = 136, and 136 - 93 = 43.", ["37"], "What is 43 + 93 - 99?",
         "37"),
        ("number", "19 + 12 * 8 = 115. Note that 12 * 8 = 96 is done first.", ["115"], "What is 19 + 12 * 8?", "115"),
        ("number", "19 + 12 * 8 = 248. Oops, multiplication comes first: 12 * 8 = 96, and 19 + 96 = 115.", ["115"],
         "What is 19 + 12 * 8?", "115"),
        ("number", "2 + 7 = 9. Let me recheck: 9 - 7 = 2.", ["9"], "What is 2 + 7?", "9"),  # a check, not a correction
        ("number", "43 + 93 - 99 = 37. To see that this is actually right: 37 + 99 = 136.", ["37"],
         "What is 43 + 93 - 99?", "37"),
        ("number", "10 + 6 × 7 = 10 + 18 + 7 = 21\n\nThe answer is correct.", ["52"], "What is 10 + 6 × 7?", "21"),
        # a list of the question's words names no one of them; spelt letters are read whole
        ("text", '"saddle", "stone", "snake"', ["saddle"], SADDLE, None),
        ("text", 'The words are "saddle", "stone", "snake".', ["saddle"], SADDLE, None),
        ("text", "In alphabetical order: saddle, snake, stone.", ["saddle"], SADDLE, "saddle"),  # sorted: its own
        ("text", "saddle, stone, snake. Saddle is first.", ["saddle"], SADDLE, "Saddle"),  # the echo is skipped
        # where the question lists its words sorted already, a list said to be sorted still gives its first
        ("text", "In alphabetical order: knife, pyramid, stone.", ["knife"], KNIFE, "knife"),
        ("text", "knife, pyramid, stone", ["knife"], KNIFE, None),
        ("text", KNIFE.split("?")[0], ["knife"], KNIFE, None),  # the question copied without its "?"
        ("text", "Castle comes after cloud.", ["castle"], SADDLE, "Castle comes after cloud"),  # "comes" is no copula
        ("text", "The words in order are night, lemon, squirrel, igloo. So the letters are n, l, s, i: nlsi.", ["nlsi"],
         INITIALS, "nlsi"),
        ("text", "night, lemon, igloo", ["nlsi"], INITIALS, None),
        ("text", 'The word that comes first is "saddle".', ["saddle"], SADDLE, "saddle"),
        ("text", "The letters are N, L, S, I.", ["nlsi"], INITIALS, "N, L, S, I"),
        ("text", "Paris, France", ["Paris"], "What is the capital of France?", "Paris"),
        ("text", r"The final answer is $\boxed{\text{Paris}}$.", ["Paris"], None, "Paris"),
        # a yes/no claim restated about an expression, or a number written with its commas
        ("yesno", "9 * 11 is equal to 99.", ["yes"], "Is 9 * 11 equal to 99? Answer yes or no.", "yes"),
        ("yesno", "It is equal to 99.", ["yes"], "Is 9 * 11 equal to 99? Answer yes or no.", "yes"),
        ("yesno", "362 + 221 is not greater than 606.", ["no"], "Is 362 + 221 greater than 606? Answer yes or no.",
         "no"),
        ("yesno", "4552 is an even number.", ["yes"], "Is 4,552 an even number? Answer yes or no.", "yes"),
        ("yesno", "It is not divisible.", ["no"], "Is 151 divisible by 6? Answer yes or no.", None),
        ("yesno", "9 * 11 is equal to 99?", ["yes"], "Is 9 * 11 equal to 99? Answer yes or no.", None),  # asked back
        ("yesno", "9 * 11 is equal to 99? It is equal to 99.", ["yes"], "Is 9 * 11 equal to 99? Answer yes or no.",
         "yes"),
    ],
)
def test_replies_found_by_the_second_scoring_audit(scorer, reply, answers, question, extracted):
    s = score_text(scorer, answers, reply, question=question)
    assert s.extracted == extracted
    if extracted is None:
        assert not s.correct and s.parse_error
    else:  # right exactly when what was read, given alone, is
        assert s.correct is score_text(scorer, answers, extracted).correct


OMAR = "A notebook costs 8 dollars. Omar buys 3 notebooks and pays with a 50-dollar bill. How much change?"
BEN = "Ben is 32 years old and Jack is 10 years older. How old will Jack be in 3 years?"
LENA = "Lena has 6 stamps. She buys 10 more and then gives 3 to a friend. How many stamps does Lena have now?"
SUM = "What is 19 + 12 × 8?"
SUM_ASCII = "What is 19 + 12 * 8?"
SUMS = "What is 43 + 93 - 99?"


@pytest.mark.parametrize(
    "reply, question, extracted",
    [
        # a. a reason joined by "and" to the working after it is only the reason
        ("Jack is 42 now since 32 + 10 = 42 and in 3 years he will be 42 + 3 = 45.", BEN, "45"),
        ("Jack is 42 since 32 + 10 = 42 and 42 + 3 = 45.", BEN, "45"),
        ("Omar spends 24 dollars since 3 × 8 = 24, and since 50 - 24 = 26 he gets 26 dollars back.", OMAR, "26"),
        ("He spent 24 dollars, so he gets money back since 50 - 24 = 26.", OMAR, "26"),
        # b. a wrong result worked out again, with or without a word of correction
        ("19 + 12 × 8 = 248. Hmm, multiplication comes first: 12 × 8 = 96, then 19 + 96 = 115.", SUM, "115"),
        ("19 + 12 × 8 = 248. Let me re-evaluate: 12 × 8 = 96, and 19 + 96 = 115.", SUM, "115"),
        ("19 + 12 × 8 = 248\nLet me re-evaluate.\n12 × 8 = 96\n19 + 96 = 115", SUM, "115"),
        ("19 + 12 × 8 = 248. No wait, 12 × 8 = 96, so 19 + 96 = 115.", SUM, "115"),
        ("19 + 12 × 8 = 248 - no wait, 12 × 8 = 96, so 19 + 96 = 115.", SUM, "115"),
        ("19 + 12 × 8 = 248. Hmm, 12 × 8 = 96 and 19 + 96 = 115.", SUM, "115"),
        ("19 + 12 × 8 = 248. However, multiplication comes before addition: 12 × 8 = 96, and 19 + 96 = 115.", SUM,
         "115"),
        ("43 + 93 - 99 = 100. 43 + 93 = 136, 136 - 99 = 37", SUMS, "37"),
        # d. the question copied in a loop answers nothing, as copied once
        ("Aisha has 10 dollars. She spends 5. She spends 5.", AISHA, None),
        ("Aisha has 10 dollars. She spends 5 dollars. She spends 5 dollars. She spends 5 dollars.", AISHA, None),
        # e. a reason told in words runs on past "then"
        ("Jack has 6 cookies, since he bought 5 and then gave 5 away.", JACK, "6"),
        # f. a "check" that works on from the answer to a new number is working
        ("3 × 8 = 24. Check: 50 - 24 = 26, so the change is 26.", OMAR, "26"),
        # g. and what must not change: a reason working the answer back to the question
        ("9, because 9 × 9 = 81.", "What is the square root of 81?", "9"),
        ("9 because 9 × 9 = 81", "What is the square root of 81?", "9"),
        ("26, because 50 - 24 = 26.", OMAR, "26"),
        ("The answer is 8 because 8 × 7 = 56.", "What is 56 ÷ 7?", "8"),
        # ... checks and notes after the question's own arithmetic
        ("1 + 6 = 7, and 7 - 1 = 6.", "What is 1 + 6?", "7"),
        ("1 + 6 = 7. Check: 7 - 6 = 1.", "What is 1 + 6?", "7"),
        ("1 + 6 = 7\n7 × 2 = 14", "What is 1 + 6?", "7"),
        ("2 + 7 = 9, 9 - 7 = 2", "What is 2 + 7?", "9"),
        ("2 + 7 = 9. Let me recheck: 9 - 7 = 2.", "What is 2 + 7?", "9"),
        ("6 × 7 = 42. Then 42 / 6 = 7.", "What is 6 × 7?", "42"),
        ("43 + 93 - 99 = 37. To verify: 37 + 99 = 136, and 136 - 93 = 43.", SUMS, "37"),
        ("43 + 93 - 99 = 37. Also 43 + 93 = 136, 136 - 99 = 37", SUMS, "37"),
        ("19 + 12 * 8 = 115. Note that 12 * 8 = 96 is done first.", SUM_ASCII, "115"),
        ("19 + 12 × 8 = 115. First 12 × 8 = 96, then 19 + 96 = 115.", SUM, "115"),
        ("19 + 12 × 8 = 115 (12 × 8 = 96, then 19 + 96 = 115)", SUM, "115"),
        ("19 + 12 * 8 = 248. Oops: 12 * 8 = 96, and 19 + 96 = 115.", SUM_ASCII, "115"),
        ("19 + 12 × 8 = 248. Hmm, let me check: 248 - 19 = 229.", SUM, "248"),  # checked, not worked out again
        # a "wait" that only checks the answer back to the question's numbers is no correction (it read 2)...
        ("2 + 7 = 9. Wait, 9 - 7 = 2, so it is 9.", "What is 2 + 7?", "9"),
        ("2 + 7 = 9. Wait, 9 - 7 = 2 and 9 - 2 = 7. Yes.", "What is 2 + 7?", "9"),
        # ... one that works the sum out again, or on to a new number, does correct it
        ("2 + 7 = 8. Wait, 2 + 7 = 9.", "What is 2 + 7?", "9"),
        ("14 - 7 = 6. Wait, 14 - 7 = 7.", "What is 14 - 7?", "7"),
        ("2 + 7 = 9. Wait, 9 + 7 = 16.", "What is 2 + 7?", "16"),
        ("3 × 8 + 1 = 25. Likewise 4 × 8 = 32, and 32 + 1 = 33.", "What is 3 × 8 + 1?", "25"),  # another sum
        # ... reasons after an answer, and working that opens with one
        ("Omar spends 24 dollars, since 3 × 8 = 24. His change is 50 - 24 = 26.", OMAR, "26"),
        ("Omar gets 26 dollars back. Check: 26 + 24 = 50, and 3 × 8 = 24.", OMAR, "26"),
        ("He gets 26 dollars back, since he spent 24 and 50 - 24 = 26.", OMAR, "26"),
        ("Since 50 - 24 = 26, he gets 26 back.", OMAR, "26"),
        ("3 × 8 = 24, and 50 - 24 = 26.", OMAR, "26"),
        ("4 feet is 48 inches because 1 foot = 12 inches.", FEET, "48"),
        ("4 feet is 48 inches. This is because 1 foot = 12 inches.", FEET, "48"),
        ("48 inches, because there are 12 inches in a foot and 4 × 12 = 48.", FEET, "48"),
        ("Lena now has 13 stamps, since 6 + 10 = 16 and gave away 3.", LENA, "13"),
        ("13 stamps, since 6 + 10 = 16 and gave away 3", LENA, "13"),
        ("13 since she had 6 and 6 + 10 = 16 and 16 - 3 = 13", LENA, "13"),
        ("Jack is 42 now since 32 + 10 = 42 so in 3 years he will be 42 + 3 = 45.", BEN, "45"),
        ("43 + 93 is 136 because 40 + 90 = 130 and 3 + 3 = 6; then 136 - 99 = 37.", SUMS, "37"),
        ("They pay 54 dollars in total, since 3 adult tickets cost 3 × 14 = 42 dollars and 4 child tickets cost "
         "4 × 3 = 12 dollars.", "Adult tickets cost 14 dollars and child tickets 3. What do 3 adult and 4 child "
         "tickets cost?", "54"),
        # ... and copies of the question
        ("Jack has 6 cookies, since he bought 5 and gave 5 away.", JACK, "6"),
        ("He gives away 5 because he bought 5, so he still has 6.", JACK, "6"),
        ("Aisha has 10 dollars. She spends 5 dollars.", AISHA, None),
        ("Aisha has 10 dollars. 5 are left.", AISHA, "5"),
        ("Jack has 6 cookies. Jack has 6 cookies.", JACK, "6"),
        ("Jack has 6 cookies. He buys 5 more and then gives 5 to a friend. So Jack has 6 cookies.", JACK, "6"),
        # ... the copy answered by its first sentence said again (the answer is the premise), not a loop
        ("Jack has 6 cookies. He buys 5 more and then gives 5 to a friend. Jack has 6 cookies.", JACK, "6"),
        ("Jack has 6 cookies.\nHe buys 5 more and then gives 5 to a friend.\nJack has 6 cookies.", JACK, "6"),
        ("Jack has 6 cookies. He buys 5 more and then gives 5 to a friend. Jack has 6 cookies. He buys 5 more and then "
         "gives 5 to a friend.", JACK, None),
    ],
)
def test_replies_found_by_review_36(reply, question, extracted):
    s = score_text("number", [extracted or "0"], reply, question=question)
    assert s.extracted == extracted
    assert s.correct is (extracted is not None) and (s.parse_error is None) is (extracted is not None)


@pytest.mark.parametrize(
    "reply, question, right, stated",
    [
        # a check of other numbers that lands on another one says the answer given is wrong: it is not the answer
        ("Omar gets 25 dollars back. Check: 50 - 24 = 26.", OMAR, "26", "25"),
        ("Omar gets 25 dollars back. Check: 3 × 8 = 24, 50 - 24 = 26.", OMAR, "26", "25"),
    ],
)
def test_a_wrong_answer_is_not_read_from_the_working_that_contradicts_it(reply, question, right, stated):
    s = score_text("number", [right], reply, question=question)
    assert s.extracted == stated and not s.correct



@pytest.mark.parametrize(
    "reply, question, extracted",
    [
        # a short first sentence with a number of its own is a step when the working goes on from it
        ("Omar spends 24 dollars. So 50 - 24 = 26.", OMAR, "26"),
        ("Omar spends 24 dollars. Check: 50 - 24 = 26.", OMAR, "26"),
        ("24 dollars spent. Check: 50 - 24 = 26.", OMAR, "26"),
        # ... and the answer when the working after it checks it: lands on it or on the question's numbers
        ("26 dollars. Check: 26 + 24 = 50.", OMAR, "26"),
        ("26. Check: 50 - 26 = 24, 24 / 3 = 8.", OMAR, "26"),
        ("26 dollars. Because 50 - 24 = 26.", OMAR, "26"),
    ],
)
def test_a_first_number_the_working_goes_on_from_is_a_step(reply, question, extracted):
    assert score_text("number", ["26"], reply, question=question).extracted == extracted

LAST = SADDLE.replace("first", "last")


@pytest.mark.parametrize(
    "reply, question, answer, extracted",
    [
        # c. the word said to come first (or last, where that is asked)
        ("Saddle comes first.", SADDLE, "saddle", "Saddle"),
        ("**Saddle** comes first alphabetically.", SADDLE, "saddle", "Saddle"),
        ("The word saddle comes first.", SADDLE, "saddle", "saddle"),
        ("Stone comes last, saddle comes first.", SADDLE, "saddle", "saddle"),
        ("Saddle comes first, stone comes last.", LAST, "stone", "stone"),
        ('"Stone" would come last.', LAST, "stone", "Stone"),
        # ... and not a pronoun, nor a word placed after another
        ("Snake comes first.", SADDLE, "saddle", "Snake"),
        ("It comes first.", SADDLE, "saddle", "It comes first"),
        ("Castle comes after cloud.", SADDLE, "castle", "Castle comes after cloud"),
    ],
)
def test_the_word_said_to_come_first_is_read(reply, question, answer, extracted):
    s = score_text("text", [answer], reply, question=question)
    assert s.extracted == extracted and s.correct is (extracted.lower() == answer)


@pytest.mark.parametrize("reply", ["1 plus " * 20000, "minus " * 20000, "2 times 3 " * 12000, "1 + " * 30000,
                                   "= " * 60000, "1," * 60000, "Jack has 6 cookies. " * 6000, "1 + 6 = 7 (" * 12000,
                                   # many reasons, or quotes, before one long equation or word
                                   "9 because " * 5000 + "1 + " * 20000 + "1 = 5", "a" + "'" * 50000 + " x",
                                   "Aisha has 10 dollars. " + "She spends 5. " * 8000,
                                   "19 + 12 × 8 = 248. " + "12 × 8 = 96, then 19 + 96 = 115. " * 3000])
def test_long_replies_are_scored_in_linear_time(reply):
    # a model stuck in a loop writes replies like these; searching back from every "=" or operation word took
    # 33 s on 120 KB of "minus " (review 33). The bound is a hang guard, far above the ~0.1 s this takes.
    start = time.perf_counter()
    for scorer, question in (("number", JACK), ("number", "What is 1 + 6?"), ("text", SADDLE)):
        score_text(scorer, ["6"], reply, question=question)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("reply", ["\\boxed{no}", "I'd say **no**.", "Therefore `no`", 'Therefore: "no"', "_no_",
                                   "It is \u201cno\u201d."])
def test_a_styled_no_is_read_as_a_styled_yes_is(reply):
    # markdown, LaTeX and quotes after "no" made it a determiner: a model that bolds its answer lost every "no"
    assert score_text("yesno", ["no"], reply, question="Is 91 a prime number? Answer yes or no.").extracted == "no"
    assert score_text("yesno", ["yes"], reply.replace("no", "yes")).extracted == "yes"


def test_a_unit_written_in_capitals_ends_its_sentence():
    # "15°C. To convert, subtract 32 ..." read 32: no sentence ended after a capital
    question = "What is 59 degrees Fahrenheit in degrees Celsius? Answer with just the number."
    assert score_text("number", ["15"], "15°C. To convert, subtract 32 and multiply by 5/9.", question=question).correct
    assert score_text("text", ["J. K. Rowling"], "**J. K. Rowling**").correct  # initials end nothing


@pytest.mark.parametrize(
    ("answer", "reply", "correct"),
    [
        # QA: the float-echo tolerance had a floor of 1 and no cap for whole answers
        ("5000000000", "5000000004.9", False),
        ("1000000000", "1000000000.5", False),
        ("0.000000001", "0", False),
        ("0.0000000005", "0.0000000015", False),
        # what it is for stays forgiven
        ("0.3", "0.30000000000000004", True),
        ("42", "41.99999999999999", True),
        ("3.3", "3.3000000000000003", True),
    ],
)
def test_only_a_float_echo_is_forgiven(answer, reply, correct):
    assert score_text("number", [answer], reply).correct is correct


@pytest.mark.parametrize(
    ("reply", "extracted"),
    [
        # QA: a number written in words lost its sign word ("minus seven" scored right for 7)
        ("minus seven", "-7"),
        ("negative twelve", "-12"),
        ("The temperature is minus three degrees.", "-3"),
        ("minus one hundred", "-100"),
        # after a number, minus is the operation
        ("seven minus three is four", "4"),
        ("Seven minus three equals four.", "4"),
    ],
)
def test_a_sign_word_before_a_number_word_is_read(reply, extracted):
    assert score_text("number", [extracted], reply).extracted == extracted
