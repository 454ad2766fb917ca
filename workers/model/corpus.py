"""Deterministic training corpus for the default model: generated English plus Python stdlib docstrings.

Sources and licences:

* Generated text. Sentences, short paragraphs and chat exchanges about Kafka, streaming, weather, animals,
  cooking and gardening are produced by the small grammar in this module, seeded with ``random.Random(seed)``.
  The word lists and hand-written sentences are part of this project (Apache-2.0).
* Python standard library documentation. Prose paragraphs from ``inspect.getdoc`` of a fixed list of stdlib
  modules and their public members, taken from the running interpreter. That text is under the Python Software
  Foundation License, which permits redistribution of derived works. Given the same Python version the
  selection is deterministic; it is a minority share of the corpus.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypedDict


class Message(TypedDict):
    """One chat turn as consumed by the tokenizer's chat template."""

    role: str
    content: str


@dataclass
class Corpus:
    """Plain documents (each wrapped in bos/eos for training) and chat conversations (rendered by the template)."""

    texts: list[str] = field(default_factory=list)
    chats: list[list[Message]] = field(default_factory=list)

    def char_count(self) -> int:
        """Approximate size in characters, counting message contents only for chats."""
        return sum(len(t) for t in self.texts) + sum(len(m["content"]) for c in self.chats for m in c)


# --- word lists -------------------------------------------------------------------------------------------------

OPENERS = (
    "Every morning",
    "In the evening",
    "Most of the time",
    "Sometimes",
    "After a while",
    "Today",
    "Usually",
    "On a quiet day",
    "Later that week",
    "At first",
    "In the end",
    "Once again",
)

CONNECTORS = ("and", "but", "so", "while", "because")

KAFKA_SUBJECTS = (
    "the broker",
    "the producer",
    "the consumer",
    "the topic",
    "each partition",
    "the consumer group",
    "the cluster",
    "the log",
    "the leader replica",
    "the controller",
    "the worker",
    "the gateway",
)
KAFKA_PREDICATES = (
    "stores every record in an ordered log",
    "appends new messages to the end of the partition",
    "keeps track of the committed offset",
    "sends a batch of records to the leader",
    "reads messages in the order they were written",
    "replicates the data to other brokers",
    "waits for an acknowledgement before moving on",
    "balances the partitions across the group",
    "retries the request after a short delay",
    "compresses the batch to save bandwidth",
    "reports its lag to the monitoring system",
    "handles thousands of messages every second",
    "keeps old records until the retention time runs out",
    "elects a new leader when a broker fails",
    "commits the offset after it finishes the work",
    "publishes each token as soon as it is ready",
)
KAFKA_ADJECTIVES = ("fast", "reliable", "durable", "busy", "healthy", "ordered", "simple", "scalable")

STREAM_SUBJECTS = (
    "the stream",
    "the model",
    "the server",
    "the client",
    "the browser",
    "the request",
    "the response",
    "the event source",
    "the scheduler",
    "the batch",
)
STREAM_PREDICATES = (
    "sends one token at a time",
    "shows the answer while it is still being written",
    "keeps the connection open until the answer is done",
    "picks up where it left off after a reconnect",
    "adds new requests to the running batch",
    "measures the time to the first token",
    "keeps the latency low for every user",
    "flushes each event to the client",
    "stops when it reaches the end of the text",
    "shares the work between several requests",
    "counts the tokens that were generated",
    "replays the events that the client missed",
)
STREAM_ADJECTIVES = ("smooth", "quick", "steady", "responsive", "efficient", "live", "incremental")

