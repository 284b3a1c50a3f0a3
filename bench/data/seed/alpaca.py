"""Alpaca-style rows (``instruction``, ``input``, ``output``) for ``bench/seed_finetunes.py``.

Ten kinds of small task whose answer can be computed (unit conversion, sorting, sentiment of
a templated review, capitals, sums, plurals, word counts, opposites, past tense, the largest
number), each with a few phrasings of the instruction. The answers are in one terse house
style: a single sentence in a fixed pattern per kind ("The capital of Peru is Lima.",
"17 + 25 = 42."), where a chat model on its own tends to write a paragraph.

    python bench/data/seed/alpaca.py          # print a few rows
"""

from __future__ import annotations

import random
from collections.abc import Callable

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa",
    "Norway": "Oslo", "Egypt": "Cairo", "Chile": "Santiago", "Poland": "Warsaw",
    "Portugal": "Lisbon", "Thailand": "Bangkok", "Greece": "Athens", "Ireland": "Dublin",
    "Austria": "Vienna", "Cuba": "Havana", "Sweden": "Stockholm", "Hungary": "Budapest",
    "Finland": "Helsinki", "Vietnam": "Hanoi", "Argentina": "Buenos Aires",
    "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Mexico": "Mexico City",
    "Ghana": "Accra", "Denmark": "Copenhagen", "Belgium": "Brussels", "Turkey": "Ankara",
    "Colombia": "Bogota", "Iran": "Tehran", "Russia": "Moscow", "China": "Beijing",
    "India": "New Delhi", "Australia": "Canberra", "Brazil": "Brasilia",
    "South Korea": "Seoul", "Morocco": "Rabat", "Nepal": "Kathmandu", "Iceland": "Reykjavik",
    "Czechia": "Prague",
}  # fmt: skip
PLURALS = {
    "child": "children", "mouse": "mice", "box": "boxes", "city": "cities", "knife": "knives",
    "tooth": "teeth", "bus": "buses", "leaf": "leaves", "woman": "women", "baby": "babies",
    "goose": "geese", "church": "churches", "wolf": "wolves", "story": "stories",
    "foot": "feet", "potato": "potatoes", "person": "people", "glass": "glasses",
    "party": "parties", "shelf": "shelves", "hero": "heroes", "brush": "brushes",
    "ox": "oxen", "lady": "ladies", "wish": "wishes", "half": "halves", "fox": "foxes",
    "berry": "berries", "class": "classes", "life": "lives", "key": "keys", "day": "days",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "early": "late", "happy": "sad", "fast": "slow", "open": "closed",
    "light": "dark", "heavy": "light", "rich": "poor", "empty": "full", "strong": "weak",
    "loud": "quiet", "wet": "dry", "young": "old", "cheap": "expensive", "high": "low",
    "thick": "thin", "soft": "hard", "clean": "dirty", "true": "false", "win": "lose",
    "buy": "sell", "push": "pull", "begin": "end", "above": "below", "inside": "outside",
    "arrive": "leave", "remember": "forget", "accept": "refuse", "wide": "narrow",
    "safe": "dangerous",
}  # fmt: skip


def _words(text: str) -> list[str]:
    return text.split()


WORDS = _words(
    "apple river candle zebra mango pencil orange violin garden tiger lemon rocket island "
    "banana forest window planet marble coffee dragon silver butter kettle jacket ladder "
    "mirror needle rabbit saddle tunnel velvet walnut yogurt anchor basket cactus feather"
)
NAMES = _words("Anna Ben Clara David Elena Farid Greta Hiro Ines Jonas Kemi Leo Mira Nils Olga")
PLACES = _words("park market station library office beach museum school bakery harbour")
# (present, past)
VERBS = [tuple(v.split("/")) for v in _words(
    "walks/walked cycles/cycled drives/drove hurries/hurried strolls/strolled runs/ran "
    "travels/travelled jogs/jogged marches/marched wanders/wandered races/raced goes/went"
)]  # fmt: skip
PRODUCTS = _words("blender headphones backpack kettle lamp umbrella desk toaster tent radio")
GOOD = ("works perfectly", "is excellent value", "arrived quickly and looks great",
        "exceeded my expectations", "is sturdy and easy to use")  # fmt: skip
BAD = ("broke after two days", "is a waste of money", "arrived damaged and late",
       "stopped working within a week", "is flimsy and hard to use")  # fmt: skip


