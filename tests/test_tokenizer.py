"""Tokenizer and chat rendering against ds4's own token streams (golden tiny-a / small-a)."""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import types

import pytest

from conftest import golden_file
from ds4tp.tokenizer import (BYTE_TO_CHAR, JOYAI_DS4_REGEX, MAX_EFFORT_PREFIX, StreamDecoder,
                             Tokenizer, export_hf, export_main, parse_tool_calls, pretokenize,
                             render_chat, render_prompt, render_tool_calls, split_reasoning)

MODELS = ["tiny-a", "small-a"]
THINKING_OF_KIND = {"chat_nothink": "none", "chat_think": "high", "chat_max": "max",
                    "messages_nothink": "none", "messages_think": "high"}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(golden_file("tiny-a.gguf"))


def load_golden(model: str) -> dict:
    return json.loads(golden_file(f"{model}.json").read_text())


def golden_messages(text: str) -> list[dict]:
    """The messages_* cases store "role\\ncontent" blocks separated by "\\n@@@@\\n"."""
    msgs = []
    for block in text.split("\n@@@@\n"):
        role, _, content = block.partition("\n")
        msgs.append({"role": role, "content": content})
    return msgs


def encode_case(tok: Tokenizer, case: dict) -> list[int]:
    kind = case["kind"]
    if kind == "text":
        return tok.encode(case["text"])
    if kind == "rendered":
        return tok.encode_rendered(case["text"])
    if kind.startswith("chat_"):
        return tok.encode_prompt(case["text"], case["system"] or "", THINKING_OF_KIND[kind])
    if kind.startswith("messages_"):
        return tok.encode_messages(golden_messages(case["text"]), THINKING_OF_KIND[kind])
    raise AssertionError(f"unknown golden tokenization kind {kind!r}")


# ------------------------------------------------------------------------------ golden ids

@pytest.mark.parametrize("model", MODELS)
def test_golden_tokenization_cases(tok, model):
    cases = load_golden(model)["tokenization"]
    assert {c["kind"] for c in cases} >= {"text", "rendered", "chat_nothink", "chat_think",
                                          "chat_max", "messages_nothink", "messages_think"}
    for case in cases:
        ids = encode_case(tok, case)
        assert ids == case["ids"], case["name"]
        assert [tok.token_bytes(i).hex() for i in ids] == case["pieces_hex"], case["name"]
        whole = b"".join(bytes.fromhex(h) for h in case["pieces_hex"]).decode("utf-8")
        assert tok.decode(ids) == whole, case["name"]
        if case["kind"] in ("text", "rendered"):
            assert tok.decode(ids) == case["text"], case["name"]


@pytest.mark.parametrize("model", MODELS)
def test_golden_prompts(tok, model):
    prompts = load_golden(model)["prompts"]
    assert {p["mode"] for p in prompts} == {"bos_raw", "chat_nothink"}
    for p in prompts:
        if p["mode"] == "bos_raw":
            ids = [tok.bos] + tok.encode(p["text"])
        else:
            ids = tok.encode_prompt(p["text"], p["system"] or "", "none")
            # the text form tokenizes the same here (no specials inside the user text)
            assert tok.encode_rendered(render_prompt(p["text"], p["system"] or "")) == ids
        assert ids == p["prompt_ids"], p["name"]
        assert tok.decode(ids[1:]) == p["text"] or p["mode"] != "bos_raw"


def test_special_ids_match_golden(tok):
    for model in MODELS:
        g = load_golden(model)
        assert tok.n_vocab == g["n_vocab"]
        for role, i in g["special_ids"].items():
            assert tok.special_ids[role] == i


def test_chat_prompt_text_forms(tok):
    cases = {c["name"]: c for c in load_golden("tiny-a")["tokenization"]}
    for name in ("chat_nothink_system", "chat_think_system", "chat_nothink_nosystem", "chat_think_max"):
        c = cases[name]
        text = render_prompt(c["text"], c["system"], THINKING_OF_KIND[c["kind"]])
        assert tok.encode_rendered(text) == c["ids"], name
    # ds4 downgrades max to high below a 384K context
    low = render_prompt("q", thinking="max", ctx=1024)
    assert MAX_EFFORT_PREFIX not in low and low.endswith("<think>")
    assert MAX_EFFORT_PREFIX in render_prompt("q", thinking="max", ctx=393216)
    with pytest.raises(ValueError, match="thinking"):
        render_prompt("q", thinking="medium")


