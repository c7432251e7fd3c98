"""General instructions for --preserve's chat half: the base model answers them once, and training keeps
the adapted model's next-token distributions on those answers close to the base's.

Built from templates over topic lists, so they cover the same kinds of request as a chat model gets
(explanations, facts about people and animals, arithmetic, short writing, advice) without repeating the
behaviour probe's instructions (`lorakit.training.general_prompts`), which are never trained on.
"""
from __future__ import annotations

ANIMALS = ("elephants", "owls", "dolphins", "bees", "penguins", "octopuses", "camels", "frogs", "whales", "ants")
CONCEPTS = ("gravity", "photosynthesis", "a volcano", "electricity", "democracy", "an atom", "the internet",
            "inflation", "a vaccine", "a fraction", "an eclipse", "a recipe")
ACTIVITIES = ("learning a new language", "saving money", "studying for an exam", "running a first 5k",
              "cooking rice", "staying focused at work", "making new friends", "keeping houseplants alive",
              "writing a good email", "travelling on a budget")
WORDS = ("brave", "whisper", "journey", "gentle", "curious", "harvest", "bright", "library", "patience", "storm")
PEOPLE = ("Isaac Newton", "Marie Curie", "Leonardo da Vinci", "Cleopatra", "Wolfgang Amadeus Mozart",
          "Mahatma Gandhi", "Galileo Galilei", "Ada Lovelace", "Charles Darwin", "Jane Austen")
PLACES = ("a quiet forest", "a busy market", "a snowy mountain", "a desert at night", "a small harbour",
          "a city park in spring", "an old library", "a train station at dawn")
PAIRS = (("weather", "climate"), ("a virus", "a bacterium"), ("speed", "velocity"), ("a lake", "a sea"),
         ("a poem", "a song"), ("borrowing", "lending"), ("a comet", "an asteroid"), ("baking", "frying"))
SUMS = ((23, 19), (48, 36), (125, 75), (9, 14), (61, 27), (300, 450))
PRODUCTS = ((6, 7), (12, 11), (4, 25), (13, 3), (8, 9), (15, 6))


def preservation_instructions() -> list[str]:
    """About 100 general instructions in a fixed order, disjoint from the behaviour probe's."""
    out = [f"Tell me one interesting fact about {a}." for a in ANIMALS]
    out += [f"Explain in simple words what {c} is." for c in CONCEPTS]
    out += [f"Give me two tips for {a}." for a in ACTIVITIES]
    out += [f"Write a short sentence using the word '{w}'." for w in WORDS]
    out += [f"Who was {p}?" for p in PEOPLE]
    out += [f"Describe {p} in two sentences." for p in PLACES]
    out += [f"What is the difference between {x} and {y}?" for x, y in PAIRS]
    out += [f"Add {a} and {b}." for a, b in SUMS]
    out += [f"Multiply {a} by {b}." for a, b in PRODUCTS]
    out += [f"Write a two-line poem about {a}." for a in ANIMALS[:5]]
    out += [f"Why is {c} important?" for c in CONCEPTS[:6]]
    return out
