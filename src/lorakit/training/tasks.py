"""The built-in demo task and the forgetting-probe text.

The demo task turns a free-text order note into a canonical one-line record::

    "Hi, Maria Lopez here - please ship 3 blue lamps to Lisbon by March 5."
    -> "ORDER customer: Maria Lopez; qty: 3; item: blue lamp; city: Lisbon; due: 03-05"

A pretrained instruct model answers such notes with free text and never hits the exact
record, so its exact match starts near 0%. To succeed it must learn the field order and
separators, singularize the item, map month names to numbers and zero-pad days, across
eight phrasings, which LoRA learns in a few hundred steps and then applies to unseen
combinations. Values follow ": " rather than "=" so that a copied name or city keeps the
tokenization it has in the note (" Lisbon" is one token, "=Lisbon" is several), which makes
copying easy to learn and keeps every sample within 96 tokens.

The probe text is English prose from the docstrings of pure-Python standard-library modules:
general text outside the training data, so perplexity on it before vs after fine-tuning
measures forgetting.
"""
from __future__ import annotations

import importlib
import inspect
import random
from types import ModuleType
from typing import Any, Callable, Iterator

from lorakit.core.errors import LorakitError

INSTRUCTION = "Convert the order note to an order record."

# Names, cities and items are single tokens for SmolLM2 after a space, so that a whole
# sample (chat template, instruction, note and record) stays within 96 tokens.
FIRST_NAMES = (
    "Maria", "James", "Omar", "Sofia", "Chen", "Lucas", "Diego", "Pierre", "Grace", "Felix",
    "Samuel", "Oscar", "Anna", "David", "Sarah", "Paul", "Laura", "Peter", "Emma", "Carlos",
    "Ali", "Hannah", "Daniel", "Rosa", "Ivan", "Julia", "Marco", "Nina", "Hugo", "Victor",
)
LAST_NAMES = (
    "Lopez", "Smith", "Murphy", "Wang", "Khan", "Silva", "Berg", "Patel", "Walsh", "Garcia",
    "Kim", "Weber", "Costa", "Brown", "Ahmed", "Fischer", "Cohen", "Shah", "Miller", "Lee",
    "Martin", "Clark", "Young", "King", "Baker", "Nelson", "Carter", "Park", "Singh", "Santos",
)
# singular -> plural; a few irregular plurals so that singularizing is more than dropping "s"
ITEMS = {
    "lamp": "lamps", "chair": "chairs", "table": "tables", "rug": "rugs", "clock": "clocks",
    "pillow": "pillows", "blanket": "blankets", "box": "boxes", "bench": "benches", "glass": "glasses",
    "shelf": "shelves", "candle": "candles", "basket": "baskets", "mirror": "mirrors", "stool": "stools",
    "jar": "jars", "desk": "desks", "bowl": "bowls", "towel": "towels", "bottle": "bottles",
}
COLOURS = (
    "blue", "red", "green", "black", "white", "yellow", "grey", "orange", "pink", "brown",
    "purple", "silver",
)
CITIES = (
    "Lyon", "Oslo", "Madrid", "Berlin", "Dublin", "Vienna", "Prague", "Lisbon", "Milan", "Tokyo",
    "Seoul", "Cairo", "Nairobi", "Toronto", "Boston", "Denver", "Austin", "Sydney", "Perth", "Lima",
    "Mumbai", "Delhi", "Manila", "Athens", "Paris", "Rome", "London", "Chicago", "Munich", "Warsaw",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)

# {name} {qty} {colour} {items} (plural unless qty is 1) {city} {month} {day} {ordinal}
TEMPLATES = (
    "Hi, {name} here - please ship {qty} {colour} {items} to {city} by {month} {day}.",
    "{name} wants {qty} {colour} {items} delivered to {city} before {month} {day}.",
    "Order from {name}: {qty} {colour} {items}, deliver to {city}, due {day} {month}.",
    "Please send {qty} {colour} {items} to {city}. Needed by {month} {day}. Thanks, {name}",
    "Can you get {qty} {colour} {items} to {city} by the {ordinal} of {month}? - {name}",
    "{city} delivery for {name}: {qty} {colour} {items}, latest {month} {day}.",
    "Need {qty} {colour} {items} shipped to {city} by {month} {day}. Regards, {name}",
    "Customer {name} ordered {qty} {colour} {items}; destination {city}; deadline {day} {month}.",
)

PROBE_MODULES = (
    "textwrap", "json", "argparse", "collections", "functools", "string", "calendar",
    "difflib", "fractions", "statistics", "shutil", "pathlib",
)


