"""Seeded synthetic tasks in V4's chat format, tokenised with the V4 tokenizer.

Every example is a conversation rendered by `mlx_dsv4.chat.encode_messages` and comes with a
loss mask that is true on assistant tokens only (the text after each assistant opener, up to
and including its end-of-sentence token). Kinds:

- "tool": a question answered with one DSML tool call (weather, calculator, adder), the tool's
  result as the agent loop would feed it back, then a final answer that uses that result;
- "retrieval": many "key: value" lines, then a question about one key (or several, in turn);
- "chat": single and multi-turn chat, and thinking-mode traces (reasoning, then the answer);
- "pattern": counting and spelling, where the next-but-one token is predictable (for MTP);
- "copy": numbers, names and expressions from the question written back, the skill that filling a
  tool call's arguments from the question needs (off in the default mix; `mix=` turns it on);
- "name": the city a weather question asks about, written alone, spelled as it starts a tool
  call's argument (off in the default mix);
- "session": up to six tool questions in turn under one system prompt and tool list, each answered
  as in "tool" (off in the default mix).

`split="eval"` draws numbers, cities and phrasings the "train" split never uses; with
`unseen_cities=False`, its weather questions ask about training cities instead (the numbers and
phrasings stay held out).
"""

import json
import random
from dataclasses import dataclass, field
from typing import Literal

from ..agent.substrates import make_substrate
from ..agent.tools import as_tool
from ..chat import encode_messages

KINDS = ("tool", "retrieval", "chat", "pattern", "copy", "name", "session")
DEFAULT_MIX = {"tool": 0.6, "retrieval": 0.08, "chat": 0.16, "pattern": 0.16}
WEATHER_SYSTEM = "You answer questions about the weather. Use the tools for data and arithmetic."

# The table behind `get_weather`; generators draw fresh values per example so that the
# final answer has to be read from the tool result.
_weather_table: dict = {}