# ------------------------------------------------------------------------------ server chat form

def test_render_chat_reproduces_golden_rendered_texts(tok):
    cases = {c["name"]: c for c in load_golden("tiny-a")["tokenization"]}
    simple = [{"role": "system", "content": "You are a helpful assistant"},
              {"role": "user", "content": "Ciao!"},
              {"role": "assistant", "content": "Ciao a te.", "reasoning_content": "dropped"},
              {"role": "user", "content": "Come stai?"}]
    assert render_chat(simple, thinking="high") == cases["rendered_simple"]["text"]
    dsml = [{"role": "user", "content": "What is the weather in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}]
    text = render_chat(dsml)
    assert text == cases["rendered_dsml"]["text"]
    assert tok.encode_rendered(text) == cases["rendered_dsml"]["ids"]


def test_render_chat_structure():
    msgs = [{"role": "developer", "content": "A"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "system", "content": [{"type": "text", "text": "B"}, {"type": "image"}]},
            {"role": "tool", "content": "x </tool_result> y"},
            {"role": "function", "content": "z"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
            {"role": "assistant", "content": "a3"}]
    text = render_chat(msgs, thinking="high")
    # tool results put the whole history in tool context, so every reasoning is kept
    assert text == ("<｜begin▁of▁sentence｜>A\n\nB<｜User｜>q1<｜Assistant｜><think>r1</think>a1"
                    "<｜end▁of▁sentence｜><｜User｜><tool_result>x &lt;/tool_result> y</tool_result>"
                    "<tool_result>z</tool_result><｜User｜>q2<｜Assistant｜><think>r2</think>a2"
                    "<｜end▁of▁sentence｜>a3<｜end▁of▁sentence｜>")
    plain = [m for m in msgs if m["role"] not in ("tool", "function")]
    no_tools = render_chat(plain, thinking="high")
    assert "<think>r1</think>" not in no_tools and "<｜Assistant｜></think>a1" in no_tools
    assert "<think>r2</think>a2" in no_tools
    assert render_chat(plain, thinking="none").count("<think>") == 0
    assert render_chat(plain, thinking="max").startswith("<｜begin▁of▁sentence｜>" + MAX_EFFORT_PREFIX)
    assert render_chat([{"role": "user", "content": "hi"}], thinking="max", ctx=4096) == \
        "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>"


def test_render_chat_tools_prompt():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
             '{"name":"g","parameters":{}}']
    text = render_chat([{"role": "user", "content": "u"}], tools=tools)
    system = text[len("<｜begin▁of▁sentence｜>"):text.index("<｜User｜>")]
    assert system.startswith("## Tools\n\n")
    assert '\n\n{"name": "f", "parameters": {"type": "object"}}\n{"name":"g","parameters":{}}\n\n' in system
    assert system.endswith("Use the exact parameter names from the schemas.")


# ------------------------------------------------------------------------------ tool calls / reasoning

def test_tool_calls_round_trip():
    calls = [{"id": "a", "type": "function", "function": {"name": "run", "arguments": json.dumps(
        {"cmd": "ls && echo '<x>' </｜DSML｜parameter> done", "n": 3, "opts": {"a": [1, 2]},
         "flag": None})}},
             {"id": "b", "type": "function", "function": {"name": "say\"q", "arguments": "not json"}}]
    block = render_tool_calls(calls)
    assert "&lt;/｜DSML｜parameter> done" in block and '"n" string="false">3<' in block
    assert '"opts" string="false">{"a":[1,2]}<' in block
    content, parsed = parse_tool_calls("Sure." + block)
    assert content == "Sure."
    assert [c["function"]["name"] for c in parsed] == ["run", 'say"q']
    assert json.loads(parsed[0]["function"]["arguments"]) == json.loads(calls[0]["function"]["arguments"])
    assert json.loads(parsed[1]["function"]["arguments"]) == {"arguments": "not json"}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in parsed)
    assert len({c["id"] for c in parsed}) == 2


def test_parse_tool_calls_variants_and_failures():
    assert parse_tool_calls("just text") == ("just text", [])
    short = ('x\n\n<DSML｜tool_calls>\n<DSML｜invoke name="f">\n'
             '<DSML｜parameter name="p">v &amp; w</DSML｜parameter>\n</DSML｜invoke>\n</DSML｜tool_calls>')
    content, calls = parse_tool_calls(short)
    assert content == "x" and json.loads(calls[0]["function"]["arguments"]) == {"p": "v & w"}
    nested = ('<｜DSML｜tool_calls><｜DSML｜invoke name="f"><｜DSML｜parameter name="o">'
              '<｜DSML｜parameter name="a" string="false">1</｜DSML｜parameter>'
              '</｜DSML｜parameter></｜DSML｜invoke></｜DSML｜tool_calls>')
    assert json.loads(parse_tool_calls(nested)[1][0]["function"]["arguments"]) == {"o": {"a": 1}}
    broken = 'y<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="p" string="true">v'
    assert parse_tool_calls(broken) == (broken, [])


def test_split_reasoning():
    assert split_reasoning("think hard</think>answer") == ("think hard", "answer")
    assert split_reasoning("<think>a</think>b</think>c") == ("a", "b</think>c")
    assert split_reasoning("still thinking") == ("still thinking", "")


# ------------------------------------------------------------------------------ BPE and splitter

def naive_bpe_ids(tok: Tokenizer, piece: str) -> list[int]:
    """Spec 14.2 literally: rescan, merge the lowest-rank (leftmost) pair, repeat."""
    sym = [BYTE_TO_CHAR[b] for b in piece.encode("utf-8")]
    while True:
        best = None
        for i in range(len(sym) - 1):
            r = tok.merge_rank.get(sym[i] + " " + sym[i + 1])
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return [tok.token_to_id[s] for s in sym]
        i = best[1]
        sym[i:i + 2] = [sym[i] + sym[i + 1]]


def test_bpe_matches_naive_loop_and_regex_matches_splitter(tok):
    rnd = random.Random(7)
    corpus = " ".join(c["text"] for c in load_golden("tiny-a")["tokenization"])
    alphabet = list("ab Z09.,;:-_/\\\"'<>()[]!?\n\r\t\v\f\x00\x01\x7f") + list("àé€—“🙂日本のカ\u00a0｜")
    rx = re.compile(JOYAI_DS4_REGEX)
    for _ in range(1500):
        if rnd.random() < 0.5:
            a = rnd.randrange(len(corpus))
            text = corpus[a:a + rnd.randint(1, 40)]
        else:
            text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 25)))
        pieces = pretokenize(text)
        assert "".join(pieces) == text
        assert rx.findall(text) == pieces, repr(text)
        assert tok.encode(text) == [i for p in pieces for i in naive_bpe_ids(tok, p)], repr(text)
    long_word = "abracadabra" * 300   # one long piece: the heap path, checked once against the loop
    assert tok.encode(long_word) == naive_bpe_ids(tok, long_word)


