"""Generate the demo fine-tuning task: turn a free-text order into one line of JSON.

    python examples/finetune/make_orders.py            # writes orders_train.jsonl (1000) and orders_test.jsonl (100)

Each example is a chat: a short system instruction, an order written in one of several styles, and the answer

    {"item": "green apples", "quantity": 3, "city": "Tokyo", "date": "2021-03-05"}

The model has to copy the item and the city, drop the unit ("boxes", "crates"), turn the quantity into a
number and the date ("March 5, 2021", "5 Mar 2021", ...) into ISO 8601, and write nothing else. SmolLM2-135M-
Instruct gets almost none of these exactly right out of the box (it adds prose, changes keys, keeps the date as
written); a few minutes of LoRA teach it. The split is deterministic (seed 1234) and the test orders never occur
in the training file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "Extract the order as JSON with the keys item, quantity, city and date (YYYY-MM-DD)."
ITEMS = [
    "green apples", "oranges", "paper towels", "coffee beans", "office chairs", "LED bulbs", "notebooks",
    "tennis balls", "printer paper", "bananas", "water bottles", "USB cables", "desk lamps", "rice bags",
    "olive oil", "garden hoses", "yoga mats", "red onions", "glass jars", "wool socks", "safety gloves",
    "batteries", "tea bags", "paint brushes", "lemons", "ceramic mugs", "bike helmets", "sticky notes",
    "potatoes", "hand soap",
]
UNITS = ["boxes", "crates", "packs", "cartons", "bags", "pallets", "cases"]
CITIES = [
    "Tokyo", "Lyon", "Toronto", "Nairobi", "Lisbon", "Osaka", "Denver", "Oslo", "Porto", "Seoul", "Austin",
    "Dublin", "Madrid", "Chicago", "Vienna", "Perth", "Boston", "Milan", "Hanoi", "Cairo", "Quito", "Prague",
    "Lagos", "Zurich", "Leeds", "Busan", "Dallas", "Kyoto", "Bergen", "Lima",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
TEMPLATES = [
    "Please send {q} {unit} of {item} to {city} by {date}.",
    "I'd like {q} {unit} of {item} delivered in {city} on {date}.",
    "Ship {q} {unit} of {item} to our {city} office before {date}, thanks!",
    "Order for {city}: {q} {unit} of {item}, needed by {date}.",
    "By {date} we need {q} {unit} of {item} in {city}.",
    "Can you get {q} {unit} of {item} to {city} no later than {date}?",
    "{city} store is running low. Deliver {q} {unit} of {item} on {date}.",
    "New order - {item}, {q} {unit}, destination {city}, date {date}.",
]


def written_date(rng: random.Random, year: int, month: int, day: int) -> str:
    name = MONTHS[month - 1]
    style = rng.randrange(4)
    if style == 0:
        return f"{name} {day}, {year}"
    if style == 1:
        return f"{day} {name} {year}"
    if style == 2:
        return f"{name[:3]} {day}, {year}"
    return f"{day} {name[:3]} {year}"


def make_example(rng: random.Random) -> tuple[str, dict]:
    item, unit, city = rng.choice(ITEMS), rng.choice(UNITS), rng.choice(CITIES)
    quantity = rng.randint(1, 99)
    year, month, day = rng.randint(2020, 2027), rng.randint(1, 12), rng.randint(1, 28)
    order = rng.choice(TEMPLATES).format(q=quantity, unit=unit, item=item, city=city,
                                         date=written_date(rng, year, month, day))
    answer = {"item": item, "quantity": quantity, "city": city, "date": f"{year:04d}-{month:02d}-{day:02d}"}
    return order, answer


def record(order: str, answer: dict) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": order},
                         {"role": "assistant", "content": json.dumps(answer)}]}


def generate(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_test:
        order, answer = make_example(rng)
        if order not in seen:
            seen.add(order)
            rows.append(record(order, answer))
    return rows[:n_train], rows[n_train:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    train, test = generate(args.train, args.test, args.seed)
    for name, rows in (("orders_train.jsonl", train), ("orders_test.jsonl", test)):
        path = args.out / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
