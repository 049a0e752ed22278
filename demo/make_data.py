"""The demo's own dataset: order tickets for the fictional shop "Quillfeather Supply", written as
free-text sentences, to be turned into one strict, exactly-checkable line:

    ORDER=4821|QTY=3|ITEM=lantern|COLOR=blue|CITY=Lisbon|DATE=2024-05-12

A pretrained chat model does not know this format (exact match near 0%); it is learnable from a few
hundred examples (copying, a month-name -> number table, zero padding), and success is checked exactly.
Generated deterministically (seeded), in Alpaca format, with disjoint train and held-out splits.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ITEMS = ["lantern", "notebook", "teapot", "compass", "umbrella", "backpack", "candle", "kettle", "scarf",
         "telescope", "journal", "flask", "blanket", "whistle", "satchel", "clock", "mug", "pencil case"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "orange", "purple", "grey", "brown"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Porto", "Quito", "Dublin", "Kyoto", "Tunis", "Riga",
          "Perth", "Accra", "Bergen", "Cusco", "Graz", "Malmo", "Sapporo", "Valencia", "Zagreb"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}
PHRASINGS = [
    "Order #{order}: {qty_text} {color} {item_pl} shipped to {city} on {month} {day}, {year}.",
    "On {month} {day}, {year} we sent {qty_text} {color} {item_pl} to a customer in {city} (order {order}).",
    "Customer in {city} received {qty_text} {color} {item_pl}; order number {order}, dispatched {day} {month} {year}.",
    "Please log order {order}: {qty_text} {item_pl} in {color}, delivery city {city}, date {month} {day} {year}.",
    "{city} order {order} - {qty_text} x {color} {item_pl}, sent {month} {day}, {year}.",
]
INSTRUCTION = "Ticket line for this order note:"
SYSTEM = "You are the Quillfeather Supply ticket assistant."  # short: replaces the model's long default


def plural(item: str, qty: int) -> str:
    if qty == 1:
        return item
    return item + ("es" if item.endswith(("ch", "sh", "s")) else "s")


def make_record(rng: random.Random, phrasing: str) -> dict:
    order, qty = rng.randint(1000, 9999), rng.randint(1, 12)
    item, color, city = rng.choice(ITEMS), rng.choice(COLORS), rng.choice(CITIES)
    year, month, day = rng.randint(2019, 2026), rng.randint(1, 12), rng.randint(1, 28)
    qty_text = NUMBER_WORDS[qty] if rng.random() < 0.5 else str(qty)
    note = phrasing.format(order=order, qty_text=qty_text, color=color, item_pl=plural(item, qty), city=city,
                           month=MONTHS[month - 1], day=day, year=year)
    ticket = (f"ORDER={order}|QTY={qty}|ITEM={item}|COLOR={color}|CITY={city}|"
              f"DATE={year:04d}-{month:02d}-{day:02d}")
    return {"system": SYSTEM, "instruction": INSTRUCTION, "input": note, "output": ticket}


def make_splits(n_train: int, n_eval: int, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen, records = set(), []
    while len(records) < n_train + n_eval:
        rec = make_record(rng, rng.choice(PHRASINGS))
        if rec["input"] not in seen:  # held-out notes never appear in training
            seen.add(rec["input"])
            records.append(rec)
    return records[:n_train], records[n_train:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--eval", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    train, held_out = make_splits(args.train, args.eval, args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train.json", train), ("eval.json", held_out)):
        (out / name).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"demo data: {len(train)} train, {len(held_out)} held-out records in {out}")


if __name__ == "__main__":
    main()