def test_splitter_rules():
    assert pretokenize("12345 x7") == ["123", "45", " x", "7"]
    assert pretokenize("    int x") == ["   ", " int", " x"]
    assert pretokenize("a->b;\n\nc") == ["a", "->", "b", ";\n\n", "c"]
    assert pretokenize("hi  \n\n  (x)") == ["hi", "  \n\n", " ", " (", "x", ")"]
    assert pretokenize("abc日本語x") == ["abc日本語x"]
    assert pretokenize("日本語abc") == ["日本語", "abc"]


def test_encode_rendered_specials_are_atomic(tok):
    ids = tok.encode_rendered("a<think>b</think>｜DSML｜<｜User｜>")
    assert ids == tok.encode("a") + [tok.think] + tok.encode("b") + [tok.think_end, tok.dsml, tok.user]
    assert tok.think not in tok.encode("<think>")


def test_encode_speed(tok):
    text = next(p["text"] for p in load_golden("tiny-a")["prompts"] if p["name"] == "long_raw_700")
    fresh = Tokenizer(tok.tokens, tok.merges)   # cold cache
    t0 = time.perf_counter()
    ids = fresh.encode(text)
    cold = time.perf_counter() - t0
    assert len(ids) == 707 and cold < 0.1, f"cold encode took {cold * 1e3:.1f} ms"


