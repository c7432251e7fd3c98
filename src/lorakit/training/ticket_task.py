"""A second built-in task, unlike the order-record one: route a customer message to its team.

    "I was charged twice for order 4821 this month, please fix it." -> "billing"

Classification into six labels (billing, delivery, refund, account, technical, feedback) from varied
phrasings with product names, order numbers, amounts and days filled in; the answer is one word, not a
rewritten record. A pretrained chat model answers with a sentence, so exact match starts near 0%. It
is used to confirm that settings chosen on the order task (`lorakit train --task tickets`) carry over.
"""
from __future__ import annotations

import random

from lorakit.core.errors import LorakitError
from lorakit.training.tasks import distinct_records

INSTRUCTION = ("Route the customer message to one team: billing, delivery, refund, account, technical or "
               "feedback. Answer with the team name only.")

PRODUCTS = ("blender", "laptop", "jacket", "headphones", "kettle", "backpack", "phone case", "desk lamp",
            "coffee maker", "sneakers", "monitor", "toaster", "watch", "printer", "keyboard", "vacuum")
NAMES = ("Maria", "James", "Omar", "Sofia", "Chen", "Lucas", "Grace", "Felix", "Anna", "David", "Laura", "Ivan")

# {product} {order} {amount} {days} {name}
TEMPLATES: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged twice for order {order} this month, please fix it.",
        "My card shows a payment of ${amount} I do not recognise.",
        "Why does my invoice for the {product} list a higher price than the shop page?",
        "Can I get a copy of the invoice for order {order}? I need it for my taxes.",
        "The subscription fee went up to ${amount} without any notice.",
        "Please change the billing address on my account before the next payment.",
    ),
    "delivery": (
        "My {product} was supposed to arrive {days} days ago and it is still not here.",
        "The tracking page for order {order} has not updated in {days} days.",
        "The courier left my {product} at the wrong address.",
        "Can you deliver order {order} to my office instead of my home?",
        "Where is my package? Order {order}, a {product}.",
        "The box with my {product} arrived crushed and soaking wet.",
    ),
    "refund": (
        "I returned the {product} {days} days ago and still have not got my ${amount} back.",
        "I would like my money back for order {order}, the {product} is not what I expected.",
        "How long does a refund take after you receive a returned {product}?",
        "You approved my return of order {order} but the refund was only ${amount}.",
        "Please cancel order {order} and refund the ${amount} to my card.",
        "I want to send back the {product} and get a full refund.",
    ),
    "account": (
        "I cannot log in, the password reset email never arrives.",
        "Please delete my account and all the data you hold about me. - {name}",
        "How do I change the email address on my profile?",
        "Someone else may have logged into my account, I see an order {order} I did not place.",
        "My account got locked after I typed the wrong password {days} times.",
        "I want to merge my two accounts into one, both are under the name {name}.",
    ),
    "technical": (
        "The {product} I bought turns off after {days} minutes of use.",
        "Your app crashes every time I open the order history.",
        "The {product} will not connect to my wifi network.",
        "After the latest update the {product} makes a loud buzzing noise.",
        "The website shows an error when I click checkout.",
        "The display on my {product} flickers and then goes black.",
    ),
    "feedback": (
        "Just wanted to say the {product} is fantastic, thank you!",
        "Your support agent {name} was incredibly helpful yesterday.",
        "It would be great if you offered the {product} in more colours.",
        "I love how fast the delivery was for order {order}, keep it up.",
        "Suggestion: let customers save several delivery addresses.",
        "The new website design is much easier to use, well done.",
    ),
}
LABELS = tuple(TEMPLATES)


def _ticket(rng: random.Random) -> dict:
    """One random customer message and its team, as an instruction record."""
    label = rng.choice(LABELS)
    message = rng.choice(TEMPLATES[label]).format(
        product=rng.choice(PRODUCTS), order=rng.randint(1000, 9999), amount=rng.randint(5, 400),
        days=rng.randint(2, 14), name=rng.choice(NAMES),
    )
    return {"instruction": INSTRUCTION, "input": message, "output": label}


def ticket_task(n_train: int = 2000, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The ticket-routing task: deterministic train and held-out instruction records, no message in both.

    Raises:
        LorakitError: a negative count, or more records than there are distinct messages.
    """
    if n_train >= 0 and n_eval >= 0 and n_train + n_eval > 200_000:
        raise LorakitError(f"the ticket task holds about 200,000 distinct messages; ask for fewer than "
                           f"{n_train + n_eval} records.")
    return distinct_records(_ticket, n_train, n_eval, seed)