WEATHER_CONDITIONS = (
    "sunny",
    "cloudy",
    "rainy",
    "windy",
    "foggy",
    "snowy",
    "stormy",
    "clear",
    "mild",
    "humid",
    "cool",
    "warm",
    "cold",
    "bright",
)
WEATHER_PHRASES = (
    "with a light breeze from the west",
    "with a chance of showers in the afternoon",
    "with clear skies after sunset",
    "with heavy rain later in the day",
    "with a few clouds in the morning",
    "with strong winds near the coast",
    "with snow on the hills",
    "with thick fog until noon",
    "with bright sunshine all day",
    "with a gentle rain in the evening",
)
WEATHER_ADVICE = (
    "It is a good idea to take an umbrella.",
    "You may want to wear a warm coat.",
    "It is a nice day for a walk in the park.",
    "Remember to drink plenty of water.",
    "A hat and sunglasses will be useful.",
    "The roads may be slippery, so drive with care.",
    "It is a good day to stay inside with a book.",
    "Wear good shoes if you go outside.",
)
CITIES = (
    "London",
    "Paris",
    "Berlin",
    "Madrid",
    "Rome",
    "Oslo",
    "Dublin",
    "Tokyo",
    "Seoul",
    "Sydney",
    "Toronto",
    "Chicago",
    "Boston",
    "Lisbon",
    "Vienna",
    "Prague",
)
SEASONS = ("spring", "summer", "autumn", "winter")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


@dataclass(frozen=True)
class Animal:
    """Facts about one animal used to write sentences and answers."""

    name: str
    plural: str
    home: str
    food: str
    trait: str
    sound: str


ANIMALS = (
    Animal("fox", "foxes", "the forest", "mice, birds and berries", "clever and quick", "barks"),
    Animal("cat", "cats", "warm houses", "fish and meat", "curious and quiet", "purrs"),
    Animal("dog", "dogs", "homes and farms", "meat and dry food", "loyal and friendly", "barks"),
    Animal("owl", "owls", "old trees", "mice and insects", "wise and patient", "hoots"),
    Animal("horse", "horses", "open fields", "grass and hay", "strong and gentle", "neighs"),
    Animal("rabbit", "rabbits", "burrows in the ground", "grass and carrots", "shy and fast", "thumps its feet"),
    Animal("bear", "bears", "the mountains", "fish, honey and berries", "large and powerful", "growls"),
    Animal("duck", "ducks", "ponds and rivers", "seeds and small plants", "calm and social", "quacks"),
    Animal("whale", "whales", "the deep ocean", "tiny sea creatures", "huge and graceful", "sings"),
    Animal("bee", "bees", "a busy hive", "nectar from flowers", "small and hard working", "buzzes"),
    Animal("wolf", "wolves", "the wild north", "deer and small animals", "smart and social", "howls"),
    Animal("goat", "goats", "rocky hills", "grass and leaves", "playful and stubborn", "bleats"),
    Animal("penguin", "penguins", "the cold south", "fish and krill", "funny and brave", "squawks"),
    Animal("deer", "deer", "quiet woods", "leaves and grass", "graceful and alert", "calls softly"),
    Animal("frog", "frogs", "wet meadows", "flies and worms", "green and lively", "croaks"),
    Animal("sheep", "sheep", "green pastures", "grass and clover", "gentle and calm", "bleats"),
)


@dataclass(frozen=True)
class Dish:
    """A simple recipe used to write cooking sentences and answers."""

    name: str
    ingredients: tuple[str, ...]
    steps: tuple[str, ...]


