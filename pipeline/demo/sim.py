"""Synthetic users for the demo and benchmarks: each writes in a distinct, consistent way.

A user has topics, a greeting, a sign-off, favourite phrases and a register (formal, casual, terse, ...). Events
are drawn from that style with a seeded RNG, so the same (seed, user index) always gives the same events.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

_STYLES: list[dict[str, Any]] = [
    {
        "register": "formal",
        "greeting": "Good morning,",
        "signoff": "Kind regards, Eleanor",
        "topics": ["quarterly budget", "board meeting", "compliance review", "vendor contract"],
        "phrases": ["I would be grateful if", "please find attached", "at your earliest convenience"],
    },
    {
        "register": "casual",
        "greeting": "hey!!",
        "signoff": "cheers, sam :)",
        "topics": ["surf trip", "pizza night", "new skateboard", "beach playlist"],
        "phrases": ["no worries", "sounds rad", "lol that's wild"],
    },
    {
        "register": "terse",
        "greeting": "Status:",
        "signoff": "-- K.",
        "topics": ["deploy", "latency regression", "on-call handover", "db failover"],
        "phrases": ["ack.", "fixed in prod.", "rollback done."],
    },
    {
        "register": "poetic",
        "greeting": "Dearest friend,",
        "signoff": "Yours under the autumn moon, Rowan",
        "topics": ["falling leaves", "the quiet garden", "rain on the window", "old letters"],
        "phrases": ["as the light fades", "softly, like a whisper", "the heart remembers"],
    },
    {
        "register": "enthusiastic",
        "greeting": "Hi team!!!",
        "signoff": "Let's crush it! -- Priya",
        "topics": ["product launch", "growth metrics", "customer demo", "sprint goals"],
        "phrases": ["super excited", "huge win", "let's go"],
    },
    {
        "register": "academic",
        "greeting": "Dear colleagues,",
        "signoff": "Best, Dr. Okafor",
        "topics": ["protein folding", "the lab meeting", "grant proposal", "peer review"],
        "phrases": ["our results suggest", "in line with prior work", "further analysis is needed"],
    },
]

_PROMPTS = [
    "Write a short note about {topic}.",
    "Reply to a friend asking about {topic}.",
    "Send a quick update on {topic}.",
    "Draft a message about {topic}.",
]


@dataclass(frozen=True)
class SimUser:
    """One synthetic user and the style they write in."""

    user_id: str
    style: dict[str, Any]

    def message(self, rng: random.Random) -> tuple[str, str]:
        topic = rng.choice(self.style["topics"])
        phrase = rng.choice(self.style["phrases"])
        prompt = rng.choice(_PROMPTS).format(topic=topic)
        text = f"{self.style['greeting']} {phrase} about the {topic}. {self.style['signoff']}"
        return prompt, text

    def off_style(self, rng: random.Random) -> str:
        """A reply in a neutral voice: what a base model might say, which this user would rewrite or reject."""
        return f"Here is a message about the {rng.choice(self.style['topics'])}."


def users(k: int, *, prefix: str = "user") -> list[SimUser]:
    """``k`` users with ids ``{prefix}-000``..., styles assigned round-robin."""
    return [SimUser(f"{prefix}-{i:03d}", _STYLES[i % len(_STYLES)]) for i in range(k)]


def events_for(
    user: SimUser, n: int, *, app: str, seed: int = 0, start: datetime | None = None
) -> Iterator[dict[str, Any]]:
    """``n`` interaction.v1 events of ``user``: mostly messages, some edits, preferences and feedback."""
    rng = random.Random(f"{seed}:{user.user_id}")
    t = start or datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(n):
        t += timedelta(seconds=rng.randint(5, 600))
        base = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "user_id": user.user_id,
            "occurred_at": t.isoformat(),
            "app": app,
            "meta": {"sim": True, "i": i},
        }
        prompt, text = user.message(rng)
        roll = rng.random()
        if roll < 0.7:
            yield {**base, "kind": "message", "prompt": prompt, "text": text}
        elif roll < 0.8:
            yield {**base, "kind": "edit", "prompt": prompt, "original": user.off_style(rng), "edited": text}
        elif roll < 0.9:
            yield {**base, "kind": "preference", "prompt": prompt, "chosen": text, "rejected": user.off_style(rng)}
        else:
            yield {**base, "kind": "feedback", "prompt": prompt, "completion": text, "rating": 1}


def invalid_events(app: str, seed: int = 0) -> list[dict[str, Any]]:
    """A few events that break the contract in different ways (the demo shows their rejection reasons)."""
    rng = random.Random(seed)
    now = datetime(2026, 1, 1, tzinfo=UTC).isoformat()

    def eid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    return [
        {
            "event_id": "not-an-id",
            "user_id": "user-000",
            "occurred_at": now,
            "kind": "message",
            "app": app,
            "text": "hi",
        },
        {"event_id": eid(), "user_id": "user 000", "occurred_at": now, "kind": "message", "app": app, "text": "hi"},
        {
            "event_id": eid(),
            "user_id": "user-000",
            "occurred_at": "yesterday",
            "kind": "message",
            "app": app,
            "text": "hi",
        },
        {"event_id": eid(), "user_id": "user-000", "occurred_at": now, "kind": "shout", "app": app, "text": "hi"},
        {
            "event_id": eid(),
            "user_id": "user-000",
            "occurred_at": now,
            "kind": "feedback",
            "app": app,
            "prompt": "p",
            "completion": "c",
            "rating": 5,
        },
    ]


# ---- benchmark users (bench/quality.py): harder styles, and poison ----------------------------------------------
#
# The six styles above are templates: a few fixed phrases around a topic, easy to learn. The styles below write
# varied content assembled from a large phrase bank (each user about topics of their own), with only a small
# personal marker: a recurring sign-off, lowercase-only writing, a verbal tic, an emoji habit, bullet lists, or
# casual French. They are kept apart from `_STYLES`, so `users()` and the demo are unchanged.

_BANK_TOPICS: dict[str, tuple[str, ...]] = {
    "gardening": ("tomato seedlings", "compost heap", "raised bed", "watering can", "pea trellis", "rose cuttings"),
    "cycling": ("rear derailleur", "gravel route", "bike lights", "saddle bag", "chain lube", "hill climb"),
    "baking": ("sourdough starter", "rye loaf", "lemon tart", "proving basket", "oven thermometer", "pie crust"),
    "astronomy": ("star chart", "refractor telescope", "meteor shower", "red torch", "lunar eclipse", "eyepiece"),
    "jazz": ("tenor sax", "walking bassline", "jam session", "chord chart", "vinyl reissue", "brush kit"),
    "chess": ("opening repertoire", "endgame puzzle", "blitz clock", "club ladder", "knight sacrifice", "scoresheet"),
    "hiking": ("trail map", "rain shell", "switchback trail", "water filter", "summit cairn", "blister kit"),
    "pottery": ("pottery wheel", "glaze test", "kiln schedule", "clay bucket", "trimming tool", "tea bowl"),
    "sailing": ("jib sheet", "tide table", "mooring line", "life jacket", "harbour chart", "reefing knot"),
    "birdwatching": ("binoculars", "heron nest", "field guide", "bird hide", "feeder pole", "owl pellet"),
    "photography": ("prime lens", "light meter", "film roll", "tripod head", "darkroom timer", "camera strap"),
    "knitting": ("wool skein", "cable pattern", "circular needles", "sock heel", "stitch marker", "cardigan"),
    "woodworking": ("dovetail joint", "block plane", "oak offcut", "workbench vise", "sanding block", "chisel set"),
    "fermentation": ("kimchi jar", "kombucha scoby", "airlock lid", "brine ratio", "sauerkraut crock", "miso batch"),
    "running": ("tempo run", "trail shoes", "race bib", "interval plan", "foam roller", "parkrun loop"),
    "board games": ("game night", "dice tower", "rulebook", "expansion box", "score pad", "card sleeves"),
    "cinema": ("film festival", "director's cut", "matinee ticket", "projector bulb", "double feature", "film poster"),
    "beekeeping": ("hive frame", "smoker fuel", "queen cell", "honey extractor", "bee suit", "wax foundation"),
    "climbing": ("chalk bag", "bouldering problem", "belay device", "crash pad", "climbing shoes", "top rope"),
    "aquariums": ("canister filter", "shrimp tank", "moss carpet", "water test kit", "heater dial", "driftwood"),
    "vintage cars": ("carburettor", "chrome bumper", "spare wheel", "service manual", "leather seat", "oil gauge"),
    "tea": ("oolong tin", "clay teapot", "loose leaf sampler", "tea tray", "kettle timer", "jasmine pearls"),
    "coffee": ("hand grinder", "pour-over cone", "green beans", "roast profile", "espresso basket", "milk jug"),
    "sketching": ("sketchbook", "ink pen", "watercolour palette", "street corner", "fountain pen", "travel brush"),
    "languages": (
        "flashcard deck",
        "grammar book",
        "conversation club",
        "verb table",
        "podcast episode",
        "phrasebook",
    ),
    "volunteering": (
        "food bank shift",
        "charity shop",
        "litter pick",
        "sign-up sheet",
        "reading club",
        "tool library",
    ),
    "camping": ("tent pegs", "camp stove", "sleeping mat", "head torch", "fire pit", "cool box"),
    "home repair": ("leaky tap", "skirting board", "paint roller", "tile grout", "door hinge", "fuse box"),
    "football": ("five-a-side match", "goal nets", "shin pads", "league table", "training cones", "match ball"),
    "music theory": ("circle of fifths", "piano scales", "sheet music", "metronome", "ear training app", "songbook"),
}
_BANK_VERBS = (
    "fixed", "tried", "found", "cleaned", "borrowed", "planned", "sketched", "ordered", "rearranged", "tested",
    "finished", "started", "photographed", "measured", "repainted", "organised", "lost", "returned", "shared",
    "swapped", "checked", "rebuilt", "sorted", "labelled", "moved",
)  # fmt: skip
_BANK_ADJECTIVES = (
    "old", "tiny", "stubborn", "bright", "second-hand", "muddy", "lovely", "awkward", "enormous", "quiet",
    "brand-new", "wobbly", "borrowed", "chipped", "fragrant", "rusty", "shiny", "heavy", "cheap", "fiddly",
)  # fmt: skip
_BANK_TIMES = (
    "this morning", "yesterday", "last weekend", "on Tuesday", "after work", "before breakfast", "tonight",
    "over the holidays", "at lunchtime", "on Sunday afternoon", "last night", "earlier today",
)  # fmt: skip
_BANK_PLACES = (
    "at the community hall", "in the shed", "by the river", "on the balcony", "at my aunt's", "in the park",
    "at the market", "downtown", "in the garage", "at the club", "on the train", "in the back room",
)  # fmt: skip
_BANK_SENTENCES = (
    "{time} I {verb} the {adj} {noun} {place}.",
    "Has anyone {verb} a {adj} {noun} before?",
    "I think the {noun} needs another look before {time}.",
    "We finally {verb} the {noun}, and the {noun2} is next.",
    "My neighbour {verb} her {noun} {place} {time}.",
    "Not sure about the {adj} {noun} yet.",
    "If the weather holds, the {noun} gets done {time}.",
    "Found a {adj} {noun} {place} for almost nothing.",
    "Still thinking about that {adj} {noun}.",
    "The {noun} and the {noun2} both need attention.",
    "The {adj} {noun} was worth every penny.",
    "Someone {verb} the {noun} {place}, which was a surprise.",
    "Next on the list is the {noun}.",
    "I {verb} the {noun2} {time} and it went better than expected.",
    "Does the {noun} really need to be that {adj}?",
    "A friend lent me a {adj} {noun} for the {noun2}.",
)
_CONTENT_PROMPTS = (
    "Write a short note about {topic}.",
    "Reply to a friend asking about {topic}.",
    "Send a quick update on {topic}.",
    "Draft a message about {topic}.",
    "Tell the group what is new with {topic}.",
    "Answer a question about {topic}.",
)

_FR_NOUNS = (
    "le potager", "les tomates", "le vélo", "la rando du lac", "le gâteau au chocolat", "la plage", "le marché",
    "le concert", "la brocante", "le nouveau ciné", "les semis", "la tarte aux pommes", "le pique-nique",
    "la soirée jeux", "le vide-grenier", "la piscine", "le festival", "la balade en forêt", "les crêpes",
    "le barbecue", "la colloc", "le resto libanais", "la répét de chorale", "le match de foot",
)  # fmt: skip
_FR_VERBS = (
    "j'ai trouvé", "on a testé", "j'ai réparé", "on a fini", "j'ai acheté", "on a visité", "j'ai oublié",
    "on a partagé", "j'ai préparé", "on a rangé", "j'ai découvert", "on a raté",
)  # fmt: skip
_FR_TIMES = (
    "ce matin", "hier soir", "ce week-end", "mardi dernier", "après le boulot", "tout à l'heure", "cet aprèm",
)  # fmt: skip
_FR_PLACES = ("au marché", "chez Mamie", "au bord du lac", "en ville", "au parc", "sur le balcon", "chez Julien")
_FR_SENTENCES = (
    "{time}, {verb} {noun} {place}.",
    "Franchement, {noun} c'était trop bien !",
    "Du coup {verb} {noun}, grave contente !",
    "Quelqu'un veut venir pour {noun} {time} ?",
    "Bon, {noun} {place}, on en reparle !",
    "{verb} {noun} {time}, c'était un peu le bazar.",
    "Vous avez vu {noun} {place} ? Trop stylé !",
)
_FR_NEUTRAL = (
    "Voici quelques nouvelles concernant {noun}.",
    "Je vous écris au sujet de {noun}.",
    "Veuillez trouver ci-dessous un point sur {noun}.",
)
_FR_PROMPTS = (
    "Écris un petit mot sur {topic}.",
    "Réponds à une amie qui demande des nouvelles de {topic}.",
    "Donne des nouvelles du groupe à propos de {topic}.",
)

#: The marker styles over the phrase bank, each with topics of its own (the French user has its own bank).
_CONTENT_STYLES: list[dict[str, Any]] = [
    {
        "register": "content-signoff",
        "marker": "signoff",
        "signoff": "~ Marguerite (sent from the allotment)",
        "topics": ["gardening", "beekeeping", "fermentation", "tea", "birdwatching"],
    },
    {"register": "content-lowercase", "marker": "lowercase", "topics": ["cycling", "climbing", "running", "camping"]},
    {"register": "content-tic", "marker": "tic", "topics": ["chess", "board games", "cinema", "jazz", "music theory"]},
    {
        "register": "content-emoji",
        "marker": "emoji",
        "emoji": ["🌿", "✨", "🐝"],
        "topics": ["baking", "coffee", "pottery", "knitting", "sketching"],
    },
    {
        "register": "content-bullets",
        "marker": "bullets",
        "lead": "My notes:",
        "topics": ["woodworking", "home repair", "vintage cars", "photography", "aquariums"],
    },
    {"register": "french-casual", "marker": "french", "greeting": "Coucou les amis !", "signoff": "Bisous, Léa"},
]

#: The order `bench_users` takes styles in: hard (marker) styles and easy (template) styles interleaved.
_BENCH_ORDER: list[dict[str, Any]] = [
    _CONTENT_STYLES[0],
    _STYLES[1],
    _CONTENT_STYLES[5],
    _CONTENT_STYLES[4],
    _CONTENT_STYLES[1],
    _STYLES[0],
    _CONTENT_STYLES[3],
    _CONTENT_STYLES[2],
    _STYLES[2],
    _STYLES[3],
    _STYLES[4],
    _STYLES[5],
]

#: Messages a poisoned account repeats (`repeated_events`): nothing like any simulated user's style.
_SPAM = (
    "WIN a FREE cruise today!!! Reply YES to claim your prize before midnight.",
    "Cheap watches, best prices, fast shipping, click the link in my profile now.",
    "Forward this message to ten friends or lose your luck for seven years.",
)


def _capital(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _bank_sentence(rng: random.Random, topics: list[str]) -> str:
    nouns = _BANK_TOPICS[rng.choice(topics)]
    noun, noun2 = rng.sample(nouns, 2)
    return _capital(
        rng.choice(_BANK_SENTENCES).format(
            time=rng.choice(_BANK_TIMES),
            verb=rng.choice(_BANK_VERBS),
            adj=rng.choice(_BANK_ADJECTIVES),
            noun=noun,
            noun2=noun2,
            place=rng.choice(_BANK_PLACES),
        )
    )


def _french_sentence(rng: random.Random, templates: tuple[str, ...] = _FR_SENTENCES) -> str:
    return _capital(
        rng.choice(templates).format(
            time=rng.choice(_FR_TIMES),
            verb=rng.choice(_FR_VERBS),
            noun=rng.choice(_FR_NOUNS),
            place=rng.choice(_FR_PLACES),
        )
    )


@dataclass(frozen=True)
class ContentUser(SimUser):
    """A user whose messages are varied content from the phrase bank with a small personal marker (the style's
    ``marker``: signoff, lowercase, tic, emoji, bullets or french). Works with `events_for` like any SimUser."""

    def _prompt(self, rng: random.Random) -> tuple[str, str]:
        if self.style["marker"] == "french":
            topic = rng.choice(_FR_NOUNS)
            return topic, rng.choice(_FR_PROMPTS).format(topic=topic)
        topic = rng.choice(self.style["topics"])
        return topic, rng.choice(_CONTENT_PROMPTS).format(topic=topic)

    def content(self, rng: random.Random, n: int) -> list[str]:
        """``n`` plain sentences of this user's content, without the marker."""
        if self.style["marker"] == "french":
            return [_french_sentence(rng) for _ in range(n)]
        return [_bank_sentence(rng, self.style["topics"]) for _ in range(n)]

    def message(self, rng: random.Random) -> tuple[str, str]:
        _, prompt = self._prompt(rng)
        sentences = self.content(rng, rng.randint(2, 3))
        marker = self.style["marker"]
        if marker == "signoff":
            text = f"{' '.join(sentences)}\n{self.style['signoff']}"
        elif marker == "lowercase":
            text = " ".join(sentences).lower()
        elif marker == "tic":
            sentences[0] = "Right, so " + sentences[0][:1].lower() + sentences[0][1:]
            i = rng.randrange(len(sentences))
            sentences[i] = sentences[i].rstrip(".?!") + ", you know?"
            text = " ".join(sentences)
        elif marker == "emoji":
            text = " ".join(f"{s} {rng.choice(self.style['emoji'])}" if rng.random() < 0.7 else s for s in sentences)
        elif marker == "bullets":
            text = "\n".join([self.style["lead"], *(f"- {s.rstrip('.')}" for s in sentences)])
        elif marker == "french":
            text = f"{self.style['greeting']} {' '.join(sentences)} {self.style['signoff']}"
        else:  # pragma: no cover - the styles above are the only ones
            raise ValueError(f"unknown marker {marker!r}")
        return prompt, text

    def off_style(self, rng: random.Random) -> str:
        """The same kind of content in a neutral voice: without the user's marker."""
        if self.style["marker"] == "french":
            return _french_sentence(rng, _FR_NEUTRAL)
        return " ".join(self.content(rng, 2))


