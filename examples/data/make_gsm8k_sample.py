"""Writes gsm8k_sample.jsonl: grade-school word problems in the GSM8K layout (`question`,
`answer` with the worked steps and a final `#### <number>`), generated from templates with a
fixed seed. Run it again to get the same file: `python examples/data/make_gsm8k_sample.py`."""

import json
import random
from pathlib import Path

NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Iris",
    "Jonas",
    "Kemi",
    "Leo",
    "Maya",
    "Noor",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells"]


def buy(r: random.Random) -> tuple[str, str]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    n, price, paid = r.randint(2, 9), r.randint(2, 12), 0
    paid = ((n * price) // 10 + 1) * 10
    cost = n * price
    return (
        f"{name} buys {n} {item} at ${price} each and pays with ${paid}. How much change does "
        f"{name} get?",
        f"The {item} cost {n} * {price} = ${cost}.\nThe change is {paid} - {cost} = "
        f"${paid - cost}.\n#### {paid - cost}",
    )


def share(r: random.Random) -> tuple[str, str]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    friends, each, left = r.randint(2, 8), r.randint(2, 9), r.randint(0, 5)
    total = friends * each + left
    return (
        f"{name} has {total} {item}. {name} gives {each} to each of {friends} friends. How many "
        f"{item} does {name} have left?",
        f"{name} gives away {friends} * {each} = {friends * each} {item}.\n"
        f"{name} has {total} - {friends * each} = {left} left.\n#### {left}",
    )


def trip(r: random.Random) -> tuple[str, str]:
    name = r.choice(NAMES)
    speed, hours, extra = r.randint(20, 70), r.randint(2, 6), r.randint(5, 40)
    dist = speed * hours
    return (
        f"{name} drives at {speed} km per hour for {hours} hours, then walks {extra} km. How "
        f"far does {name} travel in all?",
        f"Driving covers {speed} * {hours} = {dist} km.\nIn all {dist} + {extra} = "
        f"{dist + extra} km.\n#### {dist + extra}",
    )


def save(r: random.Random) -> tuple[str, str]:
    name = r.choice(NAMES)
    weekly, weeks, goal = r.randint(5, 25), r.randint(3, 12), 0
    saved = weekly * weeks
    goal = saved + r.randint(5, 60)
    return (
        f"{name} saves ${weekly} every week for {weeks} weeks. A bike costs ${goal}. How much "
        f"more money does {name} need?",
        f"{name} saves {weekly} * {weeks} = ${saved}.\n{name} needs {goal} - {saved} = "
        f"${goal - saved} more.\n#### {goal - saved}",
    )


def main() -> None:
    r = random.Random(2026)
    makers = [buy, share, trip, save]
    rows = [dict(zip(("question", "answer"), r.choice(makers)(r), strict=True)) for _ in range(300)]
    out = Path(__file__).with_name("gsm8k_sample.jsonl")
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