DISHES = (
    Dish(
        "pancakes",
        ("flour", "milk", "eggs", "a pinch of salt"),
        (
            "Mix the flour, milk and eggs into a smooth batter.",
            "Heat a little butter in a pan.",
            "Pour in some batter and cook until bubbles appear.",
            "Turn the pancake over and cook the other side.",
        ),
    ),
    Dish(
        "tomato soup",
        ("tomatoes", "an onion", "garlic", "vegetable stock"),
        (
            "Chop the onion and garlic.",
            "Cook them in olive oil until soft.",
            "Add the tomatoes and the stock.",
            "Simmer for twenty minutes and blend until smooth.",
        ),
    ),
    Dish(
        "a green salad",
        ("lettuce", "cucumber", "olive oil", "lemon juice"),
        (
            "Wash the lettuce and dry it well.",
            "Slice the cucumber thinly.",
            "Whisk the olive oil with the lemon juice.",
            "Toss everything together just before serving.",
        ),
    ),
    Dish(
        "fried rice",
        ("cooked rice", "eggs", "peas", "soy sauce"),
        (
            "Heat oil in a large pan.",
            "Scramble the eggs and set them aside.",
            "Fry the rice with the peas for a few minutes.",
            "Add the eggs and a splash of soy sauce.",
        ),
    ),
    Dish(
        "banana bread",
        ("ripe bananas", "flour", "sugar", "butter"),
        (
            "Mash the bananas in a bowl.",
            "Stir in the melted butter and the sugar.",
            "Fold in the flour gently.",
            "Bake in a warm oven for about an hour.",
        ),
    ),
    Dish(
        "a vegetable curry",
        ("potatoes", "carrots", "coconut milk", "curry paste"),
        (
            "Fry the curry paste for one minute.",
            "Add the chopped potatoes and carrots.",
            "Pour in the coconut milk.",
            "Simmer until the vegetables are tender.",
        ),
    ),
    Dish(
        "pasta with garlic",
        ("pasta", "garlic", "olive oil", "parsley"),
        (
            "Boil the pasta in salted water.",
            "Warm the oil and add the sliced garlic.",
            "Drain the pasta and toss it in the pan.",
            "Finish with fresh parsley.",
        ),
    ),
    Dish(
        "an omelette",
        ("eggs", "butter", "cheese", "herbs"),
        (
            "Beat the eggs with a fork.",
            "Melt the butter in a small pan.",
            "Pour in the eggs and stir gently.",
            "Add the cheese and fold the omelette in half.",
        ),
    ),
)
KITCHEN_SUBJECTS = ("the cook", "my friend", "the baker", "the chef", "my grandmother", "the child", "our neighbour")
KITCHEN_PREDICATES = (
    "cuts the vegetables into small pieces",
    "stirs the soup slowly",
    "tastes the sauce and adds a little salt",
    "bakes fresh bread in the morning",
    "washes the fruit before eating it",
    "sets the table for dinner",
    "keeps the kitchen clean and tidy",
    "follows the recipe step by step",
    "shares the meal with the family",
    "warms the milk on the stove",
)

GARDEN_SUBJECTS = ("the gardener", "the old man", "the young girl", "the farmer", "my sister", "the teacher")
GARDEN_PREDICATES = (
    "plants seeds in the spring",
    "waters the flowers every evening",
    "picks ripe apples from the tree",
    "pulls the weeds from the garden",
    "grows tomatoes in small pots",
    "cuts the grass on Saturday",
    "watches the birds from the window",
    "collects leaves in the autumn",
    "walks along the river after lunch",
    "reads a book under the tree",
)

KAFKA_QA = (
    (
        "What is Apache Kafka?",
        "Apache Kafka is a distributed event streaming platform. It stores streams of records in topics and lets "
        "many producers and consumers share them.",
    ),
    (
        "What is a Kafka topic?",
        "A topic is a named stream of records. Producers write to a topic and consumers read from it.",
    ),
    (
        "What is a partition?",
        "A partition is an ordered log inside a topic. Records in one partition keep their order, and partitions "
        "let a topic grow across many brokers.",
    ),
    (
        "What is an offset?",
        "An offset is the position of a record in a partition. A consumer remembers its offset so it can continue "
        "where it stopped.",
    ),
    (
        "What does a consumer group do?",
        "A consumer group shares the partitions of a topic among its members, so each record is handled by one "
        "member of the group.",
    ),
    (
        "Why does Kafka replicate data?",
        "Kafka keeps copies of each partition on several brokers. If one broker fails, another replica becomes "
        "the leader and no data is lost.",
    ),
    (
        "What is a broker?",
        "A broker is a Kafka server. It stores partitions on disk and answers requests from producers and consumers.",
    ),
    (
        "How does a producer send messages?",
        "The producer groups records into batches and sends each batch to the leader of the partition. It can "
        "wait for an acknowledgement to be sure the data is safe.",
    ),
    (
        "What is streaming inference?",
        "Streaming inference sends the answer of a model one token at a time, so the user can start reading "
        "before the whole answer is ready.",
    ),
    (
        "What is continuous batching?",
        "Continuous batching adds new requests to a running batch as soon as there is room, instead of waiting "
        "for the whole batch to finish.",
    ),
    (
        "What are server sent events?",
        "Server sent events are a simple way for a server to push text to a browser over one long HTTP connection.",
    ),
    (
        "Why is time to first token important?",
        "Time to first token is how long a user waits before the answer starts. A short wait makes the system "
        "feel fast.",
    ),
    (
        "What is consumer lag?",
        "Consumer lag is the number of records that have been written but not yet read by a consumer group.",
    ),
    (
        "What is a token?",
        "A token is a small piece of text, such as a word or part of a word. A language model reads and writes "
        "text as tokens.",
    ),
)

