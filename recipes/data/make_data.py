"""Build the small datasets the example recipes train on. Deterministic: the same seed writes the same bytes.

    python recipes/data/make_data.py        # rewrites recipes/data/{topics,reviews,chat}/

topics/   4-way topic classification (sports, weather, food, technology): the quickstart and the full fine-tune.
reviews/  product reviews with a 1-5 rating as a number: the regression recipe.
chat/     short assistant conversations (unit conversions) in role/content messages: the chat recipe.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

TOPICS = {
    "sports": {
        "subject": ["the striker", "our goalkeeper", "the home team", "the visiting side", "the captain", "the coach",
                    "the relay squad", "the tennis champion", "the rookie pitcher", "the marathon runner"],
        "verb": ["scored twice in", "was sent off during", "celebrated after", "trained hard before", "lost badly in",
                 "dominated", "was injured in", "was substituted late in"],
        "object": ["the cup final", "the derby", "the second half", "the qualifying round", "the league match",
                   "the penalty shootout", "the semifinal", "the season opener"],
    },
    "weather": {
        "subject": ["heavy rain", "a cold front", "the morning fog", "strong winds", "a heatwave", "light snow",
                    "the storm", "thunder and hail", "a humid breeze", "the forecast"],
        "verb": ["is expected across", "swept over", "will linger above", "brought flooding to", "cleared away from",
                 "is moving toward", "kept temperatures low in", "delayed flights over"],
        "object": ["the northern coast", "the valley", "the city by evening", "the mountain passes", "the airport",
                   "the southern plains", "the islands", "the region this weekend"],
    },
    "food": {
        "subject": ["the chef", "this recipe", "the bakery", "my grandmother", "the new bistro", "the street vendor",
                    "the pastry cook", "our kitchen", "the sushi bar", "the cookbook"],
        "verb": ["slowly simmers", "serves", "bakes", "seasons", "grills", "recommends", "marinates", "garnishes"],
        "object": ["tomato soup with basil", "sourdough bread", "spicy noodles", "roasted vegetables", "a lemon tart",
                   "fresh pasta with garlic", "chocolate cake", "grilled salmon with herbs"],
    },
    "technology": {
        "subject": ["the new smartphone", "the software update", "the startup", "our database server", "the laptop",
                    "the chip maker", "the open source project", "the cloud provider", "the browser", "the robot"],
        "verb": ["ships with", "crashed because of", "now supports", "was patched to fix", "benchmarks well on",
                 "added support for", "runs faster with", "released an update for"],
        "object": ["a faster processor", "the memory leak", "wireless charging", "encrypted backups",
                   "the new graphics card", "machine learning workloads", "the security flaw", "solid state storage"],
    },
}
OPENERS = ["", "Yesterday ", "According to reports, ", "Once again ", "This morning ", "Surprisingly, ", "As usual "]


def topics(rng: random.Random, n: int) -> list[dict]:
    rows = []
    labels = sorted(TOPICS)
    for i in range(n):
        label = labels[i % len(labels)]
        t = TOPICS[label]
        s = f"{rng.choice(OPENERS)}{rng.choice(t['subject'])} {rng.choice(t['verb'])} {rng.choice(t['object'])}."
        rows.append({"text": s[0].upper() + s[1:], "label": label})
    rng.shuffle(rows)
    return rows


GOOD = [("works perfectly", 2), ("is excellent value", 2), ("arrived quickly", 1), ("looks nice", 1),
        ("exceeded my expectations", 2), ("is easy to use", 1), ("feels sturdy", 1)]
BAD = [("broke after a week", -2), ("is a waste of money", -2), ("arrived late", -1), ("looks cheap", -1),
       ("stopped working", -2), ("is hard to set up", -1), ("feels flimsy", -1)]
ITEMS = ["This kettle", "The headset", "My new chair", "The blender", "This backpack", "The desk lamp", "The keyboard"]


def reviews(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        parts = rng.sample(GOOD, rng.randint(0, 2)) + rng.sample(BAD, rng.randint(0, 2))
        rng.shuffle(parts)
        score = 3 + sum(w for _, w in parts) / 2
        rating = max(1.0, min(5.0, score))
        text = f"{rng.choice(ITEMS)} " + (" and ".join(p for p, _ in parts) if parts else "is fine, nothing special")
        rows.append({"review": text + ".", "rating": round(rating, 1)})
    return rows


UNITS = [("kilometres", "miles", 0.621371), ("kilograms", "pounds", 2.20462), ("litres", "gallons", 0.264172),
         ("metres", "feet", 3.28084)]


def chats(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b, f = rng.choice(UNITS)
        x = rng.randint(1, 200)
        msgs = [{"role": "system", "content": "You convert units. Answer with the number and the unit."},
                {"role": "user", "content": f"How many {b} is {x} {a}?"},
                {"role": "assistant", "content": f"{x} {a} is {x * f:.2f} {b}."}]
        if rng.random() < 0.5:
            y = rng.randint(1, 200)
            msgs += [{"role": "user", "content": f"And {y} {a}?"},
                     {"role": "assistant", "content": f"{y} {a} is {y * f:.2f} {b}."}]
        rows.append({"messages": msgs})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(20261127)
    for split, n in (("train", 480), ("validation", 120), ("test", 200)):
        write(HERE / "topics" / f"{split}.jsonl", topics(rng, n))
    write(HERE / "reviews" / "reviews.jsonl", reviews(rng, 600))
    write(HERE / "chat" / "conversions.jsonl", chats(rng, 300))


if __name__ == "__main__":
    main()
