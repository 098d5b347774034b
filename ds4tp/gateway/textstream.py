"""From generated token ids to the text a client sees, one token at a time.

`TextStream.push(token)` returns the text that token makes visible, split in two channels:
`reasoning` (thinking mode, before `</think>`) and `content`. It handles
- UTF-8 characters split across tokens (the tokenizer's StreamDecoder holds the bytes back);
- thinking: the prompt ended in `<think>`, so output is reasoning until the `</think>` token,
  which itself is not shown (a leading `<think>` token is dropped too);
- stop strings (content channel only; reasoning may say anything): the output ends before the
  first occurrence, and text that could be the start of a stop string is held back until the
  next tokens decide, so a stop string split across tokens never leaks;
- tool calls (when the request has tools): from the DSML block opener `<｜DSML｜tool_calls>` on,
  content is captured instead of shown and parsed into OpenAI tool calls at the end.
`finish()` flushes what is held and parses the tool block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ds4tp import tokenizer as tk

TOOL_BLOCK_OPEN = "<" + tk.DSML + "tool_calls>"


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


@dataclass
class Final:
    delta: Delta                                   # text released at the end
    tool_calls: list = field(default_factory=list)  # OpenAI-style calls parsed from the block


def _held_prefix(text: str, pattern: str) -> int:
    """Length of the longest proper prefix of `pattern` that `text` ends with."""
    for k in range(min(len(pattern) - 1, len(text)), 0, -1):
        if text.endswith(pattern[:k]):
            return k
    return 0


class TextStream:
    def __init__(self, tokenizer, *, thinking: bool = False, stop: list[str] = (),
                 tools: bool = False):
        self.tok = tokenizer
        self.decoder = tokenizer.stream_decoder()
        self.channel = "reasoning" if thinking else "content"
        self.stop = [s for s in stop if s]
        self.tools = tools
        self.pending = ""          # content held back (possible stop-string / tool-block start)
        self.tool_text = None      # captured tool block (None: not in one)
        self.stopped = False       # a stop string was found; nothing more is shown
        self.reasoning_tokens = 0
        self._first = True

    def push(self, token: int) -> Delta:
        first, self._first = self._first, False
        if self.stopped:
            return Delta()
        if self.channel == "reasoning":
            self.reasoning_tokens += 1
            if token == self.tok.think_end:
                self.channel = "content"
                return Delta(reasoning=self.decoder.flush())
            if first and token == self.tok.think:
                return Delta()
            return Delta(reasoning=self.decoder.push(token))
        return Delta(content=self._content(self.decoder.push(token)))

    def _content(self, text: str) -> str:
        if self.tool_text is not None:
            self.tool_text += text
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return self._tool_split(out, final=True)
        return self._tool_split(self.pending, final=False)

    def _tool_split(self, text: str, final: bool) -> str:
        """Release what of `text` (== pending unless final) can be shown now."""
        if self.tools:
            i = text.find(TOOL_BLOCK_OPEN)
            if i >= 0:
                self.tool_text, self.pending = text[i:], ""
                return text[:i].rstrip()
        if final:
            return text
        hold = max([_held_prefix(text, s) for s in self.stop]
                   + ([_held_prefix(text, TOOL_BLOCK_OPEN)] if self.tools else []) + [0])
        if self.tools:   # nor is the whitespace before a (possible) block
            head = text[:len(text) - hold]
            hold += len(head) - len(head.rstrip())
        out, self.pending = text[:len(text) - hold], text[len(text) - hold:]
        return out

    def finish(self) -> Final:
        """End of generation: release held text, parse the tool block."""
        if self.stopped:
            return Final(Delta())
        tail = self.decoder.flush()
        if self.channel == "reasoning":
            return Final(Delta(reasoning=tail))
        out = self._content(tail) if tail else ""
        if self.stopped:
            return Final(Delta(content=out))
        calls = []
        if self.tool_text is not None:
            _, calls = tk.parse_tool_calls(self.tool_text)
            if not calls:               # not a valid block after all: it is content
                out += self.tool_text
        out += self.pending
        self.pending = ""
        return Final(Delta(content=out), calls)