def _ordinal(day: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th", 23 -> "23rd"."""
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _order(rng: random.Random) -> dict:
    """One random order note and its canonical record, as an instruction record."""
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    qty = rng.randint(1, 12)
    item = rng.choice(list(ITEMS))
    colour = rng.choice(COLOURS)
    city = rng.choice(CITIES)
    month = rng.randrange(12)
    day = rng.randint(1, 28)  # every month has a 28th, so every date is valid
    note = rng.choice(TEMPLATES).format(
        name=name, qty=qty, colour=colour, items=item if qty == 1 else ITEMS[item],
        city=city, month=MONTHS[month], day=day, ordinal=_ordinal(day),
    )
    record = (
        f"ORDER customer: {name}; qty: {qty}; item: {colour} {item}; "
        f"city: {city}; due: {month + 1:02d}-{day:02d}"
    )
    return {"instruction": INSTRUCTION, "input": note, "output": record}


def builtin_task(n_train: int = 2000, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The built-in order-note task: deterministic train and held-out instruction records.

    All notes are distinct, so no held-out input appears in the training set.

    Args:
        n_train: number of training records.
        n_eval: number of held-out records.
        seed: generator seed; the same arguments always give the same records.

    Returns:
        ``(train, eval)``: lists of ``{"instruction", "input", "output"}`` records.

    Raises:
        LorakitError: a negative count.
    """
    # The space holds billions of notes, so collisions are rare and the loop ends quickly.
    return distinct_records(_order, n_train, n_eval, seed)


def distinct_records(make: Callable[[random.Random], dict], n_train: int, n_eval: int,
                     seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out records drawn from `make`, no "input" twice (so none is in both sets).

    Args:
        make: draws one ``{"instruction", "input", "output"}`` record from the generator it is given.
        n_train: number of training records.
        n_eval: number of held-out records.
        seed: generator seed; the same arguments always give the same records.

    Returns:
        ``(train, eval)``.

    Raises:
        LorakitError: a negative count.
    """
    if n_train < 0 or n_eval < 0:
        raise LorakitError(f"Record counts must be non-negative, got n_train={n_train}, n_eval={n_eval}.")
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < n_eval + n_train:
        record = make(rng)
        if record["input"] not in seen:
            seen.add(record["input"])
            records.append(record)
    return records[n_eval:], records[:n_eval]


# Preservation text (--preserve) comes from other modules than the probe's, so that the probe measures
# what preservation kept rather than what it trained on.
PRESERVE_MODULES = (
    "heapq", "bisect", "csv", "datetime", "decimal", "enum", "fnmatch", "glob", "gzip", "html",
    "inspect", "ipaddress", "logging", "operator", "random", "shlex", "tempfile", "typing", "uuid", "zipfile",
)


def forgetting_probe_texts(max_chars: int = 20000) -> list[str]:
    """General English prose for measuring forgetting: standard-library docstring paragraphs.

    Docstrings of a fixed list of pure-Python stdlib modules (`PROBE_MODULES`) and their public classes,
    functions and methods, split into paragraphs; code examples, indented blocks and short
    fragments are dropped, wrapped lines are joined. The order is fixed, so the result is the
    same on every call with the same Python.

    Args:
        max_chars: stop before the total length of the paragraphs would exceed this.

    Returns:
        Paragraphs in a stable order, about ``max_chars`` characters in total.
    """
    return docstring_texts(PROBE_MODULES, max_chars)


def docstring_texts(modules: tuple[str, ...], max_chars: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Distinct prose paragraphs of `modules`' docstrings in a fixed order, about `max_chars` in total,
    leaving out the paragraphs in `exclude`."""
    texts: list[str] = []
    seen: set[str] = set(exclude)
    total = 0
    for paragraph in _docstring_paragraphs(modules):
        if paragraph in seen:
            continue
        if total + len(paragraph) > max_chars:
            break
        seen.add(paragraph)
        texts.append(paragraph)
        total += len(paragraph)
    return texts


def _docstring_paragraphs(modules: tuple[str, ...]) -> Iterator[str]:
    """Yield the prose paragraphs of every module's docstrings, in a fixed order."""
    for module_name in modules:
        module = importlib.import_module(module_name)
        for obj in _documented_objects(module):
            for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
                if _is_prose(paragraph):
                    yield " ".join(line.strip() for line in paragraph.splitlines())


def _documented_objects(module: ModuleType) -> Iterator[Any]:
    """The module, then its public classes and functions (with class methods), sorted by name."""
    yield module
    for name, obj in sorted(vars(module).items()):
        # Objects imported from elsewhere are visited under their own module, if at all.
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield obj
        elif inspect.isclass(obj):
            yield obj
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isfunction(member):
                    yield member


def _is_prose(paragraph: str) -> bool:
    """Whether a docstring paragraph reads as English prose rather than code or a table."""
    lines = paragraph.splitlines()
    if not lines or any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
        return False  # getdoc dedents prose; indented lines are code, option lists or tables
    words = paragraph.split()
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return len(words) >= 12 and letters >= 0.85 * len(paragraph) and paragraph.rstrip().endswith(".")