GREETINGS = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What would you like to talk about?"),
    ("Good morning.", "Good morning! I hope you have a nice day."),
    ("How are you?", "I am doing well, thank you. How can I help?"),
    ("Thank you.", "You are welcome. Let me know if you need anything else."),
    ("Thanks for your help!", "I am glad I could help."),
    ("Who are you?", "I am a small assistant. I can answer simple questions about many topics."),
    ("Goodbye.", "Goodbye! Have a great day."),
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly assistant who gives short answers.",
    "You are a helpful assistant. Answer clearly and simply.",
    "You are a kind and patient assistant.",
)

NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty")


# --- sentence generators ------------------------------------------------------------------------------------------


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _clause(rng: random.Random, subjects: tuple[str, ...], predicates: tuple[str, ...]) -> str:
    return f"{rng.choice(subjects)} {rng.choice(predicates)}"


def _svo_sentence(rng: random.Random, subjects: tuple[str, ...], predicates: tuple[str, ...]) -> str:
    form = rng.randrange(4)
    if form == 0:
        return _cap(_clause(rng, subjects, predicates)) + "."
    if form == 1:
        return f"{rng.choice(OPENERS)}, {_clause(rng, subjects, predicates)}."
    if form == 2:
        first, second = _clause(rng, subjects, predicates), _clause(rng, subjects, predicates)
        return _cap(f"{first}, {rng.choice(CONNECTORS)} {second}.")
    return _cap(f"{_clause(rng, subjects, predicates)} when {_clause(rng, subjects, predicates)}.")


def _kafka_sentence(rng: random.Random) -> str:
    if rng.random() < 0.25:
        first, second = rng.sample(KAFKA_ADJECTIVES, 2)
        return _cap(f"{rng.choice(KAFKA_SUBJECTS)} is {first} and {second}.")
    return _svo_sentence(rng, KAFKA_SUBJECTS, KAFKA_PREDICATES)


