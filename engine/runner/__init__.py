"""The model runner's parts: what `engine.model_runner.ModelRunner.run` is built of.

handle.py   StepHandle: a step the runner started; `result()` gives its sampled tokens
            (CompletedStep: ran to completion; LaunchedStep: launched ahead, read later)
inputs.py   a step's ragged batch as tensors (token ids, positions, slots, block tables)
forward.py  the forward pass as a strategy chosen per step: a CUDA graph replay
            (GraphForward) or an eager pass (EagerForward; CpuForward on the CPU)
sample.py   sampled tokens and logprobs of a step's logits rows
"""