def test_bad_input_errors(tok):
    with pytest.raises(ValueError, match="out of range"):
        tok.token_bytes(tok.n_vocab)
    with pytest.raises(ValueError, match="User"):
        Tokenizer([t for t in tok.tokens if t != "<｜User｜>"], tok.merges)


# ------------------------------------------------------------------------------ streaming decode

def test_stream_decoder_emits_only_whole_characters(tok):
    texts = [c["text"] for c in load_golden("tiny-a")["tokenization"] if c["kind"] == "text"]
    texts.append("🙂🙂 € 日本語のテキスト “x” — ñ")
    split_somewhere = False
    for text in texts:
        ids = tok.encode(text)
        split_somewhere |= any(_not_utf8(tok.token_bytes(i)) for i in ids)
        dec = StreamDecoder(tok)
        parts = [dec.push(i) for i in ids]
        assert all("\ufffd" not in p for p in parts)
        assert "".join(parts) + dec.flush() == text
    assert split_somewhere, "no token split a character: the test would prove nothing"
    dec = tok.stream_decoder()
    first = tok.encode("🙂")[0]
    assert dec.push(first) == "" and dec.flush() == "\ufffd"   # an unfinished character


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# ------------------------------------------------------------------------------ HF export

def test_export_tokenizer_loads_and_agrees(tok, tmp_path, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    model = golden_file("tiny-a.gguf")
    fake = types.ModuleType("ds4tp.synth")
    fake.default_model_path = lambda: model
    monkeypatch.setitem(sys.modules, "ds4tp.synth", fake)
    assert export_main(argparse.Namespace(dir=str(tmp_path), model=None)) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file()

    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    g = load_golden("tiny-a")
    for case in g["tokenization"]:
        if case["kind"] in ("text", "rendered") and case["name"] != "special_strings_as_text":
            assert hf.encode(case["text"], add_special_tokens=False).ids == case["ids"], case["name"]
            assert hf.decode(case["ids"], skip_special_tokens=False) == case["text"]
    # documented difference: HF always treats special strings as specials
    sst = next(c for c in g["tokenization"] if c["name"] == "special_strings_as_text")
    assert hf.encode(sst["text"], add_special_tokens=False).ids == tok.encode_rendered(sst["text"])
    for p in g["prompts"]:
        if p["mode"] == "bos_raw":
            assert hf.encode(p["text"]).ids == p["prompt_ids"], p["name"]


def test_export_transformers_chat_template(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    export_hf(tok, tmp_path)
    at = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert at.bos_token == "<｜begin▁of▁sentence｜>" and at.eos_token == "<｜end▁of▁sentence｜>"
    en = next(c for c in load_golden("tiny-a")["tokenization"] if c["name"] == "en_simple")
    assert at.encode(en["text"], add_special_tokens=False) == en["ids"]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": "", "reasoning_content": "need it", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}}]},
            {"role": "tool", "content": '{"t": 21} </tool_result>'},
            {"role": "user", "content": "Thanks"}]
    for thinking in (False, True):
        for with_tools in (None, tools):
            want = render_chat(msgs, tools=with_tools, thinking="high" if thinking else "none")
            got = at.apply_chat_template(msgs, tools=with_tools, tokenize=False,
                                         add_generation_prompt=True, thinking=thinking)
            assert got == want
    simple = msgs[:2]
    assert at.apply_chat_template(simple, tokenize=False, add_generation_prompt=True) == render_chat(simple)
    ids = at.apply_chat_template(simple, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tok.encode_rendered(render_chat(simple))


def test_export_agrees_on_random_text(tok):
    tokenizers = pytest.importorskip("tokenizers")
    from ds4tp.tokenizer import hf_tokenizer_json
    hf = tokenizers.Tokenizer.from_str(json.dumps(hf_tokenizer_json(tok)))
    rnd = random.Random(3)
    corpus = " ".join(p["text"] for p in load_golden("tiny-a")["prompts"])
    alphabet = list("ab Z09.,;:-_/\\\"'<>()!?\n\r\t\v\f\x01\x7f") + list("àé€—“🙂日本のカ\u00a0")
    for _ in range(300):
        if rnd.random() < 0.5:
            a = rnd.randrange(len(corpus))
            text = corpus[a:a + rnd.randint(1, 80)]
        else:
            text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 25)))
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text), repr(text)
