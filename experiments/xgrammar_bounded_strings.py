"""Mask-fill cost of length-bounded JSON strings under xgrammar, by how the string is written, on
the CPU (the fill is host work): bench.structured_outputs' SCHEMA (strings with maxLength 16).

    chain            what the xgrammar backend compiles now (engine.structured.xgrammar_strings)
    pattern          what it compiled before: the pattern `^C{0,16}$` of JSON string characters
    native           xgrammar's own maxLength, `[^"\\\r\n]{0,16}` (lets control characters in)
    no_max_length    the strings without maxLength (xgrammar's unbounded string)
    guidance         llguidance on the same schema (engine.structured.guidance_backend)

Each is compiled (process CPU ms, one thread: others' load moves wall time) by a compiler that
has compiled nothing else, and its mask is filled for one row token by token along two answers:
bench.structured_outputs' MASK_DOCUMENT (strings of at most 12 characters), and one whose
strings reach the bound (16); for llguidance without the spaces after ',' and ':' (its compact
JSON has none). Vocabularies: bench.byte_level_tokenizer's 128,256 tokens (the 1B shape's) and
the demo model's (SmolLM2, 49,152).

    python -m experiments.xgrammar_bounded_strings [--out PATH.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.machine import describe_machine, git_commit
from bench.structured_outputs import MASK_DOCUMENT, SCHEMA
from engine.structured.backend import TokenizerData
from engine.structured.bitmask import allocate_bitmask

FULL_DOCUMENT = (
    '[{"name": "Ada Lovelace Byr", "age": 36, "city": "London Marylebon", "id": 7}, '
    '{"name": "Grace Brewster H", "age": 85, "city": "Arlington Virgin", "id": 8}, {"name": "Al'
)
FORMS = ("chain", "pattern", "native", "no_max_length", "guidance")


def vocabularies(scratch: Path) -> dict[str, TokenizerData]:
    from transformers import AutoTokenizer

    from bench.byte_level_tokenizer import write_byte_level_tokenizer
    from engine.models.demo import ensure_demo_model

    write_byte_level_tokenizer(scratch, 128256)
    byte_level = AutoTokenizer.from_pretrained(scratch)
    demo = AutoTokenizer.from_pretrained(ensure_demo_model(progress=False))
    return {
        "byte_level_128256": TokenizerData(byte_level, 128256, (2,)),
        "demo_smollm2_49152": TokenizerData(demo, len(demo), (demo.eos_token_id,)),
    }


def compile_form(form: str, backends: dict[str, Any]) -> Any:
    """The form's compiled grammar (an object whose .matcher() fills masks), with `backends`
    (xgrammar's and llguidance's over one vocabulary, built beforehand: untimed)."""
    from engine.structured.xgrammar_backend import XgrammarGrammar, bounded_strings_as_patterns
    from engine.structured.xgrammar_strings import json_schema_as_ebnf

    schema = json.loads(json.dumps(SCHEMA))
    if form == "no_max_length":
        for prop in schema["items"]["properties"].values():
            prop.pop("maxLength", None)
    if form == "guidance":
        from common.structured_outputs import StructuredOutputsParams

        so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        return backends["guidance"].compile(so)
    compiler = backends["xgrammar"]._compiler
    if form == "chain":
        ebnf = json_schema_as_ebnf(schema, any_whitespace=False)
        assert ebnf is not None
        return XgrammarGrammar(compiler.compile_grammar(ebnf))
    if form == "pattern":
        schema = bounded_strings_as_patterns(schema)
    return XgrammarGrammar(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))


def fill_ms(grammar: Any, ids: list[int], vocab_size: int) -> dict[str, float]:
    """Host ms of each fill of one row along `ids`: mean, median, max."""
    matcher, bitmask, times = grammar.matcher(), allocate_bitmask(1, vocab_size), []
    for token in ids:
        start = time.perf_counter()
        matcher.fill_bitmask(bitmask, 0)
        times.append(1000 * (time.perf_counter() - start))
        assert matcher.accept_token(token), f"token {token} refused"
    return {"mean_ms": statistics.mean(times), "median_ms": statistics.median(times),
            "max_ms": max(times)}  # fmt: skip


def measure(data: TokenizerData) -> dict[str, Any]:
    from engine.structured.guidance_backend import GuidanceBackend
    from engine.structured.xgrammar_backend import XgrammarBackend

    documents = {"mask_document": MASK_DOCUMENT, "full_strings": FULL_DOCUMENT}
    ids = {k: data.tokenizer.encode(d, add_special_tokens=False) for k, d in documents.items()}
    out: dict[str, Any] = {"document_tokens": {k: len(v) for k, v in ids.items()}}
    # llguidance's compact JSON has no space after ',' and ':'
    compact = {k: d.replace(", ", ",").replace(": ", ":") for k, d in documents.items()}
    compact_ids = {k: data.tokenizer.encode(d, add_special_tokens=False)
                   for k, d in compact.items()}  # fmt: skip
    for form in FORMS:
        # fresh backends per form: xgrammar's compiler reuses the masks of rules it compiled
        backends = {"xgrammar": XgrammarBackend(data), "guidance": GuidanceBackend(data)}
        start = time.process_time()
        grammar = compile_form(form, backends)
        compile_ms = 1000 * (time.process_time() - start)
        along = compact_ids if form == "guidance" else ids
        fills = {k: fill_ms(grammar, v, data.vocab_size) for k, v in along.items()}
        out[form] = {"compile_ms": compile_ms, **fills}
        print(form, json.dumps(out[form]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    out = Path("bench/results/xgrammar_bounded_strings_cpu.json")
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {"benchmark": "xgrammar_bounded_strings", "schema": SCHEMA,
                              "documents": {"mask_document": MASK_DOCUMENT,
                                            "full_strings": FULL_DOCUMENT}}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        for name, data in vocabularies(Path(scratch)).items():
            print(name, flush=True)
            result[name] = measure(data)
    from importlib.metadata import version

    result.update(machine=describe_machine(), code=git_commit(), xgrammar=version("xgrammar"),
                  command="python -m experiments.xgrammar_bounded_strings")  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