def _stream_sentence(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return _cap(f"{rng.choice(STREAM_SUBJECTS)} feels {rng.choice(STREAM_ADJECTIVES)}.")
    return _svo_sentence(rng, STREAM_SUBJECTS, STREAM_PREDICATES)


def _weather_sentence(rng: random.Random) -> str:
    cond, cond2 = rng.sample(WEATHER_CONDITIONS, 2)
    city = rng.choice(CITIES)
    form = rng.randrange(7)
    if form == 0:
        return f"The weather today is {cond} and {cond2}."
    if form == 1:
        return f"The weather in {city} is {cond} today, {rng.choice(WEATHER_PHRASES)}."
    if form == 2:
        return f"Tomorrow will be {cond} {rng.choice(WEATHER_PHRASES)}."
    if form == 3:
        return f"On {rng.choice(DAYS)} it will be {cond} in {city}."
    if form == 4:
        return f"In {rng.choice(SEASONS)} the days are often {cond} and {cond2}."
    if form == 5:
        return rng.choice(WEATHER_ADVICE)
    return f"The weather today in {city} is {cond}, {rng.choice(WEATHER_PHRASES)}."


def _animal_sentence(rng: random.Random, animal: Animal | None = None) -> str:
    a = animal or rng.choice(ANIMALS)
    form = rng.randrange(6)
    if form == 0:
        return f"The {a.name} lives in {a.home}."
    if form == 1:
        return f"The {a.name} eats {a.food}."
    if form == 2:
        return f"Most {a.plural} are {a.trait}."
    if form == 3:
        return f"At night the {a.name} {a.sound}."
    if form == 4:
        return f"{rng.choice(OPENERS)}, the {a.name} looks for {a.food.split(',')[0].split(' and ')[0]}."
    other = rng.choice(ANIMALS)
    return f"The {a.name} and the {other.name} are not the same, but both like {rng.choice(SEASONS)}."


def _cooking_sentence(rng: random.Random) -> str:
    dish = rng.choice(DISHES)
    form = rng.randrange(4)
    if form == 0:
        return f"To make {dish.name} you need {', '.join(dish.ingredients[:-1])} and {dish.ingredients[-1]}."
    if form == 1:
        return rng.choice(dish.steps)
    if form == 2:
        return f"{_cap(rng.choice(KITCHEN_SUBJECTS))} likes to make {dish.name} on {rng.choice(DAYS)}."
    return _svo_sentence(rng, KITCHEN_SUBJECTS, KITCHEN_PREDICATES)


def _garden_sentence(rng: random.Random) -> str:
    return _svo_sentence(rng, GARDEN_SUBJECTS, GARDEN_PREDICATES)


SENTENCE_MAKERS: tuple[Callable[[random.Random], str], ...] = (
    _kafka_sentence,
    _stream_sentence,
    _weather_sentence,
    _animal_sentence,
    _cooking_sentence,
    _garden_sentence,
)
TITLES = ("Notes on Kafka", "Streams", "A day with the weather", "Animals we met", "In the kitchen", "The garden")


def generated_paragraph(rng: random.Random, topic: int | None = None) -> str:
    """A paragraph of 2-6 sentences, mostly on one topic so that the text stays coherent."""
    maker = SENTENCE_MAKERS[rng.randrange(len(SENTENCE_MAKERS)) if topic is None else topic]
    sentences = []
    for _ in range(rng.randint(2, 6)):
        sentences.append((maker if rng.random() < 0.85 else rng.choice(SENTENCE_MAKERS))(rng))
    return " ".join(sentences)


def generated_story(rng: random.Random) -> str:
    """A few paragraphs with a title line, giving the model longer documents."""
    topic = rng.randrange(len(TITLES))
    paragraphs = [generated_paragraph(rng, topic) for _ in range(rng.randint(2, 4))]
    return TITLES[topic] + "\n\n" + "\n\n".join(paragraphs)


# --- chat generators ----------------------------------------------------------------------------------------------


def _animal_answer(rng: random.Random, a: Animal) -> str:
    parts = [
        f"The {a.name} lives in {a.home} and eats {a.food}.",
        f"Most {a.plural} are {a.trait}.",
        f"When it wants to be heard, the {a.name} {a.sound}.",
    ]
    return " ".join(parts[: rng.randint(2, 3)])


def _qa_pair(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice(KAFKA_QA)
    if kind == 1:
        a = rng.choice(ANIMALS)
        question = rng.choice((f"Tell me about the {a.name}.", f"What do you know about {a.plural}?"))
        return question, _animal_answer(rng, a)
    if kind == 2:
        a = rng.choice(ANIMALS)
        return f"What does a {a.name} eat?", f"A {a.name} eats {a.food}."
    if kind == 3:
        city = rng.choice(CITIES)
        cond = rng.choice(WEATHER_CONDITIONS)
        answer = f"The weather in {city} is {cond} today, {rng.choice(WEATHER_PHRASES)}. {rng.choice(WEATHER_ADVICE)}"
        return rng.choice((f"How is the weather in {city}?", f"What is the weather like in {city} today?")), answer
    if kind == 4:
        dish = rng.choice(DISHES)
        answer = f"You need {', '.join(dish.ingredients[:-1])} and {dish.ingredients[-1]}. " + " ".join(dish.steps)
        return f"How do I make {dish.name}?", answer
    if kind == 5:
        return rng.choice(GREETINGS)
    if kind == 6:
        n, m = rng.randint(1, 20), rng.randint(1, 20)
        return f"What is {n} plus {m}?", f"{n} plus {m} is {n + m}."
    maker = rng.choice(SENTENCE_MAKERS)
    return "Tell me something interesting.", " ".join(maker(rng) for _ in range(rng.randint(1, 3)))


def generated_chat(rng: random.Random) -> list[Message]:
    """A conversation of one to three exchanges, with a system prompt about half the time."""
    messages: list[Message] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choice((1, 1, 2, 3))):
        question, answer = _qa_pair(rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return messages


# --- stdlib documentation -----------------------------------------------------------------------------------------

STDLIB_MODULES = (
    "abc",
    "argparse",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "gzip",
    "hashlib",
    "heapq",
    "html",
    "http.client",
    "io",
    "itertools",
    "json",
    "logging",
    "math",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shutil",
    "socket",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "weakref",
    "zipfile",
    "zlib",
)

_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:'()\-]")


def _is_prose(paragraph: str) -> bool:
    if len(paragraph) < 80 or ">>>" in paragraph or "::" in paragraph or "    " in paragraph:
        return False
    if not paragraph.rstrip().endswith("."):
        return False
    prose = sum(1 for ch in paragraph if _PROSE_CHARS.match(ch))
    return prose / len(paragraph) > 0.95


def _docstrings(module_name: str) -> Iterator[str]:
    module = importlib.import_module(module_name)
    seen: set[int] = set()
    objects: list[object] = [module]
    for name in sorted(getattr(module, "__all__", None) or dir(module)):
        if not name.startswith("_"):
            obj = getattr(module, name, None)
            if obj is not None and (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                objects.append(obj)
    for obj in objects:
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        doc = inspect.getdoc(obj)
        if doc:
            yield doc


def stdlib_paragraphs() -> list[str]:
    """Prose paragraphs (no code, no tables) from the docstrings of a fixed list of stdlib modules, deduplicated."""
    out: list[str] = []
    seen: set[str] = set()
    for module_name in STDLIB_MODULES:
        try:
            docs = list(_docstrings(module_name))
        except ImportError:
            continue
        for doc in docs:
            for raw in doc.split("\n\n"):
                paragraph = " ".join(raw.split())
                if _is_prose(raw) and paragraph not in seen:
                    seen.add(paragraph)
                    out.append(paragraph)
    return out


# --- assembly -----------------------------------------------------------------------------------------------------


def build_corpus(seed: int = 0, target_chars: int = 3_000_000, stdlib_share: float = 0.15) -> Corpus:
    """Generated stories, paragraphs and chats up to ``target_chars``, plus stdlib prose up to ``stdlib_share``."""
    rng = random.Random(seed)
    corpus = Corpus()
    stdlib_budget = int(target_chars * stdlib_share)
    for paragraph in stdlib_paragraphs():
        if stdlib_budget <= 0:
            break
        corpus.texts.append(paragraph)
        stdlib_budget -= len(paragraph)
    total = corpus.char_count()
    while total < target_chars:
        roll = rng.random()
        if roll < 0.35:
            chat = generated_chat(rng)
            corpus.chats.append(chat)
            total += sum(len(m["content"]) for m in chat)
        else:
            text = generated_story(rng) if roll < 0.55 else generated_paragraph(rng)
            corpus.texts.append(text)
            total += len(text)
    rng.shuffle(corpus.texts)
    return corpus


def main(argv: list[str] | None = None) -> None:
    """Print corpus statistics and a few samples."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chars", type=int, default=3_000_000)
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args(argv)
    corpus = build_corpus(seed=args.seed, target_chars=args.chars)
    print(f"texts={len(corpus.texts)} chats={len(corpus.chats)} chars={corpus.char_count()}")
    for text in corpus.texts[: args.samples]:
        print("---\n" + text)
    for chat in corpus.chats[: args.samples]:
        print("---\n" + "\n".join(f"{m['role']}: {m['content']}" for m in chat))


if __name__ == "__main__":
    main()