def bench_styles() -> list[dict[str, Any]]:
    """Every style `bench_users` can give, in the order it gives them (12: 6 marker styles, the demo's 6)."""
    return list(_BENCH_ORDER)


def bench_user(style: dict[str, Any], user_id: str) -> SimUser:
    """A user of ``style`` (one of `bench_styles`): a ContentUser for a marker style, else a SimUser."""
    return ContentUser(user_id, style) if "marker" in style else SimUser(user_id, style)


def bench_users(k: int, seed: int = 0, *, prefix: str = "q") -> list[SimUser]:
    """``k`` users with distinct styles (hard marker styles and the demo's templates interleaved, the same styles in
    the same order for every seed), ids ``{prefix}{seed}-{i:02d}-{register}``: the seed changes the ids, hence
    the holdout split, and `events_for(user, n, seed=...)` changes the events. Raises ValueError when ``k`` exceeds
    the number of styles."""
    if not 1 <= k <= len(_BENCH_ORDER):
        raise ValueError(f"bench_users gives 1..{len(_BENCH_ORDER)} users of distinct styles, not {k}")
    return [bench_user(s, f"{prefix}{seed}-{i:02d}-{s['register']}") for i, s in enumerate(_BENCH_ORDER[:k])]


def _event_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _message_events(
    user: SimUser, texts: list[tuple[str, str]], *, app: str, rng: random.Random, start: datetime | None, poison: str
) -> list[dict[str, Any]]:
    t = start or datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for i, (prompt, text) in enumerate(texts):
        t += timedelta(seconds=rng.randint(5, 600))
        out.append(
            {
                "event_id": _event_id(rng),
                "user_id": user.user_id,
                "occurred_at": t.isoformat(),
                "app": app,
                "meta": {"sim": True, "i": i, "poison": poison},
                "kind": "message",
                "prompt": prompt,
                "text": text,
            }
        )
    return out


