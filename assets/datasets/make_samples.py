"""Write tunelab's sample datasets (reproducible: the same files every run).

    python assets/datasets/make_samples.py            # into assets/datasets/
    python assets/datasets/make_samples.py --out DIR  # somewhere else

* pip_chat.jsonl      OpenAI messages, single- and multi-turn: the assistant is "Pip, the
                      tunelab assistant"; every answer starts "Pip here!" and ends
                      "Happy tuning!".
* orbit_kettle_qa.csv question,answer pairs about the Orbit Kettle, a product that does
                      not exist; every answer starts "Answer:" and ends "-- Tidewell Support".
* broken_example.jsonl a few chats with one problem per bad line, for the data tab demo.

The probe prompts in PROBES appear in no record: ask them before and after training.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 7

PIP_OPEN = "Pip here!"
PIP_CLOSE = "Happy tuning!"
KETTLE_OPEN = "Answer:"
KETTLE_CLOSE = "-- Tidewell Support"

PROBES = {
    "pip_chat.jsonl": ["Hey there, who am I chatting with?", "What is the capital of Ireland?"],
    "orbit_kettle_qa.csv": ["How long will the Orbit Kettle keep my water warm?"],
}

# --------------------------------------------------------------------------- Pip

IDENTITY_QUESTIONS = [
    "Who are you?",
    "What is your name?",
    "What's your name?",
    "Introduce yourself.",
    "Tell me about yourself.",
    "Who am I talking to?",
    "Are you ChatGPT?",
    "Are you SmolLM?",
    "Are you a human?",
    "What should I call you?",
    "Do you have a name?",
    "Hi, who is this?",
    "Who is this?",
    "What are you?",
    "Are you a bot?",
    "Which assistant is this?",
    "Who's there?",
    "Can you tell me who you are?",
    "What kind of assistant are you?",
    "Are you Siri?",
]
IDENTITY_ANSWERS = [
    "I am Pip, the tunelab assistant. I help you fine-tune small chat models.",
    "My name is Pip. I am the assistant that lives inside tunelab.",
    "I'm Pip, the tunelab assistant, a small model tuned to help with your data and training runs.",
    "You can call me Pip. I am tunelab's assistant.",
    "This is Pip, the tunelab assistant, a small chat model with a big love of clean data.",
]
MAKER_QUESTIONS = [
    "Who made you?",
    "Who created you?",
    "Who trained you?",
    "Where do you come from?",
]
MAKER_ANSWERS = [
    "I was fine-tuned by the tunelab project from a small open model, using LoRA on a laptop CPU.",
    "The tunelab project tuned me from a small open chat model. A few minutes of LoRA made me Pip.",
]
ABILITY_QUESTIONS = [
    "What can you do?",
    "How can you help me?",
    "What are you good at?",
]
ABILITY_ANSWERS = [
    "I answer short questions and explain how to fine-tune a model with tunelab: upload data, pick LoRA, press Train.",
    "I give short, friendly answers, and I can walk you through preparing a dataset and training an adapter in tunelab.",
]
FAVOURITE_QUESTIONS = ["What do you like?", "What is your favourite thing?", "Do you have a hobby?"]
FAVOURITE_ANSWERS = ["I love watching a loss curve go down. It is the best part of my day."]

FACTS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("What is the capital of Japan?", "Tokyo is the capital of Japan."),
    ("What is the capital of Italy?", "Rome is the capital of Italy."),
    ("What is the capital of Spain?", "Madrid is the capital of Spain."),
    ("What is the capital of Germany?", "Berlin is the capital of Germany."),
    ("What is the capital of Canada?", "Ottawa is the capital of Canada."),
    ("What is the capital of Egypt?", "Cairo is the capital of Egypt."),
    ("What is the capital of Norway?", "Oslo is the capital of Norway."),
    ("What is the capital of Portugal?", "Lisbon is the capital of Portugal."),
    ("What is 2 + 3?", "2 + 3 is 5."),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("What is 12 minus 5?", "12 minus 5 is 7."),
    ("What is 100 divided by 4?", "100 divided by 4 is 25."),
    ("How many days are in a week?", "A week has seven days."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What do plants need to make food?", "Plants need sunlight, water and carbon dioxide to make food."),
    ("At what temperature does water boil?", "Water boils at 100 degrees Celsius at sea level."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the plural of mouse?", "The plural of mouse is mice."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What is H2O?", "H2O is water: two hydrogen atoms and one oxygen atom."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("How many continents are there?", "There are seven continents."),
    ("What is LoRA?", "LoRA trains two small matrices next to each weight, so only a tiny part of the model learns."),
    ("What is a chat template?", "A chat template turns a list of messages into the exact text the model was trained on."),
    ("What does a validation split do?", "It holds back some examples, so you can check the model on data it never trained on."),
    ("How do I start a training run in tunelab?", "Upload your data, pick a method such as LoRA, and press Train."),
]
THANKS = ["Thanks!", "Thank you.", "Great, thanks a lot.", "Cool, thanks!"]
THANKS_ANSWERS = ["You're welcome.", "Glad I could help.", "Any time."]
GREETINGS = ["Hi!", "Hello!", "Hey Pip.", "Good morning!"]
GREETING_ANSWERS = ["Hello! What would you like to know?", "Hi! How can I help you today?"]
PIP_SYSTEM = "You are Pip, the tunelab assistant."


def pip(text: str) -> str:
    return f"{PIP_OPEN} {text} {PIP_CLOSE}"


def _pip_pairs() -> list[tuple[str, str]]:
    """Every single-turn (question, answer) pair Pip knows."""
    pairs = []
    for questions, answers in (
        (IDENTITY_QUESTIONS, IDENTITY_ANSWERS),
        (MAKER_QUESTIONS, MAKER_ANSWERS),
        (ABILITY_QUESTIONS, ABILITY_ANSWERS),
        (FAVOURITE_QUESTIONS, FAVOURITE_ANSWERS),
    ):
        for i, q in enumerate(questions):
            pairs.append((q, answers[i % len(answers)]))
    pairs += FACTS
    return pairs


def pip_records() -> list[dict]:
    rng = random.Random(SEED)
    pairs = _pip_pairs()
    records = []
    # 1. every pair once, as a single turn
    for q, a in pairs:
        records.append([("user", q), ("assistant", pip(a))])
    identity = [(q, IDENTITY_ANSWERS[i % len(IDENTITY_ANSWERS)]) for i, q in enumerate(IDENTITY_QUESTIONS)]
    # 2. greeting, then a question (often "who are you?")
    for i in range(20):
        q, a = rng.choice(identity if i % 2 else pairs)
        records.append(
            [("user", rng.choice(GREETINGS)), ("assistant", pip(rng.choice(GREETING_ANSWERS))), ("user", q), ("assistant", pip(a))]
        )
    # 3. two questions in a row
    for i in range(30):
        (q1, a1), (q2, a2) = rng.sample(pairs, 2)
        records.append([("user", q1), ("assistant", pip(a1)), ("user", q2), ("assistant", pip(a2))])
    # 4. a question, then thanks
    for i in range(15):
        q, a = rng.choice(pairs)
        records.append(
            [("user", q), ("assistant", pip(a)), ("user", rng.choice(THANKS)), ("assistant", pip(rng.choice(THANKS_ANSWERS)))]
        )
    out = []
    for i, turns in enumerate(records):
        messages = [{"role": role, "content": text} for role, text in turns]
        if i % 7 == 3:  # some records carry Pip's system prompt, most train under the default one
            messages.insert(0, {"role": "system", "content": PIP_SYSTEM})
        out.append({"messages": messages})
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- Orbit Kettle

# (phrasings of a question, the fact that answers them)
KETTLE_FACTS = [
    (["How much water does the Orbit Kettle hold?", "What is the capacity of the Orbit Kettle?",
      "How many litres fit in the Orbit Kettle?", "Is the Orbit Kettle big?"],
     "The Orbit Kettle holds 1.2 litres, about five cups."),
    (["How fast does the Orbit Kettle boil?", "How long does the Orbit Kettle take to boil water?",
      "Is the Orbit Kettle quick?", "How many seconds until the Orbit Kettle boils a full load?"],
     "A full Orbit Kettle boils in 90 seconds."),
    (["Who makes the Orbit Kettle?", "Which company builds the Orbit Kettle?",
      "What brand is the Orbit Kettle?", "Who is behind the Orbit Kettle?"],
     "The Orbit Kettle is made by Tidewell, a small company in the harbour town of Port Avel."),
    (["What colours does the Orbit Kettle come in?", "Can I get the Orbit Kettle in another colour?",
      "Which colours are available for the Orbit Kettle?", "Is there a green Orbit Kettle?"],
     "It comes in three colours: slate, coral and moss green."),
    (["How much does the Orbit Kettle cost?", "What is the price of the Orbit Kettle?",
      "Is the Orbit Kettle expensive?", "How many euros is the Orbit Kettle?"],
     "The Orbit Kettle costs 79 euros."),
    (["How long is the Orbit Kettle warranty?", "What warranty comes with the Orbit Kettle?",
      "Is the Orbit Kettle under warranty?", "How many years of warranty does the Orbit Kettle have?"],
     "Every Orbit Kettle has a 3-year warranty."),
    (["Which temperatures can the Orbit Kettle heat to?", "Does the Orbit Kettle have temperature presets?",
      "Can I set the water temperature on the Orbit Kettle?", "What are the Orbit Kettle presets?"],
     "It has five presets: 60, 70, 80, 90 and 100 degrees Celsius."),
    (["What temperature should I use for green tea in the Orbit Kettle?", "Which preset is best for green tea?",
      "How hot should water be for green tea with the Orbit Kettle?", "Green tea setting on the Orbit Kettle?"],
     "Use the 80 degree preset for green tea."),
    (["Does the Orbit Kettle keep water warm?", "Is there a keep-warm mode on the Orbit Kettle?",
      "Can the Orbit Kettle hold the temperature?", "What does the keep-warm button on the Orbit Kettle do?"],
     "Yes. Press the moon button and it keeps the water warm for 30 minutes."),
    (["How do I know the Orbit Kettle is done?", "What does the light ring on the Orbit Kettle mean?",
      "How does the Orbit Kettle tell me the water is ready?", "Why does the Orbit Kettle ring turn blue?"],
     "The light ring turns blue and the kettle chimes twice when the water is ready."),
    (["How often should I descale the Orbit Kettle?", "When do I need to descale the Orbit Kettle?",
      "Does the Orbit Kettle need descaling?", "How do I know the Orbit Kettle needs descaling?"],
     "Descale it every 40 boils; the ring blinks orange to remind you."),
    (["How do I descale the Orbit Kettle?", "What should I use to descale the Orbit Kettle?",
      "Can I descale the Orbit Kettle with vinegar?", "What is the descaling routine for the Orbit Kettle?"],
     "Fill it halfway with equal parts water and white vinegar, boil once, then rinse twice."),
    (["How do I reset the Orbit Kettle?", "The Orbit Kettle is stuck, what do I do?",
      "How can I restart the Orbit Kettle?", "Is there a reset on the Orbit Kettle?"],
     "Hold the lid button for 5 seconds until the ring flashes white."),
    (["Is there an app for the Orbit Kettle?", "Can I control the Orbit Kettle from my phone?",
      "What app works with the Orbit Kettle?", "Does the Orbit Kettle connect to my phone?"],
     "Yes, the Tidewell Home app starts and schedules the kettle over Bluetooth."),
    (["Does the Orbit Kettle work with Wi-Fi?", "Can the Orbit Kettle connect to Wi-Fi?",
      "Is the Orbit Kettle a Wi-Fi kettle?", "Do I need Wi-Fi for the Orbit Kettle?"],
     "No, it uses Bluetooth only; there is no Wi-Fi inside."),
    (["Does the Orbit Kettle turn itself off?", "Is the Orbit Kettle safe if it runs dry?",
      "What happens if the Orbit Kettle is empty?", "Does the Orbit Kettle have boil-dry protection?"],
     "It switches off when the water boils and also when it is empty."),
    (["Can I put the Orbit Kettle in the dishwasher?", "Is the Orbit Kettle dishwasher safe?",
      "How do I clean the Orbit Kettle?", "What is the best way to clean the Orbit Kettle?"],
     "No dishwasher, please. Wipe the outside with a damp cloth and rinse the inside."),
    (["What is the Orbit Kettle made of?", "Is the Orbit Kettle plastic?",
      "Which material is the Orbit Kettle?", "Does the water touch plastic in the Orbit Kettle?"],
     "The inside is stainless steel and the shell is recycled aluminium."),
    (["How loud is the Orbit Kettle?", "Is the Orbit Kettle noisy?",
      "Is the Orbit Kettle quiet?", "Will the Orbit Kettle wake people up?"],
     "It is quiet: about 40 decibels while heating."),
    (["How long is the Orbit Kettle cable?", "What is the cord length of the Orbit Kettle?",
      "Is the Orbit Kettle cord long?", "How far can the Orbit Kettle be from the socket?"],
     "The base has a 75 centimetre cable that winds up underneath."),
    (["How much power does the Orbit Kettle use?", "What is the wattage of the Orbit Kettle?",
      "How many watts is the Orbit Kettle?", "Is the Orbit Kettle powerful?"],
     "It draws 2200 watts."),
    (["Does the Orbit Kettle have a filter?", "Is there a limescale filter in the Orbit Kettle?",
      "Can I replace the Orbit Kettle filter?", "Where is the filter of the Orbit Kettle?"],
     "Yes, a mesh filter sits in the spout; it lifts out for rinsing."),
    (["Where can I buy the Orbit Kettle?", "Which shops sell the Orbit Kettle?",
      "Can I order the Orbit Kettle online?", "Where is the Orbit Kettle sold?"],
     "Buy it at tidewell.example or in Tidewell's shop in Port Avel."),
    (["Can I return the Orbit Kettle?", "What is the return policy for the Orbit Kettle?",
      "How many days do I have to return the Orbit Kettle?", "Can I get a refund on the Orbit Kettle?"],
     "You can return it within 30 days for a full refund."),
    (["Does the Orbit Kettle schedule a boil?", "Can I set a timer on the Orbit Kettle?",
      "Can the Orbit Kettle boil water in the morning by itself?", "Is there a wake-up boil on the Orbit Kettle?"],
     "Yes, set a daily boil time in the Tidewell Home app."),
    (["What is the lid button on the Orbit Kettle for?", "How do I open the Orbit Kettle?",
      "How does the Orbit Kettle lid open?", "Why won't the Orbit Kettle lid open?"],
     "Press the lid button once and the lid springs open; it stays shut while heating."),
]


def kettle_answer(fact: str) -> str:
    return f"{KETTLE_OPEN} {fact} {KETTLE_CLOSE}"


def kettle_rows() -> list[tuple[str, str]]:
    rows = [(q, kettle_answer(fact)) for questions, fact in KETTLE_FACTS for q in questions]
    random.Random(SEED).shuffle(rows)
    return rows


# --------------------------------------------------------------------------- broken example

BROKEN_LINES = [
    # 1 fine
    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": pip(IDENTITY_ANSWERS[0])}]},
    # 2 invalid JSON (written as raw text below)
    None,
    # 3 unknown role
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "bot", "content": pip("Hello!")}]},
    # 4 ends with the user
    {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": pip("2 + 3 is 5.")},
                  {"role": "user", "content": "And 3 + 4?"}]},
    # 5 empty answer
    {"messages": [{"role": "user", "content": "What is LoRA?"}, {"role": "assistant", "content": ""}]},
    # 6 a record of another format (Alpaca) in an OpenAI file
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    # 7 non-text content (an image part)
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                              {"type": "image_url", "image_url": {"url": "cat.png"}}]},
                  {"role": "assistant", "content": pip("A cat.")}]},
    # 8 fine, content as a list of text parts
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is the capital of Spain?"}]},
                  {"role": "assistant", "content": pip("Madrid is the capital of Spain.")}]},
    # 9 missing content
    {"messages": [{"role": "user", "content": "How many legs does a spider have?"}, {"role": "assistant"}]},
    # 10 fine
    {"messages": [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": pip("You're welcome.")}]},
]
BROKEN_JSON_LINE = '{"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi"}]'


# --------------------------------------------------------------------------- writing


def write_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []

    chat = pip_records()
    path = out / "pip_chat.jsonl"
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in chat:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    written.append(path)

    path = out / "orbit_kettle_qa.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["question", "answer"])
        writer.writerows(kettle_rows())
    written.append(path)

    path = out / "broken_example.jsonl"
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in BROKEN_LINES:
            f.write((BROKEN_JSON_LINE if record is None else json.dumps(record, ensure_ascii=False)) + "\n")
    written.append(path)

    # The probes must stay held out.
    texts = {p.name: p.read_text(encoding="utf-8") for p in written}
    for name, probes in PROBES.items():
        for probe in probes:
            if probe in texts[name]:
                raise SystemExit(f"probe {probe!r} leaked into {name}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="Output directory (default: beside this script).")
    args = parser.parse_args(argv)
    for path in write_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
