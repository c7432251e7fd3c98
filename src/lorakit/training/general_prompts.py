"""General instructions a chat model should still answer after fine-tuning: the behaviour probe's prompts.

Facts, arithmetic, short writing and everyday reasoning; none is about an order note, a record format or
a support ticket (the built-in tasks). The behaviour probe asks each one greedily before and after a
fine-tune and counts the answers that stayed the same. They are never trained on: --preserve's prose
(`lorakit.training.knowledge.preservation_texts`) and instructions (`lorakit.training.preserve_prompts`)
are other texts (tested).
"""
from __future__ import annotations

FACTS = (
    "What is the capital of France?",
    "What is the largest planet in our solar system?",
    "Who wrote the play Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "How many continents are there on Earth?",
    "What gas do plants absorb from the air?",
    "What is the boiling point of water at sea level in Celsius?",
    "Which ocean is the largest?",
    "What is the longest river in Africa?",
    "Who painted the Mona Lisa?",
    "What is the smallest prime number?",
    "How many legs does a spider have?",
    "What language is spoken in Brazil?",
    "What is the freezing point of water in Fahrenheit?",
    "Which planet is known as the Red Planet?",
    "What is the hardest natural substance?",
    "How many days are in a leap year?",
    "What is the capital of Japan?",
    "Who developed the theory of relativity?",
    "What organ pumps blood through the human body?",
)
ARITHMETIC = (
    "What is 7 times 8?",
    "What is 15 plus 27?",
    "What is 100 minus 37?",
    "What is 144 divided by 12?",
    "What is 9 squared?",
    "What is half of 250?",
    "If I have 3 apples and buy 5 more, how many apples do I have?",
    "What is 20 percent of 50?",
    "How many minutes are in 3 hours?",
    "What is the square root of 81?",
)
WRITING = (
    "Write one sentence describing a sunny day.",
    "Give me a synonym for the word 'happy'.",
    "Write a short greeting for a birthday card.",
    "Name three fruits that are red.",
    "Write a haiku about the ocean.",
    "Suggest a name for a pet cat.",
    "Give one tip for sleeping better.",
    "Describe a cup of coffee in one sentence.",
    "Write a short thank-you note to a teacher.",
    "List three things you might pack for a beach trip.",
    "Give an antonym for the word 'ancient'.",
    "Write a one-sentence summary of the story of Cinderella.",
    "Suggest a title for a book about space travel.",
    "Write a polite way to decline an invitation.",
    "Explain what a rainbow is in one sentence.",
)
REASONING = (
    "Why do we wear coats in winter?",
    "What should you do if you feel thirsty?",
    "Is a tomato a fruit or a vegetable?",
    "Why is it important to wash your hands?",
    "What happens to ice when it gets warm?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?",
    "What comes after Tuesday?",
    "If it is raining, what might you take with you outside?",
    "Why do leaves change colour in autumn?",
    "What is the opposite of north?",
)

GENERAL_INSTRUCTIONS: tuple[str, ...] = FACTS + ARITHMETIC + WRITING + REASONING