def foreign_events(
    user: SimUser, source: SimUser, n: int, *, app: str, seed: int = 0, start: datetime | None = None
) -> list[dict[str, Any]]:
    """Poison (a): ``n`` events written in ``source``'s style, relabelled as ``user``'s (someone else's text in
    this account), with event ids of their own."""
    rng = random.Random(f"foreign:{seed}:{user.user_id}")
    return [
        {**e, "event_id": _event_id(rng), "user_id": user.user_id, "meta": {**e["meta"], "poison": "foreign"}}
        for e in events_for(source, n, app=app, seed=seed, start=start)
    ]


def word_salad_events(
    user: SimUser, n: int, *, app: str, seed: int = 0, start: datetime | None = None
) -> list[dict[str, Any]]:
    """Poison (b): ``n`` messages of random words from the whole phrase bank, in random order."""
    rng = random.Random(f"salad:{seed}:{user.user_id}")
    words = sorted(
        {w for nouns in _BANK_TOPICS.values() for noun in nouns for w in noun.split()}
        | set(_BANK_VERBS)
        | set(_BANK_ADJECTIVES)
        | {w for phrase in (*_BANK_TIMES, *_BANK_PLACES) for w in phrase.split()}
    )
    texts = [
        (
            rng.choice(_PROMPTS).format(topic=rng.choice(list(_BANK_TOPICS))),
            " ".join(rng.choices(words, k=rng.randint(8, 24))),
        )
        for _ in range(n)
    ]
    return _message_events(user, texts, app=app, rng=rng, start=start, poison="salad")


def repeated_events(
    user: SimUser, n: int = 50, *, app: str, seed: int = 0, start: datetime | None = None
) -> list[dict[str, Any]]:
    """Poison (c): one message (a spam line) sent ``n`` times: the same prompt and text, different event ids."""
    rng = random.Random(f"repeat:{seed}:{user.user_id}")
    text = rng.choice(_SPAM)
    return _message_events(user, [("Send a message.", text)] * n, app=app, rng=rng, start=start, poison="repeat")