def get_weather(city: str, units: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Current weather in a city.

    Args:
        city: city name, e.g. "Paris"
        units: temperature units
    """
    entry = _weather_table[city.strip().lower()]
    temperature = entry["temperature_c"]
    if units == "fahrenheit":
        temperature = temperature * 9 / 5 + 32
    return {"city": city, "temperature": round(temperature, 1), "units": units, "conditions": entry["conditions"]}


def calculate(expression: str) -> float:
    """Evaluate an arithmetic expression (+ - * / // % ** and parentheses).

    Args:
        expression: the expression, e.g. "(18.5 - 9) * 2"
    """
    left, op, right = expression.split(" ")
    a, b = int(left), int(right)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first addend
        b: second addend
    """
    return a + b


TRAIN_CITIES = ("Paris", "Oslo", "Cairo", "Tokyo", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw",
                "Dublin", "Lisbon", "Athens", "Helsinki", "Stockholm", "Copenhagen", "Brussels", "Amsterdam",
                "Zurich", "Geneva", "Budapest", "Bucharest", "Sofia", "Belgrade", "Zagreb", "Riga", "Vilnius",
                "Tallinn", "Reykjavik", "London", "Edinburgh", "Moscow", "Istanbul", "Ankara", "Tehran",
                "Delhi", "Mumbai", "Beijing", "Shanghai", "Seoul", "Bangkok", "Hanoi", "Manila", "Jakarta",
                "Sydney", "Melbourne", "Auckland", "Lima", "Bogota", "Santiago", "Havana", "Toronto",
                "Chicago", "Boston", "Denver", "Seattle", "Dallas", "Miami", "Nairobi", "Lagos", "Accra",
                "Dakar", "Tunis", "Algiers", "Casablanca", "Doha", "Dubai", "Riyadh", "Karachi", "Lahore")
EVAL_CITIES = ("Kyoto", "Porto", "Florence", "Krakow", "Montreal", "Osaka", "Hamburg", "Valencia", "Munich",
               "Lyon", "Quito", "Perth")
CONDITIONS = ("sunny", "clear", "overcast", "light rain", "heavy rain", "snow", "fog", "windy", "cloudy")
OPS = {"+": ("plus", "added to"), "-": ("minus", "less"), "*": ("times", "multiplied by"), "/": ("divided by", "over")}

CALC_TEMPLATES = {
    "train": ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Please calculate {a} {op} {b}.",
              "How much is {a} {word} {b}?", "What do you get for {a} {word} {b}?", "{a} {op} {b} = ?",
              "Can you work out {a} {op} {b} for me?", "Calculate {a} {word} {b}.", "{a} {word} {b}?",
              "Work out {a} {word} {b}.", "Evaluate {a} {op} {b}.", "What's {a} {word} {b}?",
              "Find {a} {op} {b}.", "I want to know {a} {op} {b}.", "My homework asks for {a} {word} {b}.",
              "Result of {a} {op} {b}?", "Could you compute {a} {word} {b}?", "Solve {a} {op} {b} for me."),
    "eval": ("Tell me the result of {a} {op} {b}.", "I need {a} {word} {b}, please.", "Quick: {a} {op} {b}?"),
}
WEATHER_TEMPLATES = {
    "train": ("What is the weather in {city}?", "How warm is it in {city}?", "What's the weather like in {city}?",
              "Is it cold in {city} right now?", "Tell me the current weather in {city}.",
              "What are the conditions in {city}?", "Weather report for {city}, please.", "Weather in {city}?",
              "{city} weather?", "Is it raining in {city}?", "What is the temperature in {city}?",
              "Do I need a coat in {city} today?", "Look up the weather in {city}.", "Forecast for {city}?",
              "I am flying to {city}. What is the weather there?", "How hot is it in {city}?",
              "Check the weather in {city} for me.", "What's it like outside in {city}?"),
    "eval": ("Could you check the weather in {city}?", "How is the weather today in {city}?",
             "Give me the weather for {city}."),
}
COPY_PROMPTS = ("Repeat these {what}: {items}", "Copy exactly: {items}", "Write back the {what}: {items}",
                "Echo these {what}: {items}")
FAHRENHEIT_SUFFIX = {"train": (" Answer in fahrenheit.", " Use fahrenheit."), "eval": (" In fahrenheit, please.",)}
# Training questions sometimes open or close with one of these, so that where a question's numbers
# or city sit varies beyond the templates; evaluation phrasings never do.
OPENERS = ("Hi! ", "Hello. ", "Quick question: ", "Hey, ", "Excuse me. ", "One more thing. ", "Sorry to bother you. ")
CLOSERS = (" Thanks!", " Thank you.", " I need it soon.", " Cheers.")
ADD_TEMPLATES = {
    "train": ("What is {a} + {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?", "{a} plus {b}?",
              "{a} + {b}?", "Please add {a} to {b}.", "What do {a} and {b} add up to?", "Total of {a} and {b}?",
              "Can you add {a} and {b}?", "I have {a} and {b}. What is their sum?"),
    "eval": ("Sum {a} and {b} for me.", "How much is {a} + {b}?"),
}
SYSTEMS = {
    "weather": {"train": (WEATHER_SYSTEM, "You are a helpful assistant with a weather tool and a calculator.", None),
                "eval": (WEATHER_SYSTEM, "Help the user. Call a tool when you need data or arithmetic.")},
    "add": {"train": ("You are a helpful assistant.", None), "eval": ("You are a helpful assistant.", None)},
}

COUNTRIES = {"France": "Paris", "Norway": "Oslo", "Egypt": "Cairo", "Japan": "Tokyo", "Germany": "Berlin",
             "Spain": "Madrid", "Italy": "Rome", "Austria": "Vienna", "Poland": "Warsaw", "Ireland": "Dublin",
             "Portugal": "Lisbon", "Greece": "Athens", "Finland": "Helsinki", "Sweden": "Stockholm",
             "Denmark": "Copenhagen", "Belgium": "Brussels", "Hungary": "Budapest", "Peru": "Lima",
             "Kenya": "Nairobi", "Chile": "Santiago", "Cuba": "Havana", "Iran": "Tehran", "Turkey": "Ankara",
             "Thailand": "Bangkok"}
GREETINGS = (("Hello!", "Hello! How can I help you today?"), ("Hi there.", "Hi! What can I do for you?"),
             ("Good morning!", "Good morning! How can I help?"), ("Thanks!", "You are welcome."),
             ("Who are you?", "I am a small assistant model. I can chat, remember facts and call tools."),
             ("Goodbye.", "Goodbye! Have a nice day."))
WORDS = ("apple", "river", "garden", "planet", "window", "silver", "rocket", "forest", "candle", "bridge",
         "tiger", "yellow", "winter", "pencil", "orange", "castle", "summer", "guitar", "marble", "sunset")


# Training questions composed from parts (`composed_questions`): a lead, a body that puts the numbers
# or the city in one of several places, an ending. None of them writes an evaluation phrasing.
COMPOSED_LEADS = ("", "", "Hey, ", "OK so ", "Math time. ", "Homework help: ", "Urgent: ", "Hello again. ",
                  "Right, ", "Next one. ", "A question for you: ", "So, ")
COMPOSED_ENDS = ("?", ".", "!", " please.", " for me?", " now.", " if you can.", ", thanks.", " right now?")
# Words a training question may open with in a random order (`filler_leads`), so that what comes
# before the numbers or the city is unpredictable rather than one of a few known leads.
FILLER_WORDS = ("so", "well", "okay", "now", "then", "also", "just", "again", "today", "here", "my", "your", "our",
                "the", "a", "this", "that", "one", "other", "friend", "teacher", "boss", "sister", "neighbour",
                "class", "exam", "task", "job", "note", "list", "question", "problem", "answer", "number", "value",
                "result", "help", "asks", "wants", "says", "wrote", "needs", "sent", "gave", "tell", "give", "show",
                "find", "check", "know", "think", "please", "quickly", "really", "simple", "small", "big", "new",
                "last", "next", "first", "about", "for", "of", "to", "with", "from", "on", "and", "but", "me",
                "us", "you", "we", "it", "is", "was")
FILLER_MARKS = (": ", ". ", ", ", " - ", "! ", "? ", " ")
OP_VERBS = {"+": "add", "-": "take away", "*": "multiply it by", "/": "divide it by"}
COMPOSED_BODIES = {
    "calculate": ("compute {a} {op} {b}", "figure out {a} {word} {b}", "what does {a} {op} {b} come to",
                  "{a} {word} {b} makes what", "if I take {a} and {verb} {b}, what do I get",
                  "do the math: {a} {op} {b}", "get me {a} {op} {b}", "the answer to {a} {word} {b}",
                  "determine {a} {op} {b}", "any idea what {a} {word} {b} is", "run {a} {op} {b}",
                  "starting from {a}, {verb} {b}"),
    "add": ("add up {a} and {b}", "{a} and {b} together make what", "combine {a} with {b}",
            "the sum of {a} and {b}", "put {a} and {b} together", "add {a} plus {b}",
            "what are {a} and {b} added", "total up {a} and {b}"),
    "weather": ("weather for {city}", "current conditions in {city}", "how's it looking in {city}",
                "temperature in {city}", "is it sunny in {city}", "{city}: what is the weather",
                "in {city}, what's the weather", "the weather over in {city}",
                "what's happening weather-wise in {city}",
                "{city} conditions", "tell me how warm {city} is", "check {city}'s weather"),
}


def _train_pair(a: int, b: int) -> bool:
    """Operand pairs of the train split; the others are held out for evaluation."""
    return (a + 3 * b) % 7 != 0


@dataclass
class Example:
    kind: str
    ids: list
    mask: list  # true where the token is an assistant token (a prediction target)
    text: str
    meta: dict = field(default_factory=dict)


def render(messages, tokenizer, *, tools=None, thinking_mode="chat"):
    """(token ids, assistant mask, text) of a conversation whose assistant turns are the targets.

    An assistant turn is masked in when the prompt before it, with the generation opener, is a
    prefix of the whole text (always true in chat mode and with tools); its span runs from there
    to the end of the turn."""
    options = dict(tools=tools, thinking_mode=thinking_mode)
    text = encode_messages(messages, add_generation_prompt=False, **options)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = encode_messages(messages[:i], **options)
        upto = encode_messages(messages[: i + 1], add_generation_prompt=False, **options)
        if text.startswith(upto) and upto.startswith(prefix):
            spans.append((len(prefix), len(upto)))
    ids, mask, position = [], [], 0
    for start, end in spans:
        for piece, target in ((text[position:start], False), (text[start:end], True)):
            piece_ids = tokenizer.encode(piece) if piece else []
            ids += piece_ids
            mask += [target] * len(piece_ids)
        position = end
    tail = tokenizer.encode(text[position:]) if position < len(text) else []
    return ids + tail, mask + [False] * len(tail), text


def _call(name: str, arguments: dict) -> dict:
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def key_value_list(pairs) -> str:
    """The retrieval task's list of (key, value) pairs as it opens the user turn, up to the question."""
    return "Here is a list of keys and values.\n" + "".join(f"{k}: {v}\n" for k, v in pairs)


def value_question(key) -> str:
    """The retrieval task's question about ``key``."""
    return f"What is the value of key {key}?"


class TaskGenerator:
    """Examples of one split, drawn from `random.Random(seed)`: the same seed gives the same examples."""

    def __init__(self, tokenizer, seed: int = 0, split: str = "train", retrieval_tokens=(1024, 2048), mix=None,
                 retrieval_questions: int = 1, session_tokens: int = 1024, unseen_cities: bool = True,
                 composed_questions: float = 0.0, filler_leads: float = 0.0):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.tokenizer = tokenizer
        self.rng = random.Random(f"{split}:{seed}")
        self.split = split
        self.retrieval_tokens = retrieval_tokens
        self.retrieval_questions = retrieval_questions
        self.session_tokens = session_tokens
        self.unseen_cities = unseen_cities
        self.composed_questions = composed_questions
        self.filler_leads = filler_leads
        self.mix = dict(mix or DEFAULT_MIX)
        unknown = set(self.mix) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown task kinds {sorted(unknown)}; expected some of {KINDS}")
        self.tools = {"weather": [as_tool(get_weather), as_tool(calculate)], "add": [as_tool(add)]}
        self.substrate = make_substrate("function")

    def __iter__(self):
        return self

    def __next__(self) -> Example:
        kinds, weights = zip(*self.mix.items())
        return self.example(self.rng.choices(kinds, weights)[0])

    def example(self, kind: str) -> Example:
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
        return getattr(self, f"_{kind}")()

    # -- tool use ----------------------------------------------------------------

    def _operands(self, low=1, high=999):
        while True:
            a, b = self.rng.randint(low, high), self.rng.randint(low, high)
            if _train_pair(a, b) == (self.split == "train"):
                return a, b

    def _phrase(self, templates: dict, bodies: tuple, **fields) -> str:
        """A question of this split's phrasings; a training one opens or closes with small talk a
        third of the time each, or with `composed_questions` is composed from parts that often, and
        with `filler_leads` opens with one to six random filler words that often."""
        if self.split == "eval":
            return self.rng.choice(templates["eval"]).format(**fields)
        if self.composed_questions and self.rng.random() < self.composed_questions:
            body = self.rng.choice(bodies).format(verb=OP_VERBS.get(fields.get("op"), ""), **fields)
            lead = self.rng.choice(COMPOSED_LEADS)
            question = (lead + (body if lead.endswith(", ") else body[0].upper() + body[1:])
                        + self.rng.choice(COMPOSED_ENDS))
        else:
            question = self.rng.choice(templates["train"]).format(**fields)
            if self.rng.random() < 1 / 3:
                question = self.rng.choice(OPENERS) + question
            if self.rng.random() < 1 / 3:
                question += self.rng.choice(CLOSERS)
        if self.filler_leads and self.rng.random() < self.filler_leads:
            words = " ".join(self.rng.choices(FILLER_WORDS, k=self.rng.randint(1, 6)))
            question = words[0].upper() + words[1:] + self.rng.choice(FILLER_MARKS) + question
        return question

    def _tool_round(self, toolset: str):
        """(question, call name, arguments, tool result as fed back, final answer) of one question."""
        r, s = self.rng, self.split
        if toolset == "add":
            a, b = self._operands()
            question = self._phrase(ADD_TEMPLATES, COMPOSED_BODIES["add"], a=a, b=b)
            name, arguments = "add", {"a": a, "b": b}
            answer = lambda result: f"{a} + {b} = {result}."
        elif r.random() < 0.5:
            op = r.choice(tuple(OPS))
            a, b = self._operands()
            while (op == "/" and a % b) or (op == "-" and a < b):  # short answers: whole, not negative
                a, b = self._operands()
            question = self._phrase(CALC_TEMPLATES, COMPOSED_BODIES["calculate"], a=a, b=b, op=op,
                                    word=r.choice(OPS[op]))
            name, arguments = "calculate", {"expression": f"{a} {op} {b}"}
            answer = lambda result: f"{a} {op} {b} = {result}."
        else:
            held_out = s == "eval" and self.unseen_cities
            city = r.choice(EVAL_CITIES + TRAIN_CITIES[:4] if held_out else TRAIN_CITIES)
            _weather_table[city.lower()] = {"temperature_c": round(r.uniform(-15, 40) * 2) / 2,
                                            "conditions": r.choice(CONDITIONS)}
            question = self._phrase(WEATHER_TEMPLATES, COMPOSED_BODIES["weather"], city=city)
            arguments = {"city": city}
            if r.random() < 0.25:
                question += r.choice(FAHRENHEIT_SUFFIX[s])
                arguments["units"] = "fahrenheit"
            name = "get_weather"

            def answer(result):
                data = json.loads(result)
                unit = "°F" if data["units"] == "fahrenheit" else "°C"
                return f"{city} is at {json.dumps(data['temperature'])} {unit} with {json.dumps(data['conditions'])}."
        tool = next(t for t in self.tools[toolset] if t.name == name)
        result = self.substrate.run(tool, tool.validate(json.dumps(arguments)))
        content = result.to_content(16000)  # as the agent loop feeds tool output back
        return question, name, arguments, content, answer(content)

    @staticmethod
    def _round_messages(question, name, arguments, content, answer) -> list:
        return [{"role": "user", "content": question},
                {"role": "assistant", "content": "", "tool_calls": [_call(name, arguments)]},
                {"role": "tool", "tool_call_id": "call_0", "content": content},
                {"role": "assistant", "content": answer}]

    def _tool(self) -> Example:
        toolset = self.rng.choices(("weather", "add"), (4, 1))[0]
        system = self.rng.choice(SYSTEMS[toolset][self.split])
        question, name, arguments, content, answer = self._tool_round(toolset)
        messages = ([{"role": "system", "content": system}] if system else []) + self._round_messages(
            question, name, arguments, content, answer)
        ids, mask, text = render(messages, self.tokenizer, tools=[t.schema() for t in self.tools[toolset]])
        meta = {"toolset": toolset, "system": system, "question": question, "call": name, "arguments": arguments,
                "result": content, "answer": answer}
        return Example("tool", ids, mask, text, meta)

    def _session(self) -> Example:
        """Tool questions asked in turn under one system prompt and tool list, each answered by a call
        and a final answer, two to six as fit `session_tokens`: the long tool list is read once for up to
        six questions, and each call has to take its arguments from its own question, not an earlier one."""
        r = self.rng
        toolset = r.choices(("weather", "add"), (4, 1))[0]
        system = r.choice(SYSTEMS[toolset][self.split])
        schemas = [t.schema() for t in self.tools[toolset]]
        messages = [{"role": "system", "content": system}] if system else []
        rendered, rounds = None, []
        for _ in range(r.randint(2, 6)):
            round_ = self._tool_round(toolset)
            extended = messages + self._round_messages(*round_)
            candidate = render(extended, self.tokenizer, tools=schemas)
            if rendered is not None and len(candidate[0]) > self.session_tokens:
                break
            messages, rendered = extended, candidate
            rounds.append(round_)
        ids, mask, text = rendered
        meta = {"toolset": toolset, "system": system, "rounds": len(rounds),
                "questions": [q for q, *_ in rounds], "answers": [a for *_, a in rounds]}
        return Example("session", ids, mask, text, meta)

    # -- long-context retrieval ----------------------------------------------------

    def retrieval(self, n_tokens: int, questions: int = 1) -> Example:
        """One retrieval example of about `n_tokens` tokens of list; with `questions` > 1, as many
        distinct keys asked in turn (each question a user turn, each answer an assistant turn)."""
        r = self.rng
        n_lines = max(4, int((n_tokens - 40) / 5.45))  # a line is about 5.45 tokens
        keys = r.sample(range(100, 1000), min(n_lines, 900))
        while len(keys) < n_lines:  # longer lists reuse no key: widen to four digits
            k = r.randint(1000, 9999)
            if k not in keys:
                keys.append(k)
        values = [r.randint(100, 999) for _ in keys]
        # one question draws as before, so that earlier runs' data and the evaluation sets stay the same
        targets = [r.randrange(len(keys))] if questions == 1 else r.sample(range(len(keys)), min(questions, len(keys)))
        messages = []
        for i, target in enumerate(targets):
            question = value_question(keys[target])
            if i == 0:
                question = key_value_list(zip(keys, values)) + question
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": str(values[target])}]
        ids, mask, text = render(messages, self.tokenizer)
        target = targets[0]
        meta = {"key": keys[target], "answer": str(values[target]), "depth": target / len(keys)}
        return Example("retrieval", ids, mask, text, meta)

    def _retrieval(self) -> Example:
        return self.retrieval(self.rng.randint(*self.retrieval_tokens), self.retrieval_questions)

    # -- chat and thinking ------------------------------------------------------------

    CHAT_KINDS = ("capital", "repeat", "greeting")

    def chat_turn(self, kind):
        """(question, reply, reasoning) of one chat turn of ``kind``, one of ``CHAT_KINDS``: a
        country's capital, a few words to repeat, or a greeting."""
        r = self.rng
        if kind == "capital":
            country = r.choice(tuple(COUNTRIES))
            return (f"What is the capital of {country}?", f"The capital of {country} is {COUNTRIES[country]}.",
                    f"The user asks for the capital of {country}. The capital of {country} is {COUNTRIES[country]}.")
        if kind == "repeat":
            words = " ".join(r.sample(WORDS, r.randint(2, 5)))
            return f"Repeat after me: {words}", words, f"The user wants me to repeat: {words}. I repeat it."
        if kind == "greeting":
            return (*r.choice(GREETINGS), "The user is chatting. I reply politely.")
        raise ValueError(f"unknown chat turn kind {kind!r}; expected one of {self.CHAT_KINDS}")

    def _chat(self) -> Example:
        r = self.rng
        thinking = r.random() < 0.35
        n_turns = 1 if thinking else r.randint(1, 3)
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if r.random() < 0.5 else []
        for _ in range(n_turns):
            pick = r.random()
            kind = "capital" if pick < 0.45 else "repeat" if pick < 0.75 else "greeting"
            question, reply, reasoning = self.chat_turn(kind)
            messages.append({"role": "user", "content": question})
            turn = {"role": "assistant", "content": reply}
            if thinking:
                turn["reasoning_content"] = reasoning
            messages.append(turn)
        ids, mask, text = render(messages, self.tokenizer, thinking_mode="thinking" if thinking else "chat")
        return Example("chat", ids, mask, text, {"thinking": thinking, "answer": messages[-1]["content"]})

    # -- predictable continuations --------------------------------------------------

    def _pattern(self) -> Example:
        r = self.rng
        pick = r.random()
        if pick < 0.5:
            start = r.randint(1, 900)
            stop = start + r.randint(5, 25)
            question, reply = f"Count from {start} to {stop}.", ", ".join(str(i) for i in range(start, stop + 1))
        elif pick < 0.75:
            word = r.choice(WORDS)
            question, reply = f"Spell {word}.", "-".join(word.upper())
        else:
            words = r.sample(WORDS, 2)
            times = r.randint(2, 4)
            question = f"Say '{words[0]} {words[1]}' {times} times."
            reply = " ".join([f"{words[0]} {words[1]}"] * times)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        ids, mask, text = render(messages, self.tokenizer)
        return Example("pattern", ids, mask, text, {"answer": reply})

    # -- copying ------------------------------------------------------------------------------

    def _name(self) -> Example:
        """The city a weather question (a training phrasing) asks about, written alone: inside a
        question a name follows a space and tokenises apart from the same name at the start of a
        tool argument ("Krakow": " Krak", "ow" there, "K", "rak", "ow" here). Names come from every
        city list, so an evaluation city's spelling is learned while its weather questions stay
        unseen."""
        r = self.rng
        city = r.choice(TRAIN_CITIES + EVAL_CITIES)
        question = f"Which city does this ask about? {r.choice(WEATHER_TEMPLATES['train']).format(city=city)}"
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": city}]
        ids, mask, text = render(messages, self.tokenizer)
        return Example("name", ids, mask, text, {"answer": city})

    def _copy(self) -> Example:
        """Items of the question written back. Names come from every city list: a weather question about
        an evaluation city stays unseen, the name's tokens do not."""
        r = self.rng
        pick = r.random()
        if pick < 0.45:
            what, items = "numbers", ", ".join(str(r.randint(1, 999)) for _ in range(r.randint(2, 6)))
        elif pick < 0.75:
            names = TRAIN_CITIES + EVAL_CITIES + tuple(COUNTRIES)
            what, items = "names", ", ".join(r.sample(names, r.randint(1, 4)))
        else:
            a, b = self._operands()
            what, items = "expression", f"{a} {r.choice(tuple(OPS))} {b}"
        question = r.choice(COPY_PROMPTS).format(what=what, items=items)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": items}]
        ids, mask, text = render(messages, self.tokenizer)
        return Example("copy", ids, mask, text, {"answer": items})
