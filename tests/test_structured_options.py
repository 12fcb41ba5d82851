"""The structured-outputs engine options: the `--structured-outputs-*` flags on workers, `baton
serve` (its --config YAML too) and `baton generate`, the same keyword arguments on `LLM`, vLLM's
`--structured-outputs-config` JSON; `disable_fallback` under auto; the compile timeout (a real
backend whose compile is slower than the timeout: the request ends with an error naming its
constraint, the plain request beside it completes, the compile runs on and is cached); and the
compile statistics the worker's metrics read (the backend that served each request)."""

from __future__ import annotations

import argparse
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from common.sampling_params import SamplingParams
from common.structured_outputs import StructuredOutputsParams
from engine import LLM
from engine.config import StructuredOutputsConfig
from engine.structured import registry
from engine.structured.backend import StructuredOutputBackend
from engine.structured.xgrammar_backend import XgrammarBackend
from launcher import cli
from worker_common.engine_args import add_worker_args, engine_config, engine_kwargs

CASE_INSENSITIVE = "(?i)ab{1,3}c"  # xgrammar cannot compile it; guidance can


def _worker_args(*words: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_worker_args(parser)
    return parser.parse_args(list(words))


def _refused(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """argparse's complaint about worker flags `words`."""
    with pytest.raises(SystemExit):
        _worker_args("--model", "m", *words)
    return capsys.readouterr().err


# -- flags and keyword arguments --------------------------------------------------------------


def test_worker_flags_reach_the_structured_outputs_config(tiny_model) -> None:
    model = str(tiny_model("qwen2"))
    assert engine_config(_worker_args("--model", model)).structured_outputs == (
        StructuredOutputsConfig()
    )
    args = _worker_args("--model", model, "--structured-outputs-backend", "guidance",
                        "--structured-outputs-disable-fallback",
                        "--structured-outputs-compile-timeout", "2.5")  # fmt: skip
    assert engine_config(args).structured_outputs == StructuredOutputsConfig(
        "guidance", disable_fallback=True, compile_timeout_s=2.5
    )
    vllm_json = '{"backend": "xgrammar", "disable_fallback": true}'
    args = _worker_args("--model", model, "--structured-outputs-config", vllm_json)
    config = engine_config(args).structured_outputs
    assert (config.backend, config.disable_fallback) == ("xgrammar", True)
    both = ("--structured-outputs-backend", "guidance", "--structured-outputs-config", vllm_json)
    with pytest.raises(ValueError, match="structured_outputs_config.backend .* contradicts"):
        engine_config(_worker_args("--model", model, *both))


def test_bad_flags_are_refused_naming_what_is_wrong(capsys) -> None:
    err = _refused(capsys, "--structured-outputs-backend", "nope")
    assert "invalid choice: 'nope'" in err
    assert "'xgrammar', 'guidance', 'outlines', 'lm-format-enforcer', 'auto'" in err
    err = _refused(capsys, "--structured-outputs-config", '{"backend": "guidance", "fast": 1}')
    assert "unknown key(s) 'fast'; known: backend, disable_fallback" in err
    err = _refused(capsys, "--structured-outputs-config", '{"backend": "nope"}')
    assert "structured_outputs_config.backend must be one of" in err
    err = _refused(capsys, "--structured-outputs-config", '{"disable_fallback": "yes"}')
    assert "structured_outputs_config.disable_fallback must be true or false" in err
    assert "not valid JSON" in _refused(capsys, "--structured-outputs-config", "{backend}")
    for seconds in ("0", "-1", "soon", "nan"):
        err = _refused(capsys, "--structured-outputs-compile-timeout", seconds)
        assert "not a number of seconds > 0" in err, seconds


def test_backend_choices_are_the_registry_names_at_parse_time(monkeypatch, capsys) -> None:
    assert "mine" in _refused(capsys, "--structured-outputs-backend", "mine")
    monkeypatch.setitem(registry._BACKENDS, "mine", XgrammarBackend)
    args = _worker_args("--model", "m", "--structured-outputs-backend", "mine")
    assert args.structured_outputs_backend == "mine"


def test_serve_forwards_the_flags_and_takes_them_from_its_config_file(
    tmp_path: Path, tiny_model
) -> None:
    from launcher.serve import cluster_spec

    model = str(tiny_model("qwen2"))
    assert not [w for w in cluster_spec(cli.parse_args(["serve", "--model", model])).worker_args
                if "structured" in w]  # fmt: skip
    config = tmp_path / "baton.yaml"
    config.write_text(yaml.safe_dump({
        "structured-outputs-backend": "guidance",
        "structured_outputs_compile_timeout": 4,
        "structured_outputs_config": {"disable_fallback": True},  # a mapping: its JSON
    }))  # fmt: skip
    argv = ["serve", "--config", str(config), "--model", model, "--structured-outputs-backend",
            "auto"]  # fmt: skip
    words = cluster_spec(cli.parse_args(argv)).worker_args
    assert words[words.index("--structured-outputs-compile-timeout") + 1] == "4.0"
    assert words[words.index("--structured-outputs-config") + 1] == '{"disable_fallback":true}'
    assert "--structured-outputs-backend" not in words  # the command line's auto: the default
    worker = engine_config(_worker_args("--model", model, *words)).structured_outputs
    assert worker == StructuredOutputsConfig(disable_fallback=True, compile_timeout_s=4.0)


def test_generate_passes_the_flags_to_llm(tiny_model) -> None:
    argv = ["generate", "--structured-outputs-backend", "guidance",
            "--structured-outputs-compile-timeout", "3", "--structured-outputs-config",
            '{"disable_fallback": false}', "hi"]  # fmt: skip
    kwargs = engine_kwargs(cli.parse_args(argv))
    assert {k: v for k, v in kwargs.items() if k.startswith("structured")} == {
        "structured_outputs_backend": "guidance",
        "structured_outputs_disable_fallback": False,
        "structured_outputs_compile_timeout": 3.0,
        "structured_outputs_config": '{"disable_fallback":false}',
    }
    llm = LLM(str(tiny_model("qwen2")), **{**kwargs, "num_kv_blocks": 16})
    assert llm.engine.config.structured_outputs == StructuredOutputsConfig(
        "guidance", compile_timeout_s=3.0
    )


def test_the_llm_refuses_bad_values_naming_them(tiny_model) -> None:
    model = str(tiny_model("qwen2"))
    cases = [
        ({"structured_outputs_compile_timeout": 0}, "structured_outputs_compile_timeout must"),
        ({"structured_outputs_compile_timeout": True}, "structured_outputs_compile_timeout must"),
        ({"structured_outputs_disable_fallback": "no"}, "structured_outputs_disable_fallback"),
        ({"structured_outputs_backend": "nope"}, "structured_outputs_backend must be one of"),
        ({"structured_outputs_config": {"backend": "guidance", "enable_in_reasoning": True}},
         "unknown key(s) 'enable_in_reasoning'"),
        ({"structured_outputs_config": "[1]"}, "structured_outputs_config must be a JSON object"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            LLM(model, **kwargs)


# -- disable_fallback --------------------------------------------------------------------------


def test_auto_without_fallback_is_xgrammar_alone(tiny_model) -> None:
    """vLLM's disable_fallback: what xgrammar cannot compile fails with xgrammar's own error
    (with fallback on, guidance takes it: test_structured_outputs' auto fallback test)."""
    llm = LLM(str(tiny_model("qwen2")), num_kv_blocks=64,
              structured_outputs_config={"disable_fallback": True})  # fmt: skip
    so = StructuredOutputsParams(regex=CASE_INSENSITIVE)
    message = "structured_outputs.regex: the xgrammar backend cannot compile it"
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(
            [[1, 2, 3]], SamplingParams(max_tokens=20, structured_outputs=so), use_tqdm=False
        )
    ok = SamplingParams(max_tokens=20, structured_outputs=StructuredOutputsParams(choice=["ok"]))
    assert llm.generate([[1, 2, 3]], ok, use_tqdm=False)[0].outputs[0].text == "ok"
    stats = llm.engine.core.structured.stats
    assert (stats.failures, stats.compiles, stats.requests) == (1, {"xgrammar": 1}, {"xgrammar": 1})
    llm.check_integrity()


# -- statistics -------------------------------------------------------------------------------


def test_stats_name_the_backend_that_served_each_request_under_auto(tiny_model) -> None:
    llm = LLM(str(tiny_model("qwen2")), num_kv_blocks=64)
    structured = llm.engine.core.structured
    heard: list[tuple[str, float, str]] = []
    structured.on_compiled = lambda grammar, seconds: heard.append(
        (grammar.backend, seconds, threading.current_thread().name)
    )
    specs = [
        StructuredOutputsParams(regex="[a-c]{2}"),
        StructuredOutputsParams(regex=CASE_INSENSITIVE),  # guidance, after xgrammar refused it
        StructuredOutputsParams(regex="[a-c]{2}"),  # cached
    ]
    for so in specs:
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=20, structured_outputs=so))
        assert out[0].outputs[0].finish_reason == "stop"
    stats = structured.stats
    assert (stats.hits, stats.misses, stats.failures, stats.timeouts) == (1, 2, 0, 0)
    assert stats.compiles == {"xgrammar": 1, "guidance": 1}
    assert stats.requests == {"xgrammar": 2, "guidance": 1}
    assert [backend for backend, _, _ in heard] == ["xgrammar", "guidance"]
    assert all(0 < s < 60 and t.startswith("grammar-compile") for _, s, t in heard)
    assert stats.compile_seconds == pytest.approx(sum(s for _, s, _ in heard))
    llm.check_integrity()


# -- the compile timeout ----------------------------------------------------------------------


class SlowBackend(StructuredOutputBackend):
    """xgrammar after a pause of `DELAY_S` per compile: a compile slower than the timeout."""

    name = "slow"
    DELAY_S = 2.0

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.inner = XgrammarBackend(tokenizer)

    def compile(self, params):
        time.sleep(self.DELAY_S)
        return self.inner.compile(params)


@pytest.fixture
def slow_backend() -> Iterator[str]:
    registry.register_backend(SlowBackend.name, SlowBackend)
    yield SlowBackend.name
    registry._BACKENDS.pop(SlowBackend.name, None)


def test_a_grammar_slower_than_the_timeout_ends_its_request_only(tiny_model, slow_backend) -> None:
    timeout_s = 0.2
    llm = LLM(str(tiny_model("qwen2")), num_kv_blocks=64, structured_outputs_backend=slow_backend,
              structured_outputs_compile_timeout=timeout_s)  # fmt: skip
    engine, stats = llm.engine, llm.engine.core.structured.stats
    so = StructuredOutputsParams(choice=["left", "right"])
    engine.add_request("plain", [1, 2, 3], SamplingParams(max_tokens=12, ignore_eos=True))
    start = time.monotonic()
    engine.add_request("late", [4, 5, 6], SamplingParams(max_tokens=20, structured_outputs=so))
    grammar = engine.core.scheduler.requests["late"].grammar
    assert grammar is not None
    errors, finished = [], {}
    while engine.has_unfinished_requests():
        try:
            finished.update({s.request_id: s for s in engine.step() if s.finished})
        except ValueError as e:
            errors.append((str(e), time.monotonic() - start, grammar.future.done()))
    [(message, after_s, compiled)] = errors
    assert message == "structured_outputs.choice: grammar compile timed out after 0.2 s"
    assert timeout_s <= after_s < SlowBackend.DELAY_S and not compiled  # the timeout's doing
    assert set(finished) == {"plain"}
    assert len(finished["plain"].to_output().outputs[0].token_ids) == 12
    engine.check_integrity(expect_all_free=True)
    assert (stats.timeouts, stats.failures, stats.requests) == (1, 0, {})

    grammar.future.result(timeout=30)  # the compile ran on; its grammar is cached
    assert engine.core.structured.compiler.num_cached() == 1
    out = llm.generate([[4, 5, 6]], SamplingParams(max_tokens=20, structured_outputs=so))
    assert out[0].outputs[0].text in ("left", "right")  # a hit: ready at once, no timeout
    assert (stats.hits, stats.misses, stats.timeouts, stats.requests) == (1, 1, 1, {"xgrammar": 1})
    llm.check_integrity()


def test_a_decode_engine_whose_kv_arrives_before_the_grammar_does_not_block_on_it(
    tiny_model, slow_backend
) -> None:
    """Disaggregated decode: the prompt's KV (and the first token) arrive while the grammar
    still compiles here. The request waits for its grammar holding its blocks, the step never
    blocks on the compile, and the timeout ends it; the plain request decodes on."""
    from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from engine.core import EngineCore
    from engine.kv_connector import KVConnectorConfig, make_kv_connector
    from engine.request import Request, RequestStatus

    config = EngineConfig(
        ModelConfig.from_pretrained(tiny_model("qwen2")),
        CacheConfig(num_blocks=64),
        SchedulerConfig(max_num_batched_tokens=32),
        structured_outputs=StructuredOutputsConfig(slow_backend, compile_timeout_s=0.2),
    )
    receiver = make_kv_connector(KVConnectorConfig("receive"), config)
    decode = EngineCore(config, receiver)
    eos = tuple(config.model.eos_token_ids)
    so = StructuredOutputsParams(choice=["left", "right"])
    structured = SamplingParams(max_tokens=20, structured_outputs=so)
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    start = time.monotonic()
    for rid, params in (("late", structured), ("plain", plain)):
        receiver.reserve(decode, Request(rid, list(range(3, 40)), params, params.max_tokens, eos))
        receiver.kv_arrived(rid, [7])
    late = decode.scheduler.requests["late"]
    outputs: dict[str, list] = {}
    while decode.has_work():
        for out in decode.step():
            outputs.setdefault(out.request_id, []).append((out, time.monotonic() - start))
        if "plain" in outputs:  # the first decode step ran while the grammar compiled
            assert late.status == RequestStatus.WAITING_FOR_GRAMMAR or late.is_finished
    [(failed, after_s)] = outputs["late"]
    assert failed.error == "structured_outputs.choice: grammar compile timed out after 0.2 s"
    assert after_s < SlowBackend.DELAY_S and not late.grammar.future.done()
    assert sum(len(out.new_token_ids) for out, _ in outputs["plain"]) == 7  # 1 came with the KV
    decode.check_integrity(expect_all_free=True)