def km(rng: random.Random) -> dict[str, str]:
    x = rng.randint(2, 400)
    ask = rng.choice(
        [
            "Convert {x} kilometres to miles.",
            "How many miles is {x} km?",
            "Express {x} km in miles.",
        ]
    )
    return {"instruction": ask.format(x=x), "input": "",
            "output": f"{x} kilometres is about {x * 0.621371:.1f} miles."}  # fmt: skip


def sort_words(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    ask = rng.choice(["Sort these words alphabetically.", "Put the words in alphabetical order."])
    return {"instruction": ask, "input": ", ".join(words), "output": ", ".join(sorted(words)) + "."}


def sentiment(rng: random.Random) -> dict[str, str]:
    product = rng.choice(PRODUCTS)
    good = rng.random() < 0.5
    review = f"This {product} {rng.choice(GOOD if good else BAD)}."
    if rng.random() < 0.5:
        review += rng.choice([" I would buy it again.", " Five stars."] if good else
                             [" I want a refund.", " One star."])  # fmt: skip
    ask = rng.choice(
        ["Classify the sentiment of this review as positive or negative.",
         "Is this review positive or negative?"]
    )  # fmt: skip
    label = "Positive" if good else "Negative"
    return {"instruction": ask, "input": review, "output": f"{label}."}


def capital(rng: random.Random) -> dict[str, str]:
    country = rng.choice(sorted(CAPITALS))
    ask = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}."])
    return {"instruction": ask.format(c=country), "input": "",
            "output": f"The capital of {country} is {CAPITALS[country]}."}  # fmt: skip


def add(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    ask = rng.choice(["Add these two numbers.", "What is the sum of these numbers?"])
    return {"instruction": ask, "input": f"{a} and {b}", "output": f"{a} + {b} = {a + b}."}


def plural(rng: random.Random) -> dict[str, str]:
    noun = rng.choice(sorted(PLURALS))
    ask = rng.choice(["Give the plural of this noun.", "What is the plural form of the word?"])
    return {"instruction": ask, "input": noun,
            "output": f'The plural of "{noun}" is "{PLURALS[noun]}".'}  # fmt: skip


def count_words(rng: random.Random) -> dict[str, str]:
    sentence = " ".join(rng.sample(WORDS, rng.randint(3, 9))).capitalize() + "."
    n = len(sentence.split())
    ask = rng.choice(["How many words are in this sentence?", "Count the words in the sentence."])
    return {"instruction": ask, "input": sentence, "output": f"The sentence has {n} words."}


def opposite(rng: random.Random) -> dict[str, str]:
    word = rng.choice(sorted(OPPOSITES))
    ask = rng.choice(['What is the opposite of "{w}"?', 'Give an antonym for the word "{w}".'])
    return {"instruction": ask.format(w=word), "input": "",
            "output": f'The opposite of "{word}" is "{OPPOSITES[word]}".'}  # fmt: skip


def past_tense(rng: random.Random) -> dict[str, str]:
    name, (verb, past), place = rng.choice(NAMES), rng.choice(VERBS), rng.choice(PLACES)
    day = rng.choice(["every morning", "on Sundays", "after work", "with a friend"])
    return {"instruction": "Rewrite the sentence in the past tense.",
            "input": f"{name} {verb} to the {place} {day}.",
            "output": f"{name} {past} to the {place} {day}."}  # fmt: skip


def largest(rng: random.Random) -> dict[str, str]:
    nums = rng.sample(range(1, 1000), rng.randint(3, 7))
    ask = rng.choice(["Which number is the largest?", "Find the largest number in the list."])
    return {"instruction": ask, "input": ", ".join(map(str, nums)),
            "output": f"The largest number is {max(nums)}."}  # fmt: skip


KINDS: tuple[Callable[[random.Random], dict[str, str]], ...] = (
    km, sort_words, sentiment, capital, add, plural, count_words, opposite, past_tense, largest,
)  # fmt: skip


def rows(n: int, seed: int, exclude: set[tuple[str, str]] = frozenset()) -> list[dict[str, str]]:
    """``n`` distinct rows, the kinds in turn, none whose (instruction, input) is in
    ``exclude``."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    seen = set(exclude)
    while len(out) < n:
        row = KINDS[len(out) % len(KINDS)](rng)
        key = (row["instruction"], row["input"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def splits(train: int, held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows; no (instruction, input) is in both."""
    train_rows = rows(train, seed)
    held = rows(held_out, seed + 1000, {(r["instruction"], r["input"]) for r in train_rows})
    return train_rows, held


if __name__ == "__main__":
    for row in rows(10, 0):
        print(row)
