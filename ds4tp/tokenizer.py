"""DS4 tokenizer and chat prompt rendering, token-for-token compatible with the ds4 engine.

Encoding (spec 14.1-14.4)
    text --(JoyAI pre-split, `pretokenize`)--> pieces --(GPT-2 byte map, byte-level BPE)--> ids
The merge of one piece repeatedly joins the adjacent pair of lowest merge rank, leftmost on a
tie, one occurrence at a time. `encode_rendered` additionally turns the seven chat special
strings into their ids; BPE never crosses them.

Chat prompts. ds4 has three prompt builders and each one is reproduced here:
  * `render_prompt` / `Tokenizer.encode_prompt`: the single-turn CLI form (BOS, optional
    max-effort prefix, system, user, assistant prefix). Pieces are tokenized separately.
  * `render_chat`: the multi-turn OpenAI-server form (system/developer joined, tool results,
    assistant turns with reasoning and DSML tool calls, EOS). The result is text; feed it to
    `Tokenizer.encode_rendered`.
  * `Tokenizer.encode_messages`: the engine's message-append API (the CLI REPL form), which the
    golden `messages_*` cases were made with: message contents are plain text, tool results
    are "Tool: ..." user turns and no EOS follows an assistant turn.

Parsing generated text: `split_reasoning` and `parse_tool_calls`; `StreamDecoder` turns a token
stream into text without ever emitting half a UTF-8 character.

`export_main` writes an HF `tokenizers`/`transformers` tokenizer; see its docstring for how
closely that matches.
"""
from __future__ import annotations

import codecs
import functools
import heapq
import json
import re
import uuid
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Constants shared with the model's prompt format
# ---------------------------------------------------------------------------------------------

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
PAD = "<｜▁pad▁｜>"  # in the vocabulary, but ds4 never looks it up

# role -> special string; this is also the order in which ds4 tests them at each text position
SPECIALS = {"bos": BOS, "eos": EOS, "user": USER, "assistant": ASSISTANT,
            "think": THINK, "think_end": THINK_END, "dsml": DSML}

# The "Reasoning Effort" preamble ds4 inserts right after BOS in max-thinking mode.
MAX_EFFORT_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption "
    "is left unchecked.\n\n")

# Below this context size ds4 downgrades thinking "max" to "high".
THINK_MAX_MIN_CONTEXT = 393216
THINKING_MODES = ("none", "high", "max")


