"""The fixed prompt set shared by benchmarks/generate.py and benchmarks/decode.py.

"grounded" prompts carry the material the answer repeats (summarise, extract, edit code): prompt lookup and
other copy-friendly speculation shine there. "open" prompts ask for new text.
"""

from __future__ import annotations

ARTICLE = (
    "The city council of Riverton voted on Tuesday to expand the public library on Maple Street. The expansion "
    "will add a children's reading room, twelve study rooms and a small makerspace with 3D printers. Construction "
    "is expected to begin in March and to last fourteen months, during which the library will move to a temporary "
    "site in the old post office. The project will cost 4.2 million dollars, of which 1.5 million come from a "
    "state grant and the rest from the city's capital budget. Council member Dana Ortiz, who proposed the plan, "
    "said the library had outgrown its building: visits rose by 38 percent in five years."
)
CODE = '''def average(values):
    total = 0
    for v in values:
        total = total + v
    return total / len(values)


def maximum(values):
    best = values[0]
    for v in values:
        if v > best:
            best = v
    return best
'''
EMAILS = (
    "From: Priya Natarajan <priya.n@example.org>\nTo: team@example.org\nSubject: Offsite on 14 May\n\n"
    "Hi all, the offsite is confirmed for 14 May at the Harbor Hotel, room Cedar, from 9:30 to 17:00. "
    "Please send dietary requirements to Tomás Reyes (tomas.reyes@example.org) by 2 May. "
    "Parking is free; the hotel's address is 12 Wharf Road, Port Alden. Thanks, Priya"
)

PROMPTS: list[dict[str, str]] = [
    {"kind": "grounded", "name": "summarise",
     "prompt": f"Summarise this article in three sentences.\n\n{ARTICLE}"},
    {"kind": "grounded", "name": "extract",
     "prompt": f"List every person, date, place and e-mail address in this message, one per line.\n\n{EMAILS}"},
    {"kind": "grounded", "name": "edit-code",
     "prompt": f"Add a docstring to each function in this code and return the full code.\n\n{CODE}"},
    {"kind": "grounded", "name": "rewrite",
     "prompt": f"Rewrite this article as a bulleted list of facts.\n\n{ARTICLE}"},
    {"kind": "open", "name": "explain",
     "prompt": "Explain how a refrigerator keeps food cold."},
    {"kind": "open", "name": "story",
     "prompt": "Write a short story about a robot who learns to paint."},
    {"kind": "open", "name": "advice",
     "prompt": "Give me five tips for learning a new language."},
    {"kind": "open", "name": "compare",
     "prompt": "What are the differences between a cat and a dog as pets?"},
]


def prompts(kind: str | None = None) -> list[dict[str, str]]:
    return [p for p in PROMPTS if kind is None or p["kind"] == kind]
