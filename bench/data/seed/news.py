"""Made-up news articles and their highlights, in cnn_dailymail's schema (``article``,
``highlights``), for ``bench/seed_finetunes.py``.

Every article is invented from templates: eight kinds of local story (a council scheme, a
football match, a company's results, a storm, a rescue, a study, a rail closure, a
festival), each sentence drawn from a few phrasings, with names, towns, numbers and the order
of the background sentences drawn from a seeded generator. Articles run to about 90-150
words. The highlights follow one house style, unlike a chat model's own summaries: exactly
three short lines, a headline in news shorthand ("£12m", "3-1", no leading article), then the
key figure, then who said what or what comes next.

    python bench/data/seed/news.py            # print two examples
"""

from __future__ import annotations

import random
from collections.abc import Callable


def _words(text: str) -> list[str]:
    return text.split()


FIRST = _words(
    "Ana Ruiz Tom Baker Priya Shah Owen Price Maria Costa James Okafor Chloe Martin Ravi Nair "
    "Ellen Ford Samuel Adeyemi Lucy Grant Marek Nowak Hannah Cole Daniel Reyes Aisha Khan "
    "Peter Walsh Nina Berg Colin Hughes Fatima Begum Oliver Stone Grace Liu Kwame Mensah "
    "Rosa Silva Ian Murray Sofia Rossi Liam Byrne Zara Ahmed Victor Lindqvist Megan Lloyd "
    "Hugo Lambert"
)
NAMES = [f"{FIRST[i]} {FIRST[i + 1]}" for i in range(0, len(FIRST), 2)]
TOWNS = _words(
    "Riverton Ashby Carrow Dunmore Elmbridge Farleigh Glenhaven Holmwood Ivybridge Kestrel Bay "
    "Larkfield Millbrook Northwick Oakhurst Penmarsh Queensford Redcliffe Stanmoor Thornbury "
    "Upwell Westbrook Yarrow"
)
TOWNS = [t for t in TOWNS if t not in ("Kestrel", "Bay")] + ["Kestrel Bay", "Port Alder"]
DAYS = _words("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")
MONTHS = _words("January February March April May June July August September October November")
NUMBER_WORDS = _words("two three four five six seven eight nine ten eleven twelve")
ORDINALS = _words("second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth")


