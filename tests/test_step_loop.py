"""The step loop's objects on the CPU: a step's inputs (engine.runner.inputs), the runner's one
entry point and its handles, and the stepping chosen from `async_scheduling` (engine.step)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM
from engine.request import Request
from engine.runner.handle import CompletedStep, LaunchedStep
from engine.runner.inputs import prepare_batch
from engine.sampling_params import SamplingParams
from engine.scheduler.output import ScheduledRequest
from engine.step import AsyncStepper, SyncStepper

BLOCK = 16


def item(
    rid: str, prompt_len: int, computed: int, num_tokens: int, outputs: int = 0, **params
) -> ScheduledRequest:
    request = Request(
        request_id=rid,
        prompt_token_ids=[100 + i for i in range(prompt_len)],
        params=SamplingParams(**params),
        max_tokens=8,
        output_token_ids=[900 + i for i in range(outputs)],
    )
    request.num_computed_tokens = computed
    blocks = list(range(10, 10 + -(-(computed + num_tokens) // BLOCK)))
    return ScheduledRequest(request, num_tokens, blocks)


def test_a_steps_inputs_put_decodes_first_and_sample_each_chunks_last_row():
    chunk = item("chunk", 40, 16, 24)  # ends its prompt: samples
    decode = item("decode", 20, 19, 1)
    partial = item("partial", 40, 0, 8, prompt_logprobs=2)  # samples nothing; scores 8 rows
    batch = prepare_batch([chunk, decode, partial], BLOCK, 1000, torch.device("cpu"))
    assert batch.sample_rows == [decode, chunk]
    # rows: decode (1), chunk (24), partial (8)
    assert batch.input_ids.tolist() == [119] + list(range(116, 140)) + list(range(100, 108))
    assert batch.positions.tolist() == [19] + list(range(16, 40)) + list(range(8))
    assert batch.attn_meta.slot_mapping[:2].tolist() == [11 * BLOCK + 3, 11 * BLOCK]
    assert batch.logits_indices.tolist() == [0, 24] + list(range(25, 33))
    [piece] = batch.prompt_slices
    assert piece.rows == slice(2, 10) and piece.targets == list(range(101, 109))


def test_picked_rows_take_their_input_from_the_previous_steps_tokens():
    pending = item("a", 5, 5, 1)  # its input token was sampled on the device, unread
    decode = item("b", 7, 7, 1, outputs=1)
    previous = torch.tensor([55, 66, 77])  # (N,) the launched step's argmax
    batch = prepare_batch([pending, decode], BLOCK, 1000, torch.device("cpu"), [2, None], previous)
    assert batch.input_ids.tolist() == [77, 900]
    assert batch.sample_rows == [pending, decode]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("llama"))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_runner_gives_the_same_tokens_launched_ahead_or_run_to_completion(
    model_dir, async_scheduling
):
    llm = LLM(model_dir, device="cpu", async_scheduling=async_scheduling)
    core = llm.engine.core
    expected = AsyncStepper if async_scheduling else SyncStepper
    assert type(core.stepper) is expected
    for i in range(3):
        prompt = [3 + 5 * i + j for j in range(9 + i)]
        core.add_request(Request(f"r{i}", prompt, SamplingParams(temperature=0), max_tokens=4))
    scheduled = core.scheduler.schedule()
    completed = core.runner.run(scheduled)
    launched = core.runner.run(scheduled, ahead=True)  # writes the same KV again
    assert isinstance(completed, CompletedStep) and not completed.ahead
    assert isinstance(launched, LaunchedStep) and launched.ahead
    assert launched.result().sampled == completed.result().sampled
    assert len(completed.result().sampled) == 3
    core.abort_requests([f"r{i}" for i in range(3)])
    llm.check_integrity()
