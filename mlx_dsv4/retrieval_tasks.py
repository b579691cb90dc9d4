"""Synthetic long-context retrieval cases, built to a token count with the model's tokenizer.

Three tasks, every case drawn from ``random.Random`` seeded by (seed, task, size, case), so
the same arguments give the same prompt byte for byte:

- ``needle``: "The access code for vault QX-17 is 493812." hidden at a given depth of a
  haystack of varied, never repeated filler sentences; the question asks for the code;
- ``multidoc``: short company records and staff profiles; the question ("the headquarters
  city / founding year of the company whose chief executive is X") needs the profile that
  names X's company and that company's record;
- ``codebase``: a synthetic Python package, one module after another under file headers;
  the question asks which function defines a constant, or a settings field's default.

The prompt is one user message in the V4 chat format (chat mode), built so that its token
count is at most the requested size and within ``size_tolerance(size)`` of it. Answers are
scored by exact match after ``normalise_answer``.
"""

import random
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

TASKS = ("needle", "multidoc", "codebase", "keyvalue")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_SIZE = 512  # below this the instructions and the question leave no room for a haystack


class RetrievalSizeError(ValueError):
    """A requested size cannot hold a case (too small) or cannot be built to its token count."""


@dataclass
class Case:
    task: str
    size: int  # the token count the prompt was built to
    label: str  # what sets this case apart within its task and size ("depth 50%", "case 2")
    question: str
    answer: str
    prompt: str  # the chat-encoded prompt text
    ids: List[int]
    meta: dict = field(default_factory=dict)