class _Story:
    """One article: its sentences (a fixed lead, shuffled middle) and its three highlights."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, *options: str) -> str:
        return self.rng.choice(options)

    def name(self) -> str:
        return self.rng.choice(NAMES)

    def build(self, lead: list[str], middle: list[str], tail: list[str], highlights: list[str]):
        # One or two sentences of local colour, with names and numbers that are not news.
        middle += self.rng.sample(_colour(self), self.rng.randint(1, 2))
        self.rng.shuffle(middle)
        article = " ".join([*lead, *middle, *tail])
        return {"article": article, "highlights": "\n".join(highlights)}


def _colour(s: _Story) -> list[str]:
    town = s.rng.choice(TOWNS)
    return [
        f"{s.name()}, who has lived in the area for {s.rng.randint(5, 60)} years, said the news "
        "had been the talk of the town.",
        f"The population of the area has grown by about {s.rng.randint(3, 25)}% in the last "
        "ten years.",
        "A spokesperson for the local MP said she was following the matter closely.",
        f"Neighbouring {town} faced a similar situation {s.rng.choice(NUMBER_WORDS)} years ago.",
        "The story was widely shared on local social media groups.",
        f"Local newspaper editor {s.name()} said readers had written in to share their views.",
        f"Figures from the county council show {s.rng.randint(100, 990)} similar cases in the "
        "region last year.",
        "The weather was dry and mild for the time of year.",
        f"A public meeting about it is planned at the community centre on {s.rng.choice(DAYS)}.",
    ]


def council(s: _Story) -> dict[str, str]:
    town = s.rng.choice(TOWNS)
    project, short = s.rng.choice(
        [
            ("a new footbridge over the river", "footbridge"),
            ("a new public library", "library"),
            ("a skate park on the old gasworks site", "skate park"),
            ("a cycle lane along the high street", "cycle lane"),
            ("a new swimming pool", "swimming pool"),
            ("a covered market hall", "market hall"),
            ("a bus station", "bus station"),
        ]
    )
    cost = s.rng.randint(2, 40)
    yes = s.rng.randint(6, 14)
    no = s.rng.randint(1, yes - 1)
    hours = s.rng.randint(2, 5)
    leader = s.name()
    resident = s.name()
    month = s.rng.choice(MONTHS)
    lead = [
        s.pick(
            f"Councillors in {town} have approved plans for {project} costing £{cost} million.",
            f"{town} council voted on {s.rng.choice(DAYS)} to go ahead with {project}, at a "
            f"cost of £{cost} million.",
        )
    ]
    middle = [
        s.pick(
            f"The scheme passed by {yes} votes to {no} after a debate lasting {hours} hours.",
            f"After {hours} hours of debate, {yes} councillors voted in favour and {no} against.",
        ),
        s.pick(
            f"Opponents said the money would be better spent on repairing roads, and some "
            f"residents raised concerns about {s.pick('parking', 'noise', 'the loss of trees')}.",
            f"Local resident {resident} said the plans had been rushed and that the town could "
            "not afford them.",
        ),
        s.pick(
            f"\u201cThis is a good day for {town},\u201d said council leader {leader}. "
            "\u201cPeople have waited a long time for this.\u201d",
            f"Council leader {leader} said the project would bring visitors and jobs to the town "
            "centre.",
        ),
        s.pick(
            f"An earlier plan was dropped in {s.rng.randint(2009, 2019)} when costs rose.",
            "The designs will be shown at a public exhibition in the town hall next week.",
        ),
    ]
    tail = [
        f"Work is expected to begin in {month} and to take about "
        f"{s.rng.choice(NUMBER_WORDS)} months."
    ]
    highlights = [
        f"{town} council approves £{cost}m {short}.",
        f"Scheme passed {yes}-{no} after {hours}-hour debate.",
        f"Work to start in {month}, says council leader {leader}.",
    ]
    return s.build(lead, middle, tail, highlights)


def football(s: _Story) -> dict[str, str]:
    home, away = s.rng.sample(TOWNS, 2)
    club = s.pick("United", "Rovers", "Athletic", "City", "Town", "Wanderers")
    other = s.pick("Albion", "Rangers", "FC", "Harriers", "Villa")
    a = s.rng.randint(1, 5)
    b = s.rng.randint(0, a - 1)
    scorer = s.name()
    manager = s.name()
    crowd = s.rng.randint(2, 19) * 1000 + s.rng.randint(0, 9) * 100
    minute = s.rng.randint(60, 89)
    lead = [
        s.pick(
            f"{home} {club} beat {away} {other} {a}-{b} on {s.rng.choice(DAYS)} in front of a "
            f"crowd of {crowd:,}.",
            f"A crowd of {crowd:,} watched {home} {club} defeat {away} {other} by {a} goals to "
            f"{b}.",
        )
    ]
    middle = [
        s.pick(
            f"{scorer} scored the decisive goal after {minute} minutes.",
            f"The winner came from {scorer}, who found the net after {minute} minutes.",
        ),
        s.pick(
            f"{away} {other} had the better of the first half but could not break through.",
            "Both sides missed chances before the break on a heavy pitch.",
        ),
        s.pick(
            f"\u201cThe players showed real character,\u201d said manager {manager}.",
            f"Manager {manager} praised the fans and said the team was growing in confidence.",
        ),
        s.pick(
            f"The result lifts {home} {club} to {s.rng.choice(ORDINALS)} place in the league.",
            f"It was their {s.rng.choice(ORDINALS)} win of the season.",
        ),
    ]
    tail = [f"{home} {club} play away at {s.rng.choice(TOWNS)} next {s.rng.choice(DAYS)}."]
    highlights = [
        f"{home} {club} beat {away} {other} {a}-{b}.",
        f"{scorer} scores winner after {minute} minutes.",
        f"Crowd of {crowd:,} sees win, manager {manager} praises players.",
    ]
    return s.build(lead, middle, tail, highlights)


def results(s: _Story) -> dict[str, str]:
    town = s.rng.choice(TOWNS)
    company = s.pick("Brightwell", "Norcastle", "Halden", "Merrow", "Tidewater", "Copperline")
    kind = s.pick("Foods", "Engineering", "Logistics", "Textiles", "Software", "Brewing")
    up = s.rng.random() < 0.6
    pct = s.rng.randint(3, 45)
    profit = s.rng.randint(4, 90)
    boss = s.name()
    jobs = s.rng.randint(2, 30) * 10
    verb, short = ("rose", "up") if up else ("fell", "down")
    lead = [
        s.pick(
            f"{company} {kind}, the {town} firm, said on {s.rng.choice(DAYS)} that its profit "
            f"{verb} by {pct}% to £{profit} million last year.",
            f"Profit at {town}-based {company} {kind} {verb} {pct}% to £{profit} million, the "
            "company said.",
        )
    ]
    middle = [
        s.pick(
            f"Chief executive {boss} said demand had been "
            + ("stronger than expected." if up else "hit by rising costs."),
            f"\u201cIt has been a {'strong' if up else 'difficult'} year, with "
            + ("demand higher than expected" if up else "rising costs")
            + f",\u201d said chief executive {boss}.",
        ),
        s.pick(
            f"The company plans to {'create' if up else 'cut'} {jobs} jobs over the next year.",
            f"About {jobs} jobs will be {'added' if up else 'lost'}, mostly at its main site.",
        ),
        s.pick(
            f"Shares in the firm {'climbed' if up else 'dropped'} "
            f"{s.rng.randint(2, 12)}% in early trading.",
            "Analysts said the figures were close to what they had expected.",
        ),
        s.pick(
            f"The business was founded in {s.rng.randint(1890, 1995)} and employs about "
            f"{s.rng.randint(3, 40) * 100} people.",
            "It sells most of its products in Europe and North America.",
        ),
    ]
    tail = [f"Full results will be published in {s.rng.choice(MONTHS)}."]
    highlights = [
        f"{company} {kind} profit {short} {pct}% to £{profit}m.",
        f"Firm to {'create' if up else 'cut'} {jobs} jobs.",
        f"Chief executive {boss} " + ("cites strong demand." if up else "blames rising costs."),
    ]
    return s.build(lead, middle, tail, highlights)


def storm(s: _Story) -> dict[str, str]:
    town = s.rng.choice(TOWNS)
    storm_name = s.pick("Agnes", "Bram", "Ciara", "Dudley", "Elin", "Fergus", "Gerrit")
    homes = s.rng.randint(3, 60) * 100
    wind = s.rng.randint(60, 110)
    spokes = s.name()
    hours = s.rng.randint(12, 72)
    lead = [
        s.pick(
            f"About {homes:,} homes in and around {town} were left without power after Storm "
            f"{storm_name} brought winds of up to {wind}mph.",
            f"Storm {storm_name} cut power to {homes:,} homes in the {town} area on "
            f"{s.rng.choice(DAYS)}, with gusts reaching {wind}mph.",
        )
    ]
    middle = [
        s.pick(
            "Fallen trees blocked several roads and a school was closed.",
            "Several roads were closed by fallen trees and flooding.",
        ),
        s.pick(
            f"Engineers hope to restore supplies within {hours} hours, said {spokes}, a "
            "spokesperson for the network operator.",
            f"{spokes}, speaking for the network operator, said most homes should be "
            f"reconnected within {hours} hours.",
        ),
        s.pick(
            "A yellow weather warning remains in place until the weekend.",
            "Forecasters expect calmer weather by the end of the week.",
        ),
        s.pick(
            "Residents were urged to check on elderly neighbours.",
            "The council opened the leisure centre for people who need to keep warm.",
        ),
    ]
    tail = ["No one was seriously hurt, police said."]
    highlights = [
        f"Storm {storm_name} leaves {homes:,} {town} homes without power.",
        f"Winds reach {wind}mph, roads blocked by trees.",
        f"Power back within {hours} hours, says operator's {spokes}.",
    ]
    return s.build(lead, middle, tail, highlights)


def rescue(s: _Story) -> dict[str, str]:
    town = s.rng.choice(TOWNS)
    who, where, team = s.rng.choice(
        [
            ("A walker", "on the hills above", "mountain rescue team"),
            ("A fisherman", "on rocks near", "lifeboat crew"),
            ("A climber", "on a cliff outside", "coastguard team"),
            ("Two kayakers", "in the estuary near", "lifeboat crew"),
        ]
    )
    age = s.rng.randint(19, 74)
    hours = s.rng.randint(2, 9)
    leader = s.name()
    short_who = who.split()[-1].rstrip("s") if who.startswith("Two") else who.split()[-1]
    lead = [
        s.pick(
            f"{who} aged {age} was rescued {where} {town} after spending {hours} hours stuck in "
            "bad weather.",
            f"The {team} rescued {who.lower()}, aged {age}, {where} {town} on "
            f"{s.rng.choice(DAYS)} after a {hours}-hour search.",
        )
    ]
    fog = s.rng.random() < 0.5
    middle = [
        s.pick(
            f"The alarm was raised by a relative when the {short_who} did not return home.",
            "A passer-by called emergency services after hearing shouts for help.",
        ),
        f"{leader}, who led the {team}, said thick fog had slowed the search."
        if fog
        else f"\u201cConditions were very difficult,\u201d said {leader}, who led the {team}.",
        s.pick(
            "The casualty was taken to hospital with mild hypothermia.",
            "The casualty was checked by paramedics and did not need hospital treatment.",
        ),
    ]
    tail = [
        s.pick(
            "Rescuers reminded visitors to check the forecast and carry a phone.",
            "It was the team's third call-out this month.",
        )
    ]
    highlights = [
        f"{short_who.capitalize()}, {age}, rescued near {town} by {team}.",
        f"Casualty was stuck for {hours} hours in bad weather.",
        f"Team leader {leader} says "
        + ("fog slowed search." if fog else "conditions were difficult."),
    ]
    return s.build(lead, middle, tail, highlights)


def study(s: _Story) -> dict[str, str]:
    town = s.rng.choice(TOWNS)
    topic, finding = s.rng.choice(
        [
            ("walking", "daily walks improve sleep"),
            ("coffee", "two cups of coffee a day sharpen memory"),
            ("gardening", "gardening lowers stress"),
            ("music", "learning music helps children read"),
            ("screen time", "less screen time improves mood"),
            ("breakfast", "eating breakfast boosts concentration"),
        ]
    )
    people = s.rng.randint(3, 90) * 100
    years = s.rng.randint(2, 12)
    author = s.name()
    pct = s.rng.randint(8, 40)
    surprised = s.rng.random() < 0.5
    lead = [
        s.pick(
            f"Researchers at the University of {town} say {finding}, after following {people:,} "
            f"people for {years} years.",
            f"A {years}-year study of {people:,} people by the University of {town} suggests "
            f"{finding}.",
        )
    ]
    middle = [
        s.pick(
            f"Those who took part reported a {pct}% improvement on average.",
            f"The effect was about {pct}% compared with a control group.",
        ),
        f"\u201cThe results surprised us,\u201d said lead author Dr {author}."
        if surprised
        else f"Lead author Dr {author} said more work was needed to understand why.",
        s.pick(
            "Other scientists cautioned that the study could not prove cause and effect.",
            "The findings were published in a medical journal this week.",
        ),
        s.pick(
            f"The team now plans a larger trial of {topic} in schools and workplaces.",
            "The research was paid for by a health charity.",
        ),
    ]
    highlights = [
        f"University of {town} study says {finding}.",
        f"{people:,} people followed for {years} years, {pct}% improvement.",
        f"Lead author Dr {author} says "
        + ("results were a surprise." if surprised else "more work is needed."),
    ]
    return s.build(lead, middle, [], highlights)


def railway(s: _Story) -> dict[str, str]:
    a, b = s.rng.sample(TOWNS, 2)
    weeks = s.rng.randint(2, 14)
    month = s.rng.choice(MONTHS)
    cost = s.rng.randint(5, 120)
    manager = s.name()
    lead = [
        s.pick(
            f"The railway line between {a} and {b} will close for {weeks} weeks from {month} "
            f"for £{cost} million of engineering work.",
            f"Trains between {a} and {b} will stop running for {weeks} weeks from {month} while "
            f"£{cost} million of repairs are carried out.",
        )
    ]
    middle = [
        s.pick(
            "Replacement buses will run, adding up to 40 minutes to journeys.",
            "Passengers will have to use replacement buses, which take longer.",
        ),
        s.pick(
            f"Route manager {manager} said the work would make services more reliable.",
            f"\u201cWe know this is disruptive and we are sorry,\u201d said route manager "
            f"{manager}.",
        ),
        s.pick(
            "The work includes a new signal system and repairs to a Victorian bridge.",
            "Engineers will replace track, drainage and two level crossings.",
        ),
        s.pick(
            "Commuter groups said they should have been given more notice.",
            "Season ticket holders will be offered a partial refund.",
        ),
    ]
    highlights = [
        f"{a} to {b} rail line to close for {weeks} weeks.",
        f"£{cost}m of engineering work starts in {month}.",
        f"Replacement buses to run, says route manager {manager}.",
    ]
    return s.build(lead, middle, [], highlights)


def festival(s: _Story) -> dict[str, str]:
    town = s.rng.choice(TOWNS)
    event = s.pick("food festival", "music festival", "book fair", "kite festival", "beer festival")
    visitors = s.rng.randint(3, 80) * 1000
    raised = s.rng.randint(5, 95) * 1000
    charity = s.pick("the local hospice", "a children's hospital", "the food bank", "flood relief")
    organiser = s.name()
    lead = [
        s.pick(
            f"The {town} {event} drew {visitors:,} visitors over the weekend and raised "
            f"£{raised:,} for {charity}.",
            f"More than {visitors:,} people attended the {town} {event}, which raised "
            f"£{raised:,} for {charity}.",
        )
    ]
    middle = [
        s.pick(
            f"Organiser {organiser} said it was the best attended in the event's history.",
            f"\u201cIt was our best year yet,\u201d said organiser {organiser}.",
        ),
        s.pick(
            "Local traders reported their busiest weekend of the year.",
            "Car parks were full by mid-morning on both days.",
        ),
        s.pick(
            f"This year's event was the {s.rng.choice(ORDINALS)} to be held in the town.",
            "Volunteers spent months preparing the site.",
        ),
        s.pick(
            "Sunshine helped bring out families from across the region.",
            "A short shower on Sunday afternoon did little to keep people away.",
        ),
    ]
    tail = [f"Next year's {event} is planned for {s.rng.choice(MONTHS)}."]
    highlights = [
        f"{town} {event} draws {visitors:,} visitors.",
        f"£{raised:,} raised for {charity}.",
        f"Organiser {organiser} says it was the best yet.",
    ]
    return s.build(lead, middle, tail, highlights)


KINDS: tuple[Callable[[_Story], dict[str, str]], ...] = (
    council,
    football,
    results,
    storm,
    rescue,
    study,
    railway,
    festival,
)


def articles(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct articles, the kinds in turn, from the generator seeded with ``seed``."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        row = KINDS[len(out) % len(KINDS)](_Story(rng))
        if row["article"] not in seen:
            seen.add(row["article"])
            out.append(row)
    return out


def splits(train: int, held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training and held-out articles, from differently seeded generators and with no article
    in both."""
    train_rows = articles(train, seed)
    seen = {r["article"] for r in train_rows}
    held = [r for r in articles(held_out + 20, seed + 1000) if r["article"] not in seen]
    return train_rows, held[:held_out]


if __name__ == "__main__":
    for row in articles(2, 0):
        print(
            f"{row['article']}\n({len(row['article'].split())} words)\n---\n{row['highlights']}\n"
        )