def _byte_to_char_table() -> list[str]:
    """GPT-2's reversible byte -> printable code point map."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or b >= 174]
    table = [""] * 256
    for b in printable:
        table[b] = chr(b)
    extra = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = tuple(_byte_to_char_table())
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


# ---------------------------------------------------------------------------------------------
# JoyAI pre-tokenizer, as ds4 executes it (spec 14.3)
# ---------------------------------------------------------------------------------------------

_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_SPACE = frozenset(" \t\n\r\v\f")
_NEWLINE = frozenset("\r\n")


def _is_alpha(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def _is_letter_like(c: str) -> bool:
    # ds4 counts every non-ASCII code point as a letter (accents, emoji, symbols alike)
    return c >= "\x80" or _is_alpha(c)


def _is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fa5" or "\u3040" <= c <= "\u30ff"


def pretokenize(text: str) -> list[str]:
    """Split text into the pieces ds4 BPE-encodes independently (first matching rule wins)."""
    pieces = []
    n = len(text)
    pos = 0
    while pos < n:
        start = pos
        c = text[pos]
        nxt = text[pos + 1] if pos + 1 < n else ""
        if "0" <= c <= "9":                                     # 1: up to three digits
            pos += 1
            while pos < n and pos - start < 3 and "0" <= text[pos] <= "9":
                pos += 1
        elif _is_cjk(c):                                        # 2: CJK / kana run
            pos += 1
            while pos < n and _is_cjk(text[pos]):
                pos += 1
        elif c in _PUNCT and nxt and _is_alpha(nxt):            # 3: punct + ASCII word
            pos += 1
            while pos < n and _is_alpha(text[pos]):
                pos += 1
        elif _is_letter_like(c):                                # 4: letter-like run
            pos += 1
            while pos < n and _is_letter_like(text[pos]):
                pos += 1
        elif c not in _NEWLINE and c not in _PUNCT and nxt and _is_letter_like(nxt):
            pos += 1                                            # 5: one lead char + letters
            while pos < n and _is_letter_like(text[pos]):
                pos += 1
        elif c == " " and nxt and nxt in _PUNCT:                # 6: space + punct run + newlines
            pos += 1
            while pos < n and text[pos] in _PUNCT:
                pos += 1
            while pos < n and text[pos] in _NEWLINE:
                pos += 1
        elif c in _PUNCT:                                       # 7: punct run + newlines
            while pos < n and text[pos] in _PUNCT:
                pos += 1
            while pos < n and text[pos] in _NEWLINE:
                pos += 1
        elif c in _SPACE:                                       # 8: whitespace run
            end = pos
            last_newline_end = -1
            while end < n and text[end] in _SPACE:
                if text[end] in _NEWLINE:
                    last_newline_end = end + 1
                end += 1
            if last_newline_end >= 0:
                pos = last_newline_end
            elif end < n and end - pos >= 2 and (_is_letter_like(text[end]) or text[end] in _PUNCT):
                pos = end - 1   # the last space leads the next word / punct run (rule 5 or 6)
            else:
                pos = end
        else:                                                   # 9: one character
            pos += 1
        pieces.append(text[start:pos])
    return pieces


# The same rules as one regular expression (valid for Python `re` and for Oniguruma, which HF
# `tokenizers` uses). The exported tokenizer.json uses it; tests check it against `pretokenize`.
_RX_LETTER = r"[^\x00-\x40\x5b-\x60\x7b-\x7f]"          # ASCII letter or any non-ASCII
_RX_PUNCT = r"[!-/:-@\[-`{-~]"
JOYAI_DS4_REGEX = "|".join([
    r"[0-9]{1,3}",
    "[\u4e00-\u9fa5\u3040-\u30ff]+",
    _RX_PUNCT + r"[A-Za-z]+",
    _RX_LETTER + "+",
    r"[\x00-\x09\x0b\x0c\x0e-\x20\x7f]" + _RX_LETTER + "+",
    " " + _RX_PUNCT + r"+[\r\n]*",
    _RX_PUNCT + r"+[\r\n]*",
    r"[\x09-\x0d\x20]*[\r\n]",
    r"[\x09\x0b\x0c\x20]+(?=[\x09\x0b\x0c\x20](?:" + _RX_LETTER + "|" + _RX_PUNCT + "))",
    r"[\x09\x0b\x0c\x20]+",
    r"[\s\S]",
])

# The regex JoyAI intends (spec 14.3), kept for reference; ds4 does not execute it.
JOYAI_SPEC_REGEX = "|".join([
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[\p{P}\p{S}][A-Za-z]+",
    r"[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+",
    r" ?[\p{P}\p{S}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def _check_thinking(thinking: str, ctx: int | None) -> str:
    if thinking not in THINKING_MODES:
        raise ValueError(f"thinking must be one of {THINKING_MODES}, got {thinking!r}")
    if thinking == "max" and ctx is not None and ctx < THINK_MAX_MIN_CONTEXT:
        return "high"   # as ds4: max effort only with a >= 384K context
    return thinking


class Tokenizer:
    """DS4 byte-level BPE tokenizer. Build it with `from_gguf(path)` or from token/merge lists."""

    def __init__(self, tokens: list[str], merges: list[str], *, cache_size: int = 65536):
        if not tokens:
            raise ValueError("tokenizer has an empty token list")
        self.tokens = list(tokens)
        # duplicates: the later entry wins, as in ds4's hash tables
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.merges = list(merges)
        ids = {}
        for role, s in SPECIALS.items():
            if s not in self.token_to_id:
                raise ValueError(f"required special token {s!r} ({role}) is missing from the vocabulary")
            ids[role] = self.token_to_id[s]
        self.special_ids = ids
        self.bos, self.eos = ids["bos"], ids["eos"]
        self.user, self.assistant = ids["user"], ids["assistant"]
        self.think, self.think_end, self.dsml = ids["think"], ids["think_end"], ids["dsml"]
        self._special_re = re.compile("|".join(re.escape(s) for s in SPECIALS.values()))
        self._single_byte_id = [self.token_to_id.get(bytes([b]).decode("utf-8", "surrogateescape"))
                                for b in range(256)]
        self._bpe_cached = functools.lru_cache(maxsize=cache_size)(self._bpe)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """Read `tokenizer.ggml.tokens` and `tokenizer.ggml.merges` from a GGUF file."""
        from ds4tp.gguf_file import read_header

        md, _, _ = read_header(str(path))

        def strings(key: str) -> list[str]:
            if key not in md:
                raise ValueError(f"{path}: GGUF has no {key}")
            types, vals = md[key]
            if types != ["ARRAY", "STRING"]:
                raise ValueError(f"{path}: {key} is not an array of strings ({'/'.join(types)})")
            return vals

        return cls(strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges"))

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    # -- encoding -----------------------------------------------------------------------------

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Byte-level BPE of one pre-token piece.

        A heap of candidate pairs keyed (rank, left symbol's original index) pops exactly the
        lowest-rank, leftmost pair the plain rescanning loop would choose; entries made stale by
        an earlier merge are detected by their symbol strings (a merge always lengthens a symbol).
        """
        sym: list[str | None] = [BYTE_TO_CHAR[b] for b in piece.encode("utf-8", "surrogatepass")]
        n = len(sym)
        rank = self.merge_rank
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            r = rank.get(sym[i] + " " + sym[i + 1])
            if r is not None:
                heap.append((r, i, sym[i], sym[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if sym[i] != a or j < 0 or sym[j] != b:
                continue
            merged = a + b
            sym[i], sym[j] = merged, None
            k = nxt[i] = nxt[j]
            if k >= 0:
                prv[k] = i
                r = rank.get(merged + " " + sym[k])
                if r is not None:
                    heapq.heappush(heap, (r, i, merged, sym[k]))
            p = prv[i]
            if p >= 0:
                r = rank.get(sym[p] + " " + merged)
                if r is not None:
                    heapq.heappush(heap, (r, p, sym[p], merged))
        out = []
        i = 0
        while i >= 0:
            tid = self.token_to_id.get(sym[i])
            if tid is not None:
                out.append(tid)
            else:   # ds4's fallback: the symbol's single bytes that are tokens themselves
                out.extend(t for t in (self._single_byte_id[b] for b in sym[i].encode("utf-8"))
                           if t is not None)
            i = nxt[i]
        return tuple(out)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (no BOS; special-token strings are ordinary text)."""
        out: list[int] = []
        for piece in pretokenize(text):
            out.extend(self._bpe_cached(piece))
        return out

    def encode_rendered(self, text: str) -> list[int]:
        """Rendered chat text -> ids: the seven special strings become their ids."""
        out: list[int] = []
        span = 0
        for m in self._special_re.finditer(text):
            if m.start() > span:
                out.extend(self.encode(text[span:m.start()]))
            out.append(self.token_to_id[m.group()])
            span = m.end()
        if span < len(text):
            out.extend(self.encode(text[span:]))
        return out

    def encode_prompt(self, user: str, system: str = "", thinking: str = "none", *,
                      ctx: int | None = None) -> list[int]:
        """ds4's single-turn chat encoder (the CLI form; the golden `chat_*` cases).

        Max prefix, system and user text are plain-encoded one by one, so specials inside
        them stay text. `ctx` (if given) applies ds4's max -> high downgrade."""
        thinking = _check_thinking(thinking, ctx)
        ids = [self.bos]
        if thinking == "max":
            ids += self.encode(MAX_EFFORT_PREFIX)
        if system:
            ids += self.encode(system)
        ids.append(self.user)
        ids += self.encode(user)
        ids.append(self.assistant)
        ids.append(self.think if thinking != "none" else self.think_end)
        return ids

    def encode_messages(self, messages: list[dict], thinking: str = "none", *,
                        add_generation_prompt: bool = True, ctx: int | None = None) -> list[int]:
        """ds4's engine message API (BOS, one append per message, assistant prefix); the golden
        `messages_*` cases.

        system/developer: content as text; assistant: `<｜Assistant｜>`, then `</think>` unless
        the content starts with a think tag, then content; user and anything else: `<｜User｜>`
        + content, with "Tool: " before tool/function results. Contents are plain text and no
        EOS is added after assistant turns (ds4's caller appends the sampled EOS itself)."""
        thinking = _check_thinking(thinking, ctx)
        ids = [self.bos]
        if thinking == "max":
            ids += self.encode(MAX_EFFORT_PREFIX)
        for m in messages:
            role = m.get("role") or "user"
            content = _content_text(m.get("content"))
            if role in ("system", "developer"):
                ids += self.encode(content)
            elif role == "assistant":
                ids.append(self.assistant)
                if not content.startswith((THINK, THINK_END)):
                    ids.append(self.think_end)
                ids += self.encode(content)
            else:
                ids.append(self.user)
                if role in ("tool", "function"):
                    ids += self.encode("Tool: ")
                ids += self.encode(content)
        if add_generation_prompt:
            ids.append(self.assistant)
            ids.append(self.think if thinking != "none" else self.think_end)
        return ids

    # -- decoding -----------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (ds4_token_text): tokens containing the fullwidth bar
        are literal specials; the rest are un-mapped through the byte table."""
        if not 0 <= token_id < len(self.tokens):
            raise ValueError(f"token id {token_id} out of range [0, {len(self.tokens)})")
        s = self.tokens[token_id]
        if "｜" in s:
            return s.encode("utf-8", "surrogateescape")
        return bytes(CHAR_TO_BYTE[c] for c in s if c in CHAR_TO_BYTE)

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only complete UTF-8 characters; bytes of a
    character split across tokens are held back until it completes. Invalid bytes come out as
    U+FFFD. `flush()` returns whatever is still held (as U+FFFD if incomplete)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self._tok.token_bytes(int(token_id)))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


# ---------------------------------------------------------------------------------------------
# Chat rendering (spec 14.5)
# ---------------------------------------------------------------------------------------------

def _content_text(content) -> str:
    """Message content as ds4 reads it: a string, None -> "", or a list whose string items and
    `text` fields are concatenated (other parts are skipped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
        return "".join(out)
    return ""


def render_prompt(user: str, system: str = "", thinking: str = "none", *,
                  ctx: int | None = None) -> str:
    """The single-turn CLI prompt as text. (`Tokenizer.encode_prompt` gives ds4's exact ids;
    `encode_rendered` of this text gives the same ids unless system/user contain specials.)"""
    thinking = _check_thinking(thinking, ctx)
    prefix = MAX_EFFORT_PREFIX if thinking == "max" else ""
    return (BOS + prefix + system + USER + user + ASSISTANT
            + (THINK if thinking != "none" else THINK_END))


def _escape_closing_tag(text: str, tag: str, lt: str) -> str:
    # only the '<' of the exact closing tag is escaped: everything else in the data stays raw
    return text.replace(tag, lt + tag[1:])


def _escape_attr(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


_PARAM_END = "</" + DSML + "parameter>"
_WS = re.compile(r"\s*")


def _minify_json(raw: str) -> str:
    """Drop whitespace outside strings, keep everything else byte for byte (as ds4 does)."""
    out = []
    in_str = esc = False
    for c in raw:
        if in_str:
            out.append(c)
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            out.append(c)
        elif not c.isspace():
            out.append(c)
    return "".join(out)


def _json_object_args(text: str) -> list[tuple[str, str, bool]] | None:
    """Parse a JSON object's members as (key, value, is_string): string values decoded,
    other values as their minified source text. None if `text` is not a JSON object."""
    dec = json.JSONDecoder()
    try:
        pos = _WS.match(text, 0).end()
        if text[pos:pos + 1] != "{":
            return None
        pos = _WS.match(text, pos + 1).end()
        args = []
        while text[pos:pos + 1] != "}":
            key, pos = dec.raw_decode(text, pos)
            if not isinstance(key, str):
                return None
            pos = _WS.match(text, pos).end()
            if text[pos:pos + 1] != ":":
                return None
            pos = _WS.match(text, pos + 1).end()
            value, end = dec.raw_decode(text, pos)
            if isinstance(value, str):
                args.append((key, value, True))
            else:
                args.append((key, _minify_json(text[pos:end]), False))
            pos = _WS.match(text, end).end()
            if text[pos:pos + 1] == ",":
                pos = _WS.match(text, pos + 1).end()
            elif text[pos:pos + 1] != "}":
                return None
        return args   # like ds4, whatever follows the closing brace is ignored
    except (json.JSONDecodeError, ValueError):
        return None


def _tool_call_parts(call: dict) -> tuple[str, str]:
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name") or ""
    args = fn.get("arguments")
    if args is None:
        args = "{}"
    elif not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return name, args


def render_tool_calls(calls: list[dict]) -> str:
    """An assistant's OpenAI-style tool_calls as the DSML block the model writes."""
    if not calls:
        return ""
    out = ["\n\n<" + DSML + "tool_calls>\n"]
    for call in calls:
        name, arguments = _tool_call_parts(call)
        out.append("<" + DSML + 'invoke name="' + _escape_attr(name) + '">\n')
        args = _json_object_args(arguments)
        if args is None:   # not a JSON object: pass the raw text as one string parameter
            args = [("arguments", arguments, True)]
        for key, value, is_string in args:
            if is_string:
                value = _escape_closing_tag(value, _PARAM_END, "&lt;")
            else:
                value = _escape_closing_tag(value, _PARAM_END, "\\u003c")
            out.append("<" + DSML + 'parameter name="' + _escape_attr(key) + '" string="'
                       + ("true" if is_string else "false") + '">' + value + _PARAM_END + "\n")
        out.append("</" + DSML + "invoke>\n")
    out.append("</" + DSML + "tool_calls>")
    return "".join(out)


_TOOLS_PREAMBLE = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user question. "
    "You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as raw text and set `string=\"true\"`. "
    "Preserve characters such as `>`, `&`, and `&&` exactly; never replace normal string "
    "characters with XML or HTML entity escapes. "
    "Only if a string value itself contains the exact closing parameter tag "
    "`</｜DSML｜parameter>`, write that tag as `&lt;/｜DSML｜parameter>` inside the value. "
    "For all other types (numbers, booleans, arrays, objects), pass the value in JSON format "
    "and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete "
    "reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n")
_TOOLS_POSTAMBLE = ("\n\nYou MUST strictly follow the above defined tool name and parameter "
                    "schemas to invoke tool calls. Use the exact parameter names from the schemas.")


def tool_schema_lines(tools: list) -> str:
    """One JSON schema per line: an OpenAI tool {"type": "function", "function": F} gives F;
    other dicts are used whole; strings are taken as raw JSON text, verbatim (ds4 copies the
    client's JSON text, so passing the request's raw text reproduces it byte for byte)."""
    lines = []
    for t in tools or []:
        if isinstance(t, str):
            line = t
        elif isinstance(t, dict):
            obj = t["function"] if isinstance(t.get("function"), dict) else t
            line = json.dumps(obj, ensure_ascii=False)
        else:
            raise TypeError(f"a tool must be a dict or a JSON string, got {type(t).__name__}")
        if line:
            lines.append(line)
    return "\n".join(lines)


def render_tools_prompt(tools: list) -> str:
    schemas = tool_schema_lines(tools)
    return _TOOLS_PREAMBLE + schemas + _TOOLS_POSTAMBLE if schemas else ""


def render_chat(messages: list[dict], *, thinking: str = "none", tools: list | None = None,
                ctx: int | None = None, add_generation_prompt: bool = True) -> str:
    """The OpenAI-server chat prompt as text (ds4_server's renderer); tokenize it with
    `Tokenizer.encode_rendered`.

    Messages are dicts with `role`, `content` (string, None, or a list of parts),
    `reasoning_content` (or `reasoning`) and `tool_calls` (OpenAI form). Unknown roles are
    skipped. Earlier assistant turns keep their reasoning only while tools are in play (tools
    given, a tool call or a tool result anywhere) or when they follow the last user/tool turn.
    `ctx` (if given) applies ds4's max -> high downgrade. With `add_generation_prompt` (ds4
    always) a conversation ending in a user/tool turn gets the assistant prefix."""
    thinking = _check_thinking(thinking, ctx)
    think = thinking != "none"
    tools_prompt = render_tools_prompt(tools) if tools else ""
    tool_context = bool(tools_prompt) or any(
        (m.get("role") == "assistant" and m.get("tool_calls"))
        or m.get("role") in ("tool", "function") for m in messages)

    system = tools_prompt
    for m in messages:
        if m.get("role") in ("system", "developer"):
            if system:
                system += "\n\n"
            system += _content_text(m.get("content"))
    last_user = max((i for i, m in enumerate(messages)
                     if (m.get("role") or "user") in ("user", "tool", "function")), default=-1)

    out = [BOS, MAX_EFFORT_PREFIX if thinking == "max" else "", system]
    pending_assistant = pending_tool = False
    for i, m in enumerate(messages):
        role = m.get("role") or "user"
        content = _content_text(m.get("content"))
        if role == "user":
            out += [USER, content]
            pending_assistant, pending_tool = True, False
        elif role in ("tool", "function"):
            if not pending_tool:
                out.append(USER)
            out += ["<tool_result>", _escape_closing_tag(content, "</tool_result>", "&lt;"),
                    "</tool_result>"]
            pending_assistant = pending_tool = True
        elif role == "assistant":
            if pending_assistant:
                out.append(ASSISTANT)
                if think and (tool_context or i > last_user):
                    reasoning = m.get("reasoning_content", m.get("reasoning"))
                    out += [THINK, _content_text(reasoning), THINK_END]
                else:
                    out.append(THINK_END)
            out += [content, render_tool_calls(m.get("tool_calls") or []), EOS]
            pending_assistant = pending_tool = False
    if pending_assistant and add_generation_prompt:
        out += [ASSISTANT, THINK if think else THINK_END]
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Parsing generated text
# ---------------------------------------------------------------------------------------------

def split_reasoning(text: str) -> tuple[str, str]:
    """Thinking-mode output -> (reasoning, content). The prompt ended in `<think>`, so the text
    up to the first `</think>` is reasoning (a leading `<think>` is dropped) and the rest is
    content. Without `</think>` the whole text is (unfinished) reasoning."""
    body = text[len(THINK):] if text.startswith(THINK) else text
    reasoning, sep, content = body.partition(THINK_END)
    return (reasoning, content) if sep else (body, "")


# The three block spellings ds4 accepts: full DSML, DSML without its first bar, plain XML.
_DSML_STYLES = [("<" + DSML, "</" + DSML), ("<DSML｜", "</DSML｜"), ("<", "</")]
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'"}
_ENTITY_RE = re.compile("|".join(_ENTITIES))


def _unescape(text: str) -> str:
    return _ENTITY_RE.sub(lambda m: _ENTITIES[m.group()], text)


def _attr(tag: str, name: str) -> str | None:
    m = re.search(r'\b' + name + r'="([^"]*)"', tag)
    return _unescape(m.group(1)) if m else None


class _DSMLError(ValueError):
    pass


def _parse_params(text: str, pos: int, open_p: str, close_p: str, stop: str) -> tuple[dict, int]:
    """Parameters up to the `stop` tag; returns ({name: value}, position after `stop`)."""
    args = {}
    while True:
        pos = _WS.match(text, pos).end()
        if text.startswith(stop, pos):
            return args, pos + len(stop)
        if not text.startswith(open_p, pos):
            raise _DSMLError(f"expected a parameter at offset {pos}")
        tag_end = text.find(">", pos)
        if tag_end < 0:
            raise _DSMLError("unterminated parameter tag")
        tag = text[pos:tag_end + 1]
        name, kind = _attr(tag, "name"), _attr(tag, "string")
        if name is None:
            raise _DSMLError("parameter without a name")
        vstart = tag_end + 1
        if kind is None and text.startswith(open_p, _WS.match(text, vstart).end()):
            # loose output: nested parameters form an object
            args[name], pos = _parse_params(text, vstart, open_p, close_p, close_p)
            continue
        vend = text.find(close_p, vstart)
        if vend < 0:
            raise _DSMLError(f"parameter {name!r} is not closed")
        raw = text[vstart:vend]
        if kind in (None, "true"):
            args[name] = _unescape(raw)
        else:
            try:
                args[name] = json.loads(raw)
            except json.JSONDecodeError:
                args[name] = raw.strip()   # not JSON after all: keep the text
        pos = vend + len(close_p)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Find the model's tool-call block in (post-reasoning) text.

    Returns (content, tool_calls): the text before the block with trailing whitespace removed,
    and OpenAI-style calls `{"id", "type": "function", "function": {"name", "arguments"}}` with
    `arguments` a JSON string. Text without a block, or with a block that does not parse,
    comes back whole with no calls."""
    found = None
    for open_, close in _DSML_STYLES:
        start = text.find(open_ + "tool_calls>")
        if start >= 0:
            found = (start, open_, close)
            break
    if found is None:
        return text, []
    start, open_, close = found
    pos = start + len(open_ + "tool_calls>")
    calls = []
    try:
        while True:
            pos = _WS.match(text, pos).end()
            if text.startswith(close + "tool_calls>", pos):
                break
            if not text.startswith(open_ + "invoke", pos):
                raise _DSMLError(f"expected an invoke at offset {pos}")
            tag_end = text.find(">", pos)
            name = _attr(text[pos:tag_end + 1], "name") if tag_end >= 0 else None
            if name is None:
                raise _DSMLError("invoke without a name")
            args, pos = _parse_params(text, tag_end + 1, open_ + "parameter", close + "parameter>",
                                      close + "invoke>")
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": name,
                                       "arguments": json.dumps(args, ensure_ascii=False)}})
    except _DSMLError:
        return text, []
    return text[:start].rstrip(), calls


# ---------------------------------------------------------------------------------------------
# HF export
# ---------------------------------------------------------------------------------------------

# Jinja form of `render_chat` for transformers' apply_chat_template. Extra variable:
# `thinking` (bool, default false). Tool-call arguments given as a mapping become DSML
# parameters (non-strings via tojson, which keeps ", " and ": " where ds4 minifies); arguments
# given as a JSON string become one "arguments" string parameter (ds4 would parse them).
CHAT_TEMPLATE = (
    "{%- set think = thinking is defined and thinking -%}"
    "{%- macro text(c) -%}{%- if c is string -%}{{ c }}{%- elif c is iterable and c is not mapping -%}"
    "{%- for p in c -%}{%- if p is string -%}{{ p }}{%- elif p is mapping and p.text is string -%}"
    "{{ p.text }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- macro attr(s) -%}{{ s | replace('&', '&amp;') | replace('<', '&lt;') | replace('>', '&gt;')"
    " | replace('\"', '&quot;') }}{%- endmacro -%}"
    "{%- set ns = namespace(system='', tool_ctx=false, last_user=-1, pa=false, pt=false) -%}"
    "{%- if tools -%}{%- set ns.tool_ctx = true -%}"
    "{%- set ns.system = " + json.dumps(_TOOLS_PREAMBLE) + " -%}"
    "{%- for t in tools -%}{%- if not loop.first -%}{%- set ns.system = ns.system ~ '\\n' -%}{%- endif -%}"
    "{%- set ns.system = ns.system ~ ((t.function if t.function is defined and t.function is mapping"
    " else t) | tojson) -%}{%- endfor -%}"
    "{%- set ns.system = ns.system ~ " + json.dumps(_TOOLS_POSTAMBLE) + " -%}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role in ['system', 'developer'] -%}"
    "{%- if ns.system -%}{%- set ns.system = ns.system ~ '\\n\\n' -%}{%- endif -%}"
    "{%- set ns.system = ns.system ~ text(m.content) -%}{%- endif -%}"
    "{%- if m.role in ['user', 'tool', 'function'] -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- if m.role in ['tool', 'function'] or (m.role == 'assistant' and m.tool_calls) -%}"
    "{%- set ns.tool_ctx = true -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}{{- ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '<｜User｜>' ~ text(m.content) -}}{%- set ns.pa = true -%}{%- set ns.pt = false -%}"
    "{%- elif m.role in ['tool', 'function'] -%}{%- if not ns.pt -%}{{- '<｜User｜>' -}}{%- endif -%}"
    "{{- '<tool_result>' ~ (text(m.content) | replace('</tool_result>', '&lt;/tool_result>')) ~ '</tool_result>' -}}"
    "{%- set ns.pa = true -%}{%- set ns.pt = true -%}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- if ns.pa -%}{{- '<｜Assistant｜>' -}}"
    "{%- if think and (ns.tool_ctx or loop.index0 > ns.last_user) -%}"
    "{{- '<think>' ~ text(m.reasoning_content if m.reasoning_content is defined else m.reasoning) ~ '</think>' -}}"
    "{%- else -%}{{- '</think>' -}}{%- endif -%}{%- endif -%}"
    "{{- text(m.content) -}}"
    "{%- if m.tool_calls -%}{{- '\\n\\n<｜DSML｜tool_calls>\\n' -}}"
    "{%- for tc in m.tool_calls -%}{%- set f = tc.function if tc.function is defined else tc -%}"
    "{{- '<｜DSML｜invoke name=\"' ~ attr(f.name) ~ '\">\\n' -}}"
    "{%- if f.arguments is mapping -%}{%- for k, v in f.arguments.items() -%}"
    "{%- if v is string -%}{{- '<｜DSML｜parameter name=\"' ~ attr(k) ~ '\" string=\"true\">' ~"
    " (v | replace('</｜DSML｜parameter>', '&lt;/｜DSML｜parameter>')) ~ '</｜DSML｜parameter>\\n' -}}"
    "{%- else -%}{{- '<｜DSML｜parameter name=\"' ~ attr(k) ~ '\" string=\"false\">' ~ (v | tojson) ~"
    " '</｜DSML｜parameter>\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{- '<｜DSML｜parameter name=\"arguments\" string=\"true\">' ~ ((f.arguments or '') |"
    " replace('</｜DSML｜parameter>', '&lt;/｜DSML｜parameter>')) ~ '</｜DSML｜parameter>\\n' -}}{%- endif -%}"
    "{{- '</｜DSML｜invoke>\\n' -}}{%- endfor -%}{{- '</｜DSML｜tool_calls>' -}}{%- endif -%}"
    "{{- '<｜end▁of▁sentence｜>' -}}{%- set ns.pa = false -%}{%- set ns.pt = false -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if ns.pa and add_generation_prompt -%}{{- '<｜Assistant｜>' ~ ('<think>' if think else '</think>') -}}{%- endif -%}"
)


def hf_tokenizer_json(tok: Tokenizer, *, regex: str = JOYAI_DS4_REGEX) -> dict:
    """The tokenizer.json structure (HF `tokenizers` format) for `tok`."""
    added = []
    for s in list(SPECIALS.values()) + [PAD]:
        if s in tok.token_to_id:
            added.append({"id": tok.token_to_id[s], "content": s, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          # think tags and the DSML marker are kept by skip_special_tokens
                          "special": s in (BOS, EOS, USER, ASSISTANT, PAD)})
    added.sort(key=lambda a: a["id"])
    bos = tok.tokens[tok.bos]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False},
        ]},
        # `encode(text)` with special tokens = BOS + text, ds4's raw-prompt form
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": dict(tok.token_to_id), "merges": [m.split(" ", 1) for m in tok.merges]},
    }


def export_hf(tok: Tokenizer, out_dir: str | Path, *, model_max_length: int = 1048576) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj) -> None:
        (out / name).write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    dump("tokenizer.json", hf_tokenizer_json(tok))
    specials = {"bos_token": BOS, "eos_token": EOS}
    if PAD in tok.token_to_id:
        specials["pad_token"] = PAD
    dump("special_tokens_map.json", specials)
    dump("tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,   # the post-processor adds BOS
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    })
    return out


def export_main(args) -> int:
    """`ds4tp export-tokenizer DIR [--model F]`: write an HF tokenizer for the GGUF's vocabulary.

    The export is ds4's BPE exactly (same vocab, same merge ranks, lowest-rank-leftmost merging)
    behind a Split pre-tokenizer whose regex, `JOYAI_DS4_REGEX`, transcribes ds4's procedural
    JoyAI splitter rule for rule (tests compare it with `pretokenize` on random text).
    Agreement with `Tokenizer` (measured on golden tiny-a/small-a, tokenizers 0.23.3,
    transformers 5.24): 8 of the 9 `text` cases (not `special_strings_as_text`, see below),
    the 3 raw prompts with BOS, both `rendered` cases and the 4 `chat_*` cases as rendered
    text (`render_prompt`) match id for id. Known differences:
      * HF treats special-token strings in any text as specials (like `encode_rendered`), so the
        plain-text case `special_strings_as_text` differs from `encode`; the pad string
        `<｜▁pad▁｜>` is also an HF special, while ds4 tokenizes it as text.
      * A text holding a NUL byte: ds4's C strings stop there, both Python paths do not.
      * The chat template renders `render_chat`'s server form; tools and tool calls render
        with `tojson` spacing where ds4 copies/minifies the client's JSON.
    Beyond the golden texts, 3000 random strings (golden snippets and a mixed alphabet with
    controls, CJK, emoji, NBSP) encoded identically in HF and here when they hold no specials.
    With the JoyAI regex as the spec writes it (`JOYAI_SPEC_REGEX`, `hf_tokenizer_json(regex=)`)
    the golden ids happen to agree too (the toy merges hide it), but the pieces already differ
    on `cjk_kana` and `emoji_mixed`, and on ~30% of random snippets that mix non-ASCII
    punctuation or symbols (« » £ € … 、) with words: ds4 counts those as letters, the regex as
    \\p{P}/\\p{S}. The procedural transcription avoids that.
    """
    model = args.model
    if model is None:
        from ds4tp.synth import default_model_path  # lazily: written by another helper
        model = default_model_path()
    tok = Tokenizer.from_gguf(model)
    out = export_hf(tok, args.dir)
    print(f"wrote {out / 'tokenizer.json'}, tokenizer_config.json, special_tokens_map.json "
          f"({tok.n_vocab} tokens, {len(tok.merges)} merges) from {model}")
    return 0