def size_tolerance(size: int) -> int:
    """How many tokens short of ``size`` a built prompt may be."""
    return max(32, size // 256)


def format_tokens(n: int) -> str:
    """A token count as the sizes are usually written: 1048576 -> '1M', 32768 -> '32K'."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


# -- answers -----------------------------------------------------------------------------------

_QUOTES = "\"'`*_“”‘’«»"
_DIGITS_WITH_SEPARATORS = re.compile(r"\d{1,3}(?:[,_ ]\d{3})+")


def normalise_answer(text: str) -> str:
    """The answer in ``text`` with trivial formatting removed: the first non-empty line, an
    "Answer:" label, surrounding quotes, backticks, bold markers and brackets, final punctuation,
    a call's "()", case, repeated spaces, and thousands separators in a number."""
    text = unicodedata.normalize("NFKC", text)
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*(?:the\s+)?answer\s*(?:is\s*:?|:)\s*", "", line, flags=re.IGNORECASE)
    previous = None
    while previous != line:
        previous = line
        line = line.strip().strip(_QUOTES).strip()
        line = re.sub(r"[.,;:!?]+$", "", line)
        if len(line) > 1 and line[0] + line[-1] in ("()", "[]", "{}", "<>"):
            line = line[1:-1]
    line = re.sub(r"\(\)$", "", line)
    line = " ".join(line.split()).casefold()
    if _DIGITS_WITH_SEPARATORS.fullmatch(line):
        line = re.sub(r"[,_ ]", "", line)
    return line


def is_correct(output: str, expected: str) -> bool:
    """Exact match of the normalised model output and the normalised expected answer."""
    return normalise_answer(output) == normalise_answer(expected)


# -- word banks --------------------------------------------------------------------------------

_SYLLABLES_A = ("Vel", "Mar", "Quil", "Tor", "Bren", "Cal", "Dor", "Fen", "Gal", "Hal", "Jor", "Kel", "Lin",
                "Mor", "Nor", "Ost", "Pel", "Ral", "Sel", "Tam", "Ul", "Var", "Wen", "Yar", "Zel", "Ard",
                "Bel", "Cor", "Del", "Eld", "Fal", "Grim", "Hest", "Isk", "Kor", "Lum")
_SYLLABLES_B = ("trix", "don", "wick", "ora", "ven", "mere", "holt", "ston", "ley", "bury", "ford", "dale",
                "mont", "ric", "vane", "thorn", "well", "ham", "ton", "by", "gate", "moor", "ridge", "field",
                "croft", "wyn", "rin", "ssa", "lor", "mark", "stead", "wood")
_FIRST_NAMES = ("Mara", "Tobias", "Ines", "Oskar", "Leila", "Corin", "Yusuf", "Hana", "Milo", "Greta", "Anselm",
                "Noor", "Pavel", "Sunniva", "Dario", "Elif", "Rowan", "Ivo", "Talia", "Bram", "Zofia", "Emeka",
                "Liesel", "Ravi", "Odile", "Stellan", "Amara", "Kasimir", "Nadia", "Teodor", "Wren", "Ilse")
_PLACE_PREFIXES = ("", "", "", "Port ", "New ", "North ", "Lake ", "Fort ", "East ", "Upper ", "Saint ")
_COMPANY_SUFFIXES = ("Dynamics", "Holdings", "Works", "Labs", "Industries", "Systems", "Foods", "Logistics",
                     "Textiles", "Robotics", "Optics", "Materials", "Energy", "Instruments", "Mills")
_PRODUCTS = ("industrial pumps", "bicycle frames", "frozen dumplings", "wind turbine blades", "paper cups",
             "navigation software", "ceramic tiles", "hearing aids", "garden tools", "cargo drones",
             "wool blankets", "solar inverters", "medical gloves", "pipe organs", "rail signals",
             "kitchen scales", "sailcloth", "printer ink", "greenhouse glass", "fishing nets")
_ROLES = ("chief financial officer", "head of research", "head of logistics", "lead designer",
          "general counsel", "head of sales", "plant manager", "chief technology officer")
_ADJECTIVES = ("old", "narrow", "quiet", "crowded", "painted", "wooden", "stone", "flooded", "sunny", "windy",
               "forgotten", "busy", "tidy", "crooked", "famous", "modest", "ancient", "restored", "humble", "grand")
_NOUNS = ("bridge", "market", "lighthouse", "orchard", "bakery", "chapel", "mill", "harbour", "library", "school",
          "station", "theatre", "garden", "tower", "ferry", "bookshop", "observatory", "greenhouse", "tavern",
          "workshop", "archive", "stable", "quarry", "canal")
_PLURALS = ("maps", "letters", "coins", "photographs", "quilts", "clocks", "seed packets", "postcards",
            "recipes", "lanterns", "ledgers", "toy boats", "kites", "pressed flowers", "teapots")
_FOODS = ("plum cake", "barley soup", "smoked trout", "rye bread", "apple fritters", "pea stew",
          "honey biscuits", "cheese pies", "roasted chestnuts", "lentil pancakes")
_SPICES = ("cardamom", "fennel", "juniper", "nutmeg", "saffron", "caraway", "cinnamon", "dill")
_TOPICS = ("road repairs", "spring fair", "river cleaning", "bird counts", "street lighting",
           "school garden", "bus timetables", "tree planting", "town clock", "winter shelters")
_COLOURS = ("gold", "purple", "rust red", "pale green", "silver", "deep blue", "amber", "white")
_PLANTS = ("heather", "poppies", "lupins", "gorse", "wild thyme", "bluebells", "clover", "sunflowers")
_SEASONS = ("spring", "summer", "autumn", "winter")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_ORDINALS = ("first", "second", "third", "fourth", "last")

_FILLER_TEMPLATES = (
    "In {year}, the {adj} {noun} near {place} was repainted {colour} by a crew of {n} volunteers.",
    "{person} spent {n} afternoons sorting {plural} at the {adj} {noun} in {place}.",
    "The river crossing at {place} floods roughly every {n} years, according to the {noun} records.",
    "A stall beside the {adj} {noun} in {place} sold {n} baskets of {food} one {weekday} morning.",
    "Travellers between {place} and {place2} often stop at the {adj} {noun} for {food}.",
    "The {topic} committee of {place} meets on the {ordinal} {weekday} of each month.",
    "{person} once walked from {place} to {place2} in {n} days, carrying only a bag of {plural}.",
    "Most of the {plural} kept in the {noun} at {place} date from the years around {year}.",
    "During the {season}, the hills above {place} turn {colour} with {plant}.",
    "The choir of {place} sang {n} songs about {topic} at the {season} festival.",
    "An old map of {place} shows {n} wells, a {adj} {noun} and a road to {place2}.",
    "Bakers in {place} are known for {food} flavoured with {spice}.",
    "Every {season}, {person} counts the {plural} left at the {adj} {noun} of {place}.",
    "The {noun} in {place} closed for {n} weeks in {year} while its roof was mended.",
    "Children in {place} learn to fold paper {plural} before they learn about {topic}.",
    "A letter from {year} describes the {adj} {noun} of {place} as cold but cheerful.",
)


def _name(rng) -> str:
    return rng.choice(_SYLLABLES_A) + rng.choice(_SYLLABLES_B)


def _place(rng) -> str:
    return rng.choice(_PLACE_PREFIXES) + _name(rng)


def _person(rng) -> str:
    initial = f"{rng.choice('ABCDEFGHJKLMNOPRSTVW')}. " if rng.random() < 0.5 else ""
    return f"{rng.choice(_FIRST_NAMES)} {initial}{_name(rng)}"


def _company(rng) -> str:
    second = f" {_name(rng)}" if rng.random() < 0.5 else ""
    return f"{_name(rng)}{second} {rng.choice(_COMPANY_SUFFIXES)}"


def _filler_sentence(rng) -> str:
    template = rng.choice(_FILLER_TEMPLATES)
    place = _place(rng)
    place2 = _place(rng)
    while place2 == place:
        place2 = _place(rng)
    return template.format(
        year=rng.randint(1780, 2019), adj=rng.choice(_ADJECTIVES), noun=rng.choice(_NOUNS), place=place,
        place2=place2, colour=rng.choice(_COLOURS), n=rng.randint(2, 98), person=_person(rng),
        plural=rng.choice(_PLURALS), food=rng.choice(_FOODS), weekday=rng.choice(_WEEKDAYS),
        topic=rng.choice(_TOPICS), ordinal=rng.choice(_ORDINALS), season=rng.choice(_SEASONS),
        plant=rng.choice(_PLANTS), spice=rng.choice(_SPICES),
    )


def filler_sentences(rng) -> Iterator[str]:
    """Endless varied sentences, none repeated."""
    seen = set()
    while True:
        sentence = _filler_sentence(rng)
        if sentence not in seen:
            seen.add(sentence)
            yield sentence


def _unique(draw: Callable[[], str], taken: set) -> str:
    """A value of ``draw()`` not in ``taken`` (then added to it)."""
    for _ in range(10_000):
        value = draw()
        if value not in taken:
            taken.add(value)
            return value
    raise RuntimeError("ran out of distinct synthetic names")


# -- fitting a prompt to a token count ------------------------------------------------------------

@dataclass
class _Special:
    text: str
    position: float  # 0.0: before every filler block, 1.0: after all of them


class _Builder:
    """Joins filler blocks and the blocks a question is about into a context of the size that
    makes the whole prompt ``target`` tokens (at most, and within ``size_tolerance``)."""

    def __init__(self, tokenizer, target: int, separator: str, render: Callable[[str], str]):
        self.tokenizer = tokenizer
        self.target = target
        self.separator = separator
        self.render = render
        self._counts = {}

    def count(self, block: str) -> int:
        n = self._counts.get(block)
        if n is None:
            n = self._counts[block] = len(self.tokenizer.encode(self.separator + block))
        return n

    def _draw(self, fillers: Callable[[], Iterator[str]], budget: int) -> List[str]:
        blocks, used, misses = [], 0, 0
        for block in fillers():
            n = self.count(block)
            if used + n <= budget:
                blocks.append(block)
                used += n
                misses = 0
            else:
                misses += 1
            if budget - used < 4 or misses > 64:
                return blocks

    def _place(self, blocks: List[str], specials: Sequence[_Special]) -> List[str]:
        total = sum(self.count(b) for b in blocks)
        out, done, pending = [], 0, sorted(specials, key=lambda s: s.position)
        for block in blocks:
            # a special goes before the first filler block it would have passed the midpoint of
            while pending and done + self.count(block) / 2 > pending[0].position * total:
                out.append(pending.pop(0).text)
            out.append(block)
            done += self.count(block)
        out.extend(s.text for s in pending)
        return out

    def build(self, fillers: Callable[[], Iterator[str]], specials: Sequence[_Special]):
        """(prompt text, ids, context blocks); RetrievalSizeError when the target cannot be met."""
        empty = self.render("")
        fixed = len(self.tokenizer.encode(empty)) + sum(self.count(s.text) for s in specials)
        if fixed + 8 > self.target:
            raise RetrievalSizeError(f"{self.target} tokens cannot hold this case: its instructions, question "
                                     f"and answer-bearing text alone take {fixed} tokens")
        tolerance = size_tolerance(self.target)
        budget = self.target - fixed
        best = None
        for _ in range(8):
            blocks = self._place(self._draw(fillers, budget), specials)
            prompt = self.render(self.separator.join(blocks))
            ids = self.tokenizer.encode(prompt)
            excess = len(ids) - self.target
            if excess <= 0 and (best is None or len(ids) > len(best[1])):
                best = (prompt, ids, blocks)
            if -tolerance // 4 <= excess <= 0:
                return best
            # the blocks' separate counts miss the merges at their joins: correct the budget and retry
            budget -= excess
        if best is None or len(best[1]) < self.target - tolerance:
            raise RetrievalSizeError(f"could not build a prompt of {self.target} tokens (within {tolerance})")
        return best


def _chat_prompt(instruction: str, question: str) -> Callable[[str], str]:
    from .chat import encode_messages

    def render(context: str) -> str:
        content = f"{instruction}\n\n{context}\n\n{question}"
        return encode_messages([{"role": "user", "content": content}], thinking_mode="chat")

    return render


def _rng(seed: int, task: str, size: int, index: int, part: str = "") -> random.Random:
    return random.Random(f"{seed}:{task}:{size}:{index}:{part}")


# -- needle in a haystack --------------------------------------------------------------------------

def needle_case(tokenizer, size: int, depth: float, *, seed: int = 0, index: int = 0) -> Case:
    """A fact hidden at ``depth`` (0.0 = first sentence, 1.0 = last) of a filler haystack."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = _rng(seed, "needle", size, index)
    vault = f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}-{rng.randint(2, 99)}"
    code = str(rng.randint(100000, 999999))
    needle = f"The access code for vault {vault} is {code}."
    question = f"What is the access code for vault {vault}? Answer with the code only."
    render = _chat_prompt("Read the text below, then answer the question after it.", question)
    builder = _Builder(tokenizer, size, " ", render)
    prompt, ids, blocks = builder.build(lambda: filler_sentences(_rng(seed, "needle", size, index, "filler")),
                                        [_Special(needle, depth)])
    at = prompt.index(needle)
    meta = {"depth": depth, "needle": needle, "needle_token": len(tokenizer.encode(prompt[:at])),
            "haystack_sentences": len(blocks) - 1, "needle_sentence": blocks.index(needle)}
    return Case("needle", size, f"depth {depth:.0%}", question, code, prompt, ids, meta)


# -- questions over several documents -----------------------------------------------------------------

def _company_record(company, product, year, city, staff) -> str:
    return (f"Company record: {company}\n{company} makes {product}. It was founded in {year} and its "
            f"headquarters are in {city}. It employs about {staff} people.")


def _staff_profile(person, role, company, rng) -> str:
    hobby = rng.choice(("collects", "restores", "paints", "photographs", "writes about"))
    return (f"Staff profile: {person}\n{person} is the {role} of {company}. Outside work, {person.split()[0]} "
            f"{hobby} {rng.choice(_PLURALS)} and spends the {rng.choice(_SEASONS)} in {_place(rng)}.")


class _Registry:
    """Names already used in one case, so that no two documents or modules share one."""

    def __init__(self):
        self.companies, self.people, self.ceo_of = set(), set(), set()
        self.functions, self.constants, self.modules = set(), set(), set()


def _documents(rng, names: _Registry) -> Iterator[str]:
    sentences = filler_sentences(random.Random(rng.random()))
    while True:
        kind = rng.random()
        if kind < 0.4:
            company = _unique(lambda: _company(rng), names.companies)
            yield _company_record(company, rng.choice(_PRODUCTS), rng.randint(1850, 2015), _place(rng),
                                  rng.randint(12, 90000))
        elif kind < 0.8:
            person = _unique(lambda: _person(rng), names.people)
            company = _company(rng)
            if rng.random() < 0.5 and company not in names.ceo_of:
                names.ceo_of.add(company)
                role = "chief executive officer"
            else:
                role = rng.choice(_ROLES)
            yield _staff_profile(person, role, company, rng)
        else:
            yield "Local news\n" + " ".join(next(sentences) for _ in range(rng.randint(1, 3)))


def multidoc_case(tokenizer, size: int, *, seed: int = 0, index: int = 0) -> Case:
    """Company records and staff profiles; the answer joins a profile (who runs which company)
    with that company's record (its city or founding year)."""
    rng = _rng(seed, "multidoc", size, index)
    names = _Registry()
    company = _unique(lambda: _company(rng), names.companies)
    names.ceo_of.add(company)
    ceo = _unique(lambda: _person(rng), names.people)
    city, year = _place(rng), rng.randint(1850, 2015)
    record = _company_record(company, rng.choice(_PRODUCTS), year, city, rng.randint(12, 90000))
    profile = _staff_profile(ceo, "chief executive officer", company, rng)
    if index % 2 == 0:
        question = (f"In which city are the headquarters of the company whose chief executive officer is {ceo}? "
                    "Answer with the city name only.")
        answer = city
    else:
        question = (f"In which year was the company whose chief executive officer is {ceo} founded? "
                    "Answer with the year only.")
        answer = str(year)
    first, second = rng.uniform(0.0, 0.45), rng.uniform(0.55, 1.0)
    specials = [_Special(profile, first), _Special(record, second)]
    if rng.random() < 0.5:
        specials = [_Special(profile, second), _Special(record, first)]
    render = _chat_prompt("Below are documents from a company registry. Read them, then answer the question "
                          "after them.", question)
    builder = _Builder(tokenizer, size, "\n\n", render)
    filler_seed = _rng(seed, "multidoc", size, index, "filler").random()
    prompt, ids, _ = builder.build(lambda: _documents(random.Random(filler_seed), _copy(names)), specials)
    meta = {"company": company, "ceo": ceo, "profile_position": specials[0].position,
            "record_position": specials[1].position, "profile": profile, "record": record}
    return Case("multidoc", size, f"case {index + 1}", question, answer, prompt, ids, meta)


def _copy(names: _Registry) -> _Registry:
    """A registry with the same names, for one more attempt at drawing the same fillers."""
    fresh = _Registry()
    for key, value in vars(names).items():
        setattr(fresh, key, set(value))
    return fresh


# -- a question about a codebase ------------------------------------------------------------------------

_PACKAGE_AREAS = ("storage", "net", "auth", "billing", "search", "render", "jobs", "metrics", "config", "mail",
                  "geo", "media")
_VERBS = ("build", "merge", "parse", "load", "flush", "resolve", "compute", "format", "select", "collect",
          "index", "encode", "decode", "schedule", "validate", "render", "split", "normalise", "rank", "prune",
          "sync", "wrap", "scan", "trim", "emit", "cache", "restore", "fetch", "group", "route")
_CODE_NOUNS = ("entry", "record", "batch", "token", "header", "route", "quota", "invoice", "tile", "shard",
               "bucket", "ticket", "session", "cursor", "payload", "frame", "segment", "channel", "label",
               "profile", "receipt", "window", "sample", "layer", "report", "query", "policy", "queue",
               "snapshot", "digest", "marker", "handle", "filter", "vertex", "ledger", "crate", "beacon")
_CONSTANT_WORDS = ("MAX", "MIN", "DEFAULT", "BASE", "SOFT", "HARD", "IDLE", "RETRY", "STALE", "WARM", "COLD",
                   "FAST", "SLOW", "PEAK", "SPARE", "GRACE")
_UNITS = ("MS", "BYTES", "LIMIT", "COUNT", "RATIO", "STEPS", "SECONDS", "PERCENT", "DEPTH", "WIDTH")
_FIELD_SUFFIXES = ("interval_ms", "timeout_s", "max_items", "retries", "batch_size", "port", "workers",
                   "ttl_s", "buffer_kb", "page_size")


def _plural(noun: str) -> str:
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _constant_name(rng, names: _Registry) -> str:
    return _unique(lambda: f"{rng.choice(_CONSTANT_WORDS)}_{rng.choice(_CODE_NOUNS).upper()}_"
                           f"{rng.choice(_CODE_NOUNS).upper()}_{rng.choice(_UNITS)}", names.constants)


def _function_source(rng, names: _Registry, constant: Optional[tuple] = None):
    noun = rng.choice(_CODE_NOUNS)
    function = _unique(lambda: f"{rng.choice(_VERBS)}_{noun}_{_plural(rng.choice(_CODE_NOUNS))}", names.functions)
    if constant is None and rng.random() < 0.7:
        constant = (_constant_name(rng, names), rng.randint(2, 9999))
    arg = _plural(noun)
    lines = [f"def {function}({arg}, limit={rng.randint(2, 64)}):",
             f'    """{rng.choice(_VERBS).capitalize()} the {arg} up to `limit`."""']
    if constant is not None:
        lines.append(f"    {constant[0]} = {constant[1]}")
    scale = constant[0] if constant is not None else str(rng.randint(2, 9))
    body = rng.randrange(3)
    if body == 0:
        lines += ["    total = 0", f"    for item in {arg}[:limit]:", f"        total += len(item) * {scale}",
                  "    return total"]
    elif body == 1:
        lines += [f"    kept = [item for item in {arg} if item is not None]",
                  f"    return kept[: min(limit, {scale})]"]
    else:
        lines += [f"    if not {arg}:", "        return None",
                  f"    return sorted({arg}, key=len)[-1] if limit > {scale} else {arg}[0]"]
    return "\n".join(lines), function


def _settings_source(rng, class_name: str, asked: Optional[tuple] = None) -> str:
    suffixes = rng.sample(_FIELD_SUFFIXES, 3)
    fields = [(f"{rng.choice(_CODE_NOUNS)}_{s}", rng.randint(1, 9000)) for s in suffixes]
    if asked is not None:
        fields = [f for f in fields if f[0] != asked[0]]
        fields.insert(rng.randrange(len(fields) + 1), asked)
    seen, lines = set(), ["@dataclass", f"class {class_name}:"]
    for name, value in fields:
        if name not in seen:
            seen.add(name)
            lines.append(f"    {name}: int = {value}")
    return "\n".join(lines)


def _module_path(rng, package: str, names: _Registry) -> str:
    """A new module path; its file name is new too, as a settings class is named after it."""
    stem = _unique(lambda: f"{rng.choice(_VERBS)}_{rng.choice(_CODE_NOUNS)}_{rng.choice(_CODE_NOUNS)}"
                   if rng.random() < 0.7 else f"{rng.choice(_CODE_NOUNS)}_{rng.choice(_CODE_NOUNS)}", names.modules)
    return f"{package}/{rng.choice(_PACKAGE_AREAS)}/{stem}.py"


def _module(rng, package: str, names: _Registry, *, constant=None, settings_field=None, module_path=None):
    """One module's text (header, docstring, imports, functions, maybe settings), its path and the name
    of the function that defines ``constant``."""
    if module_path is None:
        module_path = _module_path(rng, package, names)
    stem = module_path.rsplit("/", 1)[1][:-3]
    parts = [f"# ===== file: {module_path} =====",
             f'"""{stem.replace("_", " ").capitalize()} helpers for the {module_path.split("/")[1]} layer."""']
    imports = ["import os"] if rng.random() < 0.5 else []
    if settings_field is not None or rng.random() < 0.35:
        imports.append("from dataclasses import dataclass")
    if imports:
        parts.append("\n".join(imports))
    n_functions = rng.randint(0, 3) if constant is None else rng.randint(1, 2)
    holder = rng.randrange(n_functions) if constant is not None else -1
    defining = None
    for i in range(n_functions):
        source, function = _function_source(rng, names, constant if i == holder else None)
        if i == holder:
            defining = function
        parts.append(source)
    if "from dataclasses import dataclass" in imports:
        class_name = "".join(w.capitalize() for w in stem.split("_")) + "Settings"
        parts.append(_settings_source(rng, class_name, settings_field))
    return "\n\n".join(parts), module_path, defining


def _modules(rng, package: str, names: _Registry) -> Iterator[str]:
    while True:
        yield _module(rng, package, names)[0]


def codebase_case(tokenizer, size: int, *, seed: int = 0, index: int = 0) -> Case:
    """A synthetic package; the question asks which function defines a constant (even cases) or the
    default of a settings field (odd cases)."""
    rng = _rng(seed, "codebase", size, index)
    names = _Registry()
    package = rng.choice(("orbitkit", "tallyhub", "quayline", "fernwork", "lumengrid", "basaltpy"))
    if index % 2 == 0:
        constant = (_constant_name(rng, names), rng.randint(2, 9999))
        target, path, function = _module(rng, package, names, constant=constant)
        question = (f"In the `{package}` package above, which function defines the constant `{constant[0]}`? "
                    "Answer with the function name only.")
        answer, meta = function, {"constant": constant[0], "module": path}
    else:
        asked = (f"{rng.choice(_CODE_NOUNS)}_{rng.choice(_FIELD_SUFFIXES)}", rng.randint(1, 9000))
        path = _module_path(rng, package, names)
        target, _, _ = _module(rng, package, names, settings_field=asked, module_path=path)
        class_name = "".join(w.capitalize() for w in path.rsplit("/", 1)[1][:-3].split("_")) + "Settings"
        question = (f"In the `{package}` package above, what is the default value of `{asked[0]}` in "
                    f"`{class_name}`? Answer with the value only.")
        answer, meta = str(asked[1]), {"field": asked[0], "class": class_name, "module": path}
    position = rng.uniform(0.0, 1.0)
    render = _chat_prompt(f"Below is the source code of the Python package `{package}`, one file after another. "
                          "Read it, then answer the question after it.", question)
    builder = _Builder(tokenizer, size, "\n\n\n", render)
    filler_seed = _rng(seed, "codebase", size, index, "filler").random()
    prompt, ids, _ = builder.build(lambda: _modules(random.Random(filler_seed), package, _copy(names)),
                                   [_Special(target, position)])
    meta.update(position=position, target=target)
    return Case("codebase", size, f"case {index + 1}", question, answer, prompt, ids, meta)


# -- key: value lookups -----------------------------------------------------------------------------

def keyvalue_case(tokenizer, size: int, depth: float, *, seed: int = 0, index: int = 0) -> Case:
    """A "key: value" line at ``depth`` of a list of such lines, and a question about its key, in the
    words of the small trained V4's retrieval task (``mlx_dsv4.train.data``)."""
    from .chat import encode_messages

    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = _rng(seed, "keyvalue", size, index)
    key, value = rng.randint(100, 999), rng.randint(100, 999)
    while value == key:
        value = rng.randint(100, 999)
    line = f"{key}: {value}"
    question = f"What is the value of key {key}?"

    def render(context: str) -> str:
        content = f"Here is a list of keys and values.\n{context}\n{question}"
        return encode_messages([{"role": "user", "content": content}], thinking_mode="chat")

    def lines() -> Iterator[str]:
        r = _rng(seed, "keyvalue", size, index, "lines")
        for k in r.sample(range(100, 1000), 900) + r.sample(range(1000, 10000), 9000):
            if k != key:
                yield f"{k}: {r.randint(100, 999)}"

    prompt, ids, blocks = _Builder(tokenizer, size, "\n", render).build(lines, [_Special(line, depth)])
    meta = {"depth": depth, "line": line, "lines": len(blocks), "line_index": blocks.index(line)}
    return Case("keyvalue", size, f"depth {depth:.0%}", question, str(value), prompt, ids, meta)


# -- the suite ------------------------------------------------------------------------------------------

def iter_cases(tokenizer, task: str, size: int, *, seed: int = 0, depths: Sequence[float] = DEFAULT_DEPTHS,
               cases: int = 3) -> Iterator[Case]:
    """The cases of ``task`` at ``size`` prompt tokens, one at a time: one per depth for the needle
    and the key-value lookup, ``cases`` otherwise."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task in ("needle", "keyvalue"):
        make = needle_case if task == "needle" else keyvalue_case
        for i, depth in enumerate(depths):
            yield make(tokenizer, size, depth, seed=seed, index=i)
    else:
        make = multidoc_case if task == "multidoc" else codebase_case
        for i in range(cases):
            yield make(tokenizer, size, seed=seed, index=i)


def build_cases(tokenizer, task: str, size: int, **options) -> List[Case]:
    """Every case of ``iter_cases`` at once."""
    return list(iter_cases(tokenizer, task, size, **options))
